"""CoSENT vs sentence-transformers' losses on the STS Benchmark, in one run: quality, speed and memory.

    python benchmarks/cosent_sts.py --jobs 2                      # everything (hours on 2 CPU cores)
    python benchmarks/cosent_sts.py --parts bi_sweep cross_sweep  # the dev sweeps only
    python benchmarks/cosent_sts.py --parts speed memory cached   # the quick parts
    python benchmarks/cosent_sts.py --table                       # the docs pages' tables from the results file

The protocol (benchmarks/_common.py): every setting is chosen on STS-B **dev** (1,500 pairs); the test split
(1,379 pairs) is evaluated once per chosen setting and seed, never for a setting the sweep did not choose. Every
training run is `recipes/train_cosent.py` in a child process (``--jobs`` at a time, one thread each) with the
recipe's own defaults (one epoch, dev every tenth of the run in the committed runs (the recipe now scores every
fifth: `EVAL_FRACTION`), the best-on-dev checkpoint kept) and
``--evaluate_test false``; the saved model is tested afterwards only when its setting is chosen. Finished runs
are kept in the results file, so an interrupted run resumes.

Parts:

- ``bi_sweep``: hf_ext's CoSENTLoss on the embedded all-MiniLM-L6-v2, seed 0: a coordinate search over learning
  rate and batch size, each 1-D sweep extended until dev's best is inside it: these become the recipe's defaults
  (`BI_DEFAULTS`). The peer with another objective (CosineSimilarityLoss) gets its own learning-rate sweep at that
  batch size; sentence-transformers' CoSENTLoss shares hf_ext's objective and its setting.
- ``cross_sweep``: MiniLM + a fresh 1-logit head. CrossEncoderCoSENTLoss's scale (at learning rate 5e-5), then
  its learning rate at the chosen scale; BinaryCrossEntropyLoss's and MSELoss's learning rates. The chosen scale
  is the class's default, the chosen learning rate the recipe's.
- ``bi`` / ``cross``: each loss at its chosen setting, seeds 0, 1, 2: STS-B test Spearman, mean ± sample std, and
  paired per-seed differences (hf_ext vs sentence-transformers CoSENTLoss; cross-encoder CoSENT vs BCE and MSE).
- ``speed``: forward + backward time of the loss alone (from embeddings) vs sentence-transformers' CoSENTLoss at
  B = 64, 1,024, 16,384, interleaved repetitions, medians.
- ``memory``: peak tensor memory of one training step (forward + backward) of CachedCoSENTLoss (mini-batch 32) vs
  CoSENTLoss at B = 512 real STS-B pairs on the real MiniLM, each in a fresh process (`PeakMemory`: bytes of the
  tensors alive, counted from the tensors).
- ``cached``: train-mode (dropout on) loss and gradients of CachedCoSENTLoss vs CoSENTLoss on the same B = 512
  pairs and seed: with one mini-batch holding the merged batch (the plain loss's layout) they are equal; with
  mini-batches of 32 each draws its own dropout masks, compared with the seed-to-seed spread of the plain loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import (
    child_env,
    choose,
    fmt_mean_std,
    fmt_paired,
    load_results,
    mean_std,
    paired,
    protocol,
    run_parallel,
    save_results,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "recipes" / "train_cosent.py"

# CachedCoSENTLoss is the same objective (part ``cached`` measures how its steps relate to CoSENTLoss's); it has no
# quality row of its own.
# AnglELoss (a CoSENT variant) is not run: on 2 CPU cores the budget goes to the peers with another objective.
BI_LOSSES = ["cosent", "st_cosent", "st_cosine"]
CROSS_LOSSES = ["cosent", "st_bce", "st_mse"]
SEEDS = [0, 1, 2]
SWEEP_SEED = 0
# Ladders the sweeps start inside and extend along while dev's best sits at an end.
BATCH_LADDER = [4, 8, 16, 32, 64, 128]
BI_BATCH_START = [16, 32, 64]
BI_BATCH_FIRST = 16
MAX_COORDINATE_STEPS = 10
LR_LADDER = [2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3]
BI_LR_START = [1e-5, 2e-5, 5e-5]
CROSS_LR_START = [2e-5, 5e-5, 1e-4]
SCALE_LADDER = [0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
SCALE_START = [1.0, 5.0, 20.0]
CROSS_BATCH = 32
CROSS_SCALE_SWEEP_LR = 5e-5
BI_SCALE = 20.0
SPEED_BATCHES = [64, 1024, 16384]
RUNS_DIR = Path(tempfile.gettempdir()) / "hf_ext_cosent_sts_runs"
_LOCK = threading.Lock()


class _Slots:
    """At most ``jobs`` training runs at a time across the parts running side by side; a waiting run of the
    bi-encoder sweep (the longest chain of runs that depend on each other) goes first."""

    def __init__(self, jobs: int) -> None:
        self.free, self.waiting, self.cond = jobs, [], threading.Condition()

    def __call__(self, priority: int):
        slots = self

        class _Held:
            def __enter__(self) -> None:
                with slots.cond:
                    ticket = (priority, time.monotonic())
                    slots.waiting.append(ticket)
                    slots.cond.wait_for(lambda: slots.free > 0 and min(slots.waiting) == ticket)
                    slots.waiting.remove(ticket)
                    slots.free -= 1

            def __exit__(self, *exc: object) -> None:
                with slots.cond:
                    slots.free += 1
                    slots.cond.notify_all()

        return _Held()


_SLOTS = _Slots(1)  # training runs at a time (--jobs)


# ----------------------------------------------------------------------------------------------- training runs


def run_key(spec: dict) -> str:
    scale = "-" if spec.get("scale") is None else f"{spec['scale']:g}"
    return (
        f"{spec['model_type']}/{spec['loss']}/b{spec['batch_size']}/lr{spec['learning_rate']:g}/s{scale}"
        f"/seed{spec['seed']}"
    )


def _folder(spec: dict) -> Path:
    return RUNS_DIR / run_key(spec).replace("/", "__")


def _train(spec: dict) -> dict:
    """One recipe run in a child process (one thread), dev only; the model stays in its folder."""
    folder = _folder(spec)
    argv = [
        sys.executable, str(RECIPE), "--model_type", spec["model_type"], "--loss", spec["loss"],
        "--per_device_train_batch_size", str(spec["batch_size"]), "--learning_rate", str(spec["learning_rate"]),
        "--seed", str(spec["seed"]), "--output_dir", str(folder), "--evaluate_test", "false",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    if spec.get("scale") is not None:
        argv += ["--scale", str(spec["scale"])]
    env = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with _SLOTS(0 if spec["model_type"] == "bi" and spec["loss"] == "cosent" else 1):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=4 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_key(spec)} failed:\n{proc.stderr[-4000:]}")
    result = json.loads((folder / "results.json").read_text())
    print(f"[run] {run_key(spec)}: dev {result['dev_spearman']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return _adopt(result)


def _adopt(result: dict) -> dict:
    """What the results file keeps of a recipe run (its test Spearman is never read here: --evaluate_test false)."""
    return {k: result[k] for k in ("dev_spearman", "dev_curve", "checkpoint", "train_seconds")}


_TEST_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[3])
import train_cosent
from sentence_transformers import CrossEncoder, SentenceTransformer
model_type, folder = sys.argv[1], sys.argv[2]
args, _ = train_cosent.parse_args(["--model_type", model_type])
model = SentenceTransformer(folder) if model_type == "bi" else CrossEncoder(folder)
evaluator = train_cosent.build_evaluator(args, train_cosent.load_splits(args)["test"], "sts-test")
print("RESULT " + json.dumps(train_cosent.spearman(args, evaluator(model), "sts-test")))
"""


def _test(spec: dict) -> float:
    """STS-B test Spearman of a finished run's saved (best-on-dev) model, in a child process."""
    env = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, "-c", _TEST_CHILD, spec["model_type"], str(_folder(spec)), str(RECIPE.parent)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"test of {run_key(spec)} failed:\n{proc.stderr[-4000:]}")
    return float(json.loads(lines[-1][len("RESULT ") :]))


def ensure_runs(data: dict, out: Path, specs: list[dict], jobs: int, test: bool = False) -> list[dict]:
    """Train the specs not in the results file yet (``jobs`` at a time); with ``test``, also evaluate the test
    split of each (chosen settings only). Saves after every finished run."""
    runs = data.setdefault("runs", {})

    def work(spec: dict) -> None:
        key = run_key(spec)
        untested = runs.get(key, {}).get("test_spearman") is None
        finished = _folder(spec) / "results.json"
        if key not in runs and finished.is_file():  # a run that ended after its parent was stopped
            runs[key] = {**spec, **_adopt(json.loads(finished.read_text()))}
        if key not in runs or (test and untested and not _folder(spec).is_dir()):  # (re)train: no model to test
            result = {**spec, **_train(spec)}
            with _LOCK:
                runs[key] = result
                save_results(out, data, summarize)
        if test and runs[key].get("test_spearman") is None:
            value = _test(spec)
            with _LOCK:
                runs[key]["test_spearman"] = value
                save_results(out, data, summarize)

    run_parallel([lambda spec=spec: work(spec) for spec in specs], len(specs))  # _SLOTS bounds the children
    return [runs[run_key(spec)] for spec in specs]


def _extend(values: list, best, ladder: list) -> object | None:
    """The ladder's next value beyond ``best`` when ``best`` is an end of ``values``; None when inside / no more."""
    values = sorted(values)
    i = ladder.index(best)
    if best == values[0] and len(values) > 1 and i > 0:
        return ladder[i - 1]
    if best == values[-1] and i + 1 < len(ladder):
        return ladder[i + 1]
    return None


def sweep_1d(data: dict, out: Path, base: dict, param: str, ladder: list, start: list, jobs: int) -> dict:
    """Dev Spearman over ``param`` (seed `SWEEP_SEED`), extended along ``ladder`` until the best is inside."""
    values = list(start)
    while True:
        results = ensure_runs(data, out, [{**base, param: v, "seed": SWEEP_SEED} for v in values], jobs)
        choice = choose({v: r["dev_spearman"] for v, r in zip(values, results, strict=True)})
        more = _extend(values, choice["value"], ladder) if choice["at_edge"] else None
        if more is None:
            choice["at_ladder_end"] = choice["at_edge"]
            return {"param": param, "base": base, **choice}
        values.append(more)


def _around(ladder: list, value: object) -> list:
    """``value`` and its neighbours on ``ladder``: where a coordinate step's sweep starts."""
    i = ladder.index(value)
    return ladder[max(i - 1, 0) : i + 2]


def sweep_bi(data: dict, out: Path, jobs: int) -> dict:
    """hf_ext CoSENTLoss: coordinate search over learning rate and batch size (each 1-D sweep extended until dev's
    best is inside it), from batch `BI_BATCH_FIRST`, until the batch size stops changing. Every sweep after the
    first starts around the current point, so it holds that point and a step never lowers dev's best."""
    base = {"model_type": "bi", "loss": "cosent", "scale": BI_SCALE}
    batch, steps, lr_start, batch_start = BI_BATCH_FIRST, [], BI_LR_START, BI_BATCH_START
    while True:
        lr = sweep_1d(data, out, {**base, "batch_size": batch}, "learning_rate", LR_LADDER, lr_start, jobs)
        by_batch = sweep_1d(data, out, {**base, "learning_rate": lr["value"]}, "batch_size", BATCH_LADDER,
                            batch_start, jobs)  # fmt: skip
        steps += [lr, by_batch]
        if by_batch["value"] == batch or len(steps) >= MAX_COORDINATE_STEPS:
            break
        batch = by_batch["value"]
        lr_start, batch_start = _around(LR_LADDER, lr["value"]), _around(BATCH_LADDER, batch)
    return {
        "batch_size": by_batch["value"],
        "learning_rate": lr["value"],
        "dev_spearman": by_batch["score"],
        "at_ladder_end": lr["at_ladder_end"] or by_batch["at_ladder_end"],
        "converged": by_batch["value"] == batch,
        "steps": steps,
    }


def part_bi_sweep(data: dict, out: Path, jobs: int) -> None:
    chosen = data.setdefault("chosen", {})
    cosent = sweep_bi(data, out, jobs)
    chosen["bi_cosent"] = cosent
    bases = {
        loss: {"model_type": "bi", "loss": loss, "batch_size": cosent["batch_size"], "scale": scale}
        for loss, scale in (("st_cosine", None),)
    }
    sweeps = run_parallel([lambda base=base: sweep_1d(data, out, base, "learning_rate", LR_LADDER, BI_LR_START, jobs)
                           for base in bases.values()], len(bases))  # fmt: skip
    with _LOCK:
        chosen.update({f"bi_{loss}": result for loss, result in zip(bases, sweeps, strict=True)})
        save_results(out, data, summarize)


def part_cross_sweep(data: dict, out: Path, jobs: int) -> None:
    chosen = data.setdefault("chosen", {})
    base = {"model_type": "cross", "loss": "cosent", "batch_size": CROSS_BATCH, "learning_rate": CROSS_SCALE_SWEEP_LR}

    def cosent() -> tuple[dict, dict]:
        scale = sweep_1d(data, out, base, "scale", SCALE_LADDER, SCALE_START, jobs)
        lr = sweep_1d(data, out, {**base, "scale": scale["value"]}, "learning_rate", LR_LADDER, CROSS_LR_START, jobs)
        return scale, lr

    def peer(loss: str) -> dict:
        peer_base = {"model_type": "cross", "loss": loss, "batch_size": CROSS_BATCH, "scale": None}
        return sweep_1d(data, out, peer_base, "learning_rate", LR_LADDER, CROSS_LR_START, jobs)

    (scale, lr), bce, mse = run_parallel([cosent, lambda: peer("st_bce"), lambda: peer("st_mse")], 3)
    with _LOCK:
        chosen.update({"cross_cosent_scale": scale, "cross_cosent": lr, "cross_st_bce": bce, "cross_st_mse": mse})
        save_results(out, data, summarize)


def chosen_spec(data: dict, model_type: str, loss: str) -> dict:
    """The chosen setting of a loss (raises when its sweep has not run)."""
    chosen = data.get("chosen", {})
    if model_type == "bi":
        cosent = chosen["bi_cosent"]
        spec = {"model_type": "bi", "loss": loss, "batch_size": cosent["batch_size"], "scale": BI_SCALE,
                "learning_rate": cosent["learning_rate"]}  # fmt: skip
        if loss == "st_cosine":  # its own objective: its own learning rate, no scale
            spec["learning_rate"], spec["scale"] = chosen["bi_st_cosine"]["value"], None
        return spec
    spec = {"model_type": "cross", "loss": loss, "batch_size": CROSS_BATCH, "scale": None,
            "learning_rate": chosen[f"cross_{loss}"]["value"]}  # fmt: skip
    if loss == "cosent":
        spec["scale"] = chosen["cross_cosent_scale"]["value"]
    return spec


def part_final(data: dict, out: Path, model_type: str, losses: list[str], seeds: list[int], jobs: int) -> None:
    specs = [{**chosen_spec(data, model_type, loss), "seed": seed} for seed in seeds for loss in losses]
    ensure_runs(data, out, specs, jobs, test=True)
    with _LOCK:
        data.setdefault("final", {})[model_type] = {loss: run_key({**chosen_spec(data, model_type, loss), "seed": 0})
                                                    for loss in losses}  # fmt: skip
        save_results(out, data, summarize)


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
        rows[str(batch)] = {"hf_ext_ms": hf_ms, "sentence_transformers_ms": st_ms, "ratio": hf_ms / st_ms,
                            "repetitions": reps}  # fmt: skip
        print(f"[speed] B={batch}: hf_ext {hf_ms:.3f} ms, sentence-transformers {st_ms:.3f} ms", flush=True)
    data["speed"] = {"device": "cpu", "threads": torch.get_num_threads(), "rows": rows}
    save_results(out, data, summarize)


# ----------------------------------------------------------------------------------------------- memory, cached

_MEMORY_CHILD = r"""
import json, sys, torch
from sentence_transformers import SentenceTransformer
from _common import PeakMemory
from hf_ext import load_stsb, minilm_path
from hf_ext.losses import CachedCoSENTLoss, CoSENTLoss
variant, batch = sys.argv[1], int(sys.argv[2])
device = "cuda" if torch.cuda.is_available() else "cpu"
model = SentenceTransformer(str(minilm_path()), device=device)
model.train()
data = load_stsb("train").select(range(batch))
loss_fn = CachedCoSENTLoss(model, mini_batch_size=32) if variant == "cached" else CoSENTLoss(model)
features = [model.preprocess(data["sentence1"]), model.preprocess(data["sentence2"])]
features = [{k: v.to(device) if hasattr(v, "to") else v for k, v in f.items()} for f in features]
labels = torch.tensor(data["label"], device=device)
with PeakMemory(device) as peak:
    loss = loss_fn(features, labels)
    loss.backward()
print("RESULT " + json.dumps({"variant": variant, "batch": batch, "peak_tensor_bytes": peak.bytes,
      "device": device}))
"""


def memory(data: dict, out: Path, batch: int) -> None:
    rows = {}
    for variant in ("plain", "cached"):
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, variant, str(batch)], capture_output=True,
                              text=True, env=child_env(HF_HUB_OFFLINE="1"), check=False, timeout=3600)  # fmt: skip
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr[-3000:]}")
        rows[variant] = json.loads(line[-1][len("RESULT ") :])
        print(f"[memory] {variant}: peak {rows[variant]['peak_tensor_bytes'] / 2**20:.0f} MiB", flush=True)
    rows["peak_ratio_cached_over_plain"] = rows["cached"]["peak_tensor_bytes"] / rows["plain"]["peak_tensor_bytes"]
    data["memory"] = rows
    save_results(out, data, summarize)


def cached(data: dict, out: Path, batch: int, seeds: int) -> None:
    """Train-mode (dropout on) loss / gradients of CachedCoSENTLoss against CoSENTLoss on the same pairs."""
    import torch
    from sentence_transformers import SentenceTransformer

    from hf_ext import load_stsb, minilm_path
    from hf_ext.losses import CachedCoSENTLoss, CoSENTLoss

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    model.train()
    pairs = load_stsb("train").select(range(batch))
    labels = torch.tensor(pairs["label"])

    def step(loss_fn, seed: int) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        features = [model.preprocess(pairs["sentence1"]), model.preprocess(pairs["sentence2"])]
        torch.manual_seed(seed)
        loss = loss_fn(features, labels)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return float(loss.detach()), grads

    plain = CoSENTLoss(model)
    one = CachedCoSENTLoss(model, mini_batch_size=2 * batch)  # one mini-batch: the plain loss's merged forward
    small = CachedCoSENTLoss(model, mini_batch_size=32)
    rows = []
    for seed in range(seeds):
        (lp, gp), (lo, go), (ls, gs) = step(plain, seed), step(one, seed), step(small, seed)
        rows.append({"seed": seed, "plain_loss": lp, "cached_one_minibatch_loss": lo, "cached_32_loss": ls,
                     "one_minibatch_loss_abs_diff": abs(lo - lp),
                     "one_minibatch_grad_max_abs_diff": float((go - gp).abs().max()),
                     "grad_max_abs": float(gp.abs().max()), "cached_32_loss_abs_diff": abs(ls - lp),
                     "plain_grad_norm": float(gp.norm()), "cached_32_grad_norm": float(gs.norm())})  # fmt: skip
        print(f"[cached] seed {seed}: " + json.dumps(rows[-1]), flush=True)
    data["cached"] = {"batch": batch, "rows": rows,
                      "plain_loss_seed_std": statistics.stdev(r["plain_loss"] for r in rows),
                      "cached_32_loss_seed_std": statistics.stdev(r["cached_32_loss"] for r in rows)}  # fmt: skip
    save_results(out, data, summarize)


# ----------------------------------------------------------------------------------------------- summary


NAMES = {
    ("bi", "cosent"): "bi_hf_ext",
    ("bi", "st_cosent"): "bi_st_cosent",
    ("bi", "st_cosine"): "bi_st_cosine",
    ("cross", "cosent"): "ce_cosent_default",
    ("cross", "st_bce"): "ce_bce",
    ("cross", "st_mse"): "ce_mse",
}


def test_scores(data: dict, model_type: str, loss: str) -> dict[int, float]:
    """Seed -> test Spearman of the loss at its chosen setting (only chosen settings have one)."""
    try:
        spec = chosen_spec(data, model_type, loss)
    except KeyError:
        return {}
    runs = data.get("runs", {})
    scores = {}
    for seed in SEEDS:
        run = runs.get(run_key({**spec, "seed": seed}), {})
        if run.get("test_spearman") is not None:
            scores[seed] = run["test_spearman"]
    return scores


def summarize(data: dict) -> dict:
    s: dict = {}
    chosen = data.get("chosen", {})
    if "bi_cosent" in chosen:
        s["bi_default_batch_size"] = chosen["bi_cosent"]["batch_size"]
        s["bi_default_learning_rate"] = chosen["bi_cosent"]["learning_rate"]
    if "cross_cosent_scale" in chosen:
        s["ce_cosent_default_scale"] = chosen["cross_cosent_scale"]["value"]
    if "cross_cosent" in chosen:
        s["ce_cosent_default_learning_rate"] = chosen["cross_cosent"]["value"]
    scores = {}
    for (model_type, loss), name in NAMES.items():
        scores[name] = test_scores(data, model_type, loss)
        if scores[name]:
            stats = mean_std(scores[name].values())
            s[f"{name}_spearman"], s[f"{name}_std"], s[f"{name}_seeds"] = stats["mean"], stats["std"], stats["n"]
    for a, b, key in (("bi_hf_ext", "bi_st_cosent", "bi_hf_ext_minus_st_cosent_paired"),
                      ("bi_hf_ext", "bi_st_cosine", "bi_hf_ext_minus_st_cosine_paired"),
                      ("ce_cosent_default", "ce_bce", "ce_cosent_minus_bce_paired"),
                      ("ce_cosent_default", "ce_mse", "ce_cosent_minus_mse_paired")):  # fmt: skip
        if scores.get(a) and scores.get(b) and set(scores[a]) & set(scores[b]):
            result = paired(scores[a], scores[b])
            s[key] = result["mean"]
            s[f"{key}_detail"] = result
    if "speed" in data:
        ratios = {b: r["ratio"] for b, r in data["speed"]["rows"].items()}
        s["loss_time_ratio_max"] = max(ratios.values())
        s["loss_time_ratio_by_batch"] = ratios
    if "memory" in data:
        s["cached_peak_mem_ratio"] = data["memory"]["peak_ratio_cached_over_plain"]
    if "cached" in data:
        rows = data["cached"]["rows"]
        s["cached_train_mode_loss_abs_diff"] = max(r["one_minibatch_loss_abs_diff"] for r in rows)
        s["cached_train_mode_grad_max_abs_diff"] = max(r["one_minibatch_grad_max_abs_diff"] for r in rows)
        s["cached_32_train_mode_loss_abs_diff_mean"] = statistics.fmean(r["cached_32_loss_abs_diff"] for r in rows)
        s["plain_train_mode_loss_seed_std"] = data["cached"]["plain_loss_seed_std"]
    return s


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    for ax, model_type, losses in ((axes[0], "bi", BI_LOSSES), (axes[1], "cross", CROSS_LOSSES)):
        bars = [(loss, test_scores(data, model_type, loss)) for loss in losses]
        bars = [(loss, mean_std(v.values())) for loss, v in bars if v]
        if bars:
            colors = ["tab:blue" if loss.startswith("st_") else "tab:orange" for loss, _ in bars]
            errors = [b["std"] or 0 for _, b in bars]
            ax.bar([loss for loss, _ in bars], [b["mean"] for _, b in bars], yerr=errors, capsize=4, color=colors)
            low = min(b["mean"] - (b["std"] or 0) for _, b in bars)
            ax.set_ylim(low - 0.02, max(b["mean"] + (b["std"] or 0) for _, b in bars) + 0.01)
        ax.set_title(f"{model_type}-encoder: STS-B test Spearman at dev-chosen settings")
        ax.tick_params(axis="x", rotation=20)
    scale = data.get("chosen", {}).get("cross_cosent_scale")
    if scale:
        values = sorted(float(v) for v in scale["sweep"])
        axes[2].plot(values, [scale["sweep"][f"{v:g}"] if f"{v:g}" in scale["sweep"] else scale["sweep"][str(v)]
                              for v in values], "o-")  # fmt: skip
        axes[2].set_xscale("log")
        axes[2].set_title("CrossEncoderCoSENTLoss: STS-B dev Spearman vs scale (seed 0)")
        axes[2].set_xlabel("scale")
    if "speed" in data:
        rows = data["speed"]["rows"]
        axes[3].plot([int(b) for b in rows], [r["ratio"] for r in rows.values()], "o-")
        axes[3].axhline(1.0, color="grey", ls="--")
        axes[3].set_xscale("log")
        axes[3].set_title("loss fwd+bwd time: hf_ext / sentence-transformers")
        axes[3].set_xlabel("batch size B")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(data: dict) -> str:
    """The docs page's markdown table, from the results file."""
    s = data["summary"]

    def cell(model_type: str, loss: str) -> str:
        scores = test_scores(data, model_type, loss)
        return fmt_mean_std(mean_std(scores.values())) if scores else "n/a"

    def setting(model_type: str, loss: str) -> str:
        spec = chosen_spec(data, model_type, loss)
        scale = f", scale {spec['scale']:g}" if spec.get("scale") is not None else ""
        return f"lr {spec['learning_rate']:g}, batch {spec['batch_size']}{scale}"

    lines = ["| STS-B test Spearman, dev-chosen settings | loss | setting (chosen on dev) | test Spearman |",
             "|---|---|---|---|"]  # fmt: skip
    labels = {"cosent": "hf_ext CoSENTLoss", "cached_cosent": "hf_ext CachedCoSENTLoss (mini-batch 32)",
              "st_cosent": "sentence-transformers CoSENTLoss",
              "st_cosine": "sentence-transformers CosineSimilarityLoss"}  # fmt: skip
    cross_labels = {"cosent": "hf_ext CrossEncoderCoSENTLoss", "st_bce": "sentence-transformers BinaryCrossEntropyLoss",
                    "st_mse": "sentence-transformers MSELoss"}  # fmt: skip
    for model_type, losses, names in (("bi", BI_LOSSES, labels), ("cross", CROSS_LOSSES, cross_labels)):
        for loss in losses:
            try:
                lines.append(f"| {model_type}-encoder | {names[loss]} | {setting(model_type, loss)} | "
                             f"{cell(model_type, loss)} |")  # fmt: skip
            except KeyError:
                continue
    lines.append("")
    lines.append("| paired over the same seeds (test Spearman) | mean difference ± std, seeds the first wins |")
    lines.append("|---|---|")
    for key, label in (("bi_hf_ext_minus_st_cosent_paired", "hf_ext CoSENTLoss - sentence-transformers CoSENTLoss"),
                       ("bi_hf_ext_minus_st_cosine_paired", "hf_ext CoSENTLoss - CosineSimilarityLoss"),
                       ("ce_cosent_minus_bce_paired", "CrossEncoderCoSENTLoss - BinaryCrossEntropyLoss"),
                       ("ce_cosent_minus_mse_paired", "CrossEncoderCoSENTLoss - MSELoss")):  # fmt: skip
        if f"{key}_detail" in s:
            lines.append(f"| {label} | {fmt_paired(s[key + '_detail'])} |")
    if "loss_time_ratio_by_batch" in s:
        ratios = ", ".join(f"B={b}: {r:.2f}" for b, r in s["loss_time_ratio_by_batch"].items())
        lines.append(f"\nLoss forward + backward time, hf_ext / sentence-transformers CoSENTLoss: {ratios}.")
    if "cached_peak_mem_ratio" in s:
        lines.append(f"Peak step tensor memory, CachedCoSENTLoss (32) / CoSENTLoss at B = 512: "
                     f"{s['cached_peak_mem_ratio']:.2f}.")  # fmt: skip
    return "\n".join(lines)


def _without(mapping: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["bi_sweep", "cross_sweep", "bi", "cross", "speed", "memory", "cached"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time (one thread each)")
    parser.add_argument("--output", type=Path, default=RESULTS / "cosent_sts.json")
    parser.add_argument("--speed_repetitions", type=int, default=200)
    parser.add_argument("--memory_batch", type=int, default=512)
    parser.add_argument("--cached_seeds", type=int, default=5)
    parser.add_argument("--table", action="store_true", help="print the docs page's table from --output and exit")
    args = parser.parse_args()
    if args.table:
        data = json.loads(args.output.read_text())
        plot(data, args.output.with_suffix(".png"))
        print(table(data))
        return
    data = load_results(args.output, protocol(
        selection_split="STS-B dev (1,500 pairs), seed 0", test_split="STS-B test (1,379 pairs)",
        chosen={}, seeds=SEEDS, sweep_seed=SWEEP_SEED,
        runs_note="each run: recipes/train_cosent.py defaults, one thread, best-on-dev checkpoint",
    ))  # fmt: skip
    data["protocol"]["chosen"] = data.setdefault("chosen", {})  # one mapping: what the sweeps choose is the protocol's
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    global _SLOTS
    _SLOTS = _Slots(args.jobs)
    actions = {
        "bi_sweep": lambda: part_bi_sweep(data, args.output, args.jobs),
        "cross_sweep": lambda: part_cross_sweep(data, args.output, args.jobs),
        "bi": lambda: part_final(data, args.output, "bi", BI_LOSSES, SEEDS, args.jobs),
        "cross": lambda: part_final(data, args.output, "cross", CROSS_LOSSES, SEEDS, args.jobs),
        "speed": lambda: speed(data, args.output, args.speed_repetitions),
        "memory": lambda: memory(data, args.output, args.memory_batch),
        "cached": lambda: cached(data, args.output, args.memory_batch, args.cached_seeds),
    }

    # The bi-encoder chain (its sweep, then its final runs) and the cross-encoder chain run side by side, sharing
    # the --jobs slots; the timed parts then run alone.
    def chain(parts: list[str]) -> None:
        for part in parts:
            if part in args.parts:
                actions[part]()
                with _LOCK:
                    chosen = data.get("chosen", {}).items()
                    data["protocol"]["chosen"] = {k: _without(v, ("sweep", "steps", "base")) for k, v in chosen}
                    save_results(args.output, data, summarize)

    run_parallel([lambda: chain(["bi_sweep", "bi"]), lambda: chain(["cross_sweep", "cross"])], 2)
    for part in ("speed", "memory", "cached"):
        chain([part])
    plot(data, args.output.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
