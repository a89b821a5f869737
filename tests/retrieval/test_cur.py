from __future__ import annotations

import warnings

import numpy as np
import pytest

from hf_ext.retrieval import CURIndex, biencoder_rerank_search, cur_item_matrix, kmeans_anchor_ids, top_k_overlap


class LowRankCrossEncoder:
    """A stand-in cross-encoder whose score matrix has rank ``rank``: score(q, i) = f(q) · W · g(i)."""

    def __init__(self, texts: list[str], rank: int = 6, seed: int = 0, name: str = "fake/low-rank") -> None:
        rng = np.random.default_rng(seed)
        self.vectors = {t: rng.normal(size=rank) for t in texts}
        self.weights = rng.normal(size=(rank, rank))
        self.name_or_path = name
        self.calls = 0

    def predict(self, pairs, batch_size: int = 32, show_progress_bar: bool = False) -> np.ndarray:
        self.calls += len(pairs)
        return np.array([self.vectors[q] @ self.weights @ self.vectors[i] for q, i in pairs])

    def encode(self, texts, batch_size: int = 32, show_progress_bar: bool = False, normalize_embeddings: bool = False):
        vectors = np.stack([self.vectors[t] for t in texts])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True) if normalize_embeddings else vectors


ITEMS = [f"item {i}" for i in range(60)]
QUERIES = [f"query {i}" for i in range(30)]


@pytest.fixture
def cross_encoder() -> LowRankCrossEncoder:
    return LowRankCrossEncoder(ITEMS + QUERIES)


def _exact_top(cross_encoder, queries, k: int) -> list[list[int]]:
    tops = []
    for query in queries:
        scores = cross_encoder.predict([(query, item) for item in ITEMS])
        tops.append(sorted(range(len(ITEMS)), key=lambda i: (-scores[i], i))[:k])
    return tops


def test_all_items_as_anchors_reproduce_the_exact_scores() -> None:
    cross_encoder = LowRankCrossEncoder(ITEMS + QUERIES, rank=80)  # full rank: only all-item anchors are exact
    anchors = [f"item {i}" for i in range(60)] + QUERIES[:20]  # |V| = 80 >= N: R has full column rank
    index = CURIndex.build(cross_encoder, ITEMS, anchor_queries=anchors, n_anchor_items=60, show_progress_bar=False)
    for query in QUERIES[20:]:
        exact = cross_encoder.predict([(query, item) for item in ITEMS])
        np.testing.assert_allclose(index.approximate_scores(exact[index.anchor_item_ids]), exact, rtol=1e-4, atol=1e-4)


def test_low_rank_scores_are_recovered_from_few_anchors(cross_encoder) -> None:
    index = CURIndex.build(cross_encoder, ITEMS, anchor_queries=QUERIES[:10], n_anchor_items=10,
                           show_progress_bar=False)  # fmt: skip
    query = QUERIES[25]
    exact = cross_encoder.predict([(query, item) for item in ITEMS])
    np.testing.assert_allclose(index.approximate_scores(exact[index.anchor_item_ids]), exact, rtol=1e-3, atol=1e-3)


def test_rerank_over_every_item_gives_the_exact_top_k_and_counts_calls(cross_encoder) -> None:
    index = CURIndex.build(cross_encoder, ITEMS, anchor_queries=QUERIES[:8], n_anchor_items=8, show_progress_bar=False)
    hits, calls = index.search(QUERIES[10:15], top_k=5, rerank_k=52)
    assert [[h["corpus_id"] for h in row] for row in hits] == _exact_top(cross_encoder, QUERIES[10:15], 5)
    assert calls == [60] * 5  # 8 anchors + the 52 other items; anchor scores are reused, not recomputed
    hits, calls = index.search(QUERIES[10:15], top_k=5, rerank_k=10)
    assert calls == [18] * 5  # 8 anchors + the 10 best approximations among the others (rank 6: ranked exactly)
    assert top_k_overlap(hits, _exact_top(cross_encoder, QUERIES[10:15], 5), 5) == 1


def test_save_and_load_round_trip_gives_identical_results(cross_encoder, tmp_path) -> None:
    index = CURIndex.build(cross_encoder, ITEMS, n_anchor_queries=8, query_pool=QUERIES[:20], n_anchor_items=6,
                           show_progress_bar=False)  # fmt: skip
    index.save_pretrained(tmp_path / "index")
    assert {p.name for p in (tmp_path / "index").iterdir()} >= {"config.json", "cur_index.safetensors", "items.json"}
    loaded = CURIndex.from_pretrained(str(tmp_path / "index"), cross_encoder=cross_encoder)
    assert loaded.cross_encoder_name == "fake/low-rank" and loaded.items == ITEMS
    assert loaded.search(QUERIES[20:], top_k=3, rerank_k=8) == index.search(QUERIES[20:], top_k=3, rerank_k=8)


def test_loading_with_another_cross_encoder_warns_with_both_names(cross_encoder, tmp_path) -> None:
    index = CURIndex.build(cross_encoder, ITEMS, anchor_queries=QUERIES[:5], n_anchor_items=5, show_progress_bar=False)
    index.save_pretrained(tmp_path / "index")
    other = LowRankCrossEncoder(ITEMS + QUERIES, name="someone/else")
    with pytest.warns(UserWarning, match=r"fake/low-rank.*someone/else"):
        CURIndex.from_pretrained(str(tmp_path / "index"), cross_encoder=other)
    with pytest.raises(ValueError, match="Pass `cross_encoder`"):
        CURIndex.from_pretrained(str(tmp_path / "index")).search(["query 1"])


def test_build_resumes_from_its_checkpoint_rows(cross_encoder, tmp_path) -> None:
    first = CURIndex.build(cross_encoder, ITEMS, anchor_queries=QUERIES[:6], n_anchor_items=5, show_progress_bar=False,
                           checkpoint_dir=tmp_path / "rows")  # fmt: skip
    calls = cross_encoder.calls
    again = CURIndex.build(cross_encoder, ITEMS, anchor_queries=QUERIES[:6], n_anchor_items=5, show_progress_bar=False,
                           checkpoint_dir=tmp_path / "rows")  # fmt: skip
    assert cross_encoder.calls == calls and len(list((tmp_path / "rows").glob("row_*.npy"))) == 6
    np.testing.assert_array_equal(first.item_matrix, again.item_matrix)


def test_kmeans_anchors_are_distinct_items_near_cluster_centres(cross_encoder) -> None:
    ids = kmeans_anchor_ids(cross_encoder.encode(ITEMS), 8, seed=0)
    assert len(set(ids.tolist())) == 8 and ids.max() < len(ITEMS)
    index = CURIndex.build(cross_encoder, ITEMS, anchor_queries=QUERIES[:10], n_anchor_items=8,
                           anchor_strategy="kmeans", embedder=cross_encoder, show_progress_bar=False)  # fmt: skip
    assert index.anchor_strategy == "kmeans" and sorted(index.anchor_item_ids.tolist()) == sorted(ids.tolist())


def test_singular_anchor_block_is_handled_by_the_pseudo_inverse() -> None:
    scores = np.ones((4, 10))  # rank 1: every anchor block is singular
    matrix = cur_item_matrix(scores, np.array([0, 1, 2]))
    assert np.isfinite(matrix).all()
    np.testing.assert_allclose(np.ones(3) @ matrix, np.ones(10), atol=1e-9)


def test_biencoder_rerank_baseline_spends_rerank_k_calls(cross_encoder) -> None:
    hits, calls = biencoder_rerank_search(cross_encoder, cross_encoder, ITEMS, QUERIES[:3], top_k=5, rerank_k=60)
    assert calls == [60, 60, 60]
    assert [[h["corpus_id"] for h in row] for row in hits] == _exact_top(cross_encoder, QUERIES[:3], 5)


class NaNCrossEncoder(LowRankCrossEncoder):
    def predict(self, pairs, batch_size: int = 32, show_progress_bar: bool = False) -> np.ndarray:
        scores = super().predict(pairs)
        scores[1] = np.nan
        return scores


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_anchor_items": 61, "anchor_queries": QUERIES[:3]}, "exceeds the number of items"),
        ({"n_anchor_items": 0, "anchor_queries": QUERIES[:3]}, "`n_anchor_items`"),
        ({"anchor_queries": []}, "`anchor_queries`"),
        ({}, "Pass `anchor_queries`"),
        ({"anchor_queries": QUERIES[:3], "anchor_strategy": "kmeans"}, "needs an `embedder`"),
        ({"anchor_queries": QUERIES[:3], "anchor_strategy": "best"}, "`anchor_strategy`"),
        ({"anchor_queries": ["query 1", "  "]}, r"`anchor_queries\[1\]`"),
    ],
)
def test_bad_build_arguments_raise(cross_encoder, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CURIndex.build(cross_encoder, ITEMS, show_progress_bar=False, **{"n_anchor_items": 5, **kwargs})


def test_non_finite_scores_and_empty_queries_raise(cross_encoder) -> None:
    with pytest.raises(ValueError, match="non-finite score"):
        CURIndex.build(NaNCrossEncoder(ITEMS + QUERIES), ITEMS, anchor_queries=QUERIES[:3], n_anchor_items=3,
                       show_progress_bar=False)  # fmt: skip
    index = CURIndex.build(cross_encoder, ITEMS, anchor_queries=QUERIES[:3], n_anchor_items=3, show_progress_bar=False)
    with pytest.raises(ValueError, match="`queries`"):
        index.search([])
    with pytest.raises(ValueError, match="top_k"):
        index.search(["query 1"], top_k=10, rerank_k=5)


@pytest.mark.slow
def test_cur_on_the_real_minilm_cross_encoder_beats_the_baselines_at_the_same_calls(minilm) -> None:
    from scipy.stats import spearmanr
    from sentence_transformers import CrossEncoder

    from hf_ext import load_stsb, minilm_path

    warnings.simplefilter("ignore")
    cross_encoder = CrossEncoder(str(minilm_path()), num_labels=1)  # the real MiniLM encoder, a fresh (seeded) head
    data = load_stsb("validation")
    items = list(dict.fromkeys(data["sentence1"]))[:80]
    queries = list(dict.fromkeys(data["sentence2"]))[:18]
    index = CURIndex.build(cross_encoder, items, anchor_queries=queries[:12], n_anchor_items=12, batch_size=64,
                           show_progress_bar=False)  # fmt: skip
    test_queries = queries[12:]
    exact = np.stack([cross_encoder.predict([(q, item) for item in items], batch_size=64) for q in test_queries])
    truth = [set(np.argsort(-row, kind="stable")[:5].tolist()) for row in exact]

    def overlap(hits) -> float:
        return float(
            np.mean([len({h["corpus_id"] for h in row[:5]} & top) / 5 for row, top in zip(hits, truth, strict=True)])
        )

    hits, calls = index.search(test_queries, top_k=5, rerank_k=10)
    assert calls == [22] * 6  # 12 anchors + 10 re-scored: 27.5% of the 80 items
    # The floors at the same 22 calls: a uniformly random subset scored exactly finds each true top-5 item with
    # probability 22 / 80; the bi-encoder (real MiniLM) retrieves 22 and the cross-encoder re-ranks them.
    random_floor = 22 / 80
    baseline, baseline_calls = biencoder_rerank_search(minilm, cross_encoder, items, test_queries, top_k=5, rerank_k=22)
    assert baseline_calls == [22] * 6
    cur_overlap = overlap(hits)
    assert cur_overlap >= 0.8 and cur_overlap >= random_floor + 0.4 and cur_overlap >= overlap(baseline) + 0.3
    # adaCUR on the real scores: the same 22 calls in 5 rounds, each re-solved from every item scored so far
    rounds, rounds_calls = index.search(test_queries, top_k=5, rerank_k=10, rounds=5)
    assert rounds_calls == calls
    print(
        f"real MiniLM top-5 overlap at 22 of 80 calls: ANNCUR {cur_overlap:.3f}, adaCUR 5 rounds {overlap(rounds):.3f}"
    )
    assert overlap(rounds) >= 0.8 and overlap(rounds) >= overlap(baseline) + 0.3
    # The approximation itself: all 80 scores from the 12 anchor scores, close to the exact ones in value and order
    # (a wrong pseudo-inverse or a transposed factor is far off in both).
    approx = np.stack([index.approximate_scores(row[index.anchor_item_ids]) for row in exact])
    spread = np.linalg.norm(exact - exact.mean(axis=1, keepdims=True), axis=1)
    assert np.mean(np.linalg.norm(approx - exact, axis=1) / spread) < 0.7
    assert np.mean([spearmanr(a, e)[0] for a, e in zip(approx, exact, strict=True)]) > 0.8


def test_checkpoint_rows_of_other_queries_or_items_are_not_reused(cross_encoder, tmp_path) -> None:
    CURIndex.build(cross_encoder, ITEMS, anchor_queries=QUERIES[:3], n_anchor_items=3, show_progress_bar=False,
                   checkpoint_dir=tmp_path / "rows")  # fmt: skip
    calls = cross_encoder.calls
    other = CURIndex.build(cross_encoder, ITEMS, anchor_queries=QUERIES[3:6], n_anchor_items=3,
                           show_progress_bar=False, checkpoint_dir=tmp_path / "rows")  # fmt: skip
    assert cross_encoder.calls == calls + 3 * len(ITEMS)  # scored afresh, not read from the first build's rows
    fresh = CURIndex.build(cross_encoder, ITEMS, anchor_queries=QUERIES[3:6], n_anchor_items=3, show_progress_bar=False)
    np.testing.assert_array_equal(other.item_matrix, fresh.item_matrix)


def test_two_fine_tunes_of_one_base_model_are_told_apart(tiny_cross_encoder_dir, tmp_path) -> None:
    import torch
    from sentence_transformers import CrossEncoder

    from hf_ext.retrieval.cur import cross_encoder_fingerprint, cross_encoder_name

    folders = []
    for seed in (0, 1):  # two "fine-tunes": the same base, its weights nudged differently, saved apart
        model = CrossEncoder(str(tiny_cross_encoder_dir), num_labels=1, device="cpu")
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in model.model.parameters():
                param.add_(1e-3 * torch.randn_like(param))
        model.save_pretrained(str(tmp_path / f"tune{seed}"))
        folders.append(str(tmp_path / f"tune{seed}"))
    first, second = (CrossEncoder(folder, num_labels=1, device="cpu") for folder in folders)
    for model in (first, second):  # one name for both, as two fine-tunes of one Hub base model report
        model.model_card_data.base_model = "org/base-cross-encoder"
    assert cross_encoder_name(first) == cross_encoder_name(second)
    assert cross_encoder_fingerprint(first) != cross_encoder_fingerprint(second)
    assert cross_encoder_fingerprint(first) == cross_encoder_fingerprint(CrossEncoder(folders[0], num_labels=1))
    items = ITEMS[:12]
    rows = tmp_path / "rows"
    index = CURIndex.build(first, items, anchor_queries=QUERIES[:3], n_anchor_items=4, checkpoint_dir=rows,
                           show_progress_bar=False)  # fmt: skip
    CURIndex.build(second, items, anchor_queries=QUERIES[:3], n_anchor_items=4, checkpoint_dir=rows,
                   show_progress_bar=False)  # fmt: skip
    assert len(list(rows.glob("*.npy"))) == 6  # the second fine-tune's rows are its own, never the first's
    index.save_pretrained(tmp_path / "index")
    loaded = CURIndex.from_pretrained(str(tmp_path / "index"))
    assert loaded.cross_encoder_fingerprint == cross_encoder_fingerprint(first)
    with pytest.warns(UserWarning, match="other weights"):
        loaded.search(QUERIES[5:6], top_k=2, rerank_k=3, cross_encoder=second)


# ---------------------------------------------------------------------------------------------- multi-round (adaCUR)

ADA_ITEMS = [f"item {i}" for i in range(80)]
ADA_QUERIES = [f"query {i}" for i in range(40)]


def _adacur_reference(cross_encoder, anchor_queries, anchor_ids, query, rerank_k, rounds, top_k):
    """adaCUR by hand: the anchor scores R from pair-by-pair calls, each round's weights by least squares
    (`lstsq`, not a pseudo-inverse) on float16-rounded R after the first round (float64 R in the first, as the
    index's item matrix); returns the top-k ids and the number of distinct items scored."""
    full = np.array([[cross_encoder.predict([(q, item)])[0] for item in ADA_ITEMS] for q in anchor_queries])
    rounded = full.astype(np.float16).astype(np.float64)
    exact = {int(i): cross_encoder.predict([(query, ADA_ITEMS[i])])[0] for i in anchor_ids}
    per_round = [rerank_k // rounds + (1 if r < rerank_k % rounds else 0) for r in range(rounds)]
    for r, size in enumerate(per_round):
        matrix = full if r == 0 else rounded
        ids = list(exact)
        weights = np.linalg.lstsq(matrix[:, ids].T, np.array([exact[i] for i in ids]), rcond=1e-4)[0]
        approx = weights @ matrix
        candidates = [i for i in sorted(range(len(ADA_ITEMS)), key=lambda i: (-approx[i], i)) if i not in exact]
        for i in candidates[:size]:
            exact[i] = cross_encoder.predict([(query, ADA_ITEMS[i])])[0]
    return sorted(exact, key=lambda i: (-exact[i], i))[:top_k], len(exact)


def _ada_truth(cross_encoder, queries) -> list[list[int]]:
    tops = []
    for query in queries:
        scores = cross_encoder.predict([(query, item) for item in ADA_ITEMS])
        tops.append(sorted(range(len(ADA_ITEMS)), key=lambda i: (-scores[i], i))[:5])
    return tops


@pytest.fixture
def rank12() -> LowRankCrossEncoder:
    # rank 12 with 5 anchor items: one round cannot resolve the scores; 12 scored items and 20 anchor queries can
    return LowRankCrossEncoder(ADA_ITEMS + ADA_QUERIES, rank=12, seed=3)


def _ada_index(cross_encoder) -> CURIndex:
    return CURIndex.build(cross_encoder, ADA_ITEMS, anchor_queries=ADA_QUERIES[:20], n_anchor_items=5,
                          show_progress_bar=False, seed=1)  # fmt: skip


@pytest.mark.parametrize("rounds", [1, 2, 3, 7])
def test_multi_round_search_matches_a_hand_written_adacur(rank12, rounds: int) -> None:
    index = _ada_index(rank12)
    queries = ADA_QUERIES[25:33]
    hits, calls = index.search(queries, top_k=5, rerank_k=14, rounds=rounds)
    for query, row, spent in zip(queries, hits, calls, strict=True):
        ids, scored = _adacur_reference(rank12, ADA_QUERIES[:20], index.anchor_item_ids, query, 14, rounds, 5)
        assert [h["corpus_id"] for h in row] == ids
        assert spent == scored == 5 + 14  # the same calls for any number of rounds


def test_rounds_find_what_one_round_misses_at_the_same_calls(rank12) -> None:
    index = _ada_index(rank12)
    queries = ADA_QUERIES[25:40]
    truth = _ada_truth(rank12, queries)
    one, calls_one = index.search(queries, top_k=5, rerank_k=14)
    three, calls_three = index.search(queries, top_k=5, rerank_k=14, rounds=2)
    assert calls_one == calls_three == [19] * len(queries)
    assert top_k_overlap(three, truth, 5) == 1.0  # after 12 scored items the scores are resolved exactly
    assert top_k_overlap(one, truth, 5) < 0.9


def test_multi_round_with_every_item_scored_is_exact_and_survives_save_and_load(rank12, tmp_path) -> None:
    index = _ada_index(rank12)
    queries = ADA_QUERIES[25:30]
    hits, calls = index.search(queries, top_k=5, rerank_k=75, rounds=4)
    truth = _ada_truth(rank12, queries)
    assert [[h["corpus_id"] for h in row] for row in hits] == truth and calls == [80] * 5
    index.save_pretrained(tmp_path / "index")
    loaded = CURIndex.from_pretrained(str(tmp_path / "index"), cross_encoder=rank12)
    assert loaded.anchor_scores.dtype == np.float16
    np.testing.assert_array_equal(loaded.anchor_scores, index.anchor_scores)
    assert loaded.search(queries, top_k=5, rerank_k=9, rounds=3) == index.search(queries, top_k=5, rerank_k=9, rounds=3)


@pytest.mark.parametrize(
    ("rounds", "match"), [(0, "`rounds`"), (15, "`rounds`"), (True, "`rounds`"), (2.0, "`rounds`")]
)
def test_bad_rounds_raise(rank12, rounds, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _ada_index(rank12).search(["query 30"], top_k=5, rerank_k=14, rounds=rounds)


def test_an_index_without_anchor_scores_refuses_more_than_one_round(rank12) -> None:
    index = _ada_index(rank12)
    old = CURIndex(index.items, index.anchor_item_ids, index.item_matrix, index.anchor_queries, "fake/low-rank")
    old.cross_encoder = rank12
    assert old.search(["query 30"], top_k=5, rerank_k=14) == index.search(["query 30"], top_k=5, rerank_k=14)
    with pytest.raises(ValueError, match="anchor scores"):
        old.search(["query 30"], top_k=5, rerank_k=14, rounds=2)


def test_anchor_scores_of_the_wrong_shape_or_past_float16_are_refused(rank12) -> None:
    index = _ada_index(rank12)
    args = (index.items, index.anchor_item_ids, index.item_matrix, index.anchor_queries)
    with pytest.raises(ValueError, match=r"`anchor_scores` has shape \(19, 80\), expected \(20, 80\)"):
        CURIndex(*args, anchor_scores=np.zeros((19, 80)))
    with pytest.raises(ValueError, match="`anchor_scores` overflows float16"):
        CURIndex(*args, anchor_scores=np.full((20, 80), 1e5))
