"""Generation: NBCE (many contexts beyond the model's window) as a logits processor, a `generate` wrapper, and a
`custom_generate` folder for the Hub."""

from __future__ import annotations

from .nbce import (
    NBCEContextCache,
    NBCELogitsProcessor,
    nbce_batch,
    nbce_combine,
    nbce_custom_generate_path,
    nbce_generate,
    split_into_windows,
)

__all__ = [
    "NBCEContextCache",
    "NBCELogitsProcessor",
    "nbce_batch",
    "nbce_combine",
    "nbce_custom_generate_path",
    "nbce_generate",
    "split_into_windows",
]
