"""adaCUR vs ANNCUR vs bi-encoder + re-rank: overlap with the exact cross-encoder top-k per cross-encoder call.

    python benchmarks/cur_recall.py                       # trains the cross-encoder if needed, scores, evaluates
    python benchmarks/cur_recall.py --cross_encoder PATH  # a CrossEncoder folder or Hub id instead
    python benchmarks/cur_recall.py --dtype bfloat16      # the cross-encoder in bf16 (AMX CPUs, GPUs): ~4x faster
    python benchmarks/cur_recall.py --n_items 0           # all 13,227 items (2.6x the scoring: ~4 h on 2 cores)
    python benchmarks/cur_recall.py --n_items 500 --n_test_queries 10 --n_dev_queries 6 --n_anchor_queries 20 \\
        --output /tmp/cur_smoke.json                      # a small run of the whole pipeline
    python benchmarks/cur_recall.py --table               # the docs page's table from the results file

Setup: items = ``--n_items`` (default 5,000) of the unique sentences of STS-B train + dev (13,227), drawn at random
(seed 0, kept in corpus order; 0 = all of them: the exact rows cost ``rows x items`` forward passes, ~280 pairs/s
on a 2-core CPU, so the default 300 rows take ~1.5 h on 5,000 items and ~4 h on all); queries = unique STS-B test
sentences that are not train or dev sentences, shuffled (seed 0): the first ``--n_test_queries`` are the test
queries, the next ``--n_dev_queries`` the dev queries (disjoint); anchor queries ``V`` = ``--n_anchor_queries``
items (never a dev or test query). The cross-encoder = the embedded MiniLM fine-tuned on STS-B train by
``recipes/train_cosent.py --model_type cross`` (CrossEncoderCoSENTLoss, scale 5), trained once and cached; its
scores are raw logits (``activation_fn=Identity``: CUR factorises the scores the model ranks by; a sigmoid would
bend the low-rank structure, the ranking is the same).
The exact scores of the dev, test and anchor queries against every item are computed once with
`score_anchor_matrix` (checkpointed blocks under ``--cache_dir``, resumable, one folder per ``--dtype``); each
finished budget's sweeps and test rows are kept there too, so a killed run resumes after its last budget.

Every method then runs through the shipped search on those scores: `CURIndex.search` with a scorer that looks each
pair up in the exact matrix (so calls are counted exactly as a live search spends them) and the bi-encoder
baseline with the same accounting:

- ANNCUR: ``rounds=1``; adaCUR: ``rounds`` in {2, 3, 5, 10} (doubled while the best is the largest, up to
  ``rerank_k``: one item a round). Both with
  anchor items random (the paper) or k-means (items nearest to k-means centres of MiniLM embeddings, seeded), a
  share of the budget in {0.1, 0.25, 0.5, 0.75, 0.9} spent on them (the rest re-ranked; extended below 0.1 or above
  0.9 while the best is at that end), 3 anchor draws (seeds 0, 1, 2) each; ``|V|`` is the offline budget, fixed
  at all anchor queries (a diagnostic shows 25 / 50 / 100% of them);
- bi-encoder (the embedded all-MiniLM-L6-v2) retrieves ``rerank_k`` = the budget, the cross-encoder re-ranks them.

**Protocol**: at each budget (1, 2, 5, 10% of the corpus in calls per query) the dev queries choose, per method,
the anchor strategy, the share and (adaCUR) the rounds by mean top-10 overlap over the 3 draws; the test queries are
evaluated once per draw at the chosen setting: mean ± sample std over the draws, and adaCUR - ANNCUR paired by draw.
Reported: top-1 / 10 / 50 overlap with the exact cross-encoder top-k.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import choose, mean_std, paired, protocol, save_results
from tqdm.auto import tqdm

from hf_ext import cache_dir, load_stsb, minilm_path
from hf_ext.retrieval import CURIndex, cur_item_matrix, kmeans_anchor_ids
from hf_ext.retrieval.cur_scoring import score_anchor_matrix

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUDGETS = (0.01, 0.02, 0.05, 0.10)
ANCHOR_SHARES = (0.1, 0.25, 0.5, 0.75, 0.9)  # share of the budget spent on anchor items
ROUNDS = (2, 3, 5, 10)  # adaCUR; extended by doubling (up to rerank_k) while the best is the largest
STRATEGIES = ("random", "kmeans")
DRAWS = (0, 1, 2)
ANCHOR_QUERY_SHARES = (0.25, 0.5, 1.0)  # the |V| diagnostic
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


class ExactScores:
    """A scorer that looks each (query, item) pair up in the exact score matrix: `CURIndex.search` runs as it would
    live and counts its calls, without spending forward passes again."""

    def __init__(self, queries: list[str], items: list[str], exact: np.ndarray) -> None:
        self.query_row = {q: i for i, q in enumerate(queries)}
        self.item_column = {t: j for j, t in enumerate(items)}
        self.exact = exact

    def predict(self, pairs, batch_size: int = 64, show_progress_bar: bool = False) -> np.ndarray:
        rows = [self.query_row[q] for q, _ in pairs]
        return self.exact[rows, [self.item_column[i] for _, i in pairs]]


def _overlaps(found: list[list[int]], exact_top: np.ndarray) -> dict[str, float]:
    return {f"top{k}": float(np.mean([len(set(f[:k]) & set(t[:k].tolist())) / k for f, t in zip(found, exact_top,
                                                                                              strict=True)]))
            for k in KS}  # fmt: skip


class Evaluator:
    """Every method on one query set (dev or test), from the cached exact scores."""

    def __init__(self, items, queries, exact, anchor_queries, anchors_r, item_emb, similarity) -> None:
        self.items, self.queries, self.exact = items, queries, exact
        self.anchor_queries, self.anchors_r = anchor_queries, anchors_r
        self.item_emb, self.similarity = item_emb, similarity
        self.exact_top = np.argsort(-exact, axis=1, kind="stable")[:, : max(KS)]
        self.scorer = ExactScores(queries, items, exact)
        self._anchors: dict[tuple, np.ndarray] = {}

    def anchor_ids(self, strategy: str, n_anchor: int, draw: int) -> np.ndarray:
        key = (strategy, n_anchor, draw)
        if key not in self._anchors:
            if strategy == "random":
                ids = np.sort(np.random.default_rng(draw).choice(len(self.items), n_anchor, replace=False))
            else:
                ids = kmeans_anchor_ids(self.item_emb, n_anchor, seed=draw)
            self._anchors[key] = ids
        return self._anchors[key]

    def cur(self, calls: int, strategy: str, share: float, rounds: int, draw: int, n_anchor_queries: int | None = None):
        n_anchor = _n_anchor(share, calls)
        rerank_k = calls - n_anchor
        if rerank_k < rounds:
            return None
        ids = self.anchor_ids(strategy, n_anchor, draw)
        rows = self.anchors_r[: n_anchor_queries or len(self.anchors_r)]
        matrix = cur_item_matrix(rows, ids)
        index = CURIndex(self.items, ids, matrix, self.anchor_queries[: len(rows)], anchor_scores=rows)
        hits, spent = index.search(self.queries, top_k=min(max(KS), calls), rerank_k=rerank_k, rounds=rounds,
                                   cross_encoder=self.scorer)  # fmt: skip
        assert set(spent) == {calls}, spent  # every method spends the budget exactly
        return _overlaps([[h["corpus_id"] for h in q] for q in hits], self.exact_top)

    def biencoder(self, calls: int) -> dict[str, float]:
        candidates = np.argsort(-self.similarity, axis=1, kind="stable")[:, :calls]
        found = [sorted(c.tolist(), key=lambda i, q=q: (-self.exact[q, i], i))[: max(KS)]
                 for q, c in enumerate(candidates)]  # fmt: skip
        return _overlaps(found, self.exact_top)


def _n_anchor(share: float, calls: int) -> int:
    return max(1, round(share * calls))


def _sweep(evaluate, calls: int, rounds_options: tuple[int, ...]) -> dict[str, Any]:
    """The (strategy, share, rounds) with the best mean dev top-10 over the draws, by a grid and then a local search
    that brackets it: the full grid of ``STRATEGIES x ANCHOR_SHARES x rounds_options`` first; then, while the best
    cell has an untried neighbour (the other strategy; the next share either side; the next rounds either side) that
    neighbour is run, and while the best sits at an end of an axis the axis grows there: shares halved below the
    smallest (while that changes the anchor count) or moved half way to 1 above the largest (while rounds are left
    to re-rank); rounds doubled above the largest, up to ``rerank_k`` (one item a round: the end of that axis).
    Growing the rounds runs only the best cell's neighbourhood, not the whole grid again: one adaCUR round re-solves
    the query's weights over every item scored so far, so a full grid at 80 rounds costs 40x one at 2. adaCUR's
    rounds start at 2: one round is ANNCUR."""
    grid: dict[tuple, dict | None] = {}
    shares, ladder = sorted(ANCHOR_SHARES), sorted(rounds_options)

    def run(cell: tuple) -> bool:
        if cell in grid:
            return False
        runs = [evaluate.cur(calls, cell[0], cell[1], cell[2], draw) for draw in DRAWS]
        grid[cell] = None if runs[0] is None else {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        return True

    def step(values: list, value: Any) -> list:
        i = values.index(value)
        return values[max(0, i - 1) : i + 2]

    for cell in ((t, s, r) for t in STRATEGIES for s in shares for r in ladder):
        run(cell)
    while True:
        best = max((c for c in grid if grid[c] is not None), key=lambda c: (grid[c]["top10"], -c[1], -c[2]))
        strategy, share, rounds = best
        neighbours = [(t, share, rounds) for t in STRATEGIES] + [(strategy, s, rounds) for s in step(shares, share)]
        neighbours += [(strategy, share, r) for r in step(ladder, rounds)]
        if any([run(cell) for cell in neighbours]):  # every neighbour, then look again
            continue
        low, high = shares[0], shares[-1]
        up = _n_anchor((1 + high) / 2, calls)
        if share == low and _n_anchor(low / 2, calls) < _n_anchor(low, calls):
            shares.insert(0, low / 2)
        elif share == high and calls - up >= rounds and up > _n_anchor(high, calls):
            shares.append((1 + high) / 2)
        elif len(ladder) > 1 and rounds == ladder[-1] and rounds < (cap := calls - _n_anchor(share, calls)):
            ladder.append(min(2 * rounds, cap))
        else:
            break
    feasible = {c: v for c, v in grid.items() if v is not None}
    return {"strategy": strategy, "share": share, "rounds": rounds, "dev_top10": grid[best]["top10"],
            "share_sweep": choose({c[1]: v["top10"] for c, v in feasible.items() if c[0] == strategy
                                   and c[2] == rounds}),
            "rounds_sweep": choose({c[2]: v["top10"] for c, v in feasible.items() if c[:2] == (strategy, share)}),
            "grid": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in feasible.items()}}  # fmt: skip


def evaluate(dev: Evaluator, test: Evaluator, partial: Path | None = None, key: Any = None) -> tuple[list[dict], dict]:
    """At every budget: dev chooses each method's setting, the test queries are run once per draw at it. With
    ``partial``, each finished budget is written there (with ``key``, the run's configuration) and a later run with
    the same ``key`` starts after the budgets it holds."""
    n = len(dev.items)
    rows, chosen = [], {}
    done = json.loads(partial.read_text()) if partial is not None and partial.is_file() else {}
    if done.get("key") == key:
        rows, chosen = done["rows"], done["chosen"]
    for budget in tqdm(BUDGETS, desc="budgets"):
        if any(r["budget"] == budget for r in rows):
            continue
        calls = max(2, round(budget * n))
        rows.append({"method": "biencoder", "budget": budget, "calls": calls, "split": "test", **test.biencoder(calls)})
        rows.append({"method": "biencoder", "budget": budget, "calls": calls, "split": "dev", **dev.biencoder(calls)})
        for method, rounds_options in (("anncur", (1,)), ("adacur", ROUNDS)):
            pick = _sweep(dev, calls, rounds_options)
            chosen[f"{method}_{budget:.2f}"] = {k: pick[k] for k in ("strategy", "share", "rounds", "dev_top10")}
            for draw in DRAWS:
                result = test.cur(calls, pick["strategy"], pick["share"], pick["rounds"], draw)
                rows.append({"method": method, "budget": budget, "calls": calls, "split": "test", "draw": draw,
                             "strategy": pick["strategy"], "share": pick["share"], "rounds": pick["rounds"],
                             **result})  # fmt: skip
            rows.append({"method": method, "budget": budget, "calls": calls, "split": "dev_sweep", **pick})
            print(f"{budget:.0%} {method}: dev chose {chosen[f'{method}_{budget:.2f}']}", flush=True)
        if partial is not None:
            partial.write_text(json.dumps({"key": key, "rows": rows, "chosen": chosen}, default=float))
    return rows, chosen


def anchor_query_curve(dev: Evaluator, chosen: dict) -> dict:
    """Dev top-10 at the 10% budget with 25 / 50 / 100% of the anchor queries (ANNCUR at its chosen setting)."""
    pick = chosen["anncur_0.10"]
    calls = max(2, round(0.10 * len(dev.items)))
    out = {}
    for share in ANCHOR_QUERY_SHARES:
        count = max(1, round(share * len(dev.anchors_r)))
        runs = [dev.cur(calls, pick["strategy"], pick["share"], 1, draw, count) for draw in DRAWS]
        out[str(count)] = float(np.mean([r["top10"] for r in runs]))
    return out


def summarize(data: dict) -> dict:
    rows = [r for r in data["rows"] if r["split"] == "test"]
    config = data["config"]
    summary: dict[str, Any] = {"n_items": config["n_items"], "n_test_queries": config["n_test_queries"],
                               "n_dev_queries": config["n_dev_queries"], "anchor_draws": len(DRAWS)}  # fmt: skip
    per_draw: dict[tuple, dict] = {}
    for budget in BUDGETS:
        pct = f"{round(100 * budget)}pct"
        for method in ("anncur", "adacur", "biencoder"):
            cells = [r for r in rows if r["method"] == method and r["budget"] == budget]
            if not cells:
                continue
            for k in (1, 10, 50):
                stats = mean_std(r[f"top{k}"] for r in cells)
                summary[f"{method}_top{k}_overlap_{pct}"] = stats["mean"]
                if method != "biencoder":
                    summary[f"{method}_top{k}_overlap_{pct}_std"] = stats["std"]
            per_draw[(method, budget)] = {r.get("draw", 0): r["top10"] for r in cells}
        if ("anncur", budget) in per_draw and ("adacur", budget) in per_draw:
            diff = paired(per_draw[("adacur", budget)], per_draw[("anncur", budget)])
            summary[f"adacur_minus_anncur_top10_{pct}"] = diff["mean"]
            summary[f"adacur_minus_anncur_top10_{pct}_paired"] = {k: diff[k] for k in ("std", "n", "agree")}
    summary["dev_chosen"] = data["protocol"]["chosen"]
    return summary


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KS), figsize=(6 * len(KS), 4.5))
    rows = [r for r in data["rows"] if r["split"] == "test"]
    for ax, k in zip(axes, KS, strict=True):
        for method in ("adacur", "anncur", "biencoder"):
            points = []
            for budget in BUDGETS:
                cells = [r[f"top{k}"] for r in rows if r["method"] == method and r["budget"] == budget]
                if cells:
                    spread = float(np.std(cells, ddof=1)) if len(cells) > 1 else 0.0
                    points.append((100 * budget, float(np.mean(cells)), spread))
            if points:
                x, y, e = zip(*points, strict=True)
                ax.errorbar(x, y, yerr=e, fmt="o-", capsize=3, label=method)
        ax.set_xlabel("cross-encoder calls per query (% of corpus)")
        ax.set_title(f"top-{k} overlap with the exact cross-encoder (test)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(data: dict) -> str:
    s = data["summary"]
    lines = ["| calls per query | bi-encoder + re-rank | ANNCUR | adaCUR | adaCUR - ANNCUR (paired) | top-1 error "
             "ANNCUR / adaCUR |", "|---|---|---|---|---|---|"]  # fmt: skip
    for budget in BUDGETS:
        pct = f"{round(100 * budget)}pct"
        if f"anncur_top10_overlap_{pct}" not in s:
            continue
        p = s[f"adacur_minus_anncur_top10_{pct}_paired"]
        lines.append(
            f"| {budget:.0%} of {s['n_items']} | {s[f'biencoder_top10_overlap_{pct}']:.3f} | "
            f"{s[f'anncur_top10_overlap_{pct}']:.3f} ± {s[f'anncur_top10_overlap_{pct}_std']:.3f} | "
            f"{s[f'adacur_top10_overlap_{pct}']:.3f} ± {s[f'adacur_top10_overlap_{pct}_std']:.3f} | "
            f"{s[f'adacur_minus_anncur_top10_{pct}']:+.3f}, {p['agree']} of {p['n']} draws | "
            f"{1 - s[f'anncur_top1_overlap_{pct}']:.3f} / {1 - s[f'adacur_top1_overlap_{pct}']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cross_encoder", default=None)
    parser.add_argument("--n_test_queries", type=int, default=100)
    parser.add_argument("--n_dev_queries", type=int, default=50)
    parser.add_argument("--n_anchor_queries", type=int, default=150)
    parser.add_argument("--n_items", type=int, default=5000,
                        help="items drawn at random (seed 0) from STS-B train + dev; 0 = all")  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the cross-encoder's weights and activations (every score uses it)")  # fmt: skip
    parser.add_argument("--cache_dir", type=Path, default=cache_dir() / "cur_bench")
    parser.add_argument("--output", type=Path, default=RESULTS / "cur_recall.json")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.output.read_text())))
        return
    from sentence_transformers import CrossEncoder, SentenceTransformer

    items, pool = corpus()
    if args.n_items < 0 or args.n_items > len(items):
        parser.error(f"--n_items must be in [0, {len(items)}] (0 = all), got {args.n_items}")
    if args.n_items:
        items = [items[i] for i in sorted(random.Random(0).sample(range(len(items)), args.n_items))]
    random.Random(0).shuffle(pool)
    test_queries = pool[: args.n_test_queries]
    dev_queries = pool[args.n_test_queries : args.n_test_queries + args.n_dev_queries]
    anchor_queries = random.Random(1).sample(items, args.n_anchor_queries)  # items: never a dev or test query
    path = args.cross_encoder or str(train_cross_encoder(args.cache_dir / "cross_encoder"))
    cross_encoder = CrossEncoder(path, num_labels=1, activation_fn=torch.nn.Identity())
    cross_encoder.model.to(getattr(torch, args.dtype))
    rows_dir = args.cache_dir / f"rows_{args.dtype}"
    scores = {}
    for name, queries in (("test", test_queries), ("dev", dev_queries), ("anchor", anchor_queries)):
        print(f"exact scores: {len(queries)} {name} queries x {len(items)} items", flush=True)
        scores[name] = score_anchor_matrix(cross_encoder, queries, items, batch_size=args.batch_size,
                                           checkpoint_dir=rows_dir, identity=path)  # fmt: skip
    bi = SentenceTransformer(str(minilm_path()))
    item_emb = bi.encode(items, batch_size=256, normalize_embeddings=True, show_progress_bar=True)
    sims = {name: bi.encode(q, batch_size=256, normalize_embeddings=True) @ item_emb.T
            for name, q in (("test", test_queries), ("dev", dev_queries))}  # fmt: skip
    dev = Evaluator(items, dev_queries, scores["dev"], anchor_queries, scores["anchor"], item_emb, sims["dev"])
    test = Evaluator(items, test_queries, scores["test"], anchor_queries, scores["anchor"], item_emb, sims["test"])
    config = {"n_items": len(items), "n_test_queries": len(test_queries), "n_dev_queries": len(dev_queries),
              "n_anchor_queries": len(anchor_queries), "cross_encoder": path, "dtype": args.dtype, "scores": "logits",
              "budgets": BUDGETS, "anchor_shares": ANCHOR_SHARES, "rounds": ROUNDS, "strategies": STRATEGIES,
              "draws": DRAWS}  # fmt: skip
    partial = args.cache_dir / f"evaluate_{args.dtype}.partial.json"  # finished budgets: a killed run resumes
    rows, chosen = evaluate(dev, test, partial, json.loads(json.dumps(config)))
    data = {"config": config, "rows": rows}
    data["protocol"] = protocol(
        selection_split=f"{len(dev_queries)} dev queries (STS-B test sentences, disjoint from the test queries)",
        test_split=f"{len(test_queries)} STS-B test queries, once per anchor draw at each dev-chosen setting",
        chosen=chosen, seeds=DRAWS,
    )  # fmt: skip
    data["diagnostics"] = {"dev_top10_at_10pct_by_anchor_queries": anchor_query_curve(dev, chosen)}
    save_results(args.output, data, summarize)
    plot(data, args.output.with_suffix(".png"))
    print(table(data))


if __name__ == "__main__":
    main()
