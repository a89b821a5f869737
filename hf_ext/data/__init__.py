"""Data helpers shared by the recipes and benchmarks: BBC News as classification or language-model blocks."""

from __future__ import annotations

from .bbc import bbc_classification_data, bbc_lm_data, lm_blocks

__all__ = ["bbc_classification_data", "bbc_lm_data", "lm_blocks"]
