"""CUR at scale: build time (1 and 2 processes), search time per query and memory, for N = 10k, 100k and 1M items.

    python benchmarks/cur_scale.py                      # N = 10,000 / 100,000 / 1,000,000 (~15 min on 2 cores)
    python benchmarks/cur_scale.py --sizes 10000 100000
    python benchmarks/cur_scale.py --table              # the docs page's table from the results file

**The scorer is a stand-in, for timing only**: ``StandInScorer`` scores a pair as ``tanh(e_q W e_i / sqrt(d))`` from
seeded 32-d vectors, about a microsecond per pair, so the curve shows what the index itself costs (scoring loops,
all-gather, factorisation, saving, memory-mapped search) and not a cross-encoder's forward passes, which a user
multiplies in (MiniLM-L6 on this CPU: ~280 pairs/s). Quality is measured on the real cross-encoder in
``benchmarks/cur_recall.py``. Items: the 13,227 unique STS-B train + dev sentences, each repeated with a variant
number up to N. Fixed settings: 200 anchor queries, 100 anchor items, blocks of 4,096 items, ``rerank_k`` 100.

Each measurement runs in a fresh child process: the 1-process build (both cores), the 2-process build (two gloo
ranks, one core each; its index is compared with the 1-process one), and the search over the saved index,
memory-mapped (the default) and read into memory (``mmap=False``), 20 queries at 1 and 5 rounds. Memory is counted
from the arrays (the index's matrices by where they live: mapped from the file or in the process's memory; the
items' strings) and, beside it, what the kernel reports for the search process (anonymous and file-backed resident
pages after the searches, peak resident set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import child_env, protocol, save_results

from hf_ext import cache_dir, load_stsb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SIZES = (10_000, 100_000, 1_000_000)
N_ANCHOR_QUERIES, N_ANCHOR_ITEMS, BLOCK_SIZE, RERANK_K, TOP_K = 200, 100, 4096, 100, 10
N_SEARCH_QUERIES, ROUNDS = 20, (1, 5)
DIM = 32


class StandInScorer:
    """Timing stand-in for a cross-encoder (not a model): ``tanh(e_q W e_i / sqrt(d))`` from seeded vectors of
    the texts it is given, the same in every process; ``predict`` as sentence-transformers' ``CrossEncoder``."""

    def __init__(self, texts: list[str], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.row = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        self.vectors = rng.normal(size=(len(self.row), DIM)).astype(np.float32)
        self.weights = (rng.normal(size=(DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
        self.name_or_path = "stand-in/tanh-bilinear-32d"

    def predict(self, pairs, batch_size: int = 64, show_progress_bar: bool = False) -> np.ndarray:
        row = self.row
        queries = self.vectors[[row[q] for q, _ in pairs]] @ self.weights
        items = self.vectors[[row[i] for _, i in pairs]]
        return np.tanh(np.einsum("nd,nd->n", queries, items) / np.sqrt(DIM))


def texts(n_items: int) -> tuple[list[str], list[str], list[str]]:
    """Items (STS-B sentences with variant numbers), anchor queries (drawn from the items), search queries."""
    base: list[str] = []
    for split in ("train", "validation"):
        data = load_stsb(split)
        base += list(data["sentence1"]) + list(data["sentence2"])
    base = list(dict.fromkeys(base))
    items = [base[i % len(base)] + ("" if i < len(base) else f" (variant {i // len(base)})") for i in range(n_items)]
    rng = np.random.default_rng(0)
    anchors = [items[i] for i in sorted(rng.choice(n_items, N_ANCHOR_QUERIES, replace=False))]
    test = load_stsb("test")
    queries = list(dict.fromkeys(test["sentence1"]))[:N_SEARCH_QUERIES]
    return items, anchors, queries


def _status() -> dict[str, int]:
    """The kernel's view of this process's memory (bytes): resident anonymous / file-backed pages, peak resident."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return {"rss_anon_bytes": fields.get("RssAnon"), "rss_file_bytes": fields.get("RssFile"),
            "peak_rss_bytes": fields.get("VmHWM")}  # fmt: skip


def _build(n_items: int):
    from hf_ext.retrieval import CURIndex

    items, anchors, queries = texts(n_items)
    scorer = StandInScorer(items + queries)
    start = time.perf_counter()
    index = CURIndex.build(scorer, items, anchor_queries=anchors, n_anchor_items=N_ANCHOR_ITEMS,
                           block_size=BLOCK_SIZE, show_progress_bar=False)  # fmt: skip
    return index, time.perf_counter() - start


def child_build(n_items: int, folder: str | Path) -> dict:
    folder = Path(folder)
    index, seconds = _build(n_items)
    start = time.perf_counter()
    index.save_pretrained(folder)
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    return {"build_s": seconds, "save_s": time.perf_counter() - start, "pairs": N_ANCHOR_QUERIES * n_items,
            "files_bytes": files, **_status()}  # fmt: skip


def _rank_build(rank: int, world_size: int, n_items: int, folder: str) -> dict:
    import torch.distributed as dist

    from hf_ext.retrieval import CURIndex

    dist.barrier()
    index, seconds = _build(n_items)
    result = {"build_s": seconds, **_status()}
    if rank == 0:  # against the 1-process index on disk
        single = CURIndex.from_pretrained(folder)
        result["max_abs_diff_item_matrix"] = float(np.abs(index.item_matrix - single.item_matrix).max())
        ours, theirs = index.anchor_scores, single.anchor_scores  # float16, as stored
        diff = np.abs(ours.astype(np.float32) - theirs.astype(np.float32))  # type: ignore[union-attr]
        result["max_abs_diff_anchor_scores"] = float(diff.max())
        spacing = np.spacing(np.maximum(np.abs(ours), np.abs(theirs))).astype(np.float32)  # type: ignore[arg-type]
        result["max_float16_ulps_anchor_scores"] = float((diff / spacing).max())
    return result


def child_build2(n_items: int, folder: str | Path) -> dict:
    from hf_ext.testing import run_distributed

    ranks = run_distributed(_rank_build, world_size=2, args=(n_items, str(folder)), timeout=3600)
    return {"build_s": max(r["build_s"] for r in ranks), "ranks": ranks}


def child_search(n_items: int, folder: str | Path, mmap: bool) -> dict:
    from hf_ext.retrieval import CURIndex

    items, _, queries = texts(n_items)
    scorer = StandInScorer(items + queries)
    del items
    before = _status()["rss_anon_bytes"]  # the interpreter, torch and the scorer, before the index is loaded
    start = time.perf_counter()
    index = CURIndex.from_pretrained(str(folder), cross_encoder=scorer, mmap=mmap)
    result: dict = {"load_s": time.perf_counter() - start, "rss_anon_bytes_before_load": before}
    arrays = {"item_matrix": index.item_matrix, "anchor_scores": index.anchor_scores,
              "anchor_item_ids": index.anchor_item_ids}  # fmt: skip
    result["mapped_array_bytes"] = sum(a.nbytes for a in arrays.values() if isinstance(a, np.memmap))
    result["in_memory_array_bytes"] = sum(a.nbytes for a in arrays.values() if not isinstance(a, np.memmap))
    result["items_bytes"] = sum(sys.getsizeof(t) for t in index.items) + sys.getsizeof(index.items)
    result["per_query_work_bytes"] = 3 * 8 * n_items  # approximate scores, their copy for the cut, the mask (float64)
    for rounds in ROUNDS:
        index.search(queries[:1], top_k=TOP_K, rerank_k=RERANK_K, rounds=rounds)  # warm the pages and caches
        start = time.perf_counter()
        _, calls = index.search(queries, top_k=TOP_K, rerank_k=RERANK_K, rounds=rounds)
        result[f"search_s_per_query_rounds{rounds}"] = (time.perf_counter() - start) / len(queries)
        result[f"calls_per_query_rounds{rounds}"] = float(np.mean(calls))
    return {**result, **_status()}


def _run_child(kind: str, n_items: int, folder: Path, threads: int) -> dict:
    env = child_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import cur_scale; "
            f"print('RESULT ' + json.dumps(cur_scale.child_{kind}))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} at N = {n_items} failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def _busy_loop(_: int = 0) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(20_000_000):
        total += i
    return time.perf_counter() - start


def two_process_throughput() -> float:
    """How much work two CPU-bound processes do here against one (2.0 on two independent cores)."""
    import multiprocessing

    alone = _busy_loop()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        together = pool.map(_busy_loop, [0, 1])
    return 2 * alone / max(together)


def measure(n_items: int, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    row: dict = {"n_items": n_items}
    row["build_1process"] = _run_child(f"build({n_items}, {str(folder)!r})", n_items, folder, threads)
    print(f"N = {n_items:,}: 1-process build {row['build_1process']['build_s']:.1f} s", flush=True)
    row["build_2processes"] = _run_child(f"build2({n_items}, {str(folder)!r})", n_items, folder, 1)
    print(f"N = {n_items:,}: 2-process build {row['build_2processes']['build_s']:.1f} s", flush=True)
    for mmap in (True, False):
        name = "search_mmap" if mmap else "search_in_memory"
        row[name] = _run_child(f"search({n_items}, {str(folder)!r}, {mmap})", n_items, folder, threads)
        print(f"N = {n_items:,}: {name} {row[name]['search_s_per_query_rounds1'] * 1e3:.1f} ms / query", flush=True)
    return row


def summarize(data: dict) -> dict:
    summary: dict = {"scorer": data["config"]["scorer"],
                     "two_process_throughput_of_this_cpu": data["config"]["two_process_throughput"]}  # fmt: skip
    for row in data["rows"]:
        n = f"n{row['n_items'] // 1000}k" if row["n_items"] < 1_000_000 else f"n{row['n_items'] // 1_000_000}m"
        mapped, memory = row["search_mmap"], row["search_in_memory"]
        summary.update({
            f"{n}_build_1process_s": row["build_1process"]["build_s"],
            f"{n}_build_2processes_s": row["build_2processes"]["build_s"],
            f"{n}_build_2processes_item_matrix_max_abs_diff": row["build_2processes"]["ranks"][0][
                "max_abs_diff_item_matrix"],
            f"{n}_build_2processes_anchor_scores_max_float16_ulps": row["build_2processes"]["ranks"][0][
                "max_float16_ulps_anchor_scores"],
            f"{n}_search_ms_per_query_rounds1": 1e3 * mapped["search_s_per_query_rounds1"],
            f"{n}_search_ms_per_query_rounds5": 1e3 * mapped["search_s_per_query_rounds5"],
            f"{n}_search_mapped_bytes": mapped["mapped_array_bytes"],
            f"{n}_search_in_memory_array_bytes": mapped["in_memory_array_bytes"] + mapped["items_bytes"],
            f"{n}_search_rss_anon_bytes_mmap": mapped["rss_anon_bytes"],
            f"{n}_search_rss_anon_bytes_no_mmap": memory["rss_anon_bytes"],
        })  # fmt: skip
    return summary


def table(data: dict) -> str:
    lines = ["| items N | build, 1 process | build, 2 processes | search / query (1 round, 5 rounds) | index mapped "
             "from disk | in memory at search (arrays + items) | resident anonymous, mmap / no mmap |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    mib = 2**20
    for row in data["rows"]:
        b1, b2, s, m = row["build_1process"], row["build_2processes"], row["search_mmap"], row["search_in_memory"]
        lines.append(
            f"| {row['n_items']:,} | {b1['build_s']:.1f} s | {b2['build_s']:.1f} s | "
            f"{1e3 * s['search_s_per_query_rounds1']:.1f} / {1e3 * s['search_s_per_query_rounds5']:.1f} ms | "
            f"{s['mapped_array_bytes'] / mib:,.0f} MiB | {(s['in_memory_array_bytes'] + s['items_bytes']) / mib:,.0f} "
            f"MiB | {s['rss_anon_bytes'] / mib:,.0f} / {m['rss_anon_bytes'] / mib:,.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--work_dir", type=Path, default=cache_dir() / "cur_scale")
    parser.add_argument("--output", type=Path, default=RESULTS / "cur_scale.json")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.output.read_text())))
        return
    throughput = two_process_throughput()
    print(f"two CPU-bound processes here do {throughput:.2f}x the work of one", flush=True)
    rows = [measure(n, args.work_dir / f"n{n}") for n in args.sizes]
    data = {
        "config": {"scorer": "stand-in (timing only): tanh of a bilinear form of seeded 32-d vectors, not a model",
                   "n_anchor_queries": N_ANCHOR_QUERIES, "n_anchor_items": N_ANCHOR_ITEMS, "block_size": BLOCK_SIZE,
                   "rerank_k": RERANK_K, "top_k": TOP_K, "n_search_queries": N_SEARCH_QUERIES, "rounds": ROUNDS,
                   "items": "STS-B train + dev unique sentences, repeated with variant numbers up to N",
                   "two_process_throughput": throughput},
        "protocol": protocol(selection_split="none: a timing curve at fixed settings", test_split="timing only",
                             chosen={}, seeds=[0]),
        "rows": rows,
    }  # fmt: skip
    save_results(args.output, data, summarize)
    print(table(data))


if __name__ == "__main__":
    main()
