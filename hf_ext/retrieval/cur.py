"""CURIndex: near-exact cross-encoder top-k at a fraction of the cross-encoder calls (ANNCUR, EMNLP 2022).

Offline, anchor queries ``V`` are scored against every item (``R``, ``|V| x N``) and the item matrix
``pinv(R[:, U]) @ R`` (``|U| x N``) is stored, ``U`` being the anchor items. Online, a query is scored against the
anchor items only (``c``, ``|U|`` calls), all ``N`` scores are approximated by ``c @ item_matrix``, and the best
``rerank_k`` of the other items are re-scored exactly: ``|U| + rerank_k`` calls instead of ``N``; the top-k comes
from every exactly scored item (candidates and anchors). With ``rounds=R`` (adaCUR, Yadav et al. 2023) the
``rerank_k`` calls are spent in ``R`` rounds, and after each round the query's approximation is re-solved from every
item scored so far against the stored anchor scores ``R``, so later rounds aim where the earlier ones pointed.

Example:

```python
>>> import tempfile
>>> from sentence_transformers import CrossEncoder
>>> from hf_ext import load_stsb, minilm_path
>>> from hf_ext.retrieval import CURIndex
>>> # any object with `predict(pairs)`; a trained cross-encoder in practice (here MiniLM with a fresh head)
>>> cross_encoder = CrossEncoder(str(minilm_path()), num_labels=1)
>>> sentences = list(dict.fromkeys(load_stsb("test")["sentence1"]))
>>> items = sentences[:30]
>>> index = CURIndex.build(cross_encoder, items, anchor_queries=sentences[100:106], n_anchor_items=6,
...                        show_progress_bar=False)
>>> hits, calls = index.search(["Someone plays music."], top_k=3, rerank_k=6)
>>> len(hits[0]), calls  # 3 hits, exact scores; 6 anchor items + 6 re-ranked calls instead of 30
(3, [12])
>>> hits, calls = index.search(["Someone plays music."], top_k=3, rerank_k=6, rounds=2)  # adaCUR, same calls
>>> with tempfile.TemporaryDirectory() as folder:  # or push_to_hub("me/my-cur-index")
...     index.save_pretrained(folder)
...     loaded = CURIndex.from_pretrained(folder, cross_encoder=cross_encoder)
>>> loaded.search(["Someone plays music."], top_k=3, rerank_k=6, rounds=2) == (hits, calls)
True

```
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from huggingface_hub import ModelHubMixin
from tqdm.auto import tqdm

from ..distributed import get_world_size
from .cur_scoring import DEFAULT_BLOCK_SIZE, score_anchor_matrix, score_pairs
from .memmap import memmap_safetensors

ANCHOR_STRATEGIES = ("random", "kmeans")
# Singular values of the anchor matrix below RCOND times the largest are treated as zero by the pseudo-inverse
# (numpy's lstsq convention scaled up for float32 scores): a singular or near-singular anchor block does not
# blow the item matrix up.
DEFAULT_RCOND = 1e-4
CONFIG_NAME = "config.json"  # huggingface_hub's name: the mixin then leaves it as written here
WEIGHTS_NAME = "cur_index.safetensors"
ITEMS_NAME = "items.json"


def cross_encoder_name(cross_encoder: Any) -> str | None:
    """The Hub id or path a (sentence-transformers) cross-encoder was loaded from, when it says."""
    for getter in (
        lambda m: m.model_card_data.base_model,
        lambda m: m.config._name_or_path,
        lambda m: m.model.config._name_or_path,
        lambda m: m.name_or_path,
    ):
        try:
            name = getter(cross_encoder)
        except AttributeError:
            continue
        if isinstance(name, str) and name:
            return name
    return None


def cross_encoder_fingerprint(cross_encoder: Any) -> str | None:
    """A digest of a cross-encoder's weights (every parameter's name, shape, dtype and a strided sample of at most
    4,096 of its values, plus its sum), so two fine-tunes of one base model, which share their name, differ; None for
    a scorer without torch parameters."""
    parameters = getattr(cross_encoder, "named_parameters", None)
    if parameters is None:
        model = getattr(cross_encoder, "model", None)
        parameters = getattr(model, "named_parameters", None)
    if not callable(parameters):
        return None
    import torch

    digest = hashlib.sha1()
    seen = False
    with torch.no_grad():
        for name, param in parameters():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].double().cpu()
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}:{float(flat.double().sum())!r}".encode())
            digest.update(sample.numpy().tobytes())
            seen = True
    return digest.hexdigest()[:16] if seen else None


def _check_items(items: Sequence[str], name: str) -> list[str]:
    if isinstance(items, str) or not isinstance(items, Sequence) or len(items) == 0:
        raise ValueError(f"`{name}` must be a non-empty list of strings.")
    for index, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"`{name}[{index}]` is empty or not a string: every entry must be non-empty text.")
    return list(items)


def kmeans_anchor_ids(embeddings: np.ndarray, n_anchors: int, *, seed: int = 0, iterations: int = 25) -> np.ndarray:
    """Indices of the items nearest to ``n_anchors`` k-means centres (cosine, k-means++ start), all distinct."""
    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32), dim=1)
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    centres = [x[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    closest = 1 - x @ centres[0]
    for _ in range(1, n_anchors):  # k-means++: the next centre far from the chosen ones
        probs = closest.clamp(min=0) ** 2
        pick = torch.multinomial(probs / probs.sum(), 1, generator=generator) if probs.sum() > 0 else torch.tensor([0])
        centres.append(x[pick].squeeze(0))
        closest = torch.minimum(closest, 1 - x @ centres[-1])
    c = torch.stack(centres)
    for _ in range(iterations):
        assign = (x @ c.T).argmax(dim=1)
        for k in range(n_anchors):
            members = x[assign == k]
            if len(members):
                c[k] = torch.nn.functional.normalize(members.mean(0), dim=0)
    similarity = x @ c.T  # (n, k)
    chosen: list[int] = []
    for k in range(n_anchors):  # nearest item per centre, distinct
        for index in similarity[:, k].argsort(descending=True).tolist():
            if index not in chosen:
                chosen.append(index)
                break
    return np.asarray(chosen, dtype=np.int64)


class CURIndex(ModelHubMixin, library_name="hf_ext", tags=["cross-encoder", "anncur", "retrieval"]):
    """A CUR (ANNCUR) index of ``items`` for one cross-encoder: build offline, `search` online.

    Build it with `CURIndex.build`; save with ``save_pretrained`` / ``push_to_hub`` (huggingface_hub's mixin:
    safetensors for the matrices, JSON for the config and the items) and load with ``from_pretrained``, which
    memory-maps the item matrix and the anchor scores (``mmap=False`` reads them into memory): a search reads them
    from the page cache, and the process's own memory holds the items and one query's ``N`` scores.

    Args:
        items (`list[str]`): the corpus.
        anchor_item_ids (`np.ndarray`): the anchor items ``U`` (indices into ``items``).
        item_matrix (`np.ndarray` of shape `(len(U), len(items))`): ``pinv(R[:, U]) @ R``.
        anchor_queries (`list[str]`): the anchor queries ``V`` (kept for provenance).
        cross_encoder_name (`str`, *optional*): the Hub id or path of the cross-encoder it was built with.
        cross_encoder_fingerprint (`str`, *optional*): `cross_encoder_fingerprint` of its weights (tells fine-tunes of
            one base model apart).
        rcond (`float`, *optional*, defaults to `1e-4`): the pseudo-inverse's relative cut-off it was built with.
        anchor_strategy (`str`, *optional*, defaults to `"random"`): how the anchor items were chosen.
        anchor_scores (`np.ndarray` of shape `(len(anchor_queries), len(items))`, *optional*): ``R``, kept in float16
            (what multi-round search re-solves against; an index without it searches in one round only).
    """

    def __init__(
        self,
        items: list[str],
        anchor_item_ids: np.ndarray,
        item_matrix: np.ndarray,
        anchor_queries: list[str],
        cross_encoder_name: str | None = None,
        rcond: float = DEFAULT_RCOND,
        anchor_strategy: str = "random",
        cross_encoder_fingerprint: str | None = None,
        anchor_scores: np.ndarray | None = None,
    ) -> None:
        self.items = list(items)
        self.anchor_item_ids = np.asarray(anchor_item_ids, dtype=np.int64)
        self.item_matrix = np.asanyarray(item_matrix, dtype=np.float32)  # a memory-mapped matrix stays mapped
        self.anchor_queries = list(anchor_queries)
        self.cross_encoder_name = cross_encoder_name
        self.cross_encoder_fingerprint = cross_encoder_fingerprint
        self.rcond = float(rcond)
        self.anchor_strategy = anchor_strategy
        self.cross_encoder: Any = None
        expected = (len(self.anchor_item_ids), len(self.items))
        if self.item_matrix.shape != expected:
            raise ValueError(f"`item_matrix` has shape {self.item_matrix.shape}, expected {expected}.")
        self.anchor_scores = None if anchor_scores is None else np.asanyarray(anchor_scores, dtype=np.float16)
        expected = (len(self.anchor_queries), len(self.items))
        if self.anchor_scores is not None and self.anchor_scores.shape != expected:
            raise ValueError(f"`anchor_scores` has shape {self.anchor_scores.shape}, expected {expected}.")
        if self.anchor_scores is not None and not _all_finite(self.anchor_scores):
            raise ValueError("`anchor_scores` overflows float16: the cross-encoder's scores must lie within +-65504.")

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        cross_encoder: Any,
        items: Sequence[str],
        *,
        anchor_queries: Sequence[str] | None = None,
        n_anchor_queries: int | None = None,
        query_pool: Sequence[str] | None = None,
        n_anchor_items: int = 100,
        anchor_strategy: str = "random",
        embedder: Any = None,
        rcond: float = DEFAULT_RCOND,
        batch_size: int = 64,
        show_progress_bar: bool = True,
        checkpoint_dir: str | Path | None = None,
        seed: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> CURIndex:
        """Score the anchor queries against every item and factorise.

        Args:
            cross_encoder: any object with sentence-transformers' ``predict(pairs, batch_size=...,
                show_progress_bar=...)`` (duck-typed: other rerankers plug in).
            items (`list[str]`): the corpus.
            anchor_queries (`list[str]`, *optional*): the anchor queries ``V``; or ``n_anchor_queries`` drawn
                (seeded) from ``query_pool``. Anchor queries should look like the queries to come, and must not be
                the test queries of an evaluation.
            n_anchor_items (`int`, *optional*, defaults to `100`): ``|U|``, at most ``len(items)``.
            anchor_strategy (`str`, *optional*, defaults to `"random"`): ``random`` (uniform, the paper's) or
                ``kmeans`` (the items nearest to k-means centres of ``embedder.encode(items)``; needs ``embedder``,
                e.g. a `SentenceTransformer`).
            rcond (`float`, *optional*, defaults to `1e-4`): singular values of ``R[:, U]`` below ``rcond`` times
                the largest are cut by the pseudo-inverse (a singular anchor block is handled, not amplified).
            batch_size (`int`, *optional*, defaults to `64`): cross-encoder batch size.
            show_progress_bar (`bool`, *optional*, defaults to `True`): a bar over the anchor queries.
            checkpoint_dir (`str`, *optional*): each anchor query's scores on each block of items are saved there
                as they are computed and reused by a later call with the same query, items and cross-encoder (with any
                number of processes), so an interrupted build resumes.
            seed (`int`, *optional*, defaults to `0`): seed of the anchor draws.
            block_size (`int`, *optional*, defaults to `4096`): items per scoring block (one ``predict`` call per
                anchor query and block; the unit that processes split and checkpoints keep).

        Under ``torch.distributed`` (``accelerate launch`` / ``torchrun``, the process group initialised, e.g. by
        ``accelerate.PartialState()``) every rank calls ``build`` with the same arguments and its own cross-encoder;
        the ranks score contiguous slices of the item blocks and all-gather them
        (`hf_ext.retrieval.cur_scoring.score_anchor_matrix`), so each returns the index a single process builds.
        Save it from one rank.
        """
        items = _check_items(items, "items")
        if anchor_strategy not in ANCHOR_STRATEGIES:
            raise ValueError(f"`anchor_strategy` must be one of {ANCHOR_STRATEGIES}, got {anchor_strategy!r}.")
        if isinstance(n_anchor_items, bool) or not isinstance(n_anchor_items, int) or n_anchor_items < 1:
            raise ValueError(f"`n_anchor_items` must be an int >= 1, got {n_anchor_items!r}.")
        if n_anchor_items > len(items):
            raise ValueError(f"`n_anchor_items` ({n_anchor_items}) exceeds the number of items ({len(items)}).")
        if not rcond > 0:
            raise ValueError(f"`rcond` must be > 0, got {rcond}.")
        rng = np.random.default_rng(seed)
        if anchor_queries is None:
            if query_pool is None or n_anchor_queries is None:
                raise ValueError("Pass `anchor_queries`, or `n_anchor_queries` with a `query_pool` to draw them from.")
            pool = _check_items(query_pool, "query_pool")
            if not 1 <= n_anchor_queries <= len(pool):
                raise ValueError(f"`n_anchor_queries` must be in [1, {len(pool)}], got {n_anchor_queries}.")
            anchor_queries = [pool[i] for i in sorted(rng.choice(len(pool), n_anchor_queries, replace=False))]
        anchor_queries = _check_items(anchor_queries, "anchor_queries")
        if anchor_strategy == "kmeans":
            if embedder is None:
                raise ValueError("`anchor_strategy='kmeans'` needs an `embedder` (an object with `encode(texts)`).")
            embeddings = np.asarray(embedder.encode(items, batch_size=batch_size, show_progress_bar=show_progress_bar))
            anchor_ids = kmeans_anchor_ids(embeddings, n_anchor_items, seed=seed)
        else:
            anchor_ids = np.sort(rng.choice(len(items), n_anchor_items, replace=False))
        if get_world_size() > 1:  # every rank must use rank 0's anchors (k-means on slightly other embeddings)
            shared = [anchor_ids]
            dist.broadcast_object_list(shared, src=0)
            anchor_ids = shared[0]
        fingerprint = cross_encoder_fingerprint(cross_encoder)
        scores = score_anchor_matrix(cross_encoder, anchor_queries, items, batch_size=batch_size,
                                     block_size=block_size, checkpoint_dir=checkpoint_dir,
                                     identity=f"{cross_encoder_name(cross_encoder)}\0{fingerprint}",
                                     show_progress_bar=show_progress_bar)  # R: (|V|, N)  # fmt: skip
        item_matrix = cur_item_matrix(scores, anchor_ids, rcond)
        index = cls(items, anchor_ids, item_matrix, anchor_queries, cross_encoder_name(cross_encoder), rcond,
                    anchor_strategy, fingerprint, scores)  # fmt: skip
        index.cross_encoder = cross_encoder
        return index

    # ------------------------------------------------------------------------------------------------ search

    def search(
        self,
        queries: Sequence[str],
        top_k: int = 10,
        rerank_k: int = 100,
        *,
        rounds: int = 1,
        cross_encoder: Any = None,
        batch_size: int = 64,
        show_progress_bar: bool = False,
    ) -> tuple[list[list[dict[str, Any]]], list[int]]:
        """Approximate every item's score from the anchor items', re-score the best ``rerank_k`` others exactly.

        A query costs ``|U| + rerank_k`` cross-encoder calls: the anchor items, then the ``rerank_k`` best
        approximate scores among the other items (``rerank_k`` at most ``N - |U|``); the top-k is taken from every
        exactly scored item, anchors included.

        With ``rounds=R > 1`` (adaCUR) the ``rerank_k`` calls are spent in ``R`` rounds of near-equal size (the
        first rounds take the remainder): each round scores the best-approximated items not scored yet, then the
        approximation is re-solved from every exactly scored item ``S``: ``w = c_S pinv(R[:, S])``, scores
        ``w R``, with the index's ``rcond``. ``rounds=1`` is ANNCUR's search; the call count is the same for any
        ``R``. Each round after the first costs one ``|V| x |S|`` pseudo-inverse and a ``|V| x N`` product.

        Args:
            queries (`list[str]`): the queries.
            top_k (`int`, *optional*, defaults to `10`): hits per query, at most ``|U| + rerank_k``.
            rerank_k (`int`, *optional*, defaults to `100`): exact calls beyond the anchor items.
            rounds (`int`, *optional*, defaults to `1`): rounds to spend them in, at most ``rerank_k``.
            cross_encoder (*optional*): the scorer, when the index does not hold one.

        Returns:
            ``(hits, calls)``: per query, sentence-transformers-style hits (``{"corpus_id", "score"}``, exact
            cross-encoder scores, best first, ``top_k`` of them) and the cross-encoder calls spent on it.
        """
        queries = _check_items(queries, "queries")
        cross_encoder = self._cross_encoder(cross_encoder)
        scored = len(self.anchor_item_ids) + rerank_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= scored:
            raise ValueError(f"`top_k` must be an int in [1, |U| + rerank_k = {scored}] (the items scored exactly), "
                             f"got {top_k!r}.")  # fmt: skip
        others = len(self.items) - len(self.anchor_item_ids)
        if rerank_k > others:
            raise ValueError(f"`rerank_k` ({rerank_k}) exceeds the {others} items that are not anchor items: pass at "
                             f"most {others} (then every item is scored exactly).")  # fmt: skip
        if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= rerank_k:
            raise ValueError(f"`rounds` must be an int in [1, rerank_k={rerank_k}], got {rounds!r}.")
        if rounds > 1 and self.anchor_scores is None:
            raise ValueError("`rounds` > 1 needs the anchor scores `R`, which this index does not hold (saved by an "
                             "older hf_ext): rebuild it, or search with `rounds=1`.")  # fmt: skip
        sizes = [rerank_k // rounds + (r < rerank_k % rounds) for r in range(rounds)]
        anchors = self.anchor_item_ids.tolist()
        all_hits, all_calls = [], []
        for query in tqdm(queries, desc="CUR search", disable=not show_progress_bar):
            exact = dict(zip(anchors, score_pairs(cross_encoder, [(query, self.items[i]) for i in anchors], batch_size),
                             strict=True))  # fmt: skip
            unscored = np.ones(len(self.items), dtype=bool)
            unscored[anchors] = False
            approx = self.approximate_scores(np.asarray([exact[i] for i in anchors]))
            for r, size in enumerate(sizes):
                if r > 0:  # re-solve from every item scored so far
                    approx = self._resolve(exact)
                todo = best_unscored(approx, unscored, size).tolist()  # the best approximations not scored yet
                exact.update(zip(todo, score_pairs(cross_encoder, [(query, self.items[i]) for i in todo], batch_size),
                                 strict=True))  # fmt: skip
                unscored[todo] = False
            ranked = sorted(exact, key=lambda i: (-exact[i], i))[:top_k]  # candidates and anchors: all scored exactly
            all_hits.append([{"corpus_id": i, "score": float(exact[i])} for i in ranked])
            all_calls.append(len(exact))
        return all_hits, all_calls

    def _resolve(self, exact: dict[int, float]) -> np.ndarray:
        """Every item's approximate score from the exactly scored items ``S``: ``c_S pinv(R[:, S]) R``."""
        ids = np.fromiter(exact, dtype=np.int64, count=len(exact))
        block = self.anchor_scores[:, np.sort(ids)].astype(np.float64)  # type: ignore[index]
        order = np.argsort(ids)  # columns read in file order (a memory-mapped R), weights in `exact`'s order
        values = np.fromiter(exact.values(), dtype=np.float64, count=len(exact))[order]
        # c_S pinv(R_S), as the least-squares solution of R_S^T w = c_S: the same SVD cut, without forming pinv (~2x)
        weights = np.linalg.lstsq(block.T, values, rcond=self.rcond)[0]
        return vector_times_matrix(weights, self.anchor_scores)  # type: ignore[arg-type]

    def approximate_scores(self, anchor_scores: np.ndarray) -> np.ndarray:
        """All items' approximate scores from one query's exact scores on the anchor items (``c @ item_matrix``)."""
        return vector_times_matrix(np.asarray(anchor_scores, dtype=np.float64), self.item_matrix)

    def _cross_encoder(self, cross_encoder: Any) -> Any:
        if cross_encoder is not None:
            name = cross_encoder_name(cross_encoder)
            fingerprint = cross_encoder_fingerprint(cross_encoder)
            other_name = bool(self.cross_encoder_name and name and name != self.cross_encoder_name)
            other_weights = bool(self.cross_encoder_fingerprint and fingerprint
                                 and fingerprint != self.cross_encoder_fingerprint)  # fmt: skip
            if other_name or other_weights:
                what = f"{name!r}" if other_name else f"other weights (fingerprint {fingerprint}, built with " \
                    f"{self.cross_encoder_fingerprint})"  # fmt: skip
                warnings.warn(
                    f"This CUR index was built with the cross-encoder {self.cross_encoder_name!r}, but is searched "
                    f"with {what}: its approximate scores only hold for the cross-encoder it was built with.",
                    stacklevel=3,
                )
            self.cross_encoder = cross_encoder
        if self.cross_encoder is None:
            raise ValueError(
                f"Pass `cross_encoder` (the index was built with {self.cross_encoder_name!r}) to search, or load the "
                "index with `from_pretrained(..., cross_encoder=...)`."
            )
        return self.cross_encoder

    # ------------------------------------------------------------------------------------------------ persistence

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.numpy import save_file

        save_directory = Path(save_directory)
        tensors = {"item_matrix": self.item_matrix, "anchor_item_ids": self.anchor_item_ids}
        if self.anchor_scores is not None:
            tensors["anchor_scores"] = self.anchor_scores
        save_file(tensors, str(save_directory / WEIGHTS_NAME))
        texts = {"items": self.items, "anchor_queries": self.anchor_queries}
        (save_directory / ITEMS_NAME).write_text(json.dumps(texts))
        config = {
            "cross_encoder_name": self.cross_encoder_name,
            "cross_encoder_fingerprint": self.cross_encoder_fingerprint,
            "rcond": self.rcond,
            "anchor_strategy": self.anchor_strategy,
            "n_items": len(self.items),
            "n_anchor_items": len(self.anchor_item_ids),
            "n_anchor_queries": len(self.anchor_queries),
            "format": "hf_ext.CURIndex/1",
        }
        (save_directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        cross_encoder: Any = None,
        mmap: bool = True,
        **kwargs: Any,
    ) -> CURIndex:
        from safetensors.numpy import load_file

        folder = Path(model_id)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                            force_download=force_download, local_files_only=local_files_only,
                                            token=token))  # fmt: skip
        config = json.loads((folder / CONFIG_NAME).read_text())
        texts = json.loads((folder / ITEMS_NAME).read_text())
        # memory-mapped: the item matrix and the anchor scores stay on disk, read page by page as searches touch them
        tensors = memmap_safetensors(folder / WEIGHTS_NAME) if mmap else load_file(str(folder / WEIGHTS_NAME))
        index = cls(texts["items"], tensors["anchor_item_ids"], tensors["item_matrix"], texts["anchor_queries"],
                    config.get("cross_encoder_name"), config.get("rcond", DEFAULT_RCOND),
                    config.get("anchor_strategy", "random"), config.get("cross_encoder_fingerprint"),
                    tensors.get("anchor_scores"))  # fmt: skip
        if cross_encoder is not None:
            index._cross_encoder(cross_encoder)
        return index


# Columns per step of a product with a (|U| or |V|) x N matrix: a memory-mapped or float16 matrix is converted to
# float64 a slice at a time (8 MiB at 16 rows), never whole.
COLUMN_CHUNK = 1 << 16


def vector_times_matrix(vector: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``vector @ matrix`` in float64, ``COLUMN_CHUNK`` columns at a time (each column's sum is the plain one)."""
    out = np.empty(matrix.shape[1])
    for start in range(0, matrix.shape[1], COLUMN_CHUNK):
        out[start : start + COLUMN_CHUNK] = vector @ np.asarray(matrix[:, start : start + COLUMN_CHUNK], np.float64)
    return out


def best_unscored(approx: np.ndarray, unscored: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` items with the highest ``approx`` among ``unscored``, best first, ties by lower index: what a
    stable sort of all ``N`` gives, from a partition and a sort of the candidates at or above the cut."""
    values = np.where(unscored, approx, -np.inf)
    if size >= len(values):
        candidates = np.arange(len(values))
    else:
        cut = np.partition(values, len(values) - size)[len(values) - size]  # the size-th largest
        candidates = np.flatnonzero(values >= cut)  # every tie at the cut included
    candidates = candidates[unscored[candidates]]
    return candidates[np.lexsort((candidates, -approx[candidates]))][:size]


def _all_finite(matrix: np.ndarray) -> bool:
    return all(np.isfinite(matrix[:, start : start + COLUMN_CHUNK]).all()
               for start in range(0, matrix.shape[1], COLUMN_CHUNK))  # fmt: skip


def cur_item_matrix(scores: np.ndarray, anchor_item_ids: np.ndarray, rcond: float = DEFAULT_RCOND) -> np.ndarray:
    """``pinv(R[:, U]) @ R``: the ``(|U|, N)`` item matrix of ANNCUR, from the anchor-query scores ``R``.

    The pseudo-inverse cuts singular values below ``rcond`` times the largest, so a singular anchor block gives the
    least-squares solution instead of exploding.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or not np.isfinite(scores).all():
        raise ValueError("`scores` must be a finite (n_anchor_queries, n_items) matrix.")
    block = scores[:, np.asarray(anchor_item_ids)]  # (|V|, |U|)
    return np.linalg.pinv(block, rcond=rcond) @ scores


def biencoder_rerank_search(
    bi_encoder: Any,
    cross_encoder: Any,
    items: Sequence[str],
    queries: Sequence[str],
    top_k: int = 10,
    rerank_k: int = 100,
    *,
    item_embeddings: np.ndarray | None = None,
    batch_size: int = 64,
) -> tuple[list[list[dict[str, Any]]], list[int]]:
    """The baseline: bi-encoder retrieves ``rerank_k`` items by cosine, the cross-encoder re-ranks them.

    Same output and call accounting as `CURIndex.search` (``rerank_k`` cross-encoder calls per query).
    """
    items, queries = _check_items(items, "items"), _check_items(queries, "queries")
    if top_k < 1 or rerank_k < top_k:
        raise ValueError(f"Need 1 <= top_k <= rerank_k, got top_k={top_k}, rerank_k={rerank_k}.")
    if item_embeddings is None:
        item_embeddings = np.asarray(bi_encoder.encode(items, batch_size=batch_size, normalize_embeddings=True))
    query_embeddings = np.asarray(bi_encoder.encode(queries, batch_size=batch_size, normalize_embeddings=True))
    similarity = query_embeddings @ np.asarray(item_embeddings).T
    rerank_k = min(rerank_k, len(items))
    all_hits, all_calls = [], []
    for query, row in zip(queries, similarity, strict=True):
        candidates = np.argsort(-row, kind="stable")[:rerank_k].tolist()
        exact = score_pairs(cross_encoder, [(query, items[i]) for i in candidates], batch_size)
        order = sorted(range(len(candidates)), key=lambda j: (-exact[j], candidates[j]))[:top_k]
        all_hits.append([{"corpus_id": candidates[j], "score": float(exact[j])} for j in order])
        all_calls.append(len(candidates))
    return all_hits, all_calls


def top_k_overlap(hits: list[list[dict[str, Any]]], exact_top: list[list[int]], k: int) -> float:
    """Mean share of the exact top-``k`` ids found in each query's top-``k`` hits."""
    if not hits or len(hits) != len(exact_top):
        raise ValueError("`hits` and `exact_top` must be non-empty and of equal length.")
    pairs = zip(hits, exact_top, strict=True)
    shares = [len({hit["corpus_id"] for hit in found[:k]} & set(truth[:k])) / k for found, truth in pairs]
    return sum(shares) / len(shares)
