"""The offline part of CUR: every anchor query scored against every item, in blocks that ranks share and resume.

The anchor score matrix ``R`` (``|V| x N`` cross-encoder calls) is the cost of building a `CURIndex`. The items are
cut into blocks of ``block_size`` consecutive items; under ``torch.distributed`` (``accelerate launch``,
``torchrun``) each rank scores a contiguous slice of the blocks, and the slices are all-gathered so every rank
holds the full ``R``. Each (anchor query, block) piece is scored by one ``predict`` call whatever the number of
processes, so a 2-process build sees the same batches as a 1-process one and gives the same matrix. With a
``checkpoint_dir`` every piece is saved as it is scored and reused by a later call with the same query, items and
cross-encoder, with any number of processes: a killed build resumes where it stopped.

Example:

```python
>>> import numpy as np
>>> from hf_ext.retrieval.cur_scoring import score_anchor_matrix
>>> class Lengths:  # any object with sentence-transformers' `predict(pairs, batch_size, show_progress_bar)`
...     def predict(self, pairs, batch_size=64, show_progress_bar=False):
...         return np.array([len(q) * len(i) for q, i in pairs], dtype=float)
>>> score_anchor_matrix(Lengths(), ["ab", "abc"], ["x", "xy", "xyz"], block_size=2, show_progress_bar=False)
array([[2., 4., 6.],
       [3., 6., 9.]])

```
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..distributed import get_rank, get_world_size

# Items per scoring block: large enough that a `predict` call batches well and a 1M-item build keeps a few hundred
# checkpoint files per anchor query, small enough that a killed build loses little and ranks split a corpus of a
# few thousand items evenly.
DEFAULT_BLOCK_SIZE = 4096

__all__ = ["DEFAULT_BLOCK_SIZE", "item_blocks", "rank_blocks", "score_anchor_matrix", "score_pairs"]


def score_pairs(cross_encoder: Any, pairs: list[tuple[str, str]], batch_size: int) -> np.ndarray:
    """Cross-encoder scores of ``pairs`` as float64; non-finite scores are an error (never silently kept)."""
    if not pairs:
        return np.zeros(0)
    scores = np.asarray(cross_encoder.predict(pairs, batch_size=batch_size, show_progress_bar=False), dtype=np.float64)
    scores = scores.reshape(len(pairs), -1)
    if scores.shape[1] != 1:
        raise ValueError(f"The cross-encoder must return one score per pair, got {scores.shape[1]} per pair.")
    scores = scores[:, 0]
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"The cross-encoder returned a non-finite score ({scores[bad]}) for the pair {pairs[bad]!r}.")
    return scores


def save_row(path: Path, row: np.ndarray) -> None:
    """Save a row of scores as ``.npy`` through a temporary file and a rename: a killed write leaves no row."""
    partial = path.with_suffix(".partial.npy")
    np.save(partial, row)
    partial.replace(path)


def item_blocks(n_items: int, block_size: int = DEFAULT_BLOCK_SIZE) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: the items cut into consecutive blocks of ``block_size`` (the last one shorter)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}.")
    return [(start, min(start + block_size, n_items)) for start in range(0, n_items, block_size)]


def rank_blocks(blocks: list[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """The contiguous slice of ``blocks`` that ``rank`` of ``world_size`` scores (slices differ by at most one)."""
    n = len(blocks)
    return blocks[rank * n // world_size : (rank + 1) * n // world_size]


def _digest(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


def _check_ranks_agree(what: dict[str, str]) -> None:
    """Every rank must build from the same inputs: a rank with other items or queries would join a wrong matrix."""
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, what)
    for rank, other in enumerate(gathered):
        for name, value in what.items():
            if other[name] != value:
                raise ValueError(f"Rank {rank} passed other {name} than rank {get_rank()}: every rank of a "
                                 f"distributed CUR build must pass the same items, anchor queries and "
                                 f"cross-encoder weights.")  # fmt: skip


# Bytes per all-gather call: gloo moves one 160 MB tensor ~10x slower than the same bytes in 8 MiB pieces.
GATHER_CHUNK_BYTES = 1 << 23


def _all_gather_columns(local: np.ndarray, widths: list[int]) -> np.ndarray:
    """Concatenate every rank's ``(rows, width_r)`` float64 block along the columns, in rank order (a few rows per
    all-gather call)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    widest = max(widths)
    out = np.empty((local.shape[0], sum(widths)))
    step = max(1, GATHER_CHUNK_BYTES // (8 * widest))
    offsets = np.cumsum([0, *widths])
    for start in range(0, local.shape[0], step):
        rows = local[start : start + step]
        padded = torch.zeros((rows.shape[0], widest), dtype=torch.float64, device=device)
        padded[:, : rows.shape[1]] = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
        buffers = [torch.empty_like(padded) for _ in widths]
        dist.all_gather(buffers, padded)
        for rank, (buffer, width) in enumerate(zip(buffers, widths, strict=True)):
            out[start : start + rows.shape[0], offsets[rank] : offsets[rank] + width] = buffer[:, :width].cpu().numpy()
    return out


def score_anchor_matrix(
    cross_encoder: Any,
    anchor_queries: Sequence[str],
    items: Sequence[str],
    *,
    batch_size: int = 64,
    block_size: int = DEFAULT_BLOCK_SIZE,
    checkpoint_dir: str | Path | None = None,
    identity: str = "",
    show_progress_bar: bool = True,
) -> np.ndarray:
    """``R``: every anchor query's cross-encoder score against every item, ``(len(anchor_queries), len(items))``.

    Under an initialised ``torch.distributed`` process group with more than one rank, each rank scores its
    contiguous slice of the item blocks (`rank_blocks`) and receives the others' by one all-gather of
    ``|V| x N`` float64 values in total; every rank returns the full matrix. Each rank needs its own
    cross-encoder on its own device (e.g. ``CrossEncoder(..., device=f"cuda:{local_rank}")``).

    Args:
        cross_encoder: any object with sentence-transformers' ``predict(pairs, batch_size=...,
            show_progress_bar=...)``.
        anchor_queries (`list[str]`): the anchor queries ``V``.
        items (`list[str]`): the corpus.
        batch_size (`int`, *optional*, defaults to `64`): the cross-encoder's batch size.
        block_size (`int`, *optional*, defaults to `4096`): items per block (one ``predict`` call per anchor
            query and block, the unit ranks split and checkpoints keep).
        checkpoint_dir (`str`, *optional*): each (query, block) piece is saved there as it is scored and reused by
            a later call with the same query, items, block and ``identity``; a shared folder when ranks run on
            several machines (otherwise each machine resumes its own pieces).
        identity (`str`, *optional*): what tells cross-encoders apart in the checkpoint names (its name and a
            digest of its weights; `CURIndex.build` passes both).
        show_progress_bar (`bool`, *optional*, defaults to `True`): a bar over this rank's pairs (rank 0 only).
    """
    anchor_queries, items = list(anchor_queries), list(items)
    blocks = item_blocks(len(items), block_size)
    rank, world_size = get_rank(), get_world_size()
    items_digest = _digest(*items)
    if world_size > 1:
        _check_ranks_agree({"items": items_digest, "anchor queries": _digest(*anchor_queries), "identity": identity})
    mine = rank_blocks(blocks, rank, world_size)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    context = _digest(items_digest, identity)
    local = np.empty((len(anchor_queries), sum(end - start for start, end in mine)))
    bar = tqdm(total=local.size, desc="CUR: anchor queries x items", unit="pair",
               disable=not show_progress_bar or rank != 0)  # fmt: skip
    for q, query in enumerate(anchor_queries):
        column = 0
        for start, end in mine:
            path = None
            if folder is not None:  # the name carries query, items, block and cross-encoder: other inputs never match
                digest = _digest(context, query, str(start), str(end))[:16]
                path = folder / f"row_{q:06d}_items{start}-{end}_{digest}.npy"
            if path is not None and path.is_file():
                piece = np.load(path)
            else:
                piece = score_pairs(cross_encoder, [(query, item) for item in items[start:end]], batch_size)
                if path is not None:
                    save_row(path, piece)
            local[q, column : column + end - start] = piece
            column += end - start
            bar.update(end - start)
    bar.close()
    if world_size == 1:
        return local
    widths = [sum(end - start for start, end in rank_blocks(blocks, r, world_size)) for r in range(world_size)]
    return _all_gather_columns(local, widths)
