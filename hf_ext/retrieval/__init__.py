"""Retrieval geometry: CUR search for cross-encoders (ANNCUR), hubness measures and reductions, geodesic similarity."""

from __future__ import annotations

from .cur import CURIndex, biencoder_rerank_search, cur_item_matrix, kmeans_anchor_ids, top_k_overlap
from .geodesic import GeodesicSimilarity
from .hubness import (
    csls_score_function,
    csls_scores,
    hub_sample,
    hubness_report,
    k_occurrence,
    local_scaling,
    local_scaling_score_function,
    mutual_proximity,
    mutual_proximity_score_function,
)
from .knn import nearest_neighbours, neighbour_sets

__all__ = [
    "CURIndex",
    "GeodesicSimilarity",
    "biencoder_rerank_search",
    "csls_score_function",
    "csls_scores",
    "cur_item_matrix",
    "hub_sample",
    "hubness_report",
    "k_occurrence",
    "kmeans_anchor_ids",
    "local_scaling",
    "local_scaling_score_function",
    "mutual_proximity",
    "mutual_proximity_score_function",
    "nearest_neighbours",
    "neighbour_sets",
    "top_k_overlap",
]
