"""GeodesicSimilarity: trust embeddings only locally, and measure longer distances along a kNN graph.

A trained similarity is reliable between near neighbours only; far apart, "0.10 vs 0.11" means nothing. The
geodesic distance is the shortest path through the symmetric k-nearest-neighbour graph of a corpus (edge weight:
the base distance, ``1 - cos``), computed with `scipy.sparse.csgraph`; the similarity is ``-distance`` (higher is
nearer; only the order matters for ranking and Spearman).

A construction fact: a query's geodesic top-1 is always its cosine top-1 (the cosine-nearest corpus point is reached
with no path at all, and every other point lies beyond one of the query's attachment points), so recall@1 cannot
tell the two apart; the ranks below it, pair similarities and medoids (a set's most central point) can differ.

Disconnected graphs: a kNN graph may fall apart into components. Between components there is no path, so the
distance is defined as the largest finite geodesic distance in the corpus plus the direct base distance of the
pair: always finite, every cross-component pair farther than every connected one, ordered by the base distance.

Example:

```python
>>> from sentence_transformers import SentenceTransformer
>>> from hf_ext import load_stsb, minilm_path
>>> from hf_ext.retrieval import GeodesicSimilarity
>>> model = SentenceTransformer(str(minilm_path()))
>>> corpus = model.encode(list(dict.fromkeys(load_stsb("test")["sentence1"]))[:50])  # (50, 384)
>>> geodesic = GeodesicSimilarity(k=5, show_progress_bar=False).fit(corpus)
>>> geodesic.pair_similarity([0, 1], [5, 9]).round(2)  # corpus pairs: minus the shortest-path length
array([-0.82, -1.32])
>>> query = model.encode(["A man is playing a guitar."])
>>> similarity = geodesic.query_similarity(query)  # (1, 50), through its k nearest
>>> bool(similarity.argmax() == (query @ corpus.T).argmax())  # the top-1 is the cosine top-1 (see above)
True

```
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, shortest_path
from tqdm.auto import tqdm

from .knn import as_matrix, nearest_neighbours, prepare


class GeodesicSimilarity:
    """Shortest-path (geodesic) similarity on the symmetric kNN graph of a corpus.

    Args:
        k (`int`, *optional*, defaults to `10`): neighbours per point in the graph (and attachment points of a query).
        metric (`str`, *optional*, defaults to `"cosine"`): the base similarity (``cosine``: distance ``1 - cos``).
        chunk_size (`int`, *optional*, defaults to `512`): source points per shortest-path batch (progress bar unit).
        show_progress_bar (`bool`, *optional*, defaults to `True`): a bar over the shortest-path batches.
    """

    def __init__(self, k: int = 10, metric: str = "cosine", chunk_size: int = 512, show_progress_bar: bool = True):
        if metric != "cosine":
            raise ValueError(f"`metric` must be 'cosine' (distance 1 - cos), got {metric!r}.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be an int >= 1, got {k!r}.")
        self.k, self.metric, self.chunk_size, self.show_progress_bar = k, metric, chunk_size, show_progress_bar
        self.corpus: torch.Tensor | None = None
        self.distances: np.ndarray | None = None
        self.n_components = 0

    def graph(self, corpus) -> csr_matrix:
        """The symmetric kNN graph (``N x N`` sparse, weights ``1 - cos``; an edge if either end chose the other).

        The neighbours are the exact ones of `hf_ext.retrieval.knn.nearest_neighbours` (ties to the lower index).
        """
        c = prepare(as_matrix(corpus, "corpus"), self.metric, "corpus").cpu()  # scipy works on host arrays
        n = c.shape[0]
        cosine, neighbours = nearest_neighbours(c, self.k, metric=self.metric)
        rows = np.repeat(np.arange(n), self.k)
        # tiny floor: a zero-length edge (duplicate points) must stay an edge in the sparse graph
        weights = np.maximum((1 - cosine).flatten().numpy(), 1e-12)
        graph = csr_matrix((weights, (rows, neighbours.flatten().numpy())), shape=(n, n))
        return graph.maximum(graph.T)

    def fit(self, corpus) -> GeodesicSimilarity:
        """Build the graph over ``corpus`` (``(N, dim)``) and all-pairs geodesic distances (``N x N`` float64)."""
        c = prepare(as_matrix(corpus, "corpus"), self.metric, "corpus").cpu()
        graph = self.graph(c)
        n = c.shape[0]
        self.n_components, labels = connected_components(graph, directed=False)
        distances = np.empty((n, n))
        starts = range(0, n, self.chunk_size)
        for start in tqdm(starts, desc="geodesic distances", disable=not self.show_progress_bar):
            sources = np.arange(start, min(start + self.chunk_size, n))
            distances[sources] = shortest_path(graph, method="D", directed=False, indices=sources)
        unreachable = ~np.isfinite(distances)
        if unreachable.any():  # between components: beyond every path, ordered by the base distance
            base = (1 - c @ c.T).double().numpy()
            distances[unreachable] = distances[~unreachable].max() + base[unreachable]
        self.corpus, self.distances, self._labels = c, distances, labels
        return self

    def _fitted(self) -> np.ndarray:
        if self.distances is None:
            raise ValueError("Call `fit(corpus)` first.")
        return self.distances

    def pair_similarity(self, a, b) -> np.ndarray:
        """Similarity (``-geodesic distance``) of corpus points ``a[i]`` and ``b[i]`` (index arrays)."""
        distances = self._fitted()
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.ndim != 1:
            raise ValueError("`a` and `b` must be 1-D index arrays of equal length.")
        return -distances[a, b]

    def query_similarity(self, queries) -> np.ndarray:
        """``(queries, N)`` similarities of new points: ``-min over their k nearest corpus points i of
        (1 - cos(q, i) + D(i, ·))``."""
        distances = self._fitted()
        q = prepare(as_matrix(queries, "queries"), self.metric, "queries").cpu()
        if q.shape[1] != self.corpus.shape[1]:
            raise ValueError(f"`queries` have dimension {q.shape[1]} but the corpus has {self.corpus.shape[1]}.")
        similarity = q @ self.corpus.T
        top = similarity.topk(min(self.k, self.corpus.shape[0]), dim=1)
        out = np.empty((q.shape[0], distances.shape[0]))
        for row, (values, index) in enumerate(zip(top.values, top.indices, strict=True)):
            attach = (1 - values).double().numpy()[:, None] + distances[index.numpy()]
            out[row] = -attach.min(axis=0)
        return out
