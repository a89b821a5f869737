from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from hf_ext.retrieval import (
    csls_score_function,
    csls_scores,
    hub_sample,
    hubness_report,
    k_occurrence,
    local_scaling,
    mutual_proximity,
)


def _brute_k_occurrence(x: np.ndarray, k: int, metric: str = "cosine") -> np.ndarray:
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
    else:
        sim = -((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    counts = np.zeros(len(x), dtype=int)
    for i in range(len(x)):
        order = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-sim[i, j], j))  # ties: lower index
        for j in order[:k]:
            counts[j] += 1
    return counts


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_k_occurrence_equals_brute_force_in_chunks(metric: str) -> None:
    x = torch.randn(70, 16, generator=torch.Generator().manual_seed(0))
    expected = _brute_k_occurrence(x.double().numpy(), 5, metric)
    got = k_occurrence(x, 5, metric=metric, chunk_size=16)
    assert got.tolist() == expected.tolist() and int(got.sum()) == 5 * 70


def test_k_occurrence_breaks_ties_by_the_lower_index() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])  # 1, 2, 3 identical
    assert k_occurrence(x, 1, chunk_size=2).tolist() == _brute_k_occurrence(x.numpy(), 1).tolist()


def test_hubness_report_on_a_hub_and_its_spokes() -> None:
    x = torch.cat([torch.zeros(1, 8) + 0.01, torch.eye(8)])  # the near-mean point is everyone's neighbour
    x[0] = torch.ones(8)
    report = hubness_report(x, k=1)
    counts = k_occurrence(x, 1)
    # every spoke's nearest is the hub; the hub's nearest is spoke 1 (a tie among spokes: the lower index)
    assert counts.tolist() == [8, 1, 0, 0, 0, 0, 0, 0, 0] and report["anti_hub_rate"] == pytest.approx(7 / 9)
    assert report["hub_occurrence"] == pytest.approx(8 / 9) and report["k_skewness"] > 2
    assert report["robin_hood"] == pytest.approx((7 + 0 + 7) / (2 * 9))


def test_csls_equals_its_formula() -> None:
    g = torch.Generator().manual_seed(1)
    q, c = torch.randn(4, 6, generator=g), torch.randn(12, 6, generator=g)
    qn, cn = q / q.norm(dim=1, keepdim=True), c / c.norm(dim=1, keepdim=True)
    cos = qn @ cn.T
    r_q = cos.topk(3, dim=1).values.mean(1)
    cc = cn @ cn.T
    cc.fill_diagonal_(-float("inf"))
    r_d = cc.topk(3, dim=1).values.mean(1)
    torch.testing.assert_close(csls_scores(q, c, 3), 2 * cos - r_q[:, None] - r_d[None, :])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _moments(values: list[float]) -> tuple[float, float]:
    """The maximum-likelihood Gaussian of a sample (Schnitzer et al., 2012): mean and sqrt(mean squared deviation)."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def _mutual_proximity_normal(q: np.ndarray, c: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """P(S_q < s) P(S_d < s) with each distribution a Gaussian fitted to the point's cosines, loop by loop."""
    q, c = _unit(q), _unit(c)
    cos = q @ c.T
    if reference is None:  # d's cosines to every other corpus point
        d_samples = [[float(c[d] @ c[j]) for j in range(len(c)) if j != d] for d in range(len(c))]
    else:  # d's cosines to the reference (query-like) points
        r = _unit(reference)
        d_samples = [[float(c[d] @ point) for point in r] for d in range(len(c))]
    out = np.empty(cos.shape)
    for i in range(len(q)):
        mu_q, sd_q = _moments([float(v) for v in cos[i]])
        for d in range(len(c)):
            mu_d, sd_d = _moments(d_samples[d])
            out[i, d] = norm.cdf((cos[i, d] - mu_q) / sd_q) * norm.cdf((cos[i, d] - mu_d) / sd_d)
    return out


def test_mutual_proximity_equals_its_formulas() -> None:
    g = torch.Generator().manual_seed(2)
    q, c = torch.randn(3, 5, generator=g).double(), torch.randn(9, 5, generator=g).double()
    qn, cn = q / q.norm(dim=1, keepdim=True), c / c.norm(dim=1, keepdim=True)
    s = (qn @ cn.T).numpy()
    cc = (cn @ cn.T).numpy()
    others = [np.delete(cc[d], d) for d in range(9)]
    empiric = np.array([[np.mean(s[i] < s[i, d]) * np.mean(others[d] < s[i, d]) for d in range(9)] for i in range(3)])
    np.testing.assert_allclose(mutual_proximity(q, c, method="empiric").numpy(), empiric, atol=1e-6)
    expected = _mutual_proximity_normal(q.numpy(), c.numpy())
    np.testing.assert_allclose(mutual_proximity(q, c, method="normal").numpy(), expected, rtol=1e-6, atol=1e-7)


def test_mutual_proximity_normal_uses_one_estimator_for_queries_reference_and_corpus() -> None:
    g = torch.Generator().manual_seed(7)
    q, c, ref = torch.randn(4, 6, generator=g), torch.randn(8, 6, generator=g), torch.randn(5, 6, generator=g)
    # Few samples (8 corpus cosines per query, 5 reference and 7 corpus cosines per point), so ddof=0 and ddof=1
    # differ by 6-12% in the standard deviation.
    got = mutual_proximity(q.double(), c.double(), reference=ref.double()).numpy()
    expected = _mutual_proximity_normal(q.double().numpy(), c.double().numpy(), ref.double().numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    got = mutual_proximity(q.double(), c.double()).numpy()
    np.testing.assert_allclose(got, _mutual_proximity_normal(q.double().numpy(), c.double().numpy()), rtol=1e-6,
                               atol=1e-7)  # fmt: skip
    # the corpus moments in chunks (the chunk boundary splits the self-exclusion) equal the loop's
    from hf_ext.retrieval.hubness import _corpus_moments

    cn = torch.nn.functional.normalize(c.double(), dim=1)
    mean, std = _corpus_moments(cn, chunk_size=3)
    cc = (cn @ cn.T).numpy()
    moments = np.array([_moments([float(cc[d, j]) for j in range(8) if j != d]) for d in range(8)])
    np.testing.assert_allclose(mean.numpy(), moments[:, 0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std.numpy(), moments[:, 1], rtol=1e-9, atol=1e-12)


def test_local_scaling_equals_its_formula() -> None:
    g = torch.Generator().manual_seed(3)
    q, c = torch.randn(2, 4, generator=g), torch.randn(7, 4, generator=g)
    qn, cn = q / q.norm(dim=1, keepdim=True), c / c.norm(dim=1, keepdim=True)
    d = 1 - qn @ cn.T
    sigma_q = d.sort(dim=1).values[:, 1]  # k = 2
    dc = 1 - cn @ cn.T
    dc.fill_diagonal_(float("inf"))
    sigma_d = dc.sort(dim=1).values[:, 1]
    torch.testing.assert_close(local_scaling(q, c, 2), torch.exp(-(d**2) / (sigma_q[:, None] * sigma_d[None, :])))


def test_csls_score_function_plugs_into_semantic_search() -> None:
    from sentence_transformers import util

    g = torch.Generator().manual_seed(4)
    q, c = torch.randn(3, 8, generator=g), torch.randn(40, 8, generator=g)
    hits = util.semantic_search(q, c, top_k=5, score_function=csls_score_function(c, k=4))
    expected = csls_scores(q, c, 4).topk(5, dim=1).indices
    assert [[h["corpus_id"] for h in row] for row in hits] == expected.tolist()
    with pytest.raises(ValueError, match="corpus_chunk_size"):
        util.semantic_search(q, c, score_function=csls_score_function(c, k=4), corpus_chunk_size=10)


def test_hub_sample_keeps_only_hubs_and_returns_exactly_n() -> None:
    g = torch.Generator().manual_seed(5)
    drawn = []

    def sample(m: int) -> torch.Tensor:
        batch = torch.randn(m, 32, generator=g)
        drawn.append(batch)
        return batch

    out = hub_sample(sample, 25, k=5, threshold=12, reference_size=400)
    assert out.shape == (25, 32)
    first = drawn[0]
    counts = k_occurrence(first, 5, metric="euclidean")
    kept_from_first = first[counts >= 12]
    n_first = min(25, len(kept_from_first))
    assert torch.equal(out[:n_first], kept_from_first[:n_first])
    with pytest.raises(ValueError, match="reached k-occurrence"):
        hub_sample(sample, 5, k=5, threshold=399, reference_size=400, max_rounds=2)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: k_occurrence(torch.randn(5, 3), 5), "`k`"),
        (lambda: k_occurrence(torch.randn(5, 3), 0), "`k`"),
        (lambda: k_occurrence(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1), "NaN"),
        (lambda: k_occurrence(torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), 1), "zero vectors"),
        (lambda: csls_scores(torch.randn(2, 3), torch.randn(5, 4), 2), "dimension"),
        (lambda: mutual_proximity(torch.randn(2, 3), torch.randn(5, 3), method="fast"), "`method`"),
        (lambda: k_occurrence(torch.randn(5, 3), 2, metric="dot"), "`metric`"),
        (lambda: k_occurrence(torch.randn(5, 3), 2, screen_dtype="int8"), "`screen_dtype`"),
    ],
)
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_a_reference_query_sample_defines_the_corpus_neighbourhoods() -> None:
    g = torch.Generator().manual_seed(6)
    q, c, ref = torch.randn(3, 6, generator=g), torch.randn(10, 6, generator=g), torch.randn(15, 6, generator=g)
    qn, cn, rn = (t / t.norm(dim=1, keepdim=True) for t in (q, c, ref))
    cos = qn @ cn.T
    to_ref = cn @ rn.T  # (corpus, reference)
    r_d = to_ref.topk(4, dim=1).values.mean(1)
    expected = 2 * cos - cos.topk(4, dim=1).values.mean(1)[:, None] - r_d[None, :]
    torch.testing.assert_close(csls_scores(q, c, 4, reference=ref), expected)
    p_d = (to_ref[None, :, :] < cos[:, :, None]).double().mean(2)
    p_q = (cos[:, None, :] < cos[:, :, None]).double().mean(2)
    torch.testing.assert_close(mutual_proximity(q, c, method="empiric", reference=ref), (p_q * p_d).float())
    sigma_d = 1 - to_ref.topk(2, dim=1).values[:, -1]
    sigma_q = (1 - cos).sort(dim=1).values[:, 1]
    expected_ls = torch.exp(-((1 - cos) ** 2) / (sigma_q[:, None] * sigma_d[None, :]))
    torch.testing.assert_close(local_scaling(q, c, 2, reference=ref), expected_ls)


@pytest.mark.parametrize(("kwargs", "match"), [({"n": 0}, "`n`"), ({"n": 2, "threshold": 0}, "`threshold`")])
def test_hub_sample_rejects_bad_counts(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hub_sample(lambda m: torch.randn(m, 4), reference_size=50, **kwargs)


@pytest.mark.parametrize(
    ("reference", "match"),
    [(torch.randn(15, 5), "`reference` has dimension 5"), (torch.randn(1, 6), "at least max\\(2, k\\)"),
     (torch.full((15, 6), float("nan")), "reference")],
)  # fmt: skip
def test_a_bad_reference_sample_is_rejected_by_every_reduction(reference: torch.Tensor, match: str) -> None:
    q, c = torch.randn(3, 6), torch.randn(10, 6)
    for score, kwargs in ((csls_scores, {"k": 2}), (local_scaling, {"k": 2}), (mutual_proximity, {})):
        with pytest.raises(ValueError, match=match):
            score(q, c, reference=reference, **kwargs)
