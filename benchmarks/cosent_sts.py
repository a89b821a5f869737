"""CoSENT vs sentence-transformers' losses on the STS Benchmark, in one run: quality, speed and memory.

    python benchmarks/cosent_sts.py                      # everything, 3 seeds (~1 h on 2 CPU cores)
    python benchmarks/cosent_sts.py --parts speed memory # the quick parts only

Parts (each writes into benchmarks/results/cosent_sts.json as it finishes; finished training runs are reused, so
an interrupted run resumes):

- ``bi``: the embedded all-MiniLM-L6-v2 trained one epoch on STS-B train with sentence-transformers' CoSENTLoss,
  AnglELoss, CosineSimilarityLoss and hf_ext's CoSENTLoss and CachedCoSENTLoss; same initialisation and
  hyper-parameters (recipes/train_cosent.py defaults); STS-B test Spearman per seed.
- ``cross``: MiniLM + a fresh 1-logit head (same head initialisation per seed) trained one epoch with
  sentence-transformers' BinaryCrossEntropyLoss and MSELoss and hf_ext's CrossEncoderCoSENTLoss.
- ``speed``: forward + backward time of the loss alone (from embeddings) vs sentence-transformers' CoSENTLoss at
  B = 64, 1,024, 16,384, interleaved repetitions, medians, ratios.
- ``memory``: peak memory of one training step (forward + backward) of CachedCoSENTLoss (mini-batch 32) vs
  CoSENTLoss at B = 512 real STS-B pairs on the real MiniLM, each in a fresh process (CPU: growth of the peak
  resident set, VmHWM, over the resident set before the step; CUDA: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import child_env, save_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "recipes"))

BI_LOSSES = ["cosent", "st_cosent", "st_angle", "st_cosine", "cached_cosent"]
CROSS_LOSSES = ["cosent", "st_bce", "st_mse"]
# CrossEncoderCoSENTLoss at other scales (its default, 1, is the "cosent" run). Picked by dev Spearman, never test.
CROSS_SCALES = {"cosent_scale5": 5.0, "cosent_scale20": 20.0}
SPEED_BATCHES = [64, 1024, 16384]


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------------------------- training


def train_runs(data: dict, out: Path, model_type: str, losses: list[str], seeds: list[int], extra: list[str]) -> None:
    import train_cosent

    runs = data.setdefault(f"{model_type}_runs", {})
    for seed in seeds:
        for loss in losses:
            key = f"{loss}/seed{seed}"
            if key in runs:
                continue
            tmp = tempfile.mkdtemp(prefix=f"cosent-{model_type}-")
            loss_args = ["--loss", loss]
            if loss in CROSS_SCALES:
                loss_args = ["--loss", "cosent", "--scale", str(CROSS_SCALES[loss])]
            argv = [
                "--model_type",
                model_type,
                *loss_args,
                "--seed",
                str(seed),
                "--output_dir",
                tmp,
                "--eval_strategy",
                "no",
                "--evaluate_before_training",
                "false",
                "--disable_tqdm",
                "true",
                *extra,
            ]
            args, training_args = train_cosent.parse_args(argv)
            print(f"[{model_type}] {key} ...", flush=True)
            result = train_cosent.main(args, training_args)
            shutil.rmtree(tmp, ignore_errors=True)
            runs[key] = {
                "test_spearman": result["test_spearman"],
                "dev_spearman": result["dev_spearman"],
                "train_seconds": result["train_seconds"],
            }
            data[f"{model_type}_hyperparameters"] = {
                "epochs": training_args.num_train_epochs,
                "batch_size": training_args.per_device_train_batch_size,
                "learning_rate": training_args.learning_rate,
                "warmup": training_args.warmup_steps,
                "train_pairs": result["train_pairs"],
                "extra_args": extra,
            }
            save_results(out, data, summarize)


def _mean_std(runs: dict, loss: str, metric: str = "test_spearman") -> tuple[float, float, int] | None:
    values = [r[metric] for k, r in runs.items() if k.split("/")[0] == loss]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


# ----------------------------------------------------------------------------------------------- speed


def speed(data: dict, out: Path, repetitions: int) -> None:
    import torch
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss as STCoSENTLoss

    from hf_ext.losses import CoSENTLoss

    torch.manual_seed(0)
    theirs, ours = STCoSENTLoss(torch.nn.Identity()), CoSENTLoss(torch.nn.Identity())
    rows = {}
    for batch in SPEED_BATCHES:
        emb_a = torch.randn(batch, 384, requires_grad=True)
        emb_b = torch.randn(batch, 384, requires_grad=True)
        labels = (torch.rand(batch) * 25).round() / 5  # STS-like: 0-5 in steps of 0.2, many ties

        def step(loss_fn, a=emb_a, b=emb_b, y=labels):
            loss_fn.compute_loss_from_embeddings([a, b], y).backward()

        times: dict[str, list[float]] = {"hf_ext": [], "sentence_transformers": []}
        reps = repetitions if batch < 10_000 else max(repetitions // 5, 10)
        for i in range(reps + 5):
            pair = [("hf_ext", ours), ("sentence_transformers", theirs)]
            for name, fn in pair if i % 2 == 0 else pair[::-1]:  # interleaved, alternating order
                start = time.perf_counter()
                step(fn)
                if i >= 5:  # warm-up
                    times[name].append(time.perf_counter() - start)
        hf_ms = statistics.median(times["hf_ext"]) * 1e3
        st_ms = statistics.median(times["sentence_transformers"]) * 1e3
        rows[str(batch)] = {
            "hf_ext_ms": hf_ms,
            "sentence_transformers_ms": st_ms,
            "ratio": hf_ms / st_ms,
            "repetitions": reps,
        }
        print(
            f"[speed] B={batch}: hf_ext {hf_ms:.3f} ms, sentence-transformers {st_ms:.3f} ms, "
            f"ratio {hf_ms / st_ms:.3f}",
            flush=True,
        )
    data["speed"] = {"device": "cpu", "threads": torch.get_num_threads(), "rows": rows}
    save_results(out, data, summarize)


# ----------------------------------------------------------------------------------------------- memory

_MEMORY_CHILD = r"""
import json, sys, time, torch
from sentence_transformers import SentenceTransformer
from _common import PeakMemory
from hf_ext import load_stsb, minilm_path
from hf_ext.losses import CachedCoSENTLoss, CoSENTLoss
variant, batch = sys.argv[1], int(sys.argv[2])
cuda = torch.cuda.is_available()
model = SentenceTransformer(str(minilm_path()), device="cuda" if cuda else "cpu")
model.train()
data = load_stsb("train").select(range(batch))
loss_fn = CachedCoSENTLoss(model, mini_batch_size=32) if variant == "cached" else CoSENTLoss(model)
features = [model.preprocess(data["sentence1"]), model.preprocess(data["sentence2"])]
features = [{k: v.to(model.device) if hasattr(v, "to") else v for k, v in f.items()} for f in features]
labels = torch.tensor(data["label"], device=model.device)
with PeakMemory(model.device) as peak:
    start = time.perf_counter()
    loss = loss_fn(features, labels)
    loss.backward()
    seconds = time.perf_counter() - start
grad_norm = sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.grad is not None) ** 0.5
print("RESULT " + json.dumps({"variant": variant, "batch": batch, "peak_growth_bytes": peak.bytes,
      "seconds": seconds, "loss": float(loss), "grad_norm": grad_norm, "device": "cuda" if cuda else "cpu"}))
"""


def memory(data: dict, out: Path, batch: int) -> None:
    rows = {}
    for variant in ("plain", "cached"):
        env = child_env(HF_HUB_OFFLINE="1")
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, variant, str(batch)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=1800,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr[-3000:]}")
        rows[variant] = json.loads(line[-1][len("RESULT ") :])
        print(
            f"[memory] {variant}: peak growth {rows[variant]['peak_growth_bytes'] / 2**20:.0f} MiB, "
            f"{rows[variant]['seconds']:.1f} s",
            flush=True,
        )
    rows["peak_ratio_cached_over_plain"] = rows["cached"]["peak_growth_bytes"] / rows["plain"]["peak_growth_bytes"]
    rows["loss_abs_diff"] = abs(rows["cached"]["loss"] - rows["plain"]["loss"])
    data["memory"] = rows
    save_results(out, data, summarize)


# ----------------------------------------------------------------------------------------------- summary, plot


def summarize(data: dict) -> dict:
    summary: dict = {}
    names = {
        "cosent": "bi_hf_ext",
        "cached_cosent": "bi_hf_ext_cached",
        "st_cosent": "bi_st_cosent",
        "st_angle": "bi_st_angle",
        "st_cosine": "bi_st_cosine",
    }
    for loss, name in names.items():
        stats = _mean_std(data.get("bi_runs", {}), loss)
        if stats:
            summary[f"{name}_spearman"], summary[f"{name}_std"], summary[f"{name}_seeds"] = stats
    cross_names = {"cosent": "ce_cosent", "st_bce": "ce_bce", "st_mse": "ce_mse"}
    cross_names.update({loss: f"ce_{loss}" for loss in CROSS_SCALES})
    for loss, name in cross_names.items():
        stats = _mean_std(data.get("cross_runs", {}), loss)
        if stats:
            summary[f"{name}_spearman"], summary[f"{name}_std"], summary[f"{name}_seeds"] = stats
    # The scale sweep: seed-0 dev Spearman per scale, and the scale it picks (the default 1 unless another is better).
    scales = {"cosent": 1.0, **CROSS_SCALES}
    dev = {
        scale: data["cross_runs"][f"{loss}/seed0"]["dev_spearman"]
        for loss, scale in scales.items()
        if f"{loss}/seed0" in data.get("cross_runs", {})
    }
    if len(dev) > 1:
        summary["ce_cosent_scale_sweep_dev_seed0"] = {str(k): v for k, v in dev.items()}
        best_scale = max(dev, key=dev.get)
        best = next(loss for loss, scale in scales.items() if scale == best_scale)
        summary["ce_cosent_best_scale"] = best_scale
        if f"{cross_names[best]}_spearman" in summary:
            summary["ce_cosent_best_spearman"] = summary[f"{cross_names[best]}_spearman"]
            summary["ce_cosent_best_seeds"] = summary[f"{cross_names[best]}_seeds"]
    if "speed" in data:
        ratios = {b: r["ratio"] for b, r in data["speed"]["rows"].items()}
        summary["loss_time_ratio_max"] = max(ratios.values())
        summary["loss_time_ratio_by_batch"] = ratios
    if "memory" in data:
        summary["cached_peak_mem_ratio"] = data["memory"]["peak_ratio_cached_over_plain"]
    if "bi_hf_ext_spearman" in summary and "bi_st_cosent_spearman" in summary:
        summary["bi_hf_ext_within_one_std_of_st"] = bool(
            abs(summary["bi_hf_ext_spearman"] - summary["bi_st_cosent_spearman"]) <= summary["bi_st_cosent_std"]
        )
    if "ce_cosent_spearman" in summary and "ce_bce_spearman" in summary:
        summary["ce_cosent_minus_bce"] = summary["ce_cosent_spearman"] - summary["ce_bce_spearman"]
    if "ce_cosent_best_spearman" in summary and "ce_bce_spearman" in summary:
        summary["ce_cosent_best_minus_bce"] = summary["ce_cosent_best_spearman"] - summary["ce_bce_spearman"]
    return summary


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, kind, losses in ((axes[0], "bi", BI_LOSSES), (axes[1], "cross", CROSS_LOSSES + list(CROSS_SCALES))):
        stats = [(loss, _mean_std(data.get(f"{kind}_runs", {}), loss)) for loss in losses]
        stats = [(loss, s) for loss, s in stats if s]
        if stats:
            ax.bar(
                [loss for loss, _ in stats],
                [s[0] for _, s in stats],
                yerr=[s[1] for _, s in stats],
                capsize=4,
                color=["tab:orange" if not loss.startswith("st_") else "tab:blue" for loss, _ in stats],
            )
            low = min(s[0] - s[1] for _, s in stats)
            ax.set_ylim(low - 0.02, max(s[0] + s[1] for _, s in stats) + 0.01)
        ax.set_title(f"{kind}-encoder: STS-B test Spearman (mean ± std over seeds)")
        ax.tick_params(axis="x", rotation=20)
    if "speed" in data:
        rows = data["speed"]["rows"]
        axes[2].plot([int(b) for b in rows], [r["ratio"] for r in rows.values()], "o-")
        axes[2].axhline(1.0, color="grey", ls="--")
        axes[2].axhline(1.1, color="red", ls=":")
        axes[2].set_xscale("log")
        axes[2].set_title("loss fwd+bwd time: hf_ext / sentence-transformers")
        axes[2].set_xlabel("batch size B")
    if "memory" in data:
        mem = data["memory"]
        axes[3].bar(
            ["CoSENTLoss", "CachedCoSENTLoss (32)"],
            [mem["plain"]["peak_growth_bytes"] / 2**20, mem["cached"]["peak_growth_bytes"] / 2**20],
        )
        axes[3].set_title(f"peak memory of one step, B={mem['plain']['batch']} (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(data: dict) -> str:
    """The README's markdown table, from the results file."""
    s = data["summary"]
    lines = ["| comparison (same run) | hf_ext | sentence-transformers | |", "|---|---|---|---|"]

    def cell(name: str) -> str:
        if name + "_spearman" not in s:
            return "n/a"
        return f"{s[name + '_spearman']:.4f} ± {s[name + '_std']:.4f} ({s[name + '_seeds']} seeds)"

    lines.append(
        f"| bi-encoder, STS-B test Spearman | CoSENTLoss {cell('bi_hf_ext')} | CoSENTLoss {cell('bi_st_cosent')} | "
        f"AnglELoss {cell('bi_st_angle')}, CosineSimilarityLoss {cell('bi_st_cosine')} |"
    )
    lines.append(f"| bi-encoder, cached (mini-batch 32) | CachedCoSENTLoss {cell('bi_hf_ext_cached')} | | |")
    lines.append(
        f"| cross-encoder, STS-B test Spearman | CrossEncoderCoSENTLoss {cell('ce_cosent')} | "
        f"BinaryCrossEntropyLoss {cell('ce_bce')} | MSELoss {cell('ce_mse')} |"
    )
    for loss, scale in CROSS_SCALES.items():
        if f"ce_{loss}_spearman" in s:
            lines.append(f"| cross-encoder, scale {scale:g} | CrossEncoderCoSENTLoss {cell('ce_' + loss)} | | |")
    if "loss_time_ratio_by_batch" in s:
        ratios = ", ".join(f"B={b}: {r:.2f}" for b, r in s["loss_time_ratio_by_batch"].items())
        lines.append(f"| loss fwd+bwd time, hf_ext / sentence-transformers CoSENTLoss | {ratios} | 1.00 | |")
    if "cached_peak_mem_ratio" in s:
        lines.append(f"| peak step memory, Cached / plain, B=512, MiniLM | {s['cached_peak_mem_ratio']:.2f} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", default=["speed", "memory", "bi", "cross"], choices=["speed", "memory", "bi", "cross"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=RESULTS / "cosent_sts.json")
    parser.add_argument("--speed_repetitions", type=int, default=200)
    parser.add_argument("--memory_batch", type=int, default=512)
    parser.add_argument(
        "--train_args",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra recipe arguments for every training run (after all other options)",
    )
    parser.add_argument("--table", action="store_true", help="print the README table from --output and exit")
    args = parser.parse_args()
    data = _load(args.output)
    if args.table:
        print(table(data))
        return
    if "speed" in args.parts:
        speed(data, args.output, args.speed_repetitions)
    if "memory" in args.parts:
        memory(data, args.output, args.memory_batch)
    # Priority order (every run is resumable): all losses for the first seed, then the main comparisons (hf_ext vs
    # sentence-transformers CoSENT, cross-encoder CoSENT vs BCE) before the other peers for every later seed; the
    # cached loss (same objective, two forward passes: the slowest run) for later seeds comes last of all. An
    # interrupted run thus holds the most informative subset; the summary records how many seeds each mean is over.
    main_runs = [("bi", "cosent"), ("bi", "st_cosent"), ("cross", "cosent"), ("cross", "st_bce")]
    other_runs = [("bi", "st_angle"), ("bi", "st_cosine"), ("cross", "st_mse")]
    cached = [("bi", "cached_cosent")]
    sweep = [("cross", loss) for loss in CROSS_SCALES]
    first, *later = args.seeds
    schedule = [(kind, loss, first) for kind, loss in main_runs + sweep + other_runs + cached]
    schedule += [(kind, loss, seed) for seed in later for kind, loss in main_runs + other_runs]
    # Later seeds of the scale the seed-0 dev sweep picks (if it is not the default, which is in main_runs).
    schedule += [("cross", "<best scale>", seed) for seed in later]
    schedule += [(kind, loss, seed) for seed in later for kind, loss in cached]
    for kind, loss, seed in schedule:
        if loss == "<best scale>":
            best = summarize(data).get("ce_cosent_best_scale", 1.0)
            loss = next((name for name, scale in CROSS_SCALES.items() if scale == best), "cosent")
        if kind in args.parts:
            train_runs(data, args.output, kind, [loss], [seed], args.train_args)
    save_results(args.output, data, summarize)
    plot(data, args.output.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
