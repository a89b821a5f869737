"""Embedding geometry on real data: hubness reduction and geodesic similarity vs cosine; k-occurrence speed.

    python benchmarks/geometry.py                 # everything (minutes on 2 CPU cores; the 50k timing dominates)
    python benchmarks/geometry.py --parts bbc sts # the retrieval and STS parts only
    python benchmarks/geometry.py --parts speed --device cuda  # k-occurrence on a GPU (scikit-learn on CPU)
    python benchmarks/geometry.py --table         # the README table from the results file

Parts (results go to benchmarks/results/geometry.json; the PNG beside it):

- ``bbc``: the embedded all-MiniLM-L6-v2 embeds BBC News titles (queries) and bodies (corpus, the first 256 tokens);
  title -> body retrieval, the right body being the title's own article: recall@1 / @10 and MRR with cosine, CSLS,
  mutual proximity (normal and empiric), local scaling and geodesic similarity; k-skewness of the corpus's
  k-occurrence (k = 10) under cosine and of the queries' top-10 lists under each score (how often each body is
  returned). Each reduction runs twice: the bodies' neighbourhoods taken among the titles (the query distribution,
  as in the CSLS paper) and among the other bodies (what a single unseen query can use).
- ``sts``: STS-B test Spearman of cosine vs geodesic similarity, the geodesic graph built (unsupervised) over the
  test split's unique sentences.
- ``speed``: `k_occurrence` (k = 10) vs scikit-learn's exact ``NearestNeighbors(n_neighbors=k+1,
  algorithm="brute").kneighbors`` on N = 10k and 50k points of dimension 384: distinct MiniLM embeddings of BBC News
  and STS-B sentences (cosine; scikit-learn both as ``metric="cosine"`` and by its fastest exact route, euclidean
  on unit vectors) and Gaussian points (euclidean, the hub sampler's setting and the hardest case for the screen:
  the neighbours' distances crowd together). Interleaved rounds, median seconds, counts compared point by point;
  ``--device cuda`` runs `k_occurrence` on a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from _common import save_results
from scipy.stats import skew, spearmanr

from hf_ext import cache_dir, load_bbc_news, load_stsb, minilm_path
from hf_ext.retrieval import (
    GeodesicSimilarity,
    csls_scores,
    hubness_report,
    k_occurrence,
    local_scaling,
    mutual_proximity,
)
from hf_ext.retrieval.knn import fast_bf16_matmul

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _retrieval_metrics(scores: np.ndarray) -> dict[str, float]:
    """Query i's right answer is corpus item i."""
    right = scores[np.arange(len(scores)), np.arange(len(scores))]
    rank = (scores > right[:, None]).sum(axis=1)  # 0 = first
    top10 = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    returned = np.bincount(top10.ravel(), minlength=scores.shape[1])
    return {"recall1": float((rank == 0).mean()), "recall10": float((rank < 10).mean()),
            "mrr": float((1.0 / (rank + 1)).mean()), "returned_skewness": float(skew(returned))}  # fmt: skip


def bbc(data: dict, model) -> None:
    articles = load_bbc_news()
    titles = list(articles["title"])
    bodies = list(articles["text"])
    model.max_seq_length = 256
    q = torch.as_tensor(model.encode(titles, batch_size=64, show_progress_bar=True, convert_to_numpy=True))
    c = torch.as_tensor(model.encode(bodies, batch_size=32, show_progress_bar=True, convert_to_numpy=True))
    qn, cn = q / q.norm(dim=1, keepdim=True), c / c.norm(dim=1, keepdim=True)
    # Each reduction twice: neighbourhoods of the bodies taken among the titles (the query distribution, as in the
    # CSLS paper; transductive) and among the other bodies (what a single new query can use).
    scores = {
        "cosine": (qn @ cn.T).numpy(),
        "csls": csls_scores(q, c, k=10, reference=q).numpy(),
        "csls_corpus": csls_scores(q, c, k=10).numpy(),
        "mutual_proximity_normal": mutual_proximity(q, c, method="normal", reference=q).numpy(),
        "mutual_proximity_empiric": mutual_proximity(q, c, method="empiric", reference=q).numpy(),
        "mutual_proximity_normal_corpus": mutual_proximity(q, c, method="normal").numpy(),
        "local_scaling": local_scaling(q, c, k=10, reference=q).numpy(),
        "local_scaling_corpus": local_scaling(q, c, k=10).numpy(),
    }
    start = time.perf_counter()
    geodesic = GeodesicSimilarity(k=10).fit(c)
    scores["geodesic"] = geodesic.query_similarity(q)
    geodesic_seconds = time.perf_counter() - start
    results = {name: _retrieval_metrics(s) for name, s in scores.items()}
    results["corpus_hubness_cosine"] = hubness_report(c, k=10)
    results["n_articles"] = len(titles)
    results["geodesic_seconds"] = geodesic_seconds
    results["geodesic_components"] = geodesic.n_components
    data["bbc"] = results
    print(json.dumps({k: v for k, v in results.items() if isinstance(v, dict)}, indent=1), flush=True)


def sts(data: dict, model) -> None:
    test = load_stsb("test")
    sentences = list(dict.fromkeys(list(test["sentence1"]) + list(test["sentence2"])))
    position = {s: i for i, s in enumerate(sentences)}
    emb = torch.as_tensor(model.encode(sentences, batch_size=64, convert_to_numpy=True))
    a = np.array([position[s] for s in test["sentence1"]])
    b = np.array([position[s] for s in test["sentence2"]])
    en = emb / emb.norm(dim=1, keepdim=True)
    cosine = (en[a] * en[b]).sum(1).numpy()
    gold = np.asarray(test["score"], dtype=float)
    result = {"pairs": len(a), "sentences": len(sentences), "cosine_spearman": float(spearmanr(cosine, gold)[0])}
    for k in (5, 10, 20):
        geodesic = GeodesicSimilarity(k=k).fit(emb)
        result[f"geodesic_k{k}_spearman"] = float(spearmanr(geodesic.pair_similarity(a, b), gold)[0])
        result[f"geodesic_k{k}_components"] = geodesic.n_components
    data["sts"] = result
    print(result, flush=True)


def sentence_corpus() -> list[str]:
    """Distinct sentences: those of the BBC News articles (4+ words) and of every STS-B split."""
    sentences = []
    for text in load_bbc_news(dedup=False)["text"]:
        for paragraph in text.split("\n"):
            sentences += [s for s in re.split(r"(?<=[.!?])\s+", paragraph.strip()) if len(s.split()) >= 4]
    for split in ("train", "validation", "test"):
        stsb = load_stsb(split)
        sentences += list(stsb["sentence1"]) + list(stsb["sentence2"])
    return list(dict.fromkeys(sentences))


def sentence_embeddings(model, n: int) -> np.ndarray:
    """The first ``n`` distinct MiniLM embeddings (exact duplicate vectors dropped: their ties are broken by
    index here and arbitrarily by scikit-learn) of `sentence_corpus`, cached under hf_ext's cache folder."""
    sentences = sentence_corpus()
    digest = hashlib.sha1("\n".join(sentences).encode()).hexdigest()[:12]
    path = cache_dir() / f"geometry_minilm_sentences_{digest}.npy"
    if not path.is_file():
        model.max_seq_length = 128
        model.to(torch.bfloat16)  # AMX / GPU speed; the vectors are only the data set here
        emb = model.encode(sentences, batch_size=128, show_progress_bar=True, convert_to_tensor=True)
        model.to(torch.float32)
        np.save(path, emb.float().cpu().numpy())
    emb = np.load(path)
    _, first = np.unique(emb, axis=0, return_index=True)
    emb = emb[np.sort(first)]
    if len(emb) < n:
        raise ValueError(f"Only {len(emb)} distinct sentence embeddings, {n} asked for.")
    return emb[:n]


def _sklearn_counts(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    index = (
        NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric=metric)
        .fit(x)
        .kneighbors(x, return_distance=False)
    )
    counts = np.zeros(len(x), dtype=np.int64)
    for row, neighbours_of in enumerate(index):
        np.add.at(counts, [j for j in neighbours_of if j != row][:k], 1)
    return counts


def speed(data: dict, model, sizes: list[int], device: str, rounds: int, k: int = 10, dim: int = 384) -> None:
    """`k_occurrence` against scikit-learn's exact brute force, interleaved rounds, median seconds."""
    sets = {"minilm": (sentence_embeddings(model, max(sizes)), "cosine"),
            "gaussian": (torch.randn(max(sizes), dim, generator=torch.Generator().manual_seed(0)).numpy(),
                         "euclidean")}  # fmt: skip
    out = {"k": k, "device": device, "threads": torch.get_num_threads(), "rounds": rounds,
           "bf16_screen": fast_bf16_matmul(torch.device(device)), "sets": {}}  # fmt: skip
    for name, (points, metric) in sets.items():
        rows = {}
        for n in sizes:
            x = points[:n]
            xt = torch.from_numpy(x).to(device)
            # scikit-learn's fastest exact route for cosine: unit vectors, euclidean brute force (its GEMM path)
            unit = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
            methods = {
                "hf_ext": lambda xt=xt, metric=metric: k_occurrence(xt, k, metric=metric).cpu().numpy(),
                "hf_ext_float32_screen": lambda xt=xt, metric=metric: k_occurrence(
                    xt, k, metric=metric, screen_dtype="float32").cpu().numpy(),
                "sklearn": lambda unit=unit: _sklearn_counts(unit, k, "euclidean"),
            }  # fmt: skip
            if metric == "cosine":
                methods["sklearn_cosine_metric"] = lambda x=x: _sklearn_counts(x, k, "cosine")
            seconds: dict[str, list[float]] = {m: [] for m in methods}
            counts: dict[str, np.ndarray] = {}
            names = list(methods)
            for r in range(rounds):
                for method in names[r % len(names) :] + names[: r % len(names)]:
                    start = time.perf_counter()
                    counts[method] = methods[method]()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    seconds[method].append(time.perf_counter() - start)
            row = {f"{m}_seconds": float(np.median(t)) for m, t in seconds.items()}
            row["seconds_all_rounds"] = seconds
            row["speedup"] = row["sklearn_seconds"] / row["hf_ext_seconds"]
            if metric == "cosine":
                row["speedup_vs_sklearn_cosine_metric"] = row["sklearn_cosine_metric_seconds"] / row["hf_ext_seconds"]
            row["differing_points"] = {m: int((c != counts["sklearn"]).sum()) for m, c in counts.items()}
            row["identical_counts"] = not any(row["differing_points"].values())
            rows[str(n)] = row
            print(f"[speed] {name} N={n}: " + json.dumps({m: v for m, v in row.items() if m != "seconds_all_rounds"}),
                  flush=True)  # fmt: skip
        out["sets"][name] = {"metric": metric, "dim": int(points.shape[1]), "rows": rows}
    data["speed"] = out


def summarize(data: dict) -> dict:
    s: dict = {}
    if "bbc" in data:
        b = data["bbc"]
        for name, key in (("cosine", "cosine"), ("csls", "csls"), ("mutual_proximity_normal", "mp"),
                          ("local_scaling", "ls"), ("geodesic", "geodesic")):  # fmt: skip
            s[f"{key}_recall1"] = b[name]["recall1"]
            s[f"{key}_kskew"] = b[name]["returned_skewness"]
        s["mp_empiric_recall1"] = b["mutual_proximity_empiric"]["recall1"]
        for name in ("csls_corpus", "mutual_proximity_normal_corpus", "local_scaling_corpus"):
            if name in b:
                s[f"{name}_recall1"] = b[name]["recall1"]
                s[f"{name}_kskew"] = b[name]["returned_skewness"]
        s["corpus_k10_skewness"] = b["corpus_hubness_cosine"]["k_skewness"]
        s["csls_recall1_gain_points"] = 100 * (s["csls_recall1"] - s["cosine_recall1"])
    if "sts" in data:
        s["sts_cosine_spearman"] = data["sts"]["cosine_spearman"]
        s["sts_geodesic_spearman"] = data["sts"]["geodesic_k10_spearman"]
    if "speed" in data:  # headline: real sentence embeddings (cosine) vs scikit-learn's fastest exact route
        for name, suffix in (("minilm", ""), ("gaussian", "_gaussian")):
            for n, r in data["speed"]["sets"].get(name, {"rows": {}})["rows"].items():
                s[f"kocc_speedup_vs_sklearn_{int(n) // 1000}k{suffix}"] = r["speedup"]
                s[f"kocc_identical_{int(n) // 1000}k{suffix}"] = r["identical_counts"]
                if "speedup_vs_sklearn_cosine_metric" in r:
                    s[f"kocc_speedup_vs_sklearn_cosine_metric_{int(n) // 1000}k"] = r[
                        "speedup_vs_sklearn_cosine_metric"
                    ]
    return s


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(23, 5.5))
    if "bbc" in data:
        names = [n for n, v in data["bbc"].items() if isinstance(v, dict) and "recall1" in v]
        axes[0].bar(names, [data["bbc"][n]["recall1"] for n in names])
        axes[0].set_title("BBC title -> body recall@1 (MiniLM)")
        axes[1].bar(names, [data["bbc"][n]["returned_skewness"] for n in names])
        axes[1].set_title("skewness of how often each body is in a top-10")
        for ax in axes[:2]:
            plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    if "sts" in data:
        keys = ["cosine_spearman"] + [k for k in data["sts"] if k.startswith("geodesic") and k.endswith("spearman")]
        axes[2].bar(keys, [data["sts"][k] for k in keys])
        axes[2].set_ylim(min(data["sts"][k] for k in keys) - 0.05, 1.0)
        axes[2].set_title("STS-B test Spearman")
        plt.setp(axes[2].get_xticklabels(), rotation=35, ha="right")
    if "speed" in data:
        ax = axes[3]
        for name, entry in data["speed"]["sets"].items():
            sizes = sorted(entry["rows"], key=int)
            for method, style in (("hf_ext", "o-"), ("hf_ext_float32_screen", "s:"), ("sklearn", "^--"),
                                  ("sklearn_cosine_metric", "v--")):  # fmt: skip
                if f"{method}_seconds" in entry["rows"][sizes[0]]:
                    ax.plot([int(n) for n in sizes], [entry["rows"][n][f"{method}_seconds"] for n in sizes], style,
                            label=f"{name} ({entry['metric']}): {method}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("points (d = 384, k = 10)")
        ax.set_ylabel("seconds")
        ax.set_title(f"exact k-occurrence, {data['speed']['device']}, {data['speed']['threads']} threads")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(data: dict) -> str:
    s = data["summary"]
    lines = ["| BBC title -> body (MiniLM) | recall@1 | top-10 skewness |", "|---|---|---|"]
    for key, label in (("cosine", "cosine"), ("csls", "CSLS (k=10, title neighbourhoods)"),
                       ("csls_corpus", "CSLS (k=10, body neighbourhoods)"), ("mp", "mutual proximity (normal)"),
                       ("mutual_proximity_normal_corpus", "mutual proximity (normal, body neighbourhoods)"),
                       ("ls", "local scaling (k=10)"), ("local_scaling_corpus", "local scaling (body neighbourhoods)"),
                       ("geodesic", "geodesic (k=10)")):  # fmt: skip
        if f"{key}_recall1" in s:
            lines.append(f"| {label} | {s[f'{key}_recall1']:.3f} | {s[f'{key}_kskew']:.2f} |")
    if "sts_cosine_spearman" in s:
        lines.append(f"\nSTS-B test Spearman: cosine {s['sts_cosine_spearman']:.4f}, geodesic (k=10) "
                     f"{s['sts_geodesic_spearman']:.4f}.")  # fmt: skip
    if "speed" in data:
        lines += [
            "",
            "| exact k-occurrence (k = 10, d = 384) | N | hf_ext | float32 screen | scikit-learn (fastest) "
            "| scikit-learn metric='cosine' | speed-up | identical counts |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in data["speed"]["sets"].items():
            for n, r in sorted(entry["rows"].items(), key=lambda item: int(item[0])):
                cosine = f"{r['sklearn_cosine_metric_seconds']:.2f} s" if "sklearn_cosine_metric_seconds" in r else "-"
                lines.append(f"| {name} ({entry['metric']}) | {int(n):,} | {r['hf_ext_seconds']:.2f} s | "
                             f"{r['hf_ext_float32_screen_seconds']:.2f} s | {r['sklearn_seconds']:.2f} s | {cosine} | "
                             f"{r['speedup']:.1f}x | {'yes' if r['identical_counts'] else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["bbc", "sts", "speed"], choices=["bbc", "sts", "speed"])
    parser.add_argument("--speed_sizes", nargs="+", type=int, default=[10000, 50000])
    parser.add_argument("--speed_rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    parser.add_argument("--device", default="cpu", help="where `k_occurrence` runs (scikit-learn runs on CPU)")
    parser.add_argument("--output", type=Path, default=RESULTS / "geometry.json")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    data = json.loads(args.output.read_text()) if args.output.is_file() else {}
    if "sets" not in data.get("speed", {"sets": None}):
        del data["speed"]  # the earlier format (Gaussian points only): rerun the part
    if args.table:
        print(table(data))
        return
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    for part in args.parts:
        if part == "bbc":
            bbc(data, model)
        elif part == "sts":
            sts(data, model)
        else:
            speed(data, model, args.speed_sizes, args.device, args.speed_rounds)
        save_results(args.output, data, summarize)
    plot(data, args.output.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
