"""ProjectedAdamW vs torch AdamW, peft LoRA and GaLore: held-out loss, optimizer state, peak memory, step time.

    python benchmarks/projected_optimizer.py                  # sweep + speed (resumable; about 1 h on 2 CPU cores)
    python benchmarks/projected_optimizer.py --parts speed    # only the interleaved step-time measurement
    python benchmarks/projected_optimizer.py --table          # the README table from the results file

Part ``sweep``: one run = the embedded SmolLM2-135M fine-tuned on BBC article text (blocks of ``--block_size``
tokens, the same batches in the same order for every run) for ``--steps`` optimizer steps with the stock `Trainer`,
then evaluated on held-out blocks. Methods, each with a small learning-rate sweep (the best held-out loss is
reported):

- ``adamw``: `torch.optim.AdamW` on every weight (the stock Trainer's ``adamw_torch``);
- ``lora``: peft LoRA (rank ``--rank``, alpha = rank, all linear layers) + AdamW;
- ``galore``: GaLore through transformers' ``optim="galore_adamw"`` (rank ``--rank``, the same
  ``update_proj_gap`` as our interval, scale 0.25; needs ``pip install galore-torch`` for the benchmark only);
- ``projected_random`` / ``projected_svd``: `hf_ext.optim.ProjectedAdamW` at ``--rank`` on every linear layer
  (`PROJECTED_TARGETS`: attention and MLP projections and the LM head, tied with the embedding in SmolLM2).

Every run is its own process (so its peak memory is its own): optimizer-state bytes (summed from the state tensors,
GaLore's stored projection matrices included), peak memory of training (CPU: growth of the peak resident set;
CUDA: `torch.cuda.max_memory_allocated`), median step time, the loss curve.

Part ``speed`` (`speed`): AdamW and both projections step the same model in turn in one process; the projected
step-time ratios in the summary come from it (separate processes differ by up to 20% on a shared CPU).
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

from _common import PeakMemory, load_results, protocol, save_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LEARNING_RATES = {  # each best rate of a first sweep was its largest, so every sweep goes one step higher
    "adamw": [2e-5, 5e-5, 1e-4],
    "lora": [2e-4, 5e-4, 1e-3],
    "galore": [5e-5, 2e-4, 5e-4],
    "projected_random": [2e-4, 5e-4, 1e-3],  # a rank-64 subspace moves less per step than the full weight
    "projected_svd": [2e-4, 5e-4, 1e-3],
}
# Every linear layer: the attention and MLP projections and the LM head (in SmolLM2 tied with the input embedding,
# which is then projected too: left at full AdamW it alone held 226 of 318 MiB of state in a first sweep)
PROJECTED_TARGETS = r"lm_head|.*_proj"


def _state_bytes(optimizer) -> int:
    """Bytes of the state tensors, plus the projection matrices GaLore keeps in a `projector` object."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "element_size"):
                total += value.numel() * value.element_size()
            elif getattr(value, "ortho_matrix", None) is not None:
                matrices = value.ortho_matrix if isinstance(value.ortho_matrix, list) else [value.ortho_matrix]
                total += sum(m.numel() * m.element_size() for m in matrices)
    return total


def child(method: str, lr: float, args: argparse.Namespace) -> dict:
    """One training run (in its own process); prints its JSON result."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from hf_ext import smollm2_path
    from hf_ext.data import bbc_lm_data
    from hf_ext.optim import create_projected_optimizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train, test = bbc_lm_data(tokenizer, args.block_size, max_train_blocks=args.steps * args.batch_size,
                              max_eval_blocks=args.eval_blocks)  # fmt: skip
    optimizers = (None, None)
    extra: dict = {}
    extra_result: dict = {}
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear",
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))  # fmt: skip
    elif method == "galore":
        extra = {"optim": "galore_adamw", "optim_target_modules": [r".*_proj"],
                 "optim_args": f"rank={args.rank}, update_proj_gap={args.update_interval}, scale=0.25"}  # fmt: skip
    elif method.startswith("projected_"):
        optimizer = create_projected_optimizer(model.to(device), target_modules=PROJECTED_TARGETS, rank=args.rank,
                                               lr=lr, weight_decay=0.0, projection=method.split("_", 1)[1],
                                               update_interval=args.update_interval)  # fmt: skip
        optimizers = (optimizer, None)
        extra_result = {"target_modules": PROJECTED_TARGETS}

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=max(1, args.steps // 20),
            save_strategy="no", report_to="none", seed=0, data_seed=0, disable_tqdm=True,
            dataloader_num_workers=0, per_device_eval_batch_size=8, use_cpu=device == "cpu", **extra,
        )  # fmt: skip
        trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                          optimizers=optimizers, callbacks=[timer])  # fmt: skip
        initial_eval = trainer.evaluate()["eval_loss"] if args.eval_initial else None
        with PeakMemory(device) as peak:
            trainer.train()
        eval_loss = trainer.evaluate()["eval_loss"]
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        curve = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return {
        "method": method,
        "lr": lr,
        "eval_loss": eval_loss,
        "initial_eval_loss": initial_eval,
        "optimizer_state_bytes": _state_bytes(inner),
        "peak_train_bytes": peak.bytes,
        "median_step_seconds": statistics.median(timer.times[2:]),
        "mean_step_seconds": statistics.mean(timer.times[2:]),
        "train_loss_curve": curve,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "device": device,
        **extra_result,
    }


def speed(args: argparse.Namespace) -> dict:
    """Train-step time of AdamW and ProjectedAdamW (random, svd) on one SmolLM2, interleaved in one process.

    Separate processes (the sweep's runs) differ by up to 20% in speed on a shared CPU, more than the effect
    measured, so the ratios come from here: each round runs forward, backward and one optimizer's step for every
    optimizer in turn (the order rotated each round) on the same model and batch; ``2 x update_interval`` timed
    rounds after one warm-up, so basis changes happen at their real rate (the mean includes them).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ext import smollm2_path
    from hf_ext.data import bbc_lm_data
    from hf_ext.optim import create_projected_optimizer

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(smollm2_path()).to(device).train()
    train, _ = bbc_lm_data(tokenizer, args.block_size, max_train_blocks=args.batch_size, max_eval_blocks=1)
    ids = torch.tensor(train["input_ids"][: args.batch_size], device=device)
    optimizers = {"adamw": torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)}
    for projection in ("random", "svd"):
        optimizers[f"projected_{projection}"] = create_projected_optimizer(
            model, target_modules=PROJECTED_TARGETS, rank=args.rank, lr=1e-5, weight_decay=0.0,
            projection=projection, update_interval=args.update_interval)  # fmt: skip
    names = list(optimizers)
    step_times: dict[str, list[float]] = {name: [] for name in names}
    optimizer_times: dict[str, list[float]] = {name: [] for name in names}

    def clock() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    rounds = 1 + 2 * args.update_interval
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            model(input_ids=ids, labels=ids).loss.backward()
            middle = clock()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            end = clock()
            if round_index:  # the first round is warm-up
                step_times[name].append(end - start)
                optimizer_times[name].append(end - middle)
        print(f"[projected] speed round {round_index + 1}/{rounds}", flush=True)
    result: dict = {"rounds": rounds - 1, "device": device}
    for name in names:
        result[name] = {"mean_step_seconds": statistics.mean(step_times[name]),
                        "median_step_seconds": statistics.median(step_times[name]),
                        "mean_optimizer_step_seconds": statistics.mean(optimizer_times[name]),
                        "step_seconds": step_times[name]}  # fmt: skip
    return result


def summarize(data: dict) -> dict:
    runs = data.get("runs", {})
    summary: dict = {}
    best = {}
    for method in LEARNING_RATES:
        done = [r for key, r in runs.items() if key.split("/")[0] == method]
        if done:
            best[method] = min(done, key=lambda r: r["eval_loss"])
    for method, run in best.items():
        name = {"projected_random": "projected", "projected_svd": "projected_svd"}.get(method, method)
        summary[f"eval_loss_{name}"] = run["eval_loss"]
        summary[f"best_lr_{name}"] = run["lr"]
        summary[f"state_bytes_{name}"] = run["optimizer_state_bytes"]
        summary[f"median_step_seconds_{name}"] = run["median_step_seconds"]
        summary[f"peak_train_mib_{name}"] = run["peak_train_bytes"] / 2**20
    if "adamw" in best:
        adamw = best["adamw"]
        for method, run in best.items():
            name = {"projected_random": "projected", "projected_svd": "projected_svd"}.get(method, method)
            if method != "adamw":
                # no step-time ratio across runs: they ran at other times, under other loads (see `speed`)
                for key, field in (("state_bytes", "optimizer_state_bytes"), ("eval_loss", "eval_loss")):
                    summary[f"{key}_ratio_vs_adamw_{name}"] = run[field] / adamw[field]
        if "projected_random" in best:
            summary["state_bytes_ratio_vs_adamw"] = summary["state_bytes_ratio_vs_adamw_projected"]
    speed = data.get("speed")
    if speed:  # projected step times from the interleaved measurement, not from the separate runs
        for method, name in (("projected_random", "projected"), ("projected_svd", "projected_svd")):
            summary[f"step_time_ratio_vs_adamw_{name}"] = (
                speed[method]["mean_step_seconds"] / speed["adamw"]["mean_step_seconds"]
            )
            summary[f"optimizer_step_ratio_vs_adamw_{name}"] = (
                speed[method]["mean_optimizer_step_seconds"] / speed["adamw"]["mean_optimizer_step_seconds"]
            )
        summary["step_time_ratio_vs_adamw"] = summary["step_time_ratio_vs_adamw_projected"]
        summary["mean_step_seconds_interleaved_adamw"] = speed["adamw"]["mean_step_seconds"]
    if "initial_eval_loss" in data:
        summary["eval_loss_before_training"] = data["initial_eval_loss"]
    return summary


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for run in data.get("runs", {}).values():
        method = run["method"]
        name = {"projected_random": "projected", "projected_svd": "projected_svd"}.get(method, method)
        if s.get(f"best_lr_{name}") == run["lr"]:
            steps, losses = zip(*run["train_loss_curve"], strict=True)
            axes[0].plot(steps, losses, label=f"{method} (lr {run['lr']:g})")
    axes[0].set_title("training loss (best learning rate per method)")
    axes[0].set_xlabel("step")
    axes[0].legend()
    names = [n for n in ("adamw", "lora", "galore", "projected", "projected_svd") if f"eval_loss_{n}" in s]
    axes[1].bar(names, [s[f"eval_loss_{n}"] for n in names])
    low = min(s[f"eval_loss_{n}"] for n in names)
    axes[1].set_ylim(low * 0.97, max(s[f"eval_loss_{n}"] for n in names) * 1.01)
    axes[1].set_title("held-out loss")
    axes[2].bar(names, [s[f"state_bytes_{n}"] / 2**20 for n in names])
    axes[2].set_title("optimizer state (MiB)")
    for ax in axes[1:]:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(data: dict) -> str:
    s = data["summary"]
    lines = ["| method (best lr) | held-out loss | optimizer state | step time | peak train memory |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, label in (("adamw", "torch AdamW"), ("lora", "peft LoRA + AdamW"), ("galore", "GaLore (transformers)"),
                        ("projected", "ProjectedAdamW random"), ("projected_svd", "ProjectedAdamW svd")):  # fmt: skip
        if f"eval_loss_{name}" not in s:
            continue

        def ratio(key: str, name: str = name) -> str:
            return f" ({s[f'{key}_ratio_vs_adamw_{name}']:.2f}x)" if name != "adamw" else ""

        step = f"{s[f'median_step_seconds_{name}']:.2f} s"
        if name.startswith("projected") and "mean_step_seconds_interleaved_adamw" in s:
            step += f" ({s[f'step_time_ratio_vs_adamw_{name}']:.2f}x, interleaved)"
        lines.append(
            f"| {label} ({s[f'best_lr_{name}']:g}) | {s[f'eval_loss_{name}']:.4f}{ratio('eval_loss')} | "
            f"{s[f'state_bytes_{name}'] / 2**20:.0f} MiB{ratio('state_bytes')} | {step} | "
            f"{s[f'peak_train_mib_{name}']:.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["sweep", "speed"], choices=["sweep", "speed"])
    parser.add_argument("--methods", nargs="+", default=list(LEARNING_RATES), choices=list(LEARNING_RATES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--eval_blocks", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--update_interval", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, choices=[1, 2, 3],
                        help="learning rates per method to run (the first of each before any second)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS / "pre_protocol" / "projected_optimizer.json")
    parser.add_argument("--table", action="store_true", help="print the README table from --output and exit")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "LR"), help=argparse.SUPPRESS)
    parser.add_argument("--eval_initial", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], float(args.child[1]), args)))
        return
    if args.table:
        print(table(json.loads(args.output.read_text())))
        return
    # Pre-protocol: each method's learning rate is picked on the same held-out blocks whose loss is reported;
    # issue 16 moves the choice to validation blocks (results then go to benchmarks/results/).
    data = load_results(args.output, protocol(
        selection_split="pre-protocol: the reported held-out blocks", test_split="held-out BBC text blocks",
        chosen={}, seeds=[0],
    ))  # fmt: skip
    keys = ("steps", "batch_size", "block_size", "eval_blocks", "rank", "update_interval")
    config = {k: getattr(args, k) for k in keys}
    if data.get("config", config) != config:
        raise SystemExit(f"{args.output} holds runs with another configuration {data['config']}: use --output.")
    data["config"] = config
    runs = data.setdefault("runs", {})
    first = True
    # every method's first learning rate before any second one
    for lr_index in range(args.rounds if "sweep" in args.parts else 0):
        for method in args.methods:
            if lr_index >= len(LEARNING_RATES[method]):
                continue
            lr = LEARNING_RATES[method][lr_index]
            key = f"{method}/{lr:g}"
            if key in runs:
                continue
            argv = [sys.executable, __file__, "--child", method, str(lr), *[f"--{k}={v}" for k, v in config.items()]]
            if first and "initial_eval_loss" not in data:
                argv.append("--eval_initial")
            print(f"[projected] {key} ...", flush=True)
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{key} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            if result.get("initial_eval_loss") is not None:
                data["initial_eval_loss"] = result["initial_eval_loss"]
            first = False
            runs[key] = result
            print(f"[projected] {key}: eval loss {result['eval_loss']:.4f}, state "
                  f"{result['optimizer_state_bytes'] / 2**20:.0f} MiB, step {result['median_step_seconds']:.2f} s",
                  flush=True)  # fmt: skip
            save_results(args.output, data, summarize)
    if "speed" in args.parts:
        data["speed"] = speed(args)
    save_results(args.output, data, summarize)
    plot(data, args.output.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
