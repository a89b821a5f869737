"""Data helpers: BBC News as classification or language-model blocks, and length buckets for torch.compile."""

from __future__ import annotations

from .bbc import bbc_classification_data, bbc_lm_data, lm_blocks
from .buckets import BucketPadCollator, bucket_for, bucket_sentence_transformer, default_buckets, pad_to_bucket

__all__ = [
    "BucketPadCollator",
    "bbc_classification_data",
    "bbc_lm_data",
    "bucket_for",
    "bucket_sentence_transformer",
    "default_buckets",
    "lm_blocks",
    "pad_to_bucket",
]
