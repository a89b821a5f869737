"""Hubness: k-occurrence and its measures, hubness reduction for query -> corpus search, and the hub sampler.

In high dimension a few points ("hubs") sit in many k-nearest-neighbour lists and many ("anti-hubs") in none. For
retrieval hubs are a nuisance (the same items come back for every query); for GAN latents they are a prior for
good samples (Liang et al., ICML 2022).

- `k_occurrence(X, k)`: exact (`hf_ext.retrieval.knn`: a bfloat16 screen and exact re-checks), chunked (GPU if
  ``X`` is there), self excluded; ties broken by the lower index.
- `hubness_report(X, k)`: k-skewness, robin-hood index, anti-hub rate, hub occurrence.
- `csls_scores`, `mutual_proximity`, `local_scaling`: re-scored query x corpus similarity matrices; the
  ``*_score_function(corpus, ...)`` factories return a ``score_function`` for sentence-transformers'
  ``util.semantic_search``.
- `hub_sample(sample_fn, n)`: keep latent draws whose k-occurrence in a reference batch reaches a threshold.

Example:

```python
>>> import torch
>>> from hf_ext.retrieval.hubness import hubness_report, csls_scores
>>> generator = torch.Generator().manual_seed(0)
>>> corpus, queries = torch.randn(2000, 384, generator=generator), torch.randn(10, 384, generator=generator)
>>> report = hubness_report(corpus, k=10)
>>> report["k_skewness"] > 0  # right-skewed k-occurrence: a few points sit in many neighbour lists
True
>>> scores = csls_scores(queries, corpus, k=10)  # higher is better, as cosine
>>> scores.shape
torch.Size([10, 2000])

```
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .knn import as_matrix, check_k, nearest_neighbours, neighbour_sets, prepare

# Points with N_k >= HUB_FACTOR * k are hubs (scikit-hubness' convention for hub occurrence).
HUB_FACTOR = 2


def k_occurrence(
    x, k: int = 10, *, metric: str = "cosine", chunk_size: int = 1024, screen_dtype: str | torch.dtype = "auto"
) -> Tensor:
    """N_k: for every point, how many other points have it among their ``k`` nearest neighbours (self excluded).

    Exact: the neighbour sets of `hf_ext.retrieval.knn.neighbour_sets` (float64 similarities of the float32 input,
    ties at the k-th neighbour broken by the lower index, so the result is deterministic), found with a fast
    low-precision screen (bfloat16 where the CPU runs it natively) whose dtype never changes the result. In
    chunks of ``chunk_size`` rows (memory ``chunk_size x N``), on ``x``'s device. Returns a ``(N,)`` long tensor
    summing to ``k * N``.

    Example: ``k_occurrence(torch.randn(10000, 384), k=10)`` (seconds on a laptop CPU).
    """
    device = torch.as_tensor(x).device
    sets = neighbour_sets(x, k, metric=metric, chunk_size=chunk_size, screen_dtype=screen_dtype)
    return torch.bincount(sets.flatten(), minlength=sets.shape[0]).to(device)


def hubness_report(
    x, k: int = 10, *, metric: str = "cosine", chunk_size: int = 1024, screen_dtype: str | torch.dtype = "auto"
) -> dict[str, float]:
    """k-skewness (of N_k), robin-hood index, anti-hub rate (N_k = 0) and hub occurrence (N_k >= 2k) of ``x``."""
    counts = k_occurrence(x, k, metric=metric, chunk_size=chunk_size, screen_dtype=screen_dtype).double()
    n = counts.numel()
    mean, std = counts.mean(), counts.std(unbiased=False)
    skewness = float(((counts - mean) ** 3).mean() / std**3) if std > 0 else 0.0
    hubs = counts >= HUB_FACTOR * k
    return {
        "k": k,
        "k_skewness": skewness,
        "robin_hood": float((counts - k).abs().sum() / (2 * k * n)),
        "anti_hub_rate": float((counts == 0).double().mean()),
        "hub_occurrence": float(counts[hubs].sum() / (k * n)),
        "max_k_occurrence": int(counts.max()),
    }


# --------------------------------------------------------------------------------------------- reductions


def _pair(queries, corpus, metric: str) -> tuple[Tensor, Tensor]:
    q = prepare(as_matrix(queries, "queries"), metric, "queries")
    c = prepare(as_matrix(corpus, "corpus"), metric, "corpus").to(q.device)
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"`queries` have dimension {q.shape[1]} but `corpus` has {c.shape[1]}.")
    return q, c


def _mean_top_k(similarity: Tensor, k: int) -> Tensor:
    return similarity.topk(k, dim=1).values.mean(dim=1)


def corpus_neighbourhood(corpus, k: int = 10, *, metric: str = "cosine", chunk_size: int = 1024) -> Tensor:
    """r_d: each corpus point's mean similarity to its ``k`` nearest other corpus points (CSLS's corpus term)."""
    c = prepare(as_matrix(corpus, "corpus"), metric, "corpus")
    values, _ = nearest_neighbours(c, k, metric=metric, chunk_size=chunk_size)
    return values.mean(dim=1).to(c)


def _reference_similarity(corpus: Tensor, reference, k: int = 1) -> Tensor:
    """``(N, R)`` cosines of each corpus point to the reference points (the query distribution)."""
    ref = prepare(as_matrix(reference, "reference"), "cosine", "reference").to(corpus.device)
    if ref.shape[1] != corpus.shape[1]:
        raise ValueError(f"`reference` has dimension {ref.shape[1]} but `corpus` has {corpus.shape[1]}.")
    if ref.shape[0] < max(2, k):
        raise ValueError(f"`reference` needs at least max(2, k) = {max(2, k)} points, got {ref.shape[0]}.")
    return corpus @ ref.T


def csls_scores(
    queries, corpus, k: int = 10, *, corpus_r: Tensor | None = None, reference: Tensor | None = None
) -> Tensor:
    """CSLS: ``2 cos(q, d) - r_q - r_d`` (Conneau et al., 2018), a ``(queries, corpus)`` matrix, higher is better.

    ``r_q`` is the query's mean cosine to its ``k`` nearest corpus points; ``r_d`` the corpus point's mean cosine to
    its ``k`` nearest ``reference`` points: a sample of the queries, as in the CSLS paper (use it when queries and
    corpus differ, e.g. titles vs bodies). Without ``reference`` the other corpus points stand in for the queries.
    Pass ``corpus_r`` (`corpus_neighbourhood`) to reuse ``r_d`` across calls.
    """
    q, c = _pair(queries, corpus, "cosine")
    check_k(k, c.shape[0] + 1)
    similarity = q @ c.T
    if corpus_r is not None:
        r_d = corpus_r.to(similarity)
    elif reference is not None:
        r_d = _mean_top_k(_reference_similarity(c, reference, k), k)
    else:
        r_d = corpus_neighbourhood(c, k)
    return 2 * similarity - _mean_top_k(similarity, k)[:, None] - r_d[None, :]


def mutual_proximity(
    queries, corpus, *, method: str = "normal", max_empiric: int = 20000, reference: Tensor | None = None
) -> Tensor:
    """Mutual proximity (Schnitzer et al., 2012): ``P(S_q < s) * P(S_d < s)`` for the cosine ``s`` of (q, d).

    ``S_q`` is the distribution of q's cosines to the corpus, ``S_d`` that of d's cosines to the ``reference`` points
    (a sample of the queries; by default the other corpus points). ``normal`` fits a Gaussian to each (O(N)
    memory) with the maximum-likelihood moments of the paper and of scikit-hubness: the mean and the population
    standard deviation (divided by the number of cosines, ``ddof=0``), the same estimator for ``S_q`` and ``S_d``;
    ``empiric`` counts (the corpus x reference cosines, O(N x R) memory: refused above ``max_empiric``
    corpus points). A ``(queries, corpus)`` matrix in [0, 1], higher is better.
    """
    q, c = _pair(queries, corpus, "cosine")
    if method not in ("normal", "empiric"):
        raise ValueError(f"`method` must be 'normal' or 'empiric', got {method!r}.")
    n = c.shape[0]
    if n < 3:
        raise ValueError(f"`corpus` needs at least 3 points for mutual proximity, got {n}.")
    similarity = q @ c.T  # (queries, N)
    if method == "normal":
        mu_q, sd_q = similarity.mean(1, keepdim=True), similarity.std(1, keepdim=True, unbiased=False)
        if reference is not None:
            ref_sim = _reference_similarity(c, reference, 2)
            mu_d, sd_d = ref_sim.mean(1), ref_sim.std(1, unbiased=False)
        else:
            mu_d, sd_d = _corpus_moments(c)
        normal = torch.distributions.Normal(0.0, 1.0)
        return normal.cdf((similarity - mu_q) / sd_q.clamp_min(1e-12)) * normal.cdf(
            (similarity - mu_d[None, :]) / sd_d[None, :].clamp_min(1e-12)
        )
    size = n * (n if reference is None else as_matrix(reference, "reference").shape[0])
    if size > max_empiric**2:
        raise ValueError(
            f"`method='empiric'` needs a matrix of {size} cosines: use method='normal' or raise `max_empiric`."
        )
    if reference is not None:
        sorted_d = _reference_similarity(c, reference, 2).sort(dim=1).values  # (N, R)
        count_d = sorted_d.shape[1]
    else:
        corpus_sim = c @ c.T
        corpus_sim.fill_diagonal_(torch.inf)  # self excluded: sorted last, never counted below s
        sorted_d = corpus_sim.sort(dim=1).values  # (N, N), the last column is +inf
        count_d = n - 1
    # P(S_q < s): the share of q's cosines to the corpus below s (q's own cosine to d is never below itself)
    p_q = torch.searchsorted(similarity.sort(dim=1).values, similarity, right=False).double() / n
    below_d = torch.searchsorted(sorted_d, similarity.T.contiguous(), right=False).T  # (queries, N): d's cosines < s
    p_d = below_d.double() / count_d
    return (p_q * p_d).float()


def _corpus_moments(c: Tensor, chunk_size: int = 2048) -> tuple[Tensor, Tensor]:
    """Mean and population standard deviation (``ddof=0``) of each corpus point's cosines to the other points."""
    means, stds = [], []
    n = c.shape[0]
    for start in range(0, n, chunk_size):
        similarity = c[start : start + chunk_size] @ c.T
        index = torch.arange(similarity.shape[0], device=c.device)
        total = similarity.sum(1) - similarity[index, start + index]
        square = similarity.square().sum(1) - similarity[index, start + index].square()
        mean = total / (n - 1)
        means.append(mean)
        stds.append((square / (n - 1) - mean.square()).clamp_min(0).sqrt())
    return torch.cat(means), torch.cat(stds)


def local_scaling(queries, corpus, k: int = 10, *, reference: Tensor | None = None) -> Tensor:
    """Local scaling (Zelnik-Manor & Perona): ``exp(-d² / (sigma_q sigma_d))`` with ``d = 1 - cos`` and sigma the
    distance to the ``k``-th nearest corpus point (for d: nearest ``reference`` point, by default other corpus
    points). ``(queries, corpus)``, in (0, 1]."""
    q, c = _pair(queries, corpus, "cosine")
    check_k(k, c.shape[0])  # sigma_d: the k-th nearest *other* corpus point
    distance = 1 - q @ c.T
    sigma_q = distance.topk(k, dim=1, largest=False).values[:, -1]
    if reference is not None:
        sigma_d = 1 - _reference_similarity(c, reference, k).topk(k, dim=1).values[:, -1]
    else:
        sigma_d = 1 - _kth_corpus_similarity(c, k)
    return torch.exp(-distance.square() / (sigma_q[:, None] * sigma_d[None, :]).clamp_min(1e-12))


def _kth_corpus_similarity(c: Tensor, k: int) -> Tensor:
    return nearest_neighbours(c, k)[0][:, -1].to(c)


def _score_function(corpus, scorer: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    n = as_matrix(corpus, "corpus").shape[0]

    def score_function(query_embeddings: Tensor, corpus_embeddings: Tensor) -> Tensor:
        if corpus_embeddings.shape[0] != n:
            raise ValueError(
                f"This score function was built for a corpus of {n} points but got {corpus_embeddings.shape[0]}: "
                f"pass `corpus_chunk_size >= {n}` to `util.semantic_search` (the reduction needs the whole corpus)."
            )
        return scorer(query_embeddings, corpus_embeddings)

    return score_function


def csls_score_function(corpus, k: int = 10) -> Callable[[Tensor, Tensor], Tensor]:
    """A ``score_function`` for `util.semantic_search` ranking by CSLS (``r_d`` precomputed on ``corpus``).

    Example: ``util.semantic_search(q, corpus, score_function=csls_score_function(corpus), corpus_chunk_size=N)``.
    """
    corpus_r = corpus_neighbourhood(corpus, k)
    return _score_function(corpus, lambda q, c: csls_scores(q, c, k, corpus_r=corpus_r))


def mutual_proximity_score_function(corpus, method: str = "normal") -> Callable[[Tensor, Tensor], Tensor]:
    """A ``score_function`` for `util.semantic_search` ranking by mutual proximity."""
    return _score_function(corpus, lambda q, c: mutual_proximity(q, c, method=method))


def local_scaling_score_function(corpus, k: int = 10) -> Callable[[Tensor, Tensor], Tensor]:
    """A ``score_function`` for `util.semantic_search` ranking by local scaling."""
    return _score_function(corpus, lambda q, c: local_scaling(q, c, k))


# --------------------------------------------------------------------------------------------- hub sampler


def hub_sample(
    sample_fn: Callable[[int], Tensor],
    n: int,
    *,
    k: int = 5,
    threshold: int = 50,
    reference_size: int = 10000,
    metric: str = "euclidean",
    max_rounds: int = 100,
) -> Tensor:
    """The hubness-prior sampler (Liang et al., ICML 2022): latents that are hubs of their batch.

    Each round draws ``reference_size`` latents with ``sample_fn(reference_size)`` (a ``(m, dim)`` tensor), computes
    their k-occurrence within the batch and keeps those with ``N_k >= threshold``; rounds repeat until ``n`` are
    kept. Returns exactly ``n`` latents (the first kept). Raises after ``max_rounds`` rounds without enough.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an int >= 1, got {n!r}.")
    if threshold < 1:
        raise ValueError(f"`threshold` must be >= 1, got {threshold}.")
    check_k(k, reference_size, "k")
    kept: list[Tensor] = []
    total = 0
    for _ in range(max_rounds):
        drawn = sample_fn(reference_size)
        batch = as_matrix(drawn, "sample_fn(reference_size)")
        if batch.shape[0] != reference_size:
            raise ValueError(f"`sample_fn({reference_size})` returned {batch.shape[0]} rows.")
        keep = k_occurrence(batch, k, metric=metric) >= threshold
        drawn = torch.as_tensor(drawn)  # the draws as sampled (dtype kept), not the float copy scored above
        hubs = drawn[keep.to(drawn.device)]
        kept.append(hubs)
        total += hubs.shape[0]
        if total >= n:
            return torch.cat(kept)[:n]
    raise ValueError(
        f"Only {total} of {n} latents reached k-occurrence {threshold} in {max_rounds} rounds of {reference_size}: "
        "lower `threshold`, or raise `max_rounds` / `reference_size`."
    )
