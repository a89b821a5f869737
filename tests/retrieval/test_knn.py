from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_ext.retrieval import knn
from hf_ext.retrieval.knn import nearest_neighbours, neighbour_sets


def _brute(x: torch.Tensor, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Every pair in float64, each row sorted by (-similarity, index): the definition the module promises."""
    x = x.double()
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True)
        sim = (x @ x.T).numpy()
    else:
        sim = -((x[:, None, :] - x[None, :, :]) ** 2).sum(-1).numpy()
    np.fill_diagonal(sim, -np.inf)
    order = np.stack([np.lexsort((np.arange(len(x)), -row))[:k] for row in sim])
    return np.take_along_axis(sim, order, 1), order


def _points(n: int, dim: int, seed: int) -> torch.Tensor:
    """Gaussian points with exact duplicates (ties) and a scaled copy (a cosine tie, not a euclidean one)."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    x[20:32] = x[3]
    x[40:45] = 2 * x[50]
    return x


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("screen_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("n", "dim", "k"), [(60, 5, 3), (700, 17, 10), (1200, 64, 5)])
def test_nearest_neighbours_equal_brute_force_with_ties(metric: str, screen_dtype: str, n: int, dim: int, k: int):
    x = _points(n, dim, seed=n)
    values, indices = nearest_neighbours(x, k, metric=metric, chunk_size=256, screen_dtype=screen_dtype)
    expected_values, expected_indices = _brute(x, k, metric)
    assert indices.tolist() == expected_indices.tolist()
    np.testing.assert_allclose(values.numpy(), expected_values, rtol=1e-12, atol=1e-9)
    sets = neighbour_sets(x, k, metric=metric, chunk_size=256, screen_dtype=screen_dtype)
    assert sets.sort(dim=1).values.tolist() == np.sort(expected_indices, axis=1).tolist()


def test_near_ties_the_screen_cannot_separate_are_settled_exactly() -> None:
    # 600 points within 1e-4 of one direction: their cosines differ by ~1e-8, which neither the bf16 screen nor the
    # float32 re-check can tell apart (float64 can: its own rounding, ~1e-16, is far below)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, 32, generator=g)
    x = base + 1e-4 * torch.randn(600, 32, generator=g)
    x = torch.cat([x, torch.randn(400, 32, generator=g)])
    expected = _brute(x, 7, "cosine")[1]
    for screen_dtype in ("float32", "bfloat16"):
        _, indices = nearest_neighbours(x, 7, screen_dtype=screen_dtype)
        sets = neighbour_sets(x, 7, screen_dtype=screen_dtype)
        assert indices.tolist() == expected.tolist()
        assert sets.sort(dim=1).values.tolist() == np.sort(expected, axis=1).tolist()


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_euclidean_at_extreme_scales_neither_overflows_nor_underflows(scale: float) -> None:
    x = _points(600, 16, seed=12) * scale
    values, indices = nearest_neighbours(x, 5, metric="euclidean", screen_dtype="bfloat16")
    expected_values, expected_indices = _brute(x, 5, "euclidean")
    assert indices.tolist() == expected_indices.tolist()
    np.testing.assert_allclose(values.numpy(), expected_values, rtol=1e-9)


def test_the_result_does_not_depend_on_the_screen_or_the_chunks() -> None:
    x = torch.randn(5000, 48, generator=torch.Generator().manual_seed(8))
    x[:2500] += 3 * torch.randn(1, 48, generator=torch.Generator().manual_seed(9))  # a dense cluster and the rest
    reference = nearest_neighbours(x, 10, screen_dtype="float32", chunk_size=1024)
    for screen_dtype, chunk_size in (("bfloat16", 1024), ("bfloat16", 333), ("auto", 4096)):
        values, indices = nearest_neighbours(x, 10, screen_dtype=screen_dtype, chunk_size=chunk_size)
        assert torch.equal(indices, reference[1]) and torch.equal(values, reference[0])


def _bound_ratio(x: torch.Tensor, metric: str) -> float:
    """max over pairs of |exact - screened| / bound, for the first 300 rows of a bf16 screen of ``x``."""
    x, _ = knn.prepare_exact(x, metric)
    screen = knn._Screen(x, metric, torch.bfloat16, k=10)
    operand, row_terms, shift = screen.operands(0, 300)
    screened = (operand @ screen.keys_t).double()  # (300, N), shifted
    exact = x[:300] @ x.T - (0 if screen.half_square is None else screen.half_square[None, :]) - shift[:, None]
    columns = torch.arange(x.shape[0]).expand(300, -1)
    bound = screen.screen_bound.pairs(row_terms, columns) + screen.relative * screened.abs()
    return float(((exact - screened).abs() / bound).max())


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("dim", [8, 384, 1030])
def test_this_machines_bf16_matmul_stays_inside_the_bound(metric: str, dim: int) -> None:
    """The exactness rests on the rounding model of the module docstring: check it on this machine's matmul."""
    assert _bound_ratio(torch.randn(2000, dim, generator=torch.Generator().manual_seed(dim)) + 0.3, metric) <= 1.0


@pytest.mark.parametrize("dim", [8, 384, 1030, 2100])
def test_the_bound_is_tight_where_the_inputs_are_exact_in_bf16(dim: int) -> None:
    """With bf16-exact inputs only the accumulation and the output rounding remain: the bound must hold and be
    nearly reached, so a matmul that rounded more (a bf16 partial sum past a K block, say) would fail here."""
    x = (3 * torch.randn(1500, dim, generator=torch.Generator().manual_seed(dim))).bfloat16().float()
    assert 0.5 < _bound_ratio(x, "euclidean") <= 1.0


def test_k_occurrence_of_real_minilm_embeddings_is_the_same_with_either_screen(minilm) -> None:
    from hf_ext import load_stsb
    from hf_ext.retrieval import k_occurrence

    sentences = list(dict.fromkeys(load_stsb("validation")["sentence1"]))[:600]
    embeddings = torch.as_tensor(minilm.encode(sentences, batch_size=64, convert_to_numpy=True))
    counts = k_occurrence(embeddings, 10, screen_dtype="bfloat16")
    assert torch.equal(counts, k_occurrence(embeddings, 10, screen_dtype="float32"))
    expected = np.bincount(_brute(embeddings, 10, "cosine")[1].ravel(), minlength=len(sentences))
    assert counts.tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("bf16_seconds", "expected"), [(2.0, torch.float32), (0.5, torch.bfloat16), (0.99, torch.float32)]
)
def test_auto_takes_the_screen_measured_faster_whatever_the_cpu_flags(
    monkeypatch: pytest.MonkeyPatch, bf16_seconds: float, expected: torch.dtype
) -> None:
    calls = []

    def probe(dtype: torch.dtype, metric: str, dim: int) -> float:  # a machine where only timings differ
        calls.append((dtype, metric, dim))
        return bf16_seconds if dtype == torch.bfloat16 else 1.0

    monkeypatch.setattr(knn, "probe_seconds", probe)
    monkeypatch.setattr(knn, "_MEASURED_SCREEN", {})
    for flags in (True, False):  # what the CPU reports does not change the choice
        monkeypatch.setattr(knn, "fast_bf16_matmul", lambda device, flags=flags: flags)
        assert knn._resolve_screen_dtype("auto", torch.device("cpu"), 50_000, "cosine", 384) == expected
    assert sorted(calls, key=str) == sorted([(torch.float32, "cosine", 384), (torch.bfloat16, "cosine", 384)], key=str)
    assert knn._resolve_screen_dtype("auto", torch.device("cpu"), 10_000, "cosine", 384) == torch.float32  # too few
    assert len(calls) == 2  # measured once per process, metric and dimension


def test_the_probe_times_both_screens_on_this_machine() -> None:
    seconds = {dtype: knn.probe_seconds(dtype, "cosine", 64) for dtype in (torch.float32, torch.bfloat16)}
    assert all(0.0 < s < 60.0 for s in seconds.values())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: nearest_neighbours(torch.randn(5, 3), 5), "`k`"),
        (lambda: nearest_neighbours(torch.randn(5, 3), 2, chunk_size=0), "`chunk_size`"),
        (lambda: nearest_neighbours(torch.randn(5, 3), 2, screen_dtype="float16"), "`screen_dtype`"),
        (lambda: nearest_neighbours(torch.randn(5, 3), 2, metric="dot"), "`metric`"),
        (lambda: nearest_neighbours(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1), "NaN or infinite"),
        (lambda: nearest_neighbours(torch.zeros(4), 1), "2-D"),
        (lambda: knn._resolve_screen_dtype("bfloat16", torch.device("cuda"), 10), "CPU only"),
        (lambda: neighbour_sets(torch.randn(5, 3), 0), "`k`"),
        (lambda: neighbour_sets(torch.randn(5, 3), 2, screen_dtype=torch.float16), "`screen_dtype`"),
        (lambda: neighbour_sets(torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), 1), "zero vectors"),
    ],
)
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
def test_on_cuda_the_result_is_the_cpu_one_even_with_tf32() -> None:
    x = _points(6000, 96, seed=11)
    expected = nearest_neighbours(x, 10, screen_dtype="float32")
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            values, indices = nearest_neighbours(x.cuda(), 10)
            assert torch.equal(indices.cpu(), expected[1])
            torch.testing.assert_close(values.cpu(), expected[0], rtol=1e-12, atol=1e-12)
            assert torch.equal(neighbour_sets(x.cuda(), 10).sort(dim=1).values.cpu(), expected[1].sort(dim=1).values)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
