"""The CUR build at scale: anchor scores in blocks shared by ranks and resumed after a kill; memory-mapped indexes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hf_ext.retrieval import CURIndex, cur_scoring
from hf_ext.retrieval import cur as cur_module
from hf_ext.retrieval.cur_scoring import item_blocks, rank_blocks, score_anchor_matrix
from hf_ext.retrieval.memmap import memmap_safetensors
from hf_ext.testing import DistributedTestError, run_distributed

ITEMS = [f"item {i}" for i in range(50)]
QUERIES = [f"query {i}" for i in range(12)]
RANK = 5


def _vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).normal(size=RANK)


class HashScorer:
    """A stateless stand-in cross-encoder (the same scores in every process): rank-5 bilinear scores of vectors
    seeded by each text's hash, plus a small non-linear term so the matrix is not exactly low-rank."""

    def __init__(self, die_after: int | None = None, die_on_rank: int = 1) -> None:
        self.calls = 0
        self.die_after, self.die_on_rank = die_after, die_on_rank

    def predict(self, pairs, batch_size: int = 32, show_progress_bar: bool = False) -> np.ndarray:
        if self.die_after is not None and self.calls >= self.die_after and _rank() == self.die_on_rank:
            os._exit(17)  # a killed process: no exception, no cleanup, nothing flushed
        self.calls += len(pairs)
        return np.array([_vector(q) @ _vector(i) + 0.1 * np.tanh(_vector(q)[0] * _vector(i)[1]) for q, i in pairs])

    def encode(self, texts, batch_size: int = 32, show_progress_bar: bool = False) -> np.ndarray:
        return np.stack([_vector(t) for t in texts])


def _rank() -> int:
    from hf_ext.distributed import get_rank

    return get_rank()


def _build(scorer, **kwargs) -> CURIndex:
    options = {"anchor_queries": QUERIES, "n_anchor_items": 8, "block_size": 7, "show_progress_bar": False}
    return CURIndex.build(scorer, ITEMS, **{**options, **kwargs})


def _arrays(index: CURIndex) -> dict[str, np.ndarray]:
    return {"anchor_item_ids": index.anchor_item_ids, "item_matrix": index.item_matrix,
            "anchor_scores": index.anchor_scores}  # fmt: skip


def _assert_same_index(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float = 1e-6) -> None:
    np.testing.assert_array_equal(got["anchor_item_ids"], want["anchor_item_ids"])
    np.testing.assert_allclose(got["item_matrix"], want["item_matrix"], rtol=0, atol=atol)
    np.testing.assert_allclose(got["anchor_scores"].astype(np.float64), want["anchor_scores"].astype(np.float64),
                               rtol=0, atol=atol)  # fmt: skip


# ------------------------------------------------------------------------------------------------ blocks and ranks


@pytest.mark.parametrize(("n_items", "block_size", "world_size"), [(50, 7, 2), (50, 7, 3), (5, 7, 2), (64, 8, 4)])
def test_blocks_cover_every_item_once_and_ranks_take_contiguous_slices(n_items, block_size, world_size) -> None:
    blocks = item_blocks(n_items, block_size)
    assert [i for start, end in blocks for i in range(start, end)] == list(range(n_items))
    assert all(end - start == block_size for start, end in blocks[:-1])
    slices = [rank_blocks(blocks, rank, world_size) for rank in range(world_size)]
    assert [b for s in slices for b in s] == blocks  # in rank order, each block once
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True])
def test_a_bad_block_size_is_refused(block_size) -> None:
    with pytest.raises(ValueError, match="`block_size` must be a positive int"):
        item_blocks(10, block_size)


def test_one_process_matrix_is_every_pair_scored_alone() -> None:
    scorer = HashScorer()
    want = np.array([[scorer.predict([(q, i)])[0] for i in ITEMS] for q in QUERIES])
    got = score_anchor_matrix(HashScorer(), QUERIES, ITEMS, block_size=7, show_progress_bar=False)
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------------ two processes


def _build_on_ranks(rank: int, world_size: int, strategies: tuple[str, ...], checkpoint_dir: str | None) -> list:
    results: list = []
    if checkpoint_dir is None:  # first, rank 1 passes the items in another order: both ranks refuse to build
        items = ITEMS if rank == 0 else ITEMS[::-1]
        try:
            CURIndex.build(HashScorer(), items, anchor_queries=QUERIES, n_anchor_items=8, show_progress_bar=False)
        except ValueError as error:
            results.append(str(error))
    for strategy in strategies:
        if strategy == "kmeans":  # and the all-gather in many pieces of a few rows (the last one shorter)
            cur_scoring.GATHER_CHUNK_BYTES = 8 * 32 * 5
        scorer = HashScorer()
        index = _build(scorer, anchor_strategy=strategy, embedder=scorer, checkpoint_dir=checkpoint_dir)
        results.append({**_arrays(index), "pairs_scored": scorer.calls})
    return results


def test_two_processes_build_the_one_process_index_and_refuse_ranks_with_other_items() -> None:
    ranks = run_distributed(_build_on_ranks, world_size=2, args=(("random", "kmeans"), None))
    for rank, result in enumerate(ranks):
        assert f"Rank {1 - rank} passed other items than rank {rank}" in result.pop(0)
    blocks = item_blocks(len(ITEMS), 7)
    for s, strategy in enumerate(("random", "kmeans")):
        single = _build(HashScorer(), anchor_strategy=strategy, embedder=HashScorer())
        for result in ranks:  # every rank holds the whole index
            _assert_same_index(result[s], _arrays(single), atol=0)
        assert [r[s]["pairs_scored"] for r in ranks] == [
            len(QUERIES) * sum(end - start for start, end in rank_blocks(blocks, rank, 2)) for rank in range(2)
        ]  # each rank scored its own slice only


def _killed_build(rank: int, world_size: int, checkpoint_dir: str, die_after: int) -> dict:
    scorer = HashScorer(die_after=die_after)
    return _arrays(_build(scorer, checkpoint_dir=checkpoint_dir))


def test_a_killed_two_process_build_resumes_from_its_checkpoints(tmp_path: Path) -> None:
    folder = tmp_path / "rows"
    blocks = item_blocks(len(ITEMS), 7)  # 8 blocks: 4 per rank; rank 1 dies after 5 of its 48 pieces
    with pytest.raises(DistributedTestError):
        run_distributed(_killed_build, world_size=2, args=(str(folder), 5 * 7), timeout=120)
    saved = sorted(folder.glob("row_*.npy"))
    assert 0 < len(saved) < len(QUERIES) * len(blocks)  # rank 0 finished its pieces, rank 1 only some
    assert not list(folder.glob("*.partial.npy"))
    ranks = [r[0] for r in run_distributed(_build_on_ranks, world_size=2, args=(("random",), str(folder)))]
    saved_pairs = sum(int(end) - int(start) for start, end in
                      (path.name.split("_items")[1].split("_")[0].split("-") for path in saved))  # fmt: skip
    assert sum(r["pairs_scored"] for r in ranks) == len(QUERIES) * len(ITEMS) - saved_pairs  # what the kill left
    single = _build(HashScorer())
    for result in ranks:
        _assert_same_index(result, _arrays(single), atol=0)
    one_process = HashScorer()  # the pieces are the same for any number of processes: one process reuses them all
    _assert_same_index(_arrays(_build(one_process, checkpoint_dir=folder)), _arrays(single), atol=0)
    assert one_process.calls == 0


# ------------------------------------------------------------------------------------------------ memory-mapped


def test_memmap_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    tensors = {"f16": rng.normal(size=(3, 5)).astype(np.float16), "f32": rng.normal(size=(7,)).astype(np.float32),
               "f64": rng.normal(size=(2, 2, 2)), "i64": np.arange(9, dtype=np.int64),
               "empty": np.zeros((0, 4), dtype=np.float32)}  # fmt: skip
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "np"})
    mapped = memmap_safetensors(tmp_path / "t.safetensors")
    assert isinstance(mapped["f16"], np.memmap) and not mapped["f16"].flags.writeable
    for name, array in load_file(str(tmp_path / "t.safetensors")).items():
        assert mapped[name].dtype == array.dtype and mapped[name].shape == array.shape
        np.testing.assert_array_equal(mapped[name], array)


def test_memmap_refuses_other_files_and_bfloat16(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        memmap_safetensors(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
    with pytest.raises(ValueError, match="not a safetensors file"):
        memmap_safetensors(tmp_path / "text")
    import torch
    from safetensors.torch import save_file as save_torch

    save_torch({"w": torch.ones(2, dtype=torch.bfloat16)}, str(tmp_path / "bf16.safetensors"))
    with pytest.raises(ValueError, match=r"'w' .* is BF16, which numpy cannot memory-map"):
        memmap_safetensors(tmp_path / "bf16.safetensors")


def test_a_loaded_index_is_memory_mapped_and_searches_like_the_in_memory_one(tmp_path: Path, monkeypatch) -> None:
    index = _build(HashScorer())
    index.save_pretrained(tmp_path / "index")
    mapped = CURIndex.from_pretrained(str(tmp_path / "index"), cross_encoder=HashScorer())
    in_memory = CURIndex.from_pretrained(str(tmp_path / "index"), cross_encoder=HashScorer(), mmap=False)
    assert isinstance(mapped.item_matrix, np.memmap) and isinstance(mapped.anchor_scores, np.memmap)
    assert not isinstance(in_memory.item_matrix, np.memmap)
    monkeypatch.setattr(cur_module, "COLUMN_CHUNK", 3)  # many column slices of the mapped matrices
    for rounds in (1, 4):
        got = mapped.search(QUERIES[:4], top_k=5, rerank_k=12, rounds=rounds)
        assert got == in_memory.search(QUERIES[:4], top_k=5, rerank_k=12, rounds=rounds)
        assert got == index.search(QUERIES[:4], top_k=5, rerank_k=12, rounds=rounds)


def test_vector_times_matrix_in_column_slices_is_the_plain_product(monkeypatch) -> None:
    rng = np.random.default_rng(1)
    vector, matrix = rng.normal(size=6), rng.normal(size=(6, 20)).astype(np.float16)
    monkeypatch.setattr(cur_module, "COLUMN_CHUNK", 7)
    np.testing.assert_allclose(cur_module.vector_times_matrix(vector, matrix), vector @ matrix.astype(np.float64),
                               rtol=1e-12)  # fmt: skip


def test_an_index_past_float16_is_refused_slice_by_slice(monkeypatch) -> None:
    scores = np.ones((2, 10))
    scores[1, 8] = 1e6
    monkeypatch.setattr(cur_module, "COLUMN_CHUNK", 4)  # the overflow sits in the last slice
    with pytest.raises(ValueError, match="overflows float16"):
        CURIndex(ITEMS[:10], np.array([0, 1]), np.zeros((2, 10)), QUERIES[:2], anchor_scores=scores)


@pytest.mark.parametrize("seed", range(5))
def test_best_unscored_is_what_a_stable_sort_of_every_item_gives(seed) -> None:
    rng = np.random.default_rng(seed)
    approx = rng.integers(0, 6, size=200).astype(np.float64)  # many ties
    unscored = rng.random(200) > 0.3
    order = np.argsort(-approx, kind="stable")
    for size in (1, 7, 50, int(unscored.sum()), 300):
        want = order[unscored[order]][:size]
        np.testing.assert_array_equal(cur_module.best_unscored(approx, unscored, size), want)


def test_top_k_may_take_every_exactly_scored_item_and_no_more() -> None:
    index = _build(HashScorer())  # 8 anchor items
    hits, calls = index.search(QUERIES[:2], top_k=8 + 3, rerank_k=3, cross_encoder=HashScorer())
    assert calls == [11, 11] and all(len(h) == 11 for h in hits)  # anchors and candidates, all exact
    assert {h["corpus_id"] for h in hits[0]} >= set(index.anchor_item_ids.tolist())
    assert [h["score"] for h in hits[0]] == sorted((h["score"] for h in hits[0]), reverse=True)
    for top_k in (0, 12, 2.5, True):
        with pytest.raises(ValueError, match=r"`top_k` must be an int in \[1, \|U\| \+ rerank_k = 11\]"):
            index.search(QUERIES[:1], top_k=top_k, rerank_k=3, cross_encoder=HashScorer())
