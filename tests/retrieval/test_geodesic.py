from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_ext.retrieval import GeodesicSimilarity


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _knn_graph(x, k: int) -> np.ndarray:
    """Dense symmetric kNN graph from brute-force cosines: weight 1 - cos, inf where no edge (either end choosing
    the other makes an edge); neighbours ranked by cosine, ties to the lower index, self excluded."""
    u = _unit(x)
    cos = u @ u.T
    n = len(u)
    graph = np.full((n, n), np.inf)
    for i in range(n):
        for j in sorted((j for j in range(n) if j != i), key=lambda j: (-cos[i, j], j))[:k]:
            graph[i, j] = graph[j, i] = 1 - cos[i, j]
    return graph


def _reference_distances(x, k: int) -> tuple[np.ndarray, int]:
    """Floyd-Warshall on the kNN graph; between components (no path) the largest finite path length plus the
    direct 1 - cos. Returns the distances and the number of components."""
    d = _knn_graph(x, k)
    np.fill_diagonal(d, 0.0)
    for via in range(len(d)):
        d = np.minimum(d, d[:, via : via + 1] + d[via : via + 1, :])
    reachable = np.isfinite(d)
    components = len({tuple(row) for row in reachable})  # points of a component reach exactly the same points
    u = _unit(x)
    d[~reachable] = d[reachable].max() + (1 - u @ u.T)[~reachable]
    return d, components


def _reference_query_similarity(queries, corpus, distances: np.ndarray, k: int) -> np.ndarray:
    """-min over the query's k nearest corpus points i (by cosine, ties to the lower index) of
    1 - cos(q, i) + D(i, .)."""
    cos = _unit(queries) @ _unit(corpus).T
    out = np.empty((len(cos), len(distances)))
    for row, values in enumerate(cos):
        nearest = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
        out[row] = -np.min([1 - values[i] + distances[i] for i in nearest], axis=0)
    return out


def _clusters(seed: int) -> torch.Tensor:
    """Three tight clusters far apart on the sphere: their 3-NN graphs never link them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(6)[:3] * 20
    return torch.cat([torch.randn(8, 6, generator=g) + centre for centre in centres])


@pytest.mark.parametrize(
    ("corpus", "k", "connected"),
    [
        (torch.randn(40, 6, generator=torch.Generator().manual_seed(0)), 4, True),
        (torch.randn(30, 5, generator=torch.Generator().manual_seed(1)), 3, True),
        (_clusters(2), 3, False),
        (torch.randn(30, 5, generator=torch.Generator().manual_seed(1)), 2, False),  # falls apart at k = 2
    ],
)
def test_geodesic_distances_equal_floyd_warshall_on_a_brute_force_knn_graph(corpus, k: int, connected: bool) -> None:
    expected, components = _reference_distances(corpus.numpy(), k)
    assert (components == 1) == connected  # both kinds of corpus are covered
    geodesic = GeodesicSimilarity(k=k, chunk_size=7, show_progress_bar=False).fit(corpus)
    assert geodesic.n_components == components
    graph = geodesic.graph(corpus).toarray()
    reference_graph = _knn_graph(corpus.numpy(), k)
    np.testing.assert_array_equal(graph > 0, np.isfinite(reference_graph))  # the same edges
    np.testing.assert_allclose(graph[graph > 0], reference_graph[graph > 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(geodesic.distances, expected, rtol=1e-5, atol=1e-6)
    a, b = np.array([0, 3, 5, 17, 20]), np.array([9, 3, 22, 2, 11])
    np.testing.assert_allclose(geodesic.pair_similarity(a, b), -expected[a, b], rtol=1e-5, atol=1e-6)
    queries = torch.randn(4, corpus.shape[1], generator=torch.Generator().manual_seed(9)) + corpus[[0, 9, 17, 23]]
    np.testing.assert_allclose(geodesic.query_similarity(queries),
                               _reference_query_similarity(queries.numpy(), corpus.numpy(), expected, k), rtol=1e-5,
                               atol=1e-6)  # fmt: skip


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
