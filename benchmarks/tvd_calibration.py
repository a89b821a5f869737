"""TVD (TaiLr) vs cross-entropy, label smoothing and DFT: accuracy and calibration under label noise.

    python benchmarks/tvd_calibration.py                  # the validation sweeps, then 3 seeds per method (resumable)
    python benchmarks/tvd_calibration.py --noises 0.4     # one noise level (the headline)
    python benchmarks/tvd_calibration.py --parts speed    # TVDTrainer's step time against the stock Trainer's
    python benchmarks/tvd_calibration.py --table          # the docs page's table from the results file

Task: `recipes/train_tvd.py --task classification`: the embedded MiniLM + a fresh 5-way head on BBC News (title +
body, 64 tokens, 2 epochs, learning rate 5e-5, batch 16), the recipe's stratified 80/20 split. Symmetric label noise
0 / 0.2 / 0.4 flips the *training* labels (seeded by the run's seed); a validation slice of ``VALIDATION_SHARE`` of
the training articles (stratified by topic, the same articles for every seed, not trained on) keeps its noisy labels,
as a user's would; the test labels are clean.

Methods (every one through the recipe, same data, initialisation, order and budget per seed):

- ``ce``: the stock `Trainer` (cross-entropy);
- ``ls``: the stock `Trainer` with ``label_smoothing_factor`` chosen from ``LS_FACTORS``;
- ``dft``: `TVDTrainer` at gamma 1, no floor (TRL's ``loss_type="dft"``, equal loss and gradients:
  `tests/trainers/test_trl_parity.py`);
- ``tvd``: `TVDTrainer` with gamma x floor (``tvd_min_weight``) chosen from ``GAMMAS`` x ``FLOORS``.

**Protocol**: per noise level, seed 0 trains every setting of the sweeps with the test split left alone
(``--evaluate_test false``) and the validation slice chooses by **accuracy on its noisy labels**: under symmetric
noise that accuracy is ``(1 - 5/4 eta) acc_clean + eta/4``, so it ranks settings as clean accuracy does, while NLL
and ECE against noisy labels reward a model that predicts the noise (what cross-entropy learns) and would select
against calibration. A best value at an open end of its sweep is extended (`_common.bracketed_grid`: gamma or a
smoothing factor halved towards 0 or moved halfway to 1, a floor stepped by 0.1), up to 3 times per axis; ties go to
the smallest value (the nearest to cross-entropy). Then each method runs at its chosen setting with ``--seeds``
(seed 0 again, now with the test split; its validation figures must equal the sweep's: the run is deterministic),
and the test figures are accuracy, NLL and ECE (15 bins) on the clean test labels: mean +- sample std over seeds,
TVD - CE, TVD - DFT, TVD - LS and DFT - CE paired by seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import bracketed_grid, fmt_mean_std, fmt_paired, load_results, mean_std, paired, protocol, save_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "recipes"))

NOISES = (0.0, 0.2, 0.4)
METHODS = ("ce", "ls", "dft", "tvd")
VALIDATION_SHARE = 0.2
LS_FACTORS = (0.05, 0.1, 0.2)
GAMMAS = (0.1, 0.5, 0.9)
FLOORS = (0.0, 0.1, 0.2)
METRICS = ("accuracy", "nll", "ece")
LOWER_IS_BETTER = {"nll", "ece"}
PAIRS = (("tvd", "ce"), ("tvd", "dft"), ("tvd", "ls"), ("dft", "ce"))  # paired by seed in the summary
COMMON = ["--task", "classification", "--max_length", "64", "--validation_share", str(VALIDATION_SHARE)]


def method_argv(method: str, setting: dict[str, float]) -> list[str]:
    """The recipe's flags of one method at one setting."""
    if method == "ce":
        return ["--trainer", "plain"]
    if method == "ls":
        return ["--trainer", "plain", "--label_smoothing_factor", f"{setting['ls']:g}"]
    if method == "dft":
        return ["--trainer", "tvd", "--tvd_gamma", "1.0", "--tvd_min_weight", "0.0"]
    return ["--trainer", "tvd", "--tvd_gamma", f"{setting['gamma']:g}", "--tvd_min_weight", f"{setting['floor']:g}"]


def run_key(split: str, method: str, setting: dict[str, float], noise: float, seed: int) -> str:
    tag = ",".join(f"{k}={v:g}" for k, v in sorted(setting.items())) or "-"
    return f"{split}/noise{noise:g}/{method}/{tag}/seed{seed}"


def train(data: dict, out: Path, split: str, method: str, setting: dict, noise: float, seed: int,
          extra: list[str]) -> dict:  # fmt: skip
    """One recipe run (cached in ``data["runs"]``): ``split`` "sweep" leaves the test split alone, "test" scores it."""
    import train_tvd

    key = run_key(split, method, setting, noise, seed)
    runs = data.setdefault("runs", {})
    if key not in runs:
        tmp = tempfile.mkdtemp(prefix="tvd-calibration-")
        print(f"[{split}] noise {noise:g} {method} {setting} seed {seed} ...", flush=True)
        argv = [*COMMON, "--label_noise", str(noise), "--seed", str(seed), *method_argv(method, setting),
                "--evaluate_test", str(split == "test").lower(), "--disable_tqdm", "true", *extra]  # fmt: skip
        try:
            result = train_tvd.main(*train_tvd.parse_args([*argv, "--output_dir", tmp]))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        runs[key] = {"split": split, "method": method, "setting": setting, "noise": noise, "seed": seed,
                     "validation": result["validation"], "test": result["test"] or None,
                     "train_examples": result["train_examples"], "validation_examples": result["validation_examples"],
                     "train_seconds": result["train_seconds"], "argv": argv}  # fmt: skip
        save_results(out, data, summarize)
    return runs[key]


def select(data: dict, out: Path, noise: float, extra: list[str]) -> dict[str, dict]:
    """Each method's setting at one noise level, chosen by seed 0's accuracy on the noisy validation slice."""

    def accuracy(method: str, **setting: float) -> float:
        return train(data, out, "sweep", method, setting, noise, 0, extra)["validation"]["accuracy"]

    ls = bracketed_grid(lambda e: accuracy("ls", ls=e), {"ls": LS_FACTORS}, {"ls": "share"})
    tvd = bracketed_grid(lambda g, b: accuracy("tvd", gamma=g, floor=b), {"gamma": GAMMAS, "floor": FLOORS},
                         {"gamma": "share", "floor": "floor"})  # fmt: skip
    for method in ("ce", "dft"):
        accuracy(method)  # nothing to choose: their validation figures sit beside the others'
    tag = f"noise{noise:g}"
    data.setdefault("selection", {})[tag] = {
        "ls": {"sweep": ls["ls"], "grid": {f"{k[0]:g}": v for k, v in ls["grid"].items()}},
        "tvd": {"gamma": tvd["gamma"], "floor": tvd["floor"],
                "grid": {f"gamma={g:g},floor={b:g}": v for (g, b), v in tvd["grid"].items()}},
    }  # fmt: skip
    chosen = {
        "ce": {},
        "ls": {"ls": ls["best"][0]},
        "dft": {},
        "tvd": {"gamma": tvd["best"][0], "floor": tvd["best"][1]},
    }
    data.setdefault("chosen", {})[tag] = chosen
    return chosen


def _test_runs(data: dict, noise: float, method: str) -> list[dict]:
    chosen = data.get("chosen", {}).get(f"noise{noise:g}", {}).get(method)
    if chosen is None:
        return []
    return [r for r in data.get("runs", {}).values() if r["split"] == "test" and r["noise"] == noise
            and r["method"] == method and r["setting"] == chosen]  # fmt: skip


def speed(data: dict, out: Path, steps: int) -> None:
    """Median time of one training step (forward, backward, optimizer) of TVDTrainer vs the stock Trainer.

    The same model (shared) and batches; the two trainers' steps alternate one by one (ABBA order), so load from
    anything else on the machine hits both alike.
    """
    import time

    import train_tvd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    from hf_ext import minilm_path
    from hf_ext.trainers import TVDTrainer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    recipe_args, _ = train_tvd.parse_args(["--task", "classification", "--max_train_samples", str(steps * 16)])
    train, _ = train_tvd.classification_data(recipe_args, tokenizer, seed=0)
    collator = DataCollatorWithPadding(tokenizer)
    batches = [collator([train[i] for i in range(start, start + 16)]) for start in range(0, steps * 16, 16)]
    trainers = {}
    # One model shared by both trainers: two separately allocated copies differ in speed by up to 20% on CPU
    # depending on which was allocated first (measured), which would swamp the loss's cost.
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5)
    for name, trainer_cls in (("plain", Trainer), ("tvd", TVDTrainer)):
        _, config = train_tvd.parse_args(["--task", "classification", "--output_dir", tempfile.mkdtemp(),
                                          "--max_steps", str(steps), "--tvd_gamma", "0.5"])  # fmt: skip
        trainer = trainer_cls(model=model, args=config, train_dataset=train, data_collator=collator)
        trainer.create_optimizer()
        trainer.model.train()
        trainers[name] = trainer
    times: dict[str, list[float]] = {"plain": [], "tvd": []}
    for index, batch in enumerate(batches):
        for name in ("plain", "tvd") if index % 2 == 0 else ("tvd", "plain"):
            trainer = trainers[name]
            inputs = trainer._prepare_inputs(batch)
            items = torch.tensor(int((batch["labels"] != -100).sum()))
            start = time.perf_counter()
            trainer.training_step(trainer.model, inputs, num_items_in_batch=items)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            times[name].append(time.perf_counter() - start)
    for trainer in trainers.values():
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    plain, tvd = statistics.median(times["plain"][2:]), statistics.median(times["tvd"][2:])  # drop warm-up steps
    data["speed"] = {"plain_step_seconds": plain, "tvd_step_seconds": tvd, "ratio": tvd / plain,
                     "steps_measured": {k: len(v) - 2 for k, v in times.items()}, "interleaved": True}  # fmt: skip
    print(f"[speed] Trainer {plain:.3f} s/step, TVDTrainer {tvd:.3f} s/step, ratio {tvd / plain:.3f}", flush=True)
    save_results(out, data, summarize)


def summarize(data: dict) -> dict:
    s: dict[str, Any] = {}
    for noise in NOISES:
        tag = f"noise{round(noise * 10):02d}"
        chosen = data.get("chosen", {}).get(f"noise{noise:g}")
        if chosen is None:
            continue
        per_seed: dict[str, dict[str, dict[int, float]]] = {}
        for method in METHODS:
            runs = _test_runs(data, noise, method)
            if not runs:
                continue
            for metric in METRICS:
                stats = mean_std(r["test"][metric] for r in runs)
                s[f"{tag}_{method}_{metric}"], s[f"{tag}_{method}_{metric}_std"] = stats["mean"], stats["std"]
                per_seed.setdefault(method, {})[metric] = {r["seed"]: r["test"][metric] for r in runs}
            s[f"{tag}_{method}_seeds"] = len(runs)
        s[f"{tag}_tvd_gamma"], s[f"{tag}_tvd_min_weight"] = chosen["tvd"]["gamma"], chosen["tvd"]["floor"]
        s[f"{tag}_ls_factor"] = chosen["ls"]["ls"]
        for ours, peer in PAIRS:
            if ours in per_seed and peer in per_seed:
                for metric in METRICS:
                    diff = paired(per_seed[ours][metric], per_seed[peer][metric],
                                  higher_is_better=metric not in LOWER_IS_BETTER)  # fmt: skip
                    s[f"{tag}_{ours}_minus_{peer}_{metric}"] = diff["mean"]
                    s[f"{tag}_{ours}_minus_{peer}_{metric}_paired"] = {k: diff[k] for k in ("std", "n", "agree")}
        sweep = {r["method"]: r["validation"]["accuracy"] for r in data.get("runs", {}).values()
                 if r["split"] == "sweep" and r["noise"] == noise and r["setting"] == chosen[r["method"]]}  # fmt: skip
        repeats = {r["method"]: r["validation"]["accuracy"] for r in _all_test_seed0(data, noise)}
        if sweep and repeats:
            s[f"{tag}_seed0_validation_reproduced"] = all(sweep.get(m) == v for m, v in repeats.items())
    if "speed" in data:
        s["step_time_ratio"] = data["speed"]["ratio"]
    return s


def _all_test_seed0(data: dict, noise: float) -> list[dict]:
    return [r for m in METHODS for r in _test_runs(data, noise, m) if r["seed"] == 0]


def table(data: dict) -> str:
    s = data.get("summary", {})
    lines = ["| label noise | method (chosen on noisy validation) | accuracy | NLL | ECE | seeds |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for noise in NOISES:
        tag = f"noise{round(noise * 10):02d}"
        for method in METHODS:
            if f"{tag}_{method}_accuracy" not in s:
                continue
            tvd = f"TVD gamma {s[f'{tag}_tvd_gamma']:g}, floor {s[f'{tag}_tvd_min_weight']:g}"
            label = {"ce": "cross-entropy", "dft": "DFT (gamma 1)", "ls": f"label smoothing {s[f'{tag}_ls_factor']:g}",
                     "tvd": tvd}[method]  # fmt: skip
            n = s[f"{tag}_{method}_seeds"]
            cells = " | ".join(fmt_mean_std({"mean": s[f"{tag}_{method}_{m}"], "std": s[f"{tag}_{method}_{m}_std"],
                                             "n": n}) for m in METRICS)  # fmt: skip
            lines.append(f"| {noise:g} | {label} | {cells} | {n} |")
        for ours, peer in (("tvd", "ce"), ("tvd", "dft"), ("dft", "ce")):
            if f"{tag}_{ours}_minus_{peer}_ece" in s:
                diffs = [{"mean": s[f"{tag}_{ours}_minus_{peer}_{m}"], **s[f"{tag}_{ours}_minus_{peer}_{m}_paired"]}
                         for m in METRICS]  # fmt: skip
                cells = " | ".join(fmt_paired(d) for d in diffs)
                lines.append(f"| {noise:g} | {ours.upper()} - {peer} (paired by seed) | {cells} | |")
    if "step_time_ratio" in s:
        lines.append(f"| | step time TVDTrainer / Trainer: {s['step_time_ratio']:.3f} | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["classification", "speed"], choices=["classification", "speed"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--noises", nargs="+", type=float, default=list(NOISES), choices=NOISES)
    parser.add_argument("--output", type=Path, default=RESULTS / "tvd_calibration.json")
    parser.add_argument("--speed_steps", type=int, default=24)
    parser.add_argument("--table", action="store_true", help="print the docs page's table from --output and exit")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[],
                        help="extra recipe arguments for every training run (a smoke run: --max_train_samples 40 "
                             "--max_eval_samples 16 --max_steps 2)")  # fmt: skip
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.output.read_text())))
        return
    data = load_results(args.output, protocol(
        selection_split=f"a {VALIDATION_SHARE:.0%} slice of the BBC News training articles with the run's noisy "
                        "labels (seed 0), by accuracy",
        test_split="BBC News test articles (20%, labels clean)", chosen={}, seeds=args.seeds,
        sweeps={"ls": LS_FACTORS, "gamma": GAMMAS, "floor": FLOORS}, torch_threads=torch.get_num_threads(),
    ))  # fmt: skip
    if "speed" in args.parts:
        speed(data, args.output, args.speed_steps)
    if "classification" in args.parts:
        for noise in args.noises:
            chosen = select(data, args.output, noise, args.train_args)
            data["protocol"]["chosen"] = data["chosen"]
            for seed in args.seeds:
                for method in METHODS:
                    train(data, args.output, "test", method, chosen[method], noise, seed, args.train_args)
    save_results(args.output, data, summarize)
    print(table(data))


if __name__ == "__main__":
    main()
