"""`estimate_training_memory` against the bytes SmolLM2-135M holds in training, and the Llama-3 8B / 70B table.

    python benchmarks/memory_model.py           # about 3 minutes on 2 CPU cores
    python benchmarks/memory_model.py --table   # the docs page's table from the results file

Part one: the embedded SmolLM2-135M (tied embeddings, float32) trains two steps on two 64-token blocks of BBC text
with each method, on one process and on each rank of two gloo processes (`fully_shard` per decoder layer and at
the root; GaLore and APOLLO on one process only: galore-torch has no FSDP support, apollo-torch supports FSDP1;
``pip install galore-torch apollo-torch bitsandbytes``, for the benchmark only);
`hf_ext.optim.measure_training_memory` counts the weights, the peak of the gradients and the optimizer state from
tensors, and `estimate_training_memory` predicts the same three from the shapes alone. The summary holds
the largest relative error over methods and parts, per setting.

Part two: `estimate_training_memory` on meta-device models built from Llama 3's published dimensions (no weights),
8 processes, bf16 weights, rank 64 (the docs page's table).

Nothing is chosen (the rank is the benchmark's, 64; the methods run at fixed settings), and the byte counts do not
depend on the seed beyond which tokens are read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from _common import load_results, protocol, save_results
from _peers import PEERS, peer_optimizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("adamw", "lora", "projected", "projected_freeing")  # one process and FSDP2
PARTS = ("weights", "gradients", "optimizer_state")
RANK = 64
WORLD_SIZE = 2
TABLE_RANK, TABLE_WORLD_SIZE = 64, 8
SEED = 0


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    from hf_ext.assets import load_bbc_news

    text = " ".join(load_bbc_news().shuffle(seed=SEED).select(range(4))["text"])
    ids = torch.tensor(tokenizer(text)["input_ids"][: 2 * 64]).view(2, 64)
    return {"input_ids": ids, "labels": ids}


def _measure(method: str, mesh=None) -> dict[str, dict[str, int]]:
    """Measured and estimated bytes of ``method`` on this process (``mesh``: this rank under `fully_shard`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ext import smollm2_path
    from hf_ext.optim import create_projected_optimizer, estimate_training_memory, measure_training_memory

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    batch = _batch(AutoTokenizer.from_pretrained(smollm2_path()))
    # the estimate reads the plain model's shapes (it adds LoRA's adapters and FSDP2's shards itself)
    sharding = {} if mesh is None else {"world_size": WORLD_SIZE, "sharding": "fsdp2"}
    if mesh is not None:
        sharding["process_index"] = mesh.get_local_rank()
    estimated = estimate_training_memory(model, method, rank=RANK, **sharding)
    blocks = set(model._no_split_modules)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear"))
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        if method in ("adamw", "lora"):
            return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        if method.startswith(("galore", "apollo")):
            return peer_optimizer(model, method, rank=RANK, lr=1e-5)
        return create_projected_optimizer(model, rank=RANK, lr=1e-5, step_in_backward=method.endswith("freeing"))

    measured = measure_training_memory(model, make_optimizer, batch)
    return {"measured": measured.as_dict(), "estimated": estimated.as_dict()}


def _rank(rank: int, world_size: int) -> dict[str, dict]:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    return {method: _measure(method, mesh) for method in METHODS}


def _errors(row: dict[str, dict[str, int]]) -> dict[str, float]:
    return {part: abs(row["estimated"][part] - row["measured"][part]) / row["measured"][part] for part in PARTS}


def summarize(data: dict) -> dict:
    s: dict = {}
    settings = {"one_process": [data.get("one_process", {})]}
    settings["fsdp2"] = data.get("fsdp2", [])
    for name, ranks in settings.items():
        errors = [e for rows in ranks for row in rows.values() for e in _errors(row).values()]
        if errors:
            s[f"max_rel_error_{name}"] = max(errors)
    for method, row in data.get("one_process", {}).items():
        s[f"measured_total_mib_{method}"] = row["measured"]["total"] / 2**20
    for method, row in (data.get("fsdp2") or [{}])[0].items():
        s[f"fsdp2_rank0_measured_total_mib_{method}"] = row["measured"]["total"] / 2**20
    s["within_5_percent"] = bool(s) and all(v <= 0.05 for k, v in s.items() if k.startswith("max_rel_error"))
    return s


def table(data: dict) -> str:
    """The docs pages' tables: SmolLM2 measured MiB (weights + gradients + state) and the estimate's largest error over
    the three parts, one process and FSDP2 (the larger of the two ranks' errors); then the Llama 3 estimates."""
    lines = [
        "| method | one process: weights + gradients + state = total (MiB) | error | FSDP2 rank 0 of 2 | error |",
        "|---|---|---:|---|---:|",
    ]

    def cell(row: dict) -> str:
        m = {k: v / 2**20 for k, v in row["measured"].items()}
        return f"{m['weights']:.0f} + {m['gradients']:.0f} + {m['optimizer_state']:.0f} = {m['total']:.0f}"

    for method, row in data["one_process"].items():
        ranks = [rows[method] for rows in data["fsdp2"] if method in rows]
        fsdp2 = (cell(ranks[0]), f"{max(max(_errors(r).values()) for r in ranks):.2%}") if ranks else ("-", "-")
        lines.append(f"| {method} | {cell(row)} | {max(_errors(row).values()):.2%} | {fsdp2[0]} | {fsdp2[1]} |")
    return "\n".join(lines) + "\n\n" + llama3_table(data)


def llama3_table(data: dict) -> str:
    """GiB per process (weights + gradients + optimizer state), one column per model and sharding."""
    columns = [(name, sharding) for name, by_sharding in data["llama3"].items() for sharding in by_sharding]
    header = " | ".join(f"{name}, {sharding}" for name, sharding in columns)
    lines = [f"| method | {header} |", "|---|" + "---:|" * len(columns)]
    methods = dict.fromkeys(m for name, sharding in columns for m in data["llama3"][name][sharding])
    for method in methods:
        cells = []
        for name, sharding in columns:
            row = data["llama3"][name][sharding].get(method)
            cells.append(f"{row['total'] / 2**30:.1f}" if row else "refused")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def llama3_estimates() -> dict:
    """`estimate_training_memory` on meta-device Llama 3 models (published dimensions), bf16, 8 processes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_ext.optim import LLAMA3_SHAPES, estimate_training_memory

    out: dict = {}
    for name, shape in LLAMA3_SHAPES.items():
        with torch.device("meta"):  # shapes only: no weights are made
            model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
        out[name] = {}
        for sharding in ("ddp", "fsdp2"):
            out[name][sharding] = {}
            for method in ("adamw", "lora", "galore", "apollo", "projected", "projected_freeing"):
                if sharding == "ddp" and method == "projected_freeing":
                    continue  # refused under multi-process DDP (its hooks fire before the all-reduce)
                memory = estimate_training_memory(model, method, rank=TABLE_RANK, world_size=TABLE_WORLD_SIZE,
                                                  sharding=sharding, dtype=torch.bfloat16)  # fmt: skip
                out[name][sharding][method] = memory.as_dict()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=RESULTS / "memory_model.json")
    parser.add_argument("--table", action="store_true", help="print the docs pages' tables from --output and exit")
    parser.add_argument("--llama3_only", action="store_true", help="recompute only the Llama 3 estimates")
    args = parser.parse_args()
    if args.llama3_only:
        data = json.loads(args.output.read_text())
        data["llama3"] = llama3_estimates()
        data["llama3_settings"] = {"rank": TABLE_RANK, "world_size": TABLE_WORLD_SIZE, "dtype": "bfloat16"}
        save_results(args.output, data, summarize)
        args.table = True
    if args.table:
        print(table(json.loads(args.output.read_text())))
        return
    from hf_ext.testing import run_distributed

    data = load_results(args.output, protocol(
        selection_split="none: byte counts at fixed settings (rank 64, the methods' defaults); nothing is chosen",
        test_split="SmolLM2-135M, two training steps on two 64-token blocks of BBC text: one process, and each "
                   "rank of 2 gloo processes under fully_shard",
        chosen={}, seeds=[SEED], rank=RANK, world_size=WORLD_SIZE,
    ))  # fmt: skip
    torch.set_num_threads(1)
    data["one_process"] = {}
    for method in (*METHODS, *PEERS):  # the peers on one process only: neither runs on FSDP2
        data["one_process"][method] = _measure(method)
        print(method, "one process", _errors(data["one_process"][method]), file=sys.stderr)
    data["fsdp2"] = run_distributed(_rank, world_size=WORLD_SIZE, timeout=1800.0)
    data["llama3"] = llama3_estimates()
    data["llama3_settings"] = {"rank": TABLE_RANK, "world_size": TABLE_WORLD_SIZE, "dtype": "bfloat16"}
    save_results(args.output, data, summarize)
    print(table(data))
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
