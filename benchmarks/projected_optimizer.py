"""ProjectedAdamW against torch AdamW, peft LoRA, GaLore and APOLLO: held-out loss, optimizer state, peak training
memory and step time, under the benchmark protocol.

    python benchmarks/projected_optimizer.py              # every part, resumable (about 3 h on 2 CPU cores)
    python benchmarks/projected_optimizer.py --parts memory speed fsdp2
    python benchmarks/projected_optimizer.py --table      # the docs page's table from the results file

The embedded SmolLM2-135M (float32 weights, bf16 autocast as `Trainer(bf16=True)` runs it) is fine-tuned on BBC
article text in blocks of ``--block_size`` tokens with the stock `Trainer` (constant learning rate, no warm-up, no
weight decay, no clipping: ``max_grad_norm=0``, which gradient-freeing steps need and every method gets).
BBC's deterministic 80/20 article split gives the test blocks; a stratified tenth of the training articles gives
the validation blocks; training reads the first ``--steps x --batch_size`` blocks of the other nine tenths, in an
order the seed shuffles.

Methods, all on the same weights (`PROJECTED_TARGETS`: every attention and MLP projection and the LM head, which
SmolLM2 ties with the input embedding) at rank ``--rank``, a new projection every ``--update_interval`` steps:

- ``adamw``: `torch.optim.AdamW` (fused, as `Trainer`'s default ``adamw_torch_fused``) on every weight;
- ``lora``: peft LoRA (rank ``--rank``, alpha = rank, all linear layers, no dropout) + fused AdamW;
- ``galore`` / ``galore_layerwise``: galore-torch's ``GaLoreAdamW`` (scale 0.25), and its layer-wise mode (one
  optimizer per weight, stepped in a gradient hook); ``apollo``: apollo-torch's ``APOLLOAdamW`` (channel-wise
  scales, random projection). Installed for the benchmark only: ``pip install galore-torch apollo-torch
  bitsandbytes`` (`_peers`);
- ``projected`` / ``projected_svd``: `hf_ext.optim.create_projected_optimizer` with random / SVD bases, and
  ``projected_freeing`` / ``projected_svd_freeing`` with ``step_in_backward=True`` (the same update, each
  gradient freed during backward).

Parts (each saves the results file when it ends, so runs accumulate across sessions):

- ``sweep`` (seed 0): each method's learning rate is chosen on the validation blocks from a ladder of rates; a
  best rate at either end of the rates run so far adds the next rate beyond it, until the best is inside. Each
  run keeps its trained weights (``--weights_dir``), so that only the chosen one is scored on the test blocks;
- ``test``: the chosen rate's seed-0 weights scored on the test blocks once, and seeds 1 and 2 trained at that
  rate and scored once each (mean, sample std, n; paired differences over the same seeds); where the seed-0
  weights are gone (another machine), the seed-0 run is trained again and must reproduce its validation loss;
- ``freeing``: ``projected_freeing`` and ``projected_svd_freeing`` at their base method's chosen rate (seed 0):
  the same trajectory as without freeing, so the held-out loss should match;
- ``memory``: each method (its own process, seed 0) trains ``update_interval + 1`` steps with a plain loop
  (one basis refresh included); peak training memory = weight bytes + the most bytes of tensors alive at once
  (`TensorBytes`: gradients, optimizer state, activations, temporaries), optimizer-state bytes counted from the
  state's tensors (the peers' projector objects included);
- ``speed``: every method trains its own copy of the model in one process, interleaved (forward, backward and
  step of each in turn, the order rotated each round), ``2 x update_interval`` timed rounds after a warm-up, so
  basis changes happen at their real rate; the step-time ratios come from here (separate processes on a shared
  CPU differ by more than the effect measured);
- ``fsdp2``: the ``memory`` measurement on each of 2 gloo processes with `fully_shard` (per decoder layer and at
  the root), for the methods that run under FSDP2 (GaLore and APOLLO do not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import choose, fmt_mean_std, fmt_paired, load_results, mean_std, paired, protocol, save_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Every linear layer: the attention and MLP projections and the LM head (in SmolLM2 tied with the input embedding,
# which is then projected too: left at full AdamW it alone held 226 of 318 MiB of state in a first sweep)
PROJECTED_TARGETS = r"lm_head|.*_proj"
LADDER = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
# where each sweep starts (the rate and its two neighbours on the ladder): the best rates of a 40-step first sweep
START = {"adamw": 5e-5, "lora": 5e-4, "galore": 1e-3, "apollo": 1e-4, "projected": 5e-4, "projected_svd": 2e-4}
LOSS_METHODS = tuple(START)
FREEING = {"projected_freeing": "projected", "projected_svd_freeing": "projected_svd"}
MEMORY_METHODS = ("adamw", "lora", "galore", "galore_layerwise", "apollo", "projected", "projected_freeing",
                  "projected_svd", "projected_svd_freeing")  # fmt: skip
SPEED_METHODS = ("adamw", "lora", "galore", "apollo", "projected", "projected_svd", "projected_freeing")
FSDP2_METHODS = ("adamw", "lora", "projected", "projected_freeing")
SEEDS = (0, 1, 2)
CONFIG_KEYS = ("steps", "batch_size", "block_size", "eval_blocks", "rank", "update_interval")


# ----------------------------------------------------------------------------------------------- building


def _clock() -> float:
    """Seconds, after the GPU's queued work has finished (a CPU run needs no wait)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def data_splits(tokenizer, config: dict) -> dict:
    """Train / validation / test blocks (see the module docstring)."""
    from hf_ext.assets import bbc_news_train_test_split
    from hf_ext.data import lm_blocks

    splits = bbc_news_train_test_split(test_size=0.2, seed=0)
    inner = bbc_news_train_test_split(splits["train"], test_size=0.1, seed=0)
    size, n_train, n_eval = config["block_size"], config["steps"] * config["batch_size"], config["eval_blocks"]
    out = {
        "train": lm_blocks(inner["train"]["text"], tokenizer, size),
        "validation": lm_blocks(inner["test"]["text"], tokenizer, size),
        "test": lm_blocks(splits["test"]["text"], tokenizer, size),
    }
    for name, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        if len(out[name]) < n:
            raise SystemExit(f"BBC gives {len(out[name])} {name} blocks of {size} tokens; {n} are needed.")
        out[name] = out[name].select(range(n))
    return out


def build(method: str, config: dict, *, lr: float, seed: int, mesh=None, optimizer: bool = True):
    """The model (LoRA-wrapped, `fully_shard`-ed on ``mesh``) and, unless ``optimizer=False``, its optimizer."""
    from transformers import AutoModelForCausalLM, set_seed

    from hf_ext import smollm2_path
    from hf_ext.optim import create_projected_optimizer

    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).to(_device())
    blocks = set(model._no_split_modules)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config["rank"], lora_alpha=config["rank"], lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))  # fmt: skip
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if not optimizer:
        return model, None
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method in ("adamw", "lora"):
        # fused, as Trainer's default adamw_torch_fused (DTensor shards: torch's default implementation)
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, fused=mesh is None)
    elif method in ("galore", "galore_layerwise", "apollo"):
        from _peers import peer_optimizer

        opt = peer_optimizer(model, method, rank=config["rank"], lr=lr, update_proj_gap=config["update_interval"],
                             target_modules=PROJECTED_TARGETS)  # fmt: skip
    elif method.startswith("projected"):
        opt = create_projected_optimizer(
            model, target_modules=PROJECTED_TARGETS, rank=config["rank"], lr=lr, weight_decay=0.0,
            projection="svd" if "svd" in method else "random", update_interval=config["update_interval"],
            seed=seed, step_in_backward=method.endswith("freeing"),
        )  # fmt: skip
    else:
        raise ValueError(f"unknown method {method!r}")
    return model, opt


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------- children


def _training_args(tmp: str, config: dict, *, lr: float, seed: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=tmp, max_steps=config["steps"], per_device_train_batch_size=config["batch_size"],
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=10, save_strategy="no", report_to="none", seed=seed, data_seed=seed, disable_tqdm=True,
        dataloader_num_workers=0, per_device_eval_batch_size=16, use_cpu=_device() == "cpu", bf16=True,
    )  # fmt: skip


def train_child(spec: dict) -> dict:
    """One Trainer run: validation loss, the test loss when ``spec["test"]``, the weights kept when ``spec["save"]``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback

    from hf_ext import smollm2_path

    config, method, lr, seed = spec["config"], spec["method"], spec["lr"], spec["seed"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    splits = data_splits(tokenizer, config)
    model, optimizer = build(method, config, lr=lr, seed=seed)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = _clock()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(_clock() - self._start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        trainer = Trainer(model=model, args=_training_args(tmp, config, lr=lr, seed=seed),
                          train_dataset=splits["train"], data_collator=collator, optimizers=(optimizer, None),
                          callbacks=[timer])  # fmt: skip
        trainer.train()
        result = {"method": method, "lr": lr, "seed": seed,
                  "validation_loss": trainer.evaluate(eval_dataset=splits["validation"])["eval_loss"]}  # fmt: skip
        if spec.get("test"):
            result["test_loss"] = trainer.evaluate(eval_dataset=splits["test"])["eval_loss"]
    if spec.get("save"):
        Path(spec["save"]).parent.mkdir(parents=True, exist_ok=True)
        save_file(_trainable(model), spec["save"])
    result.update({
        "median_step_seconds": statistics.median(timer.times[2:]),
        "train_loss_curve": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    })  # fmt: skip
    return result


def score_child(spec: dict) -> dict:
    """The test loss of a sweep run's kept weights (its method's chosen rate), with the same evaluation."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer

    from hf_ext import smollm2_path

    config, method = spec["config"], spec["method"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    splits = data_splits(tokenizer, config)
    model, _ = build(method, config, lr=spec["lr"], seed=spec["seed"], optimizer=False)
    saved = load_file(spec["weights"])
    if set(saved) != set(_trainable(model)):
        raise RuntimeError(f"{spec['weights']} does not hold this model's trainable weights.")
    model.load_state_dict(saved, strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, args=_training_args(tmp, config, lr=spec["lr"], seed=spec["seed"]),
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))  # fmt: skip
        return {"validation_loss_rescored": trainer.evaluate(eval_dataset=splits["validation"])["eval_loss"],
                "test_loss": trainer.evaluate(eval_dataset=splits["test"])["eval_loss"]}  # fmt: skip


def memory_child(spec: dict, mesh=None) -> dict:
    """Peak training memory and state bytes of one method over ``update_interval + 1`` plain-loop steps."""
    from transformers import AutoTokenizer

    from hf_ext import smollm2_path
    from hf_ext.optim.measure import _state_bytes, _storage_bytes
    from hf_ext.tensor_memory import TensorBytes

    config, method = spec["config"], spec["method"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    blocks = data_splits(tokenizer, config)["train"]["input_ids"]
    model, optimizer = build(method, config, lr=1e-5, seed=0, mesh=mesh)
    model.train()
    device, batch = _device(), config["batch_size"]
    weights = _storage_bytes(model.parameters())
    losses = []
    with TensorBytes(device) as probe:
        for step in range(config["update_interval"] + 1):
            ids = torch.tensor(blocks[step * batch : (step + 1) * batch], device=device)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return {"method": method, "weights_bytes": weights, "peak_bytes_over_weights": probe.peak,
            "peak_train_bytes": weights + probe.peak, "optimizer_state_bytes": _state_bytes(optimizer),
            "steps": config["update_interval"] + 1, "losses": losses}  # fmt: skip


def _fsdp2_rank(rank: int, world_size: int, config: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    return {method: memory_child({"config": config, "method": method}, mesh) for method in FSDP2_METHODS}


def speed(config: dict) -> dict:
    """Step time of every `SPEED_METHODS` method, each on its own copy of the model, interleaved in one process."""
    from transformers import AutoTokenizer

    from hf_ext import smollm2_path

    device, batch = _device(), config["batch_size"]
    blocks = data_splits(AutoTokenizer.from_pretrained(smollm2_path()), config)["train"]["input_ids"]
    ids = torch.tensor(blocks[:batch], device=device)
    setups = {m: build(m, config, lr=1e-5, seed=0) for m in SPEED_METHODS}
    for model, _ in setups.values():
        model.train()
    step_times: dict[str, list[float]] = {m: [] for m in setups}
    optimizer_times: dict[str, list[float]] = {m: [] for m in setups}

    names, rounds = list(setups), 1 + 2 * config["update_interval"]
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            model, optimizer = setups[name]
            start = _clock()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            middle = _clock()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = _clock()
            if round_index:  # the first round is warm-up
                step_times[name].append(end - start)
                optimizer_times[name].append(end - middle)
        print(f"[projected] speed round {round_index + 1}/{rounds}", flush=True)
    return {"rounds": rounds - 1, "device": device, **{
        name: {"mean_step_seconds": statistics.mean(step_times[name]),
               "median_step_seconds": statistics.median(step_times[name]),
               "mean_optimizer_step_seconds": statistics.mean(optimizer_times[name]),
               "step_seconds": step_times[name]} for name in names}}  # fmt: skip


# ----------------------------------------------------------------------------------------------- sweep logic


def _key(method: str, lr: float, seed: int) -> str:
    return f"{method}/lr={lr:g}/seed={seed}"


def sweep_scores(runs: dict, method: str) -> dict[float, float]:
    """Seed-0 validation loss by learning rate."""
    return {r["lr"]: r["validation_loss"] for r in runs.values() if r["method"] == method and r["seed"] == 0}


def next_rate(runs: dict, method: str) -> float | None:
    """The next rate ``method``'s sweep needs: its start and two neighbours, then one beyond an end that is best;
    None when the best is inside."""
    scores = sweep_scores(runs, method)
    i = LADDER.index(START[method])
    for lr in (LADDER[i], LADDER[i - 1], LADDER[i + 1]):
        if lr not in scores:
            return lr
    chosen = choose(scores, higher_is_better=False)
    if not chosen["at_edge"]:
        return None
    j = LADDER.index(chosen["value"]) + (1 if chosen["value"] == max(scores) else -1)
    if not 0 <= j < len(LADDER):
        raise SystemExit(f"{method}: the best rate {chosen['value']:g} is at the end of the ladder {LADDER}.")
    return LADDER[j]


def chosen_rate(runs: dict, method: str) -> float | None:
    scores = sweep_scores(runs, method)
    if len(scores) < 3 or next_rate(runs, method) is not None:
        return None
    return choose(scores, higher_is_better=False)["value"]


# ----------------------------------------------------------------------------------------------- summary


def _test_losses(data: dict, method: str) -> dict[int, float]:
    lr = chosen_rate(data.get("runs", {}), method)
    out = {}
    for seed in SEEDS:
        entry = data.get("test", {}).get(_key(method, lr, seed)) if lr is not None else None
        if entry is not None:
            out[seed] = entry["test_loss"]
    return out


def summarize(data: dict) -> dict:
    s: dict[str, Any] = {"steps": data["config"]["steps"]}
    runs = data.get("runs", {})
    tests = {}
    for method in LOSS_METHODS:
        scores = sweep_scores(runs, method)
        if scores:
            best = choose(scores, higher_is_better=False)
            s[f"validation_sweep_{method}"] = best["sweep"]
            s[f"chosen_lr_{method}"] = chosen_rate(runs, method)
        tests[method] = _test_losses(data, method)
        if tests[method]:
            stats = mean_std(tests[method].values())
            s[f"eval_loss_{method}"] = stats["mean"]
            s[f"eval_loss_{method}_std"] = stats["std"]
            s[f"eval_loss_{method}_n"] = stats["n"]
    for a in ("projected", "projected_svd"):
        for b in ("lora", "adamw", "galore", "apollo"):
            if tests.get(a) and tests.get(b) and set(tests[a]) & set(tests[b]):
                stats = paired(tests[a], tests[b], higher_is_better=False)
                s[f"eval_loss_{a}_minus_{b}_paired"] = stats["mean"]
                s[f"eval_loss_{a}_minus_{b}_paired_std"] = stats["std"]
                s[f"eval_loss_{a}_minus_{b}_paired_n"] = stats["n"]
                s[f"eval_loss_{a}_minus_{b}_paired_lower_on"] = stats["agree"]
    for method, base in FREEING.items():
        entry = data.get("freeing", {}).get(method)
        if entry and entry["lr"] == chosen_rate(runs, base):
            s[f"eval_loss_{method}_seed0_minus_{base}_seed0"] = (
                entry["test_loss"] - data["test"][_key(base, entry["lr"], 0)]["test_loss"]
            )
    memory = data.get("memory", {})
    for method, row in memory.items():
        s[f"peak_train_mib_{method}"] = row["peak_train_bytes"] / 2**20
        s[f"state_mib_{method}"] = row["optimizer_state_bytes"] / 2**20
    if "adamw" in memory:
        for method, row in memory.items():
            s[f"state_bytes_ratio_vs_adamw_{method}"] = (
                row["optimizer_state_bytes"] / memory["adamw"]["optimizer_state_bytes"]
            )
        if "projected" in memory:
            s["state_bytes_ratio_vs_adamw"] = s["state_bytes_ratio_vs_adamw_projected"]
    timing = data.get("speed")
    if timing:
        for method in SPEED_METHODS:
            s[f"step_time_ratio_vs_adamw_{method}"] = (
                timing[method]["mean_step_seconds"] / timing["adamw"]["mean_step_seconds"]
            )
            s[f"mean_step_seconds_{method}"] = timing[method]["mean_step_seconds"]
        s["step_time_ratio_vs_adamw"] = s["step_time_ratio_vs_adamw_projected"]
    for rank, rows in enumerate(data.get("fsdp2", [])):
        for method, row in rows.items():
            s[f"fsdp2_peak_train_mib_{method}_rank{rank}"] = row["peak_train_bytes"] / 2**20
            s[f"fsdp2_state_mib_{method}_rank{rank}"] = row["optimizer_state_bytes"] / 2**20
        if "adamw" in rows and "projected" in rows:
            s[f"fsdp2_state_bytes_ratio_vs_adamw_rank{rank}"] = (
                rows["projected"]["optimizer_state_bytes"] / rows["adamw"]["optimizer_state_bytes"]
            )
    limits = {  # each target: the summary key and its bound
        "peak_freeing_le_lora": ("peak_train_mib_projected_freeing", s.get("peak_train_mib_lora")),
        "eval_loss_projected_le_lora_paired": ("eval_loss_projected_minus_lora_paired", 0.0),
        "state_bytes_ratio_le_0.2": ("state_bytes_ratio_vs_adamw", 0.2),
        "step_time_ratio_le_1.15": ("step_time_ratio_vs_adamw", 1.15),
    }
    for name, (key, limit) in limits.items():
        if key in s and limit is not None:
            s[f"target_{name}"] = s[key] <= limit
    return s


def table(data: dict) -> str:
    s = data["summary"]
    timing = data.get("speed", {})
    labels = {"adamw": "torch AdamW", "lora": "peft LoRA + AdamW", "galore": "GaLore", "galore_layerwise":
              "GaLore layer-wise", "apollo": "APOLLO", "projected": "ProjectedAdamW random", "projected_freeing":
              "ProjectedAdamW random, freeing", "projected_svd": "ProjectedAdamW svd", "projected_svd_freeing":
              "ProjectedAdamW svd, freeing"}  # fmt: skip
    lines = ["| method (chosen lr) | test loss | vs LoRA (paired) | optimizer state | peak train memory | step time |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for method, label in labels.items():
        base = FREEING.get(method, method)
        tests = _test_losses(data, base) if base in LOSS_METHODS else {}
        lr = s.get(f"chosen_lr_{base}")
        loss = fmt_mean_std(mean_std(tests.values())) if tests and method == base else "same update" if tests else "-"
        vs = (
            fmt_paired(paired(tests, _test_losses(data, "lora"), higher_is_better=False))
            if (tests and method == base and method != "lora" and _test_losses(data, "lora"))
            else "-"
        )
        mem = data.get("memory", {}).get(method)
        state = f"{mem['optimizer_state_bytes'] / 2**20:.0f} MiB" if mem else "-"
        peak = f"{mem['peak_train_bytes'] / 2**20:.0f} MiB" if mem else "-"
        step = (
            f"{timing[method]['mean_step_seconds']:.2f} s ({s[f'step_time_ratio_vs_adamw_{method}']:.2f}x)"
            if method in timing
            else "-"
        )
        name = f"{label} ({lr:g})" if lr is not None else label
        lines.append(f"| {name} | {loss} | {vs} | {state} | {peak} | {step} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- driver


def _child(spec: dict) -> dict:
    print(f"[projected] {spec['kind']} {spec.get('method')} lr={spec.get('lr')} seed={spec.get('seed')} ...",
          flush=True)  # fmt: skip
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['kind']} {spec.get('method')} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["memory", "speed", "fsdp2", "sweep", "test", "freeing"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--methods", nargs="+", default=list(LOSS_METHODS), choices=list(LOSS_METHODS),
                        help="the methods the sweep and test parts run")  # fmt: skip
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--eval_blocks", type=int, default=64)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--update_interval", type=int, default=10)
    parser.add_argument("--max_runs", type=int, default=None, help="stop after this many training runs")
    parser.add_argument("--output", type=Path, default=RESULTS / "projected_optimizer.json")
    parser.add_argument("--weights_dir", type=Path, default=ROOT / ".cache" / "projected_optimizer",
                        help="where sweep runs keep their trained weights until the chosen one is scored")  # fmt: skip
    parser.add_argument("--table", action="store_true", help="print the docs page's table from --output and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        out = {"train": train_child, "score": score_child, "memory": memory_child}[spec["kind"]](spec)
        print(json.dumps(out))
        return
    if args.table:
        print(table(json.loads(args.output.read_text())))
        return
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    data = load_results(args.output, protocol(
        selection_split="validation blocks: a stratified tenth of BBC's training articles (seed-0 runs)",
        test_split="held-out BBC test articles (the deterministic 80/20 split), scored once per chosen rate",
        chosen={}, seeds=list(SEEDS), ladder=list(LADDER), sweep_start=START, targets=PROJECTED_TARGETS,
        precision="float32 weights, bf16 autocast", extra_libraries=("peft", "galore_torch", "apollo_torch"),
    ))  # fmt: skip
    if data.get("config", config) != config:
        raise SystemExit(f"{args.output} holds runs with another configuration {data['config']}: use --output.")
    data["config"] = config
    runs, tested = data.setdefault("runs", {}), data.setdefault("test", {})
    budget = [args.max_runs if args.max_runs is not None else 10**9]

    def save() -> None:
        data["protocol"]["chosen"] = {f"lr_{m}": chosen_rate(runs, m) for m in LOSS_METHODS}
        save_results(args.output, data, summarize)

    def spend() -> bool:
        budget[0] -= 1
        return budget[0] >= 0

    if "memory" in args.parts:
        memory = data.setdefault("memory", {})
        for method in MEMORY_METHODS:
            if method not in memory:
                memory[method] = _child({"kind": "memory", "method": method, "config": config})
                print(f"[projected] memory {method}: peak {memory[method]['peak_train_bytes'] / 2**20:.0f} MiB, "
                      f"state {memory[method]['optimizer_state_bytes'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
                save()
    if "speed" in args.parts and "speed" not in data:
        data["speed"] = speed(config)
        save()
    if "fsdp2" in args.parts and "fsdp2" not in data:
        from hf_ext.testing import run_distributed

        data["fsdp2"] = run_distributed(_fsdp2_rank, world_size=2, args=(config,), timeout=3600.0)
        save()
    if "sweep" in args.parts:
        pending = True
        while pending:  # one rate per method per pass, so every sweep advances together
            pending = False
            for method in args.methods:
                lr = next_rate(runs, method)
                if lr is None or not spend():
                    continue
                pending = True
                weights = args.weights_dir / f"{method}-lr{lr:g}.safetensors"
                runs[_key(method, lr, 0)] = _child({"kind": "train", "method": method, "lr": lr, "seed": 0,
                                                    "config": config, "save": str(weights)})  # fmt: skip
                print(f"[projected] {method} lr={lr:g}: validation loss "
                      f"{runs[_key(method, lr, 0)]['validation_loss']:.4f}", flush=True)  # fmt: skip
                save()
    if "test" in args.parts:
        for method in args.methods:
            lr = chosen_rate(runs, method)
            if lr is None:
                continue
            for seed in SEEDS:
                key = _key(method, lr, seed)
                if key in tested or not spend():
                    continue
                weights = args.weights_dir / f"{method}-lr{lr:g}.safetensors"
                if seed == 0 and weights.exists():
                    tested[key] = _child({"kind": "score", "method": method, "lr": lr, "seed": 0, "config": config,
                                          "weights": str(weights)})  # fmt: skip
                elif seed == 0:  # the sweep's weights are gone (another machine): train the same run again
                    again = _child({"kind": "train", "method": method, "lr": lr, "seed": 0, "config": config,
                                    "test": True})  # fmt: skip
                    swept = runs[key]["validation_loss"]
                    if abs(again["validation_loss"] - swept) > 1e-3 * abs(swept):
                        raise SystemExit(f"{key} trained again reads validation loss {again['validation_loss']:.5f}, "
                                         f"the sweep's {swept:.5f}: the run is not reproducible here.")  # fmt: skip
                    tested[key] = {**again, "retrained": True}
                else:
                    tested[key] = runs[key] = _child({"kind": "train", "method": method, "lr": lr, "seed": seed,
                                                      "config": config, "test": True})  # fmt: skip
                print(f"[projected] {key}: test loss {tested[key]['test_loss']:.4f}", flush=True)
                save()
            if all(_key(method, lr, seed) in tested for seed in SEEDS):
                for path in args.weights_dir.glob(f"{method}-lr*.safetensors"):
                    path.unlink()
    if "freeing" in args.parts:
        freeing = data.setdefault("freeing", {})
        for method, base in FREEING.items():
            lr = chosen_rate(runs, base)
            if lr is None or freeing.get(method, {}).get("lr") == lr or not spend():
                continue
            freeing[method] = _child({"kind": "train", "method": method, "lr": lr, "seed": 0, "config": config,
                                      "test": True})  # fmt: skip
            save()
    save()
    print(table(data))
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
