from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import shortest_path

from hf_ext.retrieval import GeodesicSimilarity


def test_geodesic_distances_equal_scipys_on_the_knn_graph() -> None:
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    geodesic = GeodesicSimilarity(k=4, chunk_size=7, show_progress_bar=False).fit(x)
    graph = geodesic.graph(x)
    expected = shortest_path(graph.toarray(), method="FW", directed=False)
    if np.isfinite(expected).all():
        np.testing.assert_allclose(geodesic.distances, expected, rtol=1e-5)  # Dijkstra vs Floyd-Warshall sums
    np.testing.assert_allclose(geodesic.pair_similarity([0, 3], [5, 9]), -expected[[0, 3], [5, 9]], rtol=1e-5)
    assert (graph != graph.T).nnz == 0  # symmetric


def test_near_neighbours_keep_their_base_distance_and_far_points_go_around() -> None:
    angles = np.linspace(0, np.pi, 30)  # points on a half circle: the geodesic follows the arc
    x = torch.tensor(np.stack([np.cos(angles), np.sin(angles), np.full(30, 0.05)], 1), dtype=torch.float32)
    geodesic = GeodesicSimilarity(k=2, show_progress_bar=False).fit(x)
    xn = x.double() / x.double().norm(dim=1, keepdim=True)  # the graph's edges are exact (float64) 1 - cos
    base = (1 - xn @ xn.T).numpy()
    assert geodesic.distances[0, 1] == pytest.approx(base[0, 1], rel=1e-6)
    # the two ends: the path follows the arc, step by step (1 - cos is not a metric: many small steps sum to less
    # than the direct 1 - cos of the ends, which the kNN graph never links)
    arc = sum(base[i, i + 1] for i in range(29))
    assert geodesic.distances[0, 29] == pytest.approx(arc, rel=1e-5) and arc < base[0, 29]


def test_a_disconnected_corpus_gives_finite_ordered_scores() -> None:
    a = torch.randn(10, 5, generator=torch.Generator().manual_seed(1)) + torch.tensor([20.0, 0, 0, 0, 0])
    b = torch.randn(10, 5, generator=torch.Generator().manual_seed(2)) + torch.tensor([0, 0, 0, 0, 20.0])
    geodesic = GeodesicSimilarity(k=3, show_progress_bar=False).fit(torch.cat([a, b]))
    assert geodesic.n_components >= 2
    distances = geodesic.distances
    assert np.isfinite(distances).all() and not np.isnan(distances).any()
    within = distances[:10, :10].max()
    assert distances[:10, 10:].min() > within  # every cross-component pair is farther than every connected one
    scores = geodesic.query_similarity(a[:2] + 0.01)
    assert np.isfinite(scores).all() and scores.shape == (2, 20)


def test_query_similarity_attaches_through_the_nearest_points() -> None:
    x = torch.randn(25, 4, generator=torch.Generator().manual_seed(3))
    geodesic = GeodesicSimilarity(k=5, show_progress_bar=False).fit(x)
    scores = geodesic.query_similarity(x[:3])  # a query equal to a corpus point: its own distances
    np.testing.assert_allclose(scores, -geodesic.distances[:3], atol=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: GeodesicSimilarity(k=0), "`k`"),
        (lambda: GeodesicSimilarity(metric="dot"), "`metric`"),
        (lambda: GeodesicSimilarity(k=5, show_progress_bar=False).fit(torch.randn(5, 3)), "`k`"),
        (lambda: GeodesicSimilarity(show_progress_bar=False).pair_similarity([0], [1]), "fit"),
        (
            lambda: (
                GeodesicSimilarity(k=2, show_progress_bar=False)
                .fit(torch.randn(6, 3))
                .query_similarity(torch.randn(1, 4))
            ),
            "dimension",
        ),
    ],
)
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
