"""Training throughput: fp32 eager, bf16 eager, bf16 + torch.compile (static, free and bucketed lengths).

    python benchmarks/throughput.py --make_lengths      # once, here: real token-length samples -> JSON (committed)
    OMP_NUM_THREADS=2 python benchmarks/throughput.py   # CPU (throughput_cpu.json; ~30 min on 2 quiet cores)
    python benchmarks/throughput.py --device cuda --steps 40 --bert_batch 64 --gpt2_batch 16 --gpt2_max_length 1024
    python benchmarks/throughput.py --table             # the docs page's table from the CPU results (and the plot)
    python benchmarks/throughput.py --tiny --output /tmp/throughput_tiny.json   # 2-layer models (~20 min: compiles)

Models with random weights at real sizes (speed does not depend on the weights, and nothing is downloaded):
BERT-base sequence classification (``BertConfig()``) and GPT-2 small causal LM (``GPT2Config()``). Batch lengths
are drawn from real token-length samples (STS-B train pairs for BERT, BBC articles for GPT-2) stored in
``benchmarks/data/token_lengths.json``, so the GPU machine needs no data packages. One training step = forward,
backward and AdamW. Modes, each through the shipped accelerate config named (its ``ACCELERATE_*`` variables, made by
accelerate's own ``accelerate launch`` code from the YAML, then `Accelerator.prepare`, which compiles with the config's
dynamo settings: inductor, ``dynamic=False``):

- ``fp32_eager`` (no config: plain fp32), ``bf16_eager`` (`bf16.yaml`), lengths padded to the batch's longest;
- ``bf16_compile_static`` (`bf16_compile.yaml`): every batch padded to the maximum length (one shape);
- ``bf16_compile_varying`` (`bf16_compile.yaml`): padded to the batch's longest, so a new length recompiles, until
  dynamo's recompile limit (``torch._dynamo.config.recompile_limit``, 8 by default): from then on a new length runs
  eagerly (the graphs already compiled keep serving their lengths);
- ``bf16_compile_buckets`` (`bf16_compile.yaml`): padded to `default_buckets(max_length)` (3 lengths) with
  `BucketPadCollator`'s rule.

Every step is timed on its own (``--steps``, enough for the free-length mode to pass the recompile limit: with the
default 24 at BERT's batch of 8, the 9th distinct length comes at step 10). Each compile mode starts from
``torch._dynamo.reset()`` and inductor's fresh caches (`fresh_compile_caches`), so its compilations are cold, as in a
first run (otherwise a mode reuses the graphs an earlier mode compiled for the same shape). BERT's config sets
``problem_type`` up front (BERT sets it on its first forward, which would recompile once more). A step
during which `hf_ext.trainers.compiled_graphs()` grew is a compile step: **compile seconds** are the seconds of those
steps (0 in eager modes; their first steps, excluded from the steady state, are reported as ``warmup_seconds``).
**Steady-state real tokens/s** counts real (non-pad) tokens over the steps that compiled nothing, after the first
``--warmup`` steps; the free-length mode also reports it over the steps after the limit was hit (the eager
fallback). MFU = 6 x parameters x steady real tokens/s over a bf16 matmul peak measured in the same run. Peak memory
is measured in one more, untimed step on the plan's longest batch (`PeakMemory`: the CUDA allocator; on CPU a
tensor-counting dispatch mode, run in eager modes only, since it slows every operator and does not belong inside
compiled code). The **epoch** figures extrapolate what a user waits for over one epoch of the real data (all STS-B
train pairs, all BBC articles, shuffled, in batches of the benchmark's size, the last one partial): each distinct
batch shape compiles once up to the recompile limit, at the measured mean seconds of a compile step; every other step
runs at the steady-state rate (after the limit, for free lengths); `EXTRAPOLATION` states it in the JSON.

`run` is what `benchmarks/gpu_suite.py` calls (the GPU suite's part 1): it takes a deadline, runs the free-length
modes last (`schedule`) and never starts a step expected to compile unless the longest compile seen so far still fits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from _common import PeakMemory, load_results, protocol, save_results

from hf_ext import accelerate_config_path
from hf_ext.data import bucket_for, default_buckets
from hf_ext.trainers import compiled_graphs

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = ROOT / "benchmarks" / "data" / "token_lengths.json"
MODES = ("fp32_eager", "bf16_eager", "bf16_compile_static", "bf16_compile_varying", "bf16_compile_buckets")
# The shipped accelerate config each mode runs under (None: plain fp32, no Accelerator).
MODE_CONFIGS = {"fp32_eager": None, "bf16_eager": "bf16", "bf16_compile_static": "bf16_compile",
                "bf16_compile_varying": "bf16_compile", "bf16_compile_buckets": "bf16_compile"}  # fmt: skip
# Per model: the real token lengths (a key of LENGTHS) and what one epoch is.
DATA = {"bert": ("stsb_pairs_minilm", "STS-B train sentence pairs"), "gpt2": ("bbc_articles_smollm2", "BBC articles")}
PLAN_SEED, INIT_SEED, EPOCH_SEED = 1, 0, 2
# The longest compile step seen in this process: under a deadline, a step expected to compile starts only if this
# much time is left (so a budgeted run never overruns by a whole compilation).
_LONGEST_COMPILE = [0.0]
EXTRAPOLATION = (
    "epoch seconds = C x (compile seconds / compile steps measured) + (S - C) x (epoch real tokens / S) / steady "
    "real tokens/s, where S = the epoch's steps (every example once, shuffled, batches of the benchmark's size, the "
    "last one partial) and C = min(distinct batch shapes in that epoch, recompile limit) for compile modes, 0 for "
    "eager ones; the steady rate of the free-length mode is the one measured after the recompile limit was hit "
    "(new lengths then run eagerly), when the run got there."
)


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


def recompile_limit() -> int:
    """Dynamo's per-function recompile limit (``recompile_limit``; ``cache_size_limit`` in older torch)."""
    import torch._dynamo.config as dynamo_config

    return int(getattr(dynamo_config, "recompile_limit", getattr(dynamo_config, "cache_size_limit", 8)))


def build(kind: str, device: str, tiny: bool = False) -> torch.nn.Module:
    """A random-weight BERT-base classifier or GPT-2 small LM (``tiny``: 2 layers, 64 wide, 1,024-token vocabulary),
    in train mode."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(INIT_SEED)
    if kind == "bert":
        small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                 "vocab_size": 1024}  # fmt: skip
        # problem_type set up front: BERT sets it on its first forward, which would recompile a compiled model once
        config = BertConfig(num_labels=2, problem_type="single_label_classification", **(small if tiny else {}))
        model = BertForSequenceClassification(config)
    else:
        small = {"n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 0}
        model = GPT2LMHeadModel(GPT2Config(**(small if tiny else {})))
    return model.to(device).train()


def batches(lengths: list[int], batch: int, max_length: int, steps: int, seed: int = PLAN_SEED) -> list[list[int]]:
    """``steps`` batches of ``batch`` row lengths drawn with replacement from ``lengths``, capped at ``max_length``."""
    rng = random.Random(seed)
    return [[min(rng.choice(lengths), max_length) for _ in range(batch)] for _ in range(steps)]


def epoch_batches(lengths: list[int], batch: int, max_length: int, seed: int = EPOCH_SEED) -> list[list[int]]:
    """One epoch: every length once, shuffled, in batches of ``batch`` (the last one partial), capped."""
    order = random.Random(seed).sample(lengths, len(lengths))
    return [[min(n, max_length) for n in order[i : i + batch]] for i in range(0, len(order), batch)]


def padded_length(mode: str, rows: list[int], max_length: int) -> int:
    """The length a mode pads a batch to: the maximum (static), its bucket (buckets) or its longest row."""
    if mode == "bf16_compile_static":
        return max_length
    if mode == "bf16_compile_buckets":
        return bucket_for(max(rows), default_buckets(max_length))
    return max(rows)


def make_inputs(kind: str, row_lengths: list[int], padded: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    """Random token ids of one batch, its attention mask (right padding) and labels (pad tokens ignored)."""
    batch = len(row_lengths)
    ids = torch.randint(0, vocab, (batch, padded), device=device)
    mask = (torch.arange(padded, device=device)[None, :] < torch.tensor(row_lengths, device=device)[:, None]).long()
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), device=device)}
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def launch_env(config_name: str, device: str) -> dict[str, str]:
    """The ``ACCELERATE_*`` variables that ``accelerate launch --config_file <shipped config>`` hands its script,
    made by accelerate's own launcher code from the YAML (mixed precision, the dynamo backend, mode, fullgraph,
    dynamic); ``ACCELERATE_USE_CPU`` follows ``device``."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    launch_args = launch_command_parser().parse_args(
        ["--config_file", str(accelerate_config_path(config_name)), "--num_cpu_threads_per_process", "1", __file__]
    )
    validated = _validate_launch_command(launch_args)
    launch_args = validated[0] if isinstance(validated, tuple) else launch_args
    _, env = prepare_simple_launcher_cmd_env(launch_args)
    variables = {key: value for key, value in env.items() if key.startswith("ACCELERATE_")}
    variables["ACCELERATE_USE_CPU"] = str(device == "cpu")
    return variables


@contextmanager
def accelerator_for(config_name: str | None, device: str, dynamo_backend: str | None = None) -> Iterator[Any]:
    """An `Accelerator` built as under ``accelerate launch --config_file <config_name>`` (None: no Accelerator).

    ``dynamo_backend`` overrides the config's backend (``"eager"`` for a quick check of the compile modes'
    bookkeeping without inductor's code generation); the environment is restored afterwards.
    """
    if config_name is None:
        yield None
        return
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    variables = launch_env(config_name, device)
    if dynamo_backend is not None and variables.get("ACCELERATE_DYNAMO_BACKEND", "NO") != "NO":
        variables["ACCELERATE_DYNAMO_BACKEND"] = dynamo_backend.upper()
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = None
    try:
        accelerator = Accelerator()
        yield accelerator
    finally:
        if accelerator is not None:
            accelerator.free_memory()  # drops its references to the prepared model and optimizer
        AcceleratorState._reset_state(reset_partial_state=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fresh_compile_caches() -> AbstractContextManager:
    """inductor's own fresh-cache context (`torch._inductor.utils.fresh_inductor_cache`): its in-memory caches
    cleared and its on-disk inductor / triton caches in a new, empty folder (removed afterwards), so that every
    compile mode compiles cold, as a first run does, instead of reusing what an earlier mode compiled for a shape."""
    from torch._inductor import utils

    factory = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache  # the older name in older torch
    return factory()


class _LimitHits(logging.Handler):
    """Collects dynamo's "hit config.recompile_limit" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "hit config." in message and "limit" in message:
            self.messages.append(message.splitlines()[0])


def run_mode(
    kind: str, mode: str, args: argparse.Namespace, lengths: list[int], max_length: int, batch: int,
    deadline: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train ``args.steps`` timed steps of one model in one mode; per-step seconds, real tokens and new graphs, the
    compile / steady-state split, and peak memory from one extra untimed step. Stops early (``stopped_early``) when
    ``time.monotonic()`` passes ``deadline``."""
    import torch._dynamo as dynamo

    compiled = "compile" in mode
    if compiled:
        dynamo.reset()  # a fresh cache: every mode starts with no graph and its own recompile budget
    limit_log = _LimitHits()
    dynamo_logger = logging.getLogger("torch._dynamo")
    dynamo_logger.addHandler(limit_log)
    try:
        with fresh_compile_caches() if compiled else nullcontext():
            per_step, peak_bytes, params = _measure(kind, mode, args, lengths, max_length, batch, deadline)
    finally:
        dynamo_logger.removeHandler(limit_log)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    result = split_steps(per_step, args.warmup, compiled, limit_log.messages)
    tokens_per_s = result["tokens_per_s"]
    done = len(per_step["seconds"])
    result.update({
        "mode": mode, "accelerate_config": MODE_CONFIGS[mode], "parameters": params, "batch": batch,
        "max_length": max_length, "steps": done, "stopped_early": done < args.steps,
        "flops_per_s": 6 * params * tokens_per_s if tokens_per_s else None, "peak_bytes": peak_bytes,
        "peak_memory_note": None if peak_bytes is not None else "not measured: on CPU the tensor-counting probe "
        "(a TorchDispatchMode) runs in eager modes only", "per_step": per_step,
    })  # fmt: skip
    return result


def _measure(
    kind: str, mode: str, args: argparse.Namespace, lengths: list[int], max_length: int, batch: int,
    deadline: float | None,
) -> tuple[dict[str, list], int | None, int]:  # fmt: skip
    """The timed steps of `run_mode` (each synchronised and timed alone), then the untimed memory step."""
    device = args.device
    model = build(kind, device, args.tiny)
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    plan = batches(lengths, batch, max_length, args.steps)
    per_step: dict[str, list] = {"seconds": [], "real_tokens": [], "padded_length": [], "new_graphs": []}
    peak_bytes: int | None = None
    with accelerator_for(MODE_CONFIGS[mode], device, args.dynamo_backend) as accelerator:
        if accelerator is not None:  # compiles (compile modes) and wraps the forward in bf16 autocast
            model, optimizer = accelerator.prepare(model, optimizer)

        def step(rows: list[int]) -> None:
            inputs = make_inputs(kind, rows, padded_length(mode, rows, max_length), vocab, device)
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seen: set[int] = set()
        limit_hit = False
        for rows in plan:
            length = padded_length(mode, rows, max_length)
            compiles = "compile" in mode and length not in seen and not limit_hit  # expected to build a graph
            if deadline is not None and time.monotonic() + (_LONGEST_COMPILE[0] if compiles else 0.0) > deadline:
                break
            graphs = compiled_graphs()
            _sync(device)
            start = time.perf_counter()
            step(rows)
            _sync(device)
            per_step["seconds"].append(time.perf_counter() - start)
            per_step["real_tokens"].append(sum(rows))
            per_step["padded_length"].append(padded_length(mode, rows, max_length))
            per_step["new_graphs"].append(compiled_graphs() - graphs)
            if per_step["new_graphs"][-1]:
                _LONGEST_COMPILE[0] = max(_LONGEST_COMPILE[0], per_step["seconds"][-1])
            limit_hit = limit_hit or (compiles and not per_step["new_graphs"][-1] and bool(seen))
            seen.add(length)
        done = len(per_step["seconds"])
        if done and (device == "cuda" or "compile" not in mode):  # CPU: the tensor-counting probe in eager only
            # the plan's longest batch, already run (so no compilation inside the memory step)
            longest = max(plan[:done], key=lambda rows: (padded_length(mode, rows, max_length), sum(rows)))
            with PeakMemory(device) as peak:
                step(longest)
            peak_bytes = peak.bytes
    return per_step, peak_bytes, params


def split_steps(per_step: dict[str, list], warmup: int, compiled: bool, limit_messages: list[str]) -> dict[str, Any]:
    """Compile seconds (steps that built a graph) and the steady state (the other steps after ``warmup``)."""
    seconds, tokens, new_graphs = per_step["seconds"], per_step["real_tokens"], per_step["new_graphs"]
    compile_steps = [i for i, g in enumerate(new_graphs) if g > 0]
    steady = [i for i, g in enumerate(new_graphs) if g == 0 and i >= warmup]
    seen: set[int] = set()
    limit_step = None  # the first step with a never-seen length that compiled nothing: the limit took effect
    for i, length in enumerate(per_step["padded_length"]):
        if compiled and length not in seen and new_graphs[i] == 0 and limit_step is None and seen:
            limit_step = i
        seen.add(length)
    after = [i for i in steady if limit_step is not None and i >= limit_step]

    def rate(indices: list[int]) -> float | None:
        return sum(tokens[i] for i in indices) / sum(seconds[i] for i in indices) if indices else None

    return {
        "compile_seconds": sum(seconds[i] for i in compile_steps),
        "compile_steps": len(compile_steps),
        "graphs": sum(new_graphs),
        "recompiles": max(len(compile_steps) - 1, 0),  # steps that compiled again after the first compile
        "warmup_seconds": sum(seconds[i] for i in range(min(warmup, len(seconds))) if i not in compile_steps),
        "steady_steps": len(steady),
        "steady_seconds": sum(seconds[i] for i in steady),
        "tokens_per_s": rate(steady),
        "distinct_lengths": len(seen),
        "recompile_limit": recompile_limit(),
        "recompile_limit_hit": bool(limit_messages) or limit_step is not None,
        "recompile_limit_hit_at_step": limit_step,
        "recompile_limit_messages": limit_messages[:4],
        "steady_after_limit_steps": len(after),
        "steady_after_limit_tokens_per_s": rate(after),
        "real_tokens": sum(tokens),
        "seconds": sum(seconds),
    }


def epoch_estimate(mode: str, result: dict[str, Any], epoch: list[list[int]], max_length: int) -> dict[str, Any]:
    """The seconds of one epoch (``epoch``: its batches' row lengths) including compilation (see EXTRAPOLATION)."""
    shapes = {(len(rows), padded_length(mode, rows, max_length)) for rows in epoch}
    compile_steps = min(len(shapes), result["recompile_limit"]) if "compile" in mode else 0
    rate = result["tokens_per_s"]
    if mode == "bf16_compile_varying" and result.get("steady_after_limit_tokens_per_s"):
        rate = result["steady_after_limit_tokens_per_s"]
    per_compile = result["compile_seconds"] / result["compile_steps"] if result["compile_steps"] else None
    tokens = sum(map(sum, epoch))
    out: dict[str, Any] = {"distinct_shapes": len(shapes), "compile_steps": compile_steps, "seconds": None}
    if rate and (compile_steps == 0 or per_compile is not None):
        compile_seconds = compile_steps * (per_compile or 0.0)
        steady_seconds = (len(epoch) - compile_steps) * tokens / len(epoch) / rate
        out.update(seconds=compile_seconds + steady_seconds, compile_seconds=compile_seconds,
                   steady_seconds=steady_seconds, steady_tokens_per_s=rate)  # fmt: skip
    return out


def schedule(models: list[str], modes: list[str]) -> list[tuple[str, str]]:
    """The (model, mode) order: every model's other modes first, the free-length compile mode (the slowest, its
    compile time grows with the recompile limit) last, so a time budget cuts it before the headline figures."""
    first = [(kind, mode) for kind in models for mode in modes if mode != "bf16_compile_varying"]
    return first + [(kind, mode) for kind in models for mode in modes if mode == "bf16_compile_varying"]


def new_results(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """A results dict for this run: the protocol block (earlier machines kept from ``out``), device and config."""
    block = protocol(
        selection_split="none: a timing of fixed settings (models, batch sizes, lengths, modes); nothing is chosen",
        test_split="training steps of random-weight BERT-base / GPT-2 small on batch lengths drawn from real "
        "STS-B train pair and BBC article token lengths (benchmarks/data/token_lengths.json)",
        chosen={}, seeds=[PLAN_SEED], device=args.device, model_init_seed=INIT_SEED, epoch_order_seed=EPOCH_SEED,
    )  # fmt: skip
    data: dict[str, Any] = {"protocol": load_results(out, block)["protocol"]}
    threads = torch.get_num_threads()
    data["device"] = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{threads}"
    data["config"] = {k: v for k, v in vars(args).items() if k not in ("output", "make_lengths", "table")}
    data["recompile_limit"] = recompile_limit()
    data["extrapolation"] = EXTRAPOLATION
    data["compile_caches"] = "inductor's fresh caches (in memory and on disk) for every compile mode: cold compiles"
    return data


def run(
    args: argparse.Namespace, out: Path, deadline: float | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Measure every (model, mode) of ``args`` in `schedule` order, saving ``out`` after each; modes left when
    ``time.monotonic()`` passes ``deadline`` are listed under ``skipped``."""
    lengths = json.loads(LENGTHS.read_text())
    data = new_results(args, out)
    data["peak_flops"] = matmul_peak(args.device, 4096 if args.device == "cuda" else 1024)
    data["skipped"] = []
    for kind, mode in schedule(args.models, args.modes):
        if deadline is not None and time.monotonic() > deadline:
            data["skipped"].append(f"{kind}/{mode}")
            continue
        real = lengths[DATA[kind][0]]
        max_length = args.bert_max_length if kind == "bert" else args.gpt2_max_length
        batch = args.bert_batch if kind == "bert" else args.gpt2_batch
        result = run_mode(kind, mode, args, real, max_length, batch, deadline)
        epoch = epoch_batches(real, batch, max_length)
        result["epoch"] = epoch_estimate(mode, result, epoch, max_length)
        data.setdefault("epochs", {})[kind] = {"examples": len(real), "data": DATA[kind][1], "batch": batch,
                                               "steps": len(epoch), "real_tokens": sum(map(sum, epoch))}  # fmt: skip
        data.setdefault(kind, {})[mode] = result
        log(f"[{kind}] {mode}: {_fmt(result['tokens_per_s'])} steady real tokens/s, "
            f"{result['compile_seconds']:.1f} s compiling ({result['graphs']} graphs, limit hit: "
            f"{result['recompile_limit_hit']}), epoch {_fmt(result['epoch']['seconds'])} s")  # fmt: skip
        save_results(out, data, summarize)
    save_results(out, data, summarize)
    return data


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize(data: dict) -> dict:
    peak = data.get("peak_flops") or 0
    s: dict = {"device": data.get("device"), "bf16_matmul_peak_tflops": peak / 1e12}
    for kind in ("bert", "gpt2"):
        runs = data.get(kind, {})
        rate = {mode: run.get("tokens_per_s") for mode, run in runs.items()}
        s[f"{kind}_bucketed_vs_static"] = _ratio(rate.get("bf16_compile_buckets"), rate.get("bf16_compile_static"))
        s[f"{kind}_unbucketed_vs_static"] = _ratio(rate.get("bf16_compile_varying"), rate.get("bf16_compile_static"))
        s[f"{kind}_bucketed_vs_fp32"] = _ratio(rate.get("bf16_compile_buckets"), rate.get("fp32_eager"))
        for mode, run in runs.items():
            s[f"{kind}_{mode}_tokens_per_s"] = run.get("tokens_per_s")
            s[f"{kind}_{mode}_compile_seconds"] = run.get("compile_seconds")
            s[f"{kind}_{mode}_mfu"] = run["flops_per_s"] / peak if peak and run.get("flops_per_s") else None
            s[f"{kind}_{mode}_epoch_seconds"] = run.get("epoch", {}).get("seconds")
        varying = runs.get("bf16_compile_varying")
        if varying:
            s[f"{kind}_unbucketed_graphs"] = varying["graphs"]
            s[f"{kind}_unbucketed_recompile_limit_hit"] = varying["recompile_limit_hit"]
            s[f"{kind}_unbucketed_after_limit_tokens_per_s"] = varying["steady_after_limit_tokens_per_s"]
        # the issue-17 names: buckets vs fixed shapes, the shipped recipe path (bf16 + compile + buckets) vs fp32
        s[f"{kind}_buckets_vs_fixed"] = s[f"{kind}_bucketed_vs_static"]
        s[f"{kind}_bf16_compile_vs_fp32"] = s[f"{kind}_bucketed_vs_fp32"]
        s[f"{kind}_mfu_compile_fixed"] = s.get(f"{kind}_bf16_compile_static_mfu")
        if kind in data.get("epochs", {}):
            s[f"{kind}_epoch_steps"] = data["epochs"][kind]["steps"]
    bert = data.get("bert", {})
    if "bf16_compile_buckets" in bert:
        s["recompiles_bucketed"] = bert["bf16_compile_buckets"]["recompiles"]
    if "bf16_compile_varying" in bert:
        s["recompiles_unbucketed"] = bert["bf16_compile_varying"]["recompiles"]
    s["skipped"] = data.get("skipped", [])
    return {key: value for key, value in s.items() if value is not None or key == "device"}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [kind for kind in ("bert", "gpt2") if data.get(kind)]
    if not kinds:
        return
    fig, axes = plt.subplots(2, len(kinds), figsize=(7 * len(kinds), 8), squeeze=False)
    for column, kind in enumerate(kinds):
        modes = list(data[kind])
        top, bottom = axes[0][column], axes[1][column]
        bars = top.bar(modes, [data[kind][mode]["tokens_per_s"] or 0 for mode in modes])
        for bar, mode in zip(bars, modes, strict=True):
            run = data[kind][mode]
            top.annotate(f"{run['graphs']} graphs, {run['compile_seconds']:.0f} s compile",
                         (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                         fontsize=8)  # fmt: skip
        top.set_title(f"{kind}: steady-state real tokens/s ({data['device']})")
        epoch = data.get("epochs", {}).get(kind, {})
        bottom.bar(modes, [data[kind][mode]["epoch"]["seconds"] or 0 for mode in modes])
        bottom.set_yscale("log")
        bottom.set_title(f"{kind}: one epoch ({epoch.get('examples')} {epoch.get('data')}), seconds incl. compile")
        for ax in (top, bottom):
            ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(data: dict) -> str:
    lines = ["| model | mode | steady real tokens/s | vs fp32 eager | vs compile static | compile s (graphs) | "
             "recompile limit hit | MFU | peak memory | epoch s (incl. compile) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    for kind in ("bert", "gpt2"):
        runs = data.get(kind, {})
        fp32 = runs.get("fp32_eager", {}).get("tokens_per_s")
        static = runs.get("bf16_compile_static", {}).get("tokens_per_s")
        for mode, run in runs.items():
            rate = run["tokens_per_s"]
            mfu = run["flops_per_s"] / data["peak_flops"] if data.get("peak_flops") and run["flops_per_s"] else None
            hit = "yes" if run["recompile_limit_hit"] else "no"
            if hit == "yes" and run.get("steady_after_limit_tokens_per_s"):
                hit += f" ({run['steady_after_limit_tokens_per_s']:.0f} tokens/s after)"
            memory = f"{run['peak_bytes'] / 2**20:.0f} MiB" if run["peak_bytes"] is not None else "n/a"
            lines.append(
                f"| {kind} | {mode} | {cell(rate, '.0f')} | {cell(_ratio(rate, fp32), '.2f')}x | "
                f"{cell(_ratio(rate, static), '.2f')}x | {run['compile_seconds']:.1f} ({run['graphs']}) | {hit} | "
                f"{cell(mfu, '.2f')} | {memory} | {cell(run['epoch']['seconds'], '.0f')} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make_lengths", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["bert", "gpt2"], choices=["bert", "gpt2"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument(
        "--steps",
        type=int,
        default=24,
        help="timed steps per mode (the free-length mode needs well over the recompile limit)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the steady state")
    parser.add_argument("--bert_batch", type=int, default=8)
    parser.add_argument("--bert_max_length", type=int, default=128)
    parser.add_argument("--gpt2_batch", type=int, default=2)
    parser.add_argument("--gpt2_max_length", type=int, default=256)
    parser.add_argument(
        "--dynamo_backend", default=None, help="override the config's dynamo backend (eager: a check without inductor)"
    )
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="2-layer, 64-wide models: a quick check of every mode")
    parser.add_argument("--table", action="store_true", help="print the docs table (and redraw the plot) and exit")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.make_lengths:
        make_lengths()
        return
    if args.steps <= args.warmup:
        raise ValueError(f"`--steps` must exceed `--warmup` ({args.warmup}), got {args.steps}.")
    suffix = "gpu" if args.device == "cuda" else "cpu"
    out = args.output or ROOT / "benchmarks" / "results" / f"throughput_{suffix}.json"
    if args.table:
        data = json.loads(out.read_text())
        plot(data, out.with_suffix(".png"))
        print(table(data))
        return
    data = run(args, out)
    plot(data, out.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
