"""The LM loss's peak memory and time on 8,192 tokens x SmolLM2's 49,152-word vocabulary: TVD vs TRL's losses.

    python benchmarks/tvd_memory.py            # ~5 min on 2 CPU cores
    python benchmarks/tvd_memory.py --table    # the docs page's table from the results file

The inputs are real: the embedded SmolLM2-135M-Instruct's last hidden states (after the final norm) on 8,192
next-token targets of BBC article text (4 sequences of 2,049 tokens, float32), and its LM head (49,152 x 576).
Each loss runs forward and backward from those two leaves (the hidden states and the head both need gradients, as
in training), so every method does the same work: the projection to the vocabulary, the loss and the gradients of
both inputs. Peak memory is counted from the tensors created meanwhile (`hf_ext.tensor_memory.TensorBytes`: the
logits or their tiles, temporaries, and the two gradients); time is the median of 3 repetitions, the methods in
rotated order.

- ``ce_full``: the logits materialised, `F.cross_entropy` (a `Trainer` with the model's own loss);
- ``tvd_full``: the logits materialised, `tvd_loss` (``tvd_compute_loss_func`` or ``TVDTrainer`` today);
- ``trl_nll`` / ``trl_dft``: TRL's fused LM head kernel (``ChunkedLogProbFunction``, what ``SFTTrainer`` runs for
  ``loss_type="nll"``, the former ``"chunked_nll"``, and ``"dft"``), with its own tile sizes;
- ``linear_tvd`` / ``linear_dft``: `linear_tvd_loss` at gamma 0.5 / floor 0.2 and at gamma 1 / no floor (= DFT;
  its loss and gradients are compared with ``trl_dft``'s).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import protocol, save_results

from hf_ext import load_bbc_news, smollm2_path
from hf_ext.losses import linear_tvd_loss, tvd_loss
from hf_ext.tensor_memory import TensorBytes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEQUENCES, SEQ_LEN = 4, 2049  # 4 x 2,048 = 8,192 next-token targets
GAMMA, MIN_WEIGHT = 0.5, 0.2
REPEATS = 3


def real_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SmolLM2's final hidden states on BBC text, its LM head weight, and the next-token targets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    ids: list[int] = []
    for article in load_bbc_news():
        ids += tokenizer(article["title"] + "\n" + article["text"])["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= SEQUENCES * SEQ_LEN:
            break
    batch = torch.tensor(ids[: SEQUENCES * SEQ_LEN]).view(SEQUENCES, SEQ_LEN)
    with torch.no_grad():
        hidden = torch.cat([model.model(input_ids=row[None]).last_hidden_state[0, :-1] for row in batch])
    labels = batch[:, 1:].reshape(-1)
    return hidden, model.lm_head.weight.detach().clone(), labels


def methods(labels: torch.Tensor) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    def trl_log_probs(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        args = (hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))
        return ChunkedLogProbFunction.apply(*args)[0]

    def trl_dft(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        log_probs = trl_log_probs(hidden, weight)
        return (-log_probs * log_probs.exp().detach()).sum() / len(labels)  # SFTTrainer's `loss_type="dft"`

    return {
        "ce_full": lambda h, w: F.cross_entropy(h @ w.T, labels),
        "tvd_full": lambda h, w: tvd_loss(h @ w.T, labels, gamma=GAMMA, min_weight=MIN_WEIGHT),
        "trl_nll": lambda h, w: -trl_log_probs(h, w).sum() / len(labels),
        "trl_dft": trl_dft,
        "linear_tvd": lambda h, w: linear_tvd_loss(h, w, labels, gamma=GAMMA, min_weight=MIN_WEIGHT),
        "linear_dft": lambda h, w: linear_tvd_loss(h, w, labels, gamma=1.0, min_weight=0.0),
    }


def run_once(loss_fn: Callable, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[int, float, dict]:
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    gc.collect()
    start = time.perf_counter()
    with TensorBytes() as probe:
        loss = loss_fn(h, w)
        loss.backward()
    seconds = time.perf_counter() - start
    return probe.peak, seconds, {"loss": loss.detach(), "grad_hidden": h.grad, "grad_weight": w.grad}


def measure(data: dict, out: Path) -> None:
    hidden, weight, labels = real_inputs()
    fns = methods(labels)
    names = list(fns)
    peaks: dict[str, list[int]] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, dict] = {}
    for repeat in range(REPEATS):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            peak, seconds, result = run_once(fns[name], hidden, weight)
            peaks[name].append(peak)
            times[name].append(seconds)
            if name in ("trl_dft", "linear_dft", "tvd_full", "linear_tvd") and repeat == 0:
                outputs[name] = result
            del result
            print(f"[{repeat}] {name}: peak {peak / 2**20:,.0f} MiB, {seconds:.2f} s", flush=True)
    parity = {}
    for ours, theirs in (("linear_dft", "trl_dft"), ("linear_tvd", "tvd_full")):
        a, b = outputs[ours], outputs[theirs]
        parity[f"{ours}_vs_{theirs}"] = {
            "loss": [float(a["loss"]), float(b["loss"])],
            **{f"{k}_max_abs_diff": float((a[k] - b[k]).abs().max()) for k in ("grad_hidden", "grad_weight")},
            **{f"{k}_max_abs": float(b[k].abs().max()) for k in ("grad_hidden", "grad_weight")},
        }
    data["runs"] = {
        n: {"peak_bytes": peaks[n], "seconds": times[n], "median_seconds": statistics.median(times[n])} for n in names
    }
    data["parity"] = parity
    data["config"] = {"tokens": len(labels), "vocab": weight.shape[0], "hidden": weight.shape[1],
                      "dtype": "float32", "gamma": GAMMA, "min_weight": MIN_WEIGHT, "repeats": REPEATS}  # fmt: skip
    save_results(out, data, summarize)


def summarize(data: dict) -> dict:
    runs = data.get("runs", {})
    s: dict = {f"{n}_peak_mib": max(r["peak_bytes"]) / 2**20 for n, r in runs.items()}
    s.update({f"{n}_seconds": r["median_seconds"] for n, r in runs.items()})
    if runs:
        s["linear_tvd_over_trl_nll_peak"] = s["linear_tvd_peak_mib"] / s["trl_nll_peak_mib"]
        s["tvd_full_over_trl_nll_peak"] = s["tvd_full_peak_mib"] / s["trl_nll_peak_mib"]
        s["logits_mib"] = data["config"]["tokens"] * data["config"]["vocab"] * 4 / 2**20
    for key, p in data.get("parity", {}).items():
        s[f"{key}_loss_abs_diff"] = abs(p["loss"][0] - p["loss"][1])
        s[f"{key}_grad_weight_rel_diff"] = p["grad_weight_max_abs_diff"] / p["grad_weight_max_abs"]
        s[f"{key}_grad_hidden_rel_diff"] = p["grad_hidden_max_abs_diff"] / p["grad_hidden_max_abs"]
    return s


LABELS = {
    "ce_full": "full logits + `F.cross_entropy`",
    "tvd_full": "full logits + `tvd_loss` (gamma 0.5, floor 0.2)",
    "trl_nll": 'TRL fused LM head, `loss_type="nll"`',
    "trl_dft": 'TRL fused LM head, `loss_type="dft"`',
    "linear_tvd": "`linear_tvd_loss` (gamma 0.5, floor 0.2)",
    "linear_dft": "`linear_tvd_loss` (gamma 1, no floor = DFT)",
}


def table(data: dict) -> str:
    s = data["summary"]
    lines = ["| loss, forward + backward from the hidden states | peak tensor memory | time (median of 3) |",
             "|---|---|---|"]  # fmt: skip
    for name, label in LABELS.items():
        lines.append(f"| {label} | {s[f'{name}_peak_mib']:,.0f} MiB | {s[f'{name}_seconds']:.2f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=RESULTS / "tvd_memory.json")
    parser.add_argument("--table", action="store_true", help="print the docs page's table from --output and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.output.read_text())))
        return
    data = {"protocol": protocol(selection_split="none: a measurement at fixed settings",
                                 test_split="8,192 next-token targets of BBC text", chosen={}, seeds=[0],
                                 extra_libraries=["trl"])}  # fmt: skip
    measure(data, args.output)
    print(table(data))
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
