"""Generation: NBCE (many contexts beyond the model's window) as a logits processor and a `generate` wrapper."""

from __future__ import annotations

from .nbce import NBCELogitsProcessor, nbce_batch, nbce_combine, nbce_generate, split_into_windows

__all__ = ["NBCELogitsProcessor", "nbce_batch", "nbce_combine", "nbce_generate", "split_into_windows"]
