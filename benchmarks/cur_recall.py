"""CUR (ANNCUR) vs bi-encoder + re-rank: overlap with the exact cross-encoder top-k per cross-encoder call.

    python benchmarks/cur_recall.py                       # trains the cross-encoder if needed, scores, evaluates
    python benchmarks/cur_recall.py --cross_encoder PATH  # a CrossEncoder folder or Hub id instead
    python benchmarks/cur_recall.py --dtype bfloat16      # the cross-encoder in bf16 (AMX CPUs, GPUs): ~4x faster
    python benchmarks/cur_recall.py --table               # the docs page's table from the results file

Setup: items = the unique sentences of STS-B train + dev; test queries = ``--n_test_queries`` unique STS-B test
sentences that are not items (never anchors); the cross-encoder = the embedded MiniLM fine-tuned on STS-B train by
``recipes/train_cosent.py --model_type cross`` (CrossEncoderCoSENTLoss, scale 5), trained once and cached. The
exact scores of the test queries and of the anchor-query pool against every item are computed once (cached .npy
under ``--cache_dir``, resumable by rows, one folder per ``--dtype``); the scores are the cross-encoder's raw
logits (``activation_fn=Identity``: ANNCUR factorises the scores the model ranks by, and a sigmoid would bend the
low-rank structure; the ranking is the same). Every method is then evaluated on those exact scores, with calls counted
as `CURIndex.search` and `biencoder_rerank_search` spend them:

- CUR: ``|U|`` anchor-item calls + the ``rerank_k`` best approximate candidates not among them; anchors random (the
  paper) or k-means (items nearest to k-means centres of MiniLM embeddings); three splits of a budget between
  ``|U|`` and ``rerank_k``; ``|V|`` = 50, 100 or all 200 anchor queries;
- bi-encoder (the embedded all-MiniLM-L6-v2) retrieves ``rerank_k`` = the budget, the cross-encoder re-ranks them.

Budgets: 1, 2, 5 and 10% of the corpus per query; top-1 / 10 / 50 overlap with the exact top-k. Diagnostics: how
concentrated the exact top-10 lists are (the cross-encoder's own hubs), and the 10% overlaps split by whether a query
has a paraphrase among the items.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from _common import protocol, save_results
from tqdm.auto import tqdm

from hf_ext import cache_dir, load_stsb, minilm_path
from hf_ext.retrieval import cur_item_matrix, kmeans_anchor_ids
from hf_ext.retrieval.cur import save_row, score_pairs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUDGETS = (0.01, 0.02, 0.05, 0.10)
ANCHOR_SHARES = (0.25, 0.5, 0.75)  # share of the budget spent on anchor items
ANCHOR_QUERY_COUNTS = (50, 100, 200)  # |V|: the first 50 / 100 / all of the scored anchor queries
PARAPHRASE_COSINE = 0.7  # a query "has a paraphrase" among the items if its nearest item is this close (MiniLM)
KS = (1, 10, 50)


def corpus() -> tuple[list[str], list[str]]:
    items: list[str] = []
    for split in ("train", "validation"):
        data = load_stsb(split)
        items += list(data["sentence1"]) + list(data["sentence2"])
    items = list(dict.fromkeys(items))
    known = set(items)
    test = load_stsb("test")
    queries = [s for s in dict.fromkeys(list(test["sentence1"]) + list(test["sentence2"])) if s not in known]
    return items, queries


def train_cross_encoder(folder: Path) -> Path:
    if (folder / "results.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT / "recipes"))
    import train_cosent

    args, training_args = train_cosent.parse_args(["--model_type", "cross", "--loss", "cosent", "--scale", "5",
                                                   "--output_dir", str(folder), "--eval_strategy", "no",
                                                   "--evaluate_before_training", "false"])  # fmt: skip
    train_cosent.main(args, training_args)
    return folder


def score_matrix(cross_encoder, queries: list[str], items: list[str], path: Path, batch_size: int) -> np.ndarray:
    """Exact scores of ``queries`` x ``items``, one row at a time, cached (resumable) in ``path`` (.npy rows)."""
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, query in enumerate(tqdm(queries, desc=f"exact scores -> {path.name}")):
        row_path = path / f"{index:06d}.npy"
        if row_path.is_file():
            rows.append(np.load(row_path))
            continue
        row = score_pairs(cross_encoder, [(query, item) for item in items], batch_size)
        save_row(row_path, row)
        rows.append(row)
    return np.stack(rows)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _overlaps(found: list[list[int]], exact_top: np.ndarray) -> dict[str, float]:
    return {f"top{k}": float(np.mean([len(set(f[:k]) & set(t[:k].tolist())) / k for f, t in zip(found, exact_top,
                                                                                              strict=True)]))
            for k in KS}  # fmt: skip


def evaluate_cur(exact: np.ndarray, anchors_r: np.ndarray, anchor_ids: np.ndarray, rerank_k: int, top: int) -> tuple:
    matrix = cur_item_matrix(anchors_r, anchor_ids)
    approx = exact[:, anchor_ids] @ matrix  # (queries, N)
    found, calls = [], []
    unscored = np.ones(exact.shape[1], dtype=bool)
    unscored[anchor_ids] = False
    for q in range(exact.shape[0]):  # as `CURIndex.search`: the anchors, then the best approximations of the others
        order = np.argsort(-approx[q], kind="stable")
        pool = anchor_ids.tolist() + order[unscored[order]][:rerank_k].tolist()
        calls.append(len(pool))
        found.append(sorted(pool, key=lambda i, q=q: (-exact[q, i], i))[:top])
    return found, float(np.mean(calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cross_encoder", default=None)
    parser.add_argument("--n_test_queries", type=int, default=100)
    parser.add_argument("--n_anchor_queries", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the cross-encoder's weights and activations; every score (exact and CUR) uses it",
    )
    parser.add_argument("--cache_dir", type=Path, default=cache_dir() / "cur_bench")
    parser.add_argument("--output", type=Path, default=RESULTS / "pre_protocol" / "cur_recall.json")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.output.read_text())))
        return
    from sentence_transformers import CrossEncoder, SentenceTransformer

    items, pool = corpus()
    rng = random.Random(0)
    test_queries = rng.sample(pool, args.n_test_queries)
    anchor_pool = rng.sample(items, args.n_anchor_queries)  # anchor queries come from the items, never the tests
    path = args.cross_encoder or str(train_cross_encoder(args.cache_dir / "cross_encoder"))
    cross_encoder = CrossEncoder(path, num_labels=1, activation_fn=torch.nn.Identity())
    cross_encoder.model.to(getattr(torch, args.dtype))
    rows_dir = args.cache_dir / f"rows_{args.dtype}"
    exact = score_matrix(cross_encoder, test_queries, items, rows_dir / "test", args.batch_size)
    anchors_r = score_matrix(cross_encoder, anchor_pool, items, rows_dir / "anchor", args.batch_size)
    bi = SentenceTransformer(str(minilm_path()))
    item_emb = bi.encode(items, batch_size=256, normalize_embeddings=True, show_progress_bar=True)
    query_emb = bi.encode(test_queries, batch_size=256, normalize_embeddings=True)
    similarity = query_emb @ item_emb.T
    counts = sorted({min(v, args.n_anchor_queries) for v in ANCHOR_QUERY_COUNTS} | {args.n_anchor_queries})
    rows, found_at = evaluate(exact, anchors_r, similarity, item_emb, counts)
    data = {"config": {"n_items": len(items), "n_test_queries": len(test_queries),
                       "n_anchor_queries": args.n_anchor_queries, "cross_encoder": path, "dtype": args.dtype,
                       "scores": "logits"}, "rows": rows}  # fmt: skip
    # Pre-protocol: the |U| / rerank split and |V| are chosen on the reported test queries and random anchors are
    # one draw; issue 19 moves the choice to dev queries (results then go to benchmarks/results/).
    data["protocol"] = protocol(selection_split="pre-protocol: the reported test queries",
                                test_split=f"{len(test_queries)} STS-B test queries", chosen={}, seeds=[0])  # fmt: skip
    data["diagnostics"] = diagnostics(exact, similarity, found_at, rows)
    save_results(args.output, data, summarize)
    plot(data, args.output.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=2))


def evaluate(exact: np.ndarray, anchors_r: np.ndarray, similarity: np.ndarray, item_emb: np.ndarray,
             anchor_query_counts: list[int]) -> tuple[list[dict], dict]:  # fmt: skip
    """Every method at every budget; returns the rows and, at the largest budget, each method's top-k lists."""
    exact_top = _top(exact, max(KS))
    kmeans_cache: dict[int, np.ndarray] = {}
    n = exact.shape[1]
    rows, found_at = [], {}
    for budget in BUDGETS:
        calls_budget = max(2, round(budget * n))
        candidates = _top(similarity, calls_budget)
        found = [sorted(c.tolist(), key=lambda i, q=q: (-exact[q, i], i))[: max(KS)] for q, c in enumerate(candidates)]
        rows.append({"method": "biencoder_rerank", "budget": budget, "calls": calls_budget, "rerank_k": calls_budget,
                     **_overlaps(found, exact_top)})  # fmt: skip
        found_at[("biencoder_rerank", budget)] = found
        for share in ANCHOR_SHARES:
            n_anchor = max(1, round(share * calls_budget))
            rerank_k = calls_budget - n_anchor
            for strategy in ("random", "kmeans"):
                if strategy == "random":
                    anchor_ids = np.sort(np.random.default_rng(0).choice(n, n_anchor, replace=False))
                else:
                    if n_anchor not in kmeans_cache:
                        kmeans_cache[n_anchor] = kmeans_anchor_ids(item_emb, n_anchor, seed=0)
                    anchor_ids = kmeans_cache[n_anchor]
                for n_queries in anchor_query_counts:  # the first |V| of the scored anchor queries
                    found, calls = evaluate_cur(exact, anchors_r[:n_queries], anchor_ids, rerank_k, max(KS))
                    rows.append({"method": f"cur_{strategy}", "budget": budget, "calls": calls,
                                 "anchor_items": n_anchor, "rerank_k": rerank_k, "anchor_queries": n_queries,
                                 **_overlaps(found, exact_top)})  # fmt: skip
                    found_at[(f"cur_{strategy}", budget, n_anchor, n_queries)] = found
                    print(rows[-1], flush=True)
    return rows, found_at


def diagnostics(exact: np.ndarray, similarity: np.ndarray, found_at: dict, rows: list[dict]) -> dict:
    """What the exact top-10 lists look like (how many slots the most frequent items hold: the cross-encoder's own
    hubs), and the 10% budget's top-10 overlaps split by whether a query has a paraphrase among the items (its
    nearest item by bi-encoder cosine >= PARAPHRASE_COSINE)."""
    top10 = _top(exact, 10)
    _, counts = np.unique(top10, return_counts=True)
    paraphrase = similarity.max(axis=1) >= PARAPHRASE_COSINE
    best = max((r for r in rows if r["budget"] == 0.10 and r["method"].startswith("cur_")), key=lambda r: r["top10"])
    methods = {"biencoder_rerank": found_at[("biencoder_rerank", 0.10)],
               "cur_best": found_at[(best["method"], 0.10, best["anchor_items"], best["anchor_queries"])]}  # fmt: skip
    split = {}
    for name, mask in (("with_paraphrase", paraphrase), ("without_paraphrase", ~paraphrase)):
        queries = np.flatnonzero(mask)
        split[name] = {"n_queries": len(queries), **{m: float(np.mean([len(set(found[q][:10]) & set(top10[q]))
                       / 10 for q in queries])) if len(queries) else None for m, found in methods.items()}}  # fmt: skip
    return {"exact_top10_distinct_items": len(counts),
            "exact_top10_slots_held_by_20_most_frequent": float(np.sort(counts)[::-1][:20].sum() / top10.size),
            "paraphrase_cosine": PARAPHRASE_COSINE, "top10_overlap_at_10pct_by_query_kind": split}  # fmt: skip


def summarize(data: dict) -> dict:
    rows = data["rows"]
    at = [r for r in rows if r["budget"] == 0.10]
    cur = [r for r in at if r["method"].startswith("cur_")]
    best = max(cur, key=lambda r: r["top10"]) if cur else None
    bi = next((r for r in at if r["method"] == "biencoder_rerank"), None)
    summary = {"budget_fraction": 0.10, "n_items": data["config"]["n_items"],
               "n_test_queries": data["config"]["n_test_queries"]}  # fmt: skip
    if best:
        summary.update({"cur_top10_overlap": best["top10"], "cur_best_config": {k: best[k] for k in ("method",
                        "anchor_items", "rerank_k", "calls")}})  # fmt: skip
    if bi:
        summary["biencoder_top10_overlap"] = bi["top10"]
    if cur:
        summary["cur_worst_config_top10_overlap"] = min(r["top10"] for r in cur)
    return summary


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KS) + 1, figsize=(6 * (len(KS) + 1), 4.5))
    for ax, k in zip(axes, KS, strict=False):
        methods = sorted({r["method"] for r in data["rows"]})
        for method in methods:
            best = {}
            for r in data["rows"]:
                if r["method"] == method:
                    best[r["budget"]] = max(best.get(r["budget"], 0.0), r[f"top{k}"])
            ax.plot([100 * b for b in best], list(best.values()), "o-", label=method)
        ax.set_xlabel("cross-encoder calls per query (% of corpus)")
        ax.set_title(f"top-{k} overlap with the exact cross-encoder")
        ax.legend()
    ax = axes[-1]  # |V| at the 10% budget, the best split of it for each anchor strategy
    for method in ("cur_random", "cur_kmeans"):
        best: dict[int, float] = {}
        for r in data["rows"]:
            if r["method"] == method and r["budget"] == 0.10:
                best[r["anchor_queries"]] = max(best.get(r["anchor_queries"], 0.0), r["top10"])
        ax.plot(sorted(best), [best[v] for v in sorted(best)], "o-", label=method)
    bi = [r["top10"] for r in data["rows"] if r["method"] == "biencoder_rerank" and r["budget"] == 0.10]
    if bi:
        ax.axhline(bi[0], color="grey", linestyle="--", label="biencoder_rerank")
    ax.set_xlabel("anchor queries |V|")
    ax.set_title("top-10 overlap at 10% of the corpus in calls")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(data: dict) -> str:
    lines = ["| calls per query | bi-encoder + re-rank | CUR random (best split) | CUR k-means (best split) |",
             "|---|---|---|---|"]  # fmt: skip
    for budget in BUDGETS:
        cells = []
        for method in ("biencoder_rerank", "cur_random", "cur_kmeans"):
            rows = [r for r in data["rows"] if r["budget"] == budget and r["method"] == method]
            cells.append(f"{max(r['top10'] for r in rows):.3f}" if rows else "n/a")
        lines.append(f"| {budget:.0%} of {data['config']['n_items']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
