"""Retrieval geometry: CUR search for cross-encoders (ANNCUR)."""

from __future__ import annotations

from .cur import CURIndex, biencoder_rerank_search, cur_item_matrix, kmeans_anchor_ids, top_k_overlap

__all__ = ["CURIndex", "biencoder_rerank_search", "cur_item_matrix", "kmeans_anchor_ids", "top_k_overlap"]
