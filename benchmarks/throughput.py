"""Training throughput: fp32 eager, bf16 eager, bf16 + torch.compile (static, varying, bucketed lengths).

    python benchmarks/throughput.py --make_lengths      # once, here: real token-length samples -> JSON (committed)
    python benchmarks/throughput.py                     # CPU, small (writes throughput_cpu.json)
    python benchmarks/throughput.py --device cuda --steps 30 --bert_batch 64 --gpt2_batch 16 --gpt2_max_length 1024
    python benchmarks/throughput.py --table             # the README table from the CPU results (and the plot)

Models with random weights at real sizes (speed does not depend on the weights, and nothing is downloaded):
BERT-base sequence classification (``BertConfig()``) and GPT-2 small causal LM (``GPT2Config()``). Batch lengths
are drawn from real token-length samples (STS-B sentence pairs for BERT, BBC articles for GPT-2) stored in
``benchmarks/data/token_lengths.json``, so the GPU machine needs no data packages. One training step = forward,
backward and AdamW. Modes (the settings of the shipped accelerate configs):

- ``fp32_eager``, ``bf16_eager`` (autocast), lengths padded to the batch's longest;
- ``bf16_compile_static``: every batch padded to the maximum length (one shape);
- ``bf16_compile_varying``: padded to the batch's longest (``dynamic=False``, as `bf16_compile.yaml`): a new
  length recompiles;
- ``bf16_compile_buckets``: padded to `default_buckets(max_length)` (3 lengths) with `BucketPadCollator`'s rule.

Tokens/s counts real (non-pad) tokens; MFU = 6 x parameters x real tokens/s over a bf16 matmul peak measured in the
same run; recompiles = graphs compiled during the timed steps (warm-up excluded for static / buckets: every bucket is
compiled before timing); peak memory of the step (CUDA allocator, or the CPU resident set's growth).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from _common import PeakMemory, save_results

from hf_ext.data import bucket_for, default_buckets
from hf_ext.trainers import compiled_graphs

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = ROOT / "benchmarks" / "data" / "token_lengths.json"
MODES = ("fp32_eager", "bf16_eager", "bf16_compile_static", "bf16_compile_varying", "bf16_compile_buckets")


def make_lengths() -> None:
    """Token lengths of real data with the embedded tokenizers (MiniLM's WordPiece for STS-B pairs, SmolLM2's BPE
    for BBC articles), written once to benchmarks/data/token_lengths.json."""
    from transformers import AutoTokenizer

    from hf_ext import load_bbc_news, load_stsb, minilm_path, smollm2_path

    bert = AutoTokenizer.from_pretrained(minilm_path())
    sts = load_stsb("train")
    pairs = [len(ids) for ids in bert(list(sts["sentence1"]), list(sts["sentence2"]))["input_ids"]]
    gpt = AutoTokenizer.from_pretrained(smollm2_path())
    bbc = [len(ids) for ids in gpt(list(load_bbc_news()["text"]))["input_ids"]]
    LENGTHS.parent.mkdir(parents=True, exist_ok=True)
    LENGTHS.write_text(json.dumps({"stsb_pairs_minilm": pairs, "bbc_articles_smollm2": bbc}))
    print(f"{len(pairs)} STS-B pair lengths, {len(bbc)} BBC article lengths -> {LENGTHS}")


def matmul_peak(device: str, size: int) -> float:
    """Measured bf16 matmul FLOP/s (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(kind: str, device: str, tiny: bool = False):
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(num_labels=2, **(small if tiny else {})))
    else:
        model = GPT2LMHeadModel(GPT2Config(**({"n_embd": 64, "n_layer": 2, "n_head": 2} if tiny else {})))
    return model.to(device).train()


def batches(kind: str, lengths: list[int], batch: int, max_length: int, steps: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[min(rng.choice(lengths), max_length) for _ in range(batch)] for _ in range(steps)]


def make_inputs(kind: str, row_lengths: list[int], padded: int, vocab: int, device: str) -> dict:
    batch = len(row_lengths)
    ids = torch.randint(0, vocab, (batch, padded), device=device)
    mask = (torch.arange(padded, device=device)[None, :] < torch.tensor(row_lengths, device=device)[:, None]).long()
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), device=device)}
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_mode(kind: str, mode: str, args, lengths: list[int], max_length: int, batch: int) -> dict:
    import torch._dynamo as dynamo

    device = args.device
    model = build(kind, device, args.tiny)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step_model = model
    if "compile" in mode:
        dynamo.reset()
        step_model = torch.compile(model, dynamic=False)
    buckets = default_buckets(max_length)
    vocab = model.config.vocab_size
    plan = batches(kind, lengths, batch, max_length, args.warmup + args.steps, seed=1)

    def padded_length(rows: list[int]) -> int:
        if mode == "bf16_compile_static":
            return max_length
        if mode == "bf16_compile_buckets":
            return bucket_for(max(rows), buckets)
        return max(rows)

    def step(rows: list[int]) -> None:
        inputs = make_inputs(kind, rows, padded_length(rows), vocab, device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=mode != "fp32_eager"):
            loss = step_model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warm = plan[: args.warmup]
    if mode in ("bf16_compile_static", "bf16_compile_buckets"):  # compile every shape before timing
        shapes = [max_length] if mode == "bf16_compile_static" else list(buckets)
        warm = warm + [[length] * batch for length in shapes]
    for rows in warm:
        step(rows)
    _sync(device)
    graphs_before = compiled_graphs()
    real_tokens = 0
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        for rows in plan[args.warmup :]:
            step(rows)
            real_tokens += sum(rows)
        _sync(device)
        seconds = time.perf_counter() - start
    tokens_per_s = real_tokens / seconds
    return {"tokens_per_s": tokens_per_s, "seconds": seconds, "steps": args.steps, "real_tokens": real_tokens,
            "recompiles": compiled_graphs() - graphs_before, "peak_bytes": peak.bytes, "parameters": params,
            "flops_per_s": 6 * params * tokens_per_s}  # fmt: skip


def summarize(data: dict) -> dict:
    s: dict = {"device": data.get("device"), "bf16_matmul_peak_tflops": data.get("peak_flops", 0) / 1e12}
    for kind in ("bert", "gpt2"):
        runs = data.get(kind, {})
        if {"bf16_compile_buckets", "bf16_compile_static"} <= runs.keys():
            s[f"{kind}_bucketed_vs_static"] = (
                runs["bf16_compile_buckets"]["tokens_per_s"] / runs["bf16_compile_static"]["tokens_per_s"]
            )
        if {"bf16_compile_varying", "bf16_compile_static"} <= runs.keys():
            s[f"{kind}_unbucketed_vs_static"] = (
                runs["bf16_compile_varying"]["tokens_per_s"] / runs["bf16_compile_static"]["tokens_per_s"]
            )
        if {"bf16_compile_buckets", "fp32_eager"} <= runs.keys():
            s[f"{kind}_bucketed_vs_fp32"] = (
                runs["bf16_compile_buckets"]["tokens_per_s"] / runs["fp32_eager"]["tokens_per_s"]
            )
        for mode, run in runs.items():
            s[f"{kind}_{mode}_tokens_per_s"] = run["tokens_per_s"]
            if data.get("peak_flops"):
                s[f"{kind}_{mode}_mfu"] = run["flops_per_s"] / data["peak_flops"]
    bert = data.get("bert", {})
    if "bf16_compile_buckets" in bert:
        s["recompiles_bucketed"] = bert["bf16_compile_buckets"]["recompiles"]
    if "bf16_compile_varying" in bert:
        s["recompiles_unbucketed"] = bert["bf16_compile_varying"]["recompiles"]
    return s


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [kind for kind in ("bert", "gpt2") if kind in data]
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        modes = list(data[kind])
        bars = ax.bar(modes, [data[kind][mode]["tokens_per_s"] for mode in modes])
        for bar, mode in zip(bars, modes, strict=True):
            ax.annotate(f"{data[kind][mode]['recompiles']} recompiles", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_title(f"{kind}: real tokens/s ({data['device']})")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(data: dict) -> str:
    lines = ["| model | mode | real tokens/s | vs fp32 eager | vs compile static | recompiles | MFU |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind in ("bert", "gpt2"):
        runs = data.get(kind, {})
        for mode, run in runs.items():
            fp32 = run["tokens_per_s"] / runs["fp32_eager"]["tokens_per_s"] if "fp32_eager" in runs else float("nan")
            static = runs.get("bf16_compile_static", {}).get("tokens_per_s", float("nan"))
            mfu = run["flops_per_s"] / data["peak_flops"] if data.get("peak_flops") else float("nan")
            lines.append(f"| {kind} | {mode} | {run['tokens_per_s']:.0f} | {fp32:.2f}x | "
                         f"{run['tokens_per_s'] / static:.2f}x | {run['recompiles']} | {mfu:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make_lengths", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["bert", "gpt2"], choices=["bert", "gpt2"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bert_batch", type=int, default=8)
    parser.add_argument("--bert_max_length", type=int, default=128)
    parser.add_argument("--gpt2_batch", type=int, default=2)
    parser.add_argument("--gpt2_max_length", type=int, default=256)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="2-layer, 64-wide models: a quick check of every mode")
    parser.add_argument("--table", action="store_true", help="print the README table (and redraw the plot) and exit")
    args = parser.parse_args()
    if args.make_lengths:
        make_lengths()
        return
    suffix = "gpu" if args.device == "cuda" else "cpu"
    out = args.output or ROOT / "benchmarks" / "results" / f"throughput_{suffix}.json"
    if args.table:
        data = json.loads(out.read_text())
        plot(data, out.with_suffix(".png"))
        print(table(data))
        return
    lengths = json.loads(LENGTHS.read_text())
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    config = {k: v for k, v in vars(args).items() if k not in ("output", "make_lengths")}
    data: dict = {"device": device_name, "config": config}
    data["peak_flops"] = matmul_peak(args.device, 4096 if args.device == "cuda" else 1024)
    for kind in args.models:
        real = lengths["stsb_pairs_minilm" if kind == "bert" else "bbc_articles_smollm2"]
        max_length = args.bert_max_length if kind == "bert" else args.gpt2_max_length
        batch = args.bert_batch if kind == "bert" else args.gpt2_batch
        for mode in args.modes:
            result = run_mode(kind, mode, args, real, max_length, batch)
            data.setdefault(kind, {})[mode] = result
            print(f"[{kind}] {mode}: {result['tokens_per_s']:.0f} real tokens/s, {result['recompiles']} recompiles",
                  flush=True)  # fmt: skip
            save_results(out, data, summarize)
    plot(data, out.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
