"""Every GPU figure the docs promise, in one process, within 9 minutes on one H200 (issue 17).

    python benchmarks/gpu_suite.py                             # on the GPU machine: every part, $OUT or results/
    python benchmarks/gpu_suite.py --tiny --device cpu         # tiny shapes, every part (the test runs this)
    python benchmarks/gpu_suite.py --parts knn losses          # some parts only
    python benchmarks/gpu_suite.py --table                     # the docs pages' tables from the results file

The device call (the ``run`` tool; the command runs in the repository's root there):

    command:   set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py 2>&1 | tee $OUT/gpu_suite.log
    timeout_s: 570
    carry:     nothing (every model has random weights and the token lengths are committed in benchmarks/data/, so
               the working tree alone travels; hf_ext is imported from the checkout, nothing is installed there)

That machine's ``python3`` holds torch 2.11, transformers 5.17, sentence-transformers 6.0.1, accelerate 1.15 and peft,
no ``datasets`` / ``evaluate`` (none is needed). The results come back under ``$OUT``: ``gpu_suite_h200.json`` (every
part's section, the summary with issue 17's keys, each target met or missed), ``throughput_gpu.json`` (part 1
alone, the file ``benchmarks/throughput.py --device cuda --table`` reads) and the log; commit the two JSON files
under ``benchmarks/results/``.

Parts, in this fixed order; each rewrites the combined JSON when it ends. A global time budget (``--budget_s``,
default 480 s from the start of the process) is shared out before each part: a part's deadline is the budget less the
later parts' estimates (so part 1 gets what they leave, ~300 s), every part stops cleanly between measurements at its
deadline (``stopped_early``; part 1 starts no step expected to compile unless its longest compile so far still fits,
and lists the modes it left under ``skipped``), and a part starts only if the least time it cannot interrupt
(``MIN_START_S``) is left of the budget, else it is recorded under ``skipped``. The worst case ends at the budget plus
one such piece (<= 60 s): ~540 s, inside 9 minutes and inside ``timeout_s`` 570. A part that fails records its error
and the next one runs. Estimates for the H200 and how they were made (FLOP counts against its ~785 TFLOP/s bf16 peak,
~67 TFLOP/s FP32 and FP64, 4.8 TB/s; the stock reference figures of issue 17):

1. ``throughput``: `benchmarks/throughput.py`'s own functions with its GPU command (``--steps 40 --bert_batch 64
   --gpt2_batch 16 --gpt2_max_length 1024``), through the shipped `bf16_compile` accelerate config. Steps: BERT
   ~1.8k real / ~4.5k padded tokens a step, GPT-2 ~7.7k real / ~16k padded; at the reference rates (BERT 77.8k
   tokens/s fp32, 440k compiled; GPT-2 48.7k fp32, 343k compiled) 40 steps of the 10 modes take ~35 s, building the
   10 models ~15 s. Compilation
   dominates and has no reference figure: assumed 20-40 s for a model's first inductor graph (forward + backward)
   and 10-20 s per new shape, so static (1 graph) + buckets (3) of both models ~150-250 s, and the free-length mode
   up to the recompile limit (8 graphs) ~100-200 s per model. Estimate 300 s; the free-length modes run last
   (`throughput.schedule`) and are cut by the budget if compilation is slower.
2. ``nbce``: a Llama with SmolLM2-1.7B's shape (1.7 B parameters, bf16). Decoding is launch-bound in eager
   transformers (~25 ms a step for 24 layers, against 0.7 ms to read 3.4 GB of weights), prefill of 49 x 210 tokens
   is 35 TFLOP (0.1 s): 3 settings x 7 generates x 32 tokens + the identity check ~ 700 steps ~ 20 s, plus model
   set-up: estimate 40 s.
3. ``projected``: a Llama with TinyLlama-1.1B's shape (1.1 B parameters, bf16), batch 4 x 512: forward + backward
   13.5 TFLOP (~45 ms at 40% of peak), 3 optimizers x 10 steps ~ 3 s; the SVD bases of the first svd step
   (154 float32 SVDs of up to 2048 x 5632, one of 32000 x 2048; cuSOLVER ~0.1-0.5 s each) ~20-60 s: estimate 60 s.
4. ``knn``: N = 1M, d = 384: each method is 2 N^2 d = 768 TFLOP; the fp32 screen at ~50 TFLOP/s ~15 s plus ~1,000
   chunks of selection ~5-10 s; the float64 reference (DGEMM ~55 TFLOP/s) ~14 s plus top-k over 1M-wide float64
   rows ~5-10 s: estimate 60 s.
5. ``losses``: CoSENT at B = 64k makes 4.3e9-entry B x B matrices in the matrix form (~10 passes over 17 GB, ~0.1 s
   a pass forward + backward); TVD / cross-entropy at 16k x 128k logits (2.1e9 entries, a few passes over 4-8 GB,
   ~50 ms); the LM loss from 16k bf16 hidden states of width 4,096 through a 128k-word head (`linear_tvd_loss`, the
   full logits with `tvd_loss`, TRL's fused head when TRL is installed: ~26 TFLOP a call, ~0.1 s): with repeats and
   the memory runs, estimate 20 s.

With ``--tiny`` every part runs tiny shapes (2-layer models, N = 2,000, B <= 1,024, 4,096 x 1,000 logits): about a
minute on one busy CPU core, most of it dynamo tracing GPT-2 (3 graphs a shape: it has graph breaks), the other parts
a few seconds. Its throughput part keeps every mode and the shipped config's path but swaps inductor for dynamo's
``eager`` backend and lowers the recompile limit to 4 (inductor's C++ code generation takes about a minute a graph on
a CPU), so the compile bookkeeping (graphs, the limit taking effect, the eager fallback) is exercised quickly.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

STARTED = time.monotonic()  # the budget counts from here, before the heavy imports
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # hf_ext from this checkout: the GPU machine has it on no path of its own
    sys.path.insert(1, str(ROOT))

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from typing import Any  # noqa: E402

import throughput  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import PeakMemory, load_results, protocol, save_results  # noqa: E402

PARTS = ("throughput", "nbce", "projected", "knn", "losses")
ESTIMATE_S = {"throughput": 300, "nbce": 40, "projected": 60, "knn": 60, "losses": 20}  # the H200 (see above)
# The least time a part must have left (of the global budget) to start: its work that no deadline can stop (kNN's
# two searches, the model set-up and first steps of NBCE / ProjectedAdamW, one compile).
MIN_START_S = {"throughput": 30, "nbce": 20, "projected": 40, "knn": 60, "losses": 10}
TINY_ESTIMATE_S = dict.fromkeys(PARTS, 5)
TINY_MIN_START_S = dict.fromkeys(PARTS, 1)
# fmt: off
SHAPES: dict[str, dict[str, Any]] = {
    "full": {
        "throughput_args": ["--steps", "40", "--bert_batch", "64", "--gpt2_batch", "16", "--gpt2_max_length", "1024"],
        # SmolLM2-1.7B's shape
        "nbce_llama": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32,
                       "num_key_value_heads": 32, "intermediate_size": 8192, "vocab_size": 49152,
                       "max_position_embeddings": 8192, "rope_theta": 130000.0, "tie_word_embeddings": True},
        "nbce_ns": [4, 16, 48], "nbce_context_tokens": (180, 200), "nbce_question_tokens": 20, "nbce_new_tokens": 32,
        "nbce_repeats": 3,
        # TinyLlama-1.1B's shape
        "projected_llama": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
                            "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000,
                            "max_position_embeddings": 2048, "tie_word_embeddings": False},
        "projected_batch": (4, 512), "projected_rounds": 8, "projected_rank": 64,
        "knn_points": 1_000_000, "knn_dim": 384, "knn_k": 10, "knn_block": 2048,
        "cosent_batches": [1024, 16384, 65536], "tvd_tokens": 16384, "tvd_vocab": 128256, "tvd_hidden": 4096,
        "loss_repeats": 3,
    },
    "tiny": {
        "throughput_args": ["--tiny", "--steps", "12", "--dynamo_backend", "eager"],
        "nbce_llama": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                       "intermediate_size": 128, "vocab_size": 1024, "max_position_embeddings": 512,
                       "rope_theta": 130000.0, "tie_word_embeddings": True},
        "nbce_ns": [4, 16, 48], "nbce_context_tokens": (15, 25), "nbce_question_tokens": 5, "nbce_new_tokens": 6,
        "nbce_repeats": 1,
        "projected_llama": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1024,
                            "max_position_embeddings": 256, "tie_word_embeddings": False},
        "projected_batch": (2, 32), "projected_rounds": 2, "projected_rank": 8,
        "knn_points": 2000, "knn_dim": 384, "knn_k": 10, "knn_block": 512,
        "cosent_batches": [64, 256, 1024], "tvd_tokens": 4096, "tvd_vocab": 1000, "tvd_hidden": 64, "loss_repeats": 1,
    },
}
# fmt: on
TINY_RECOMPILE_LIMIT = 4
# issue 17, "Done when" 3: (summary key, comparison, target)
TARGETS = [("bert_buckets_vs_fixed", ">=", 0.9), ("bert_bf16_compile_vs_fp32", ">=", 5.0),
           ("bert_mfu_compile_fixed", ">=", 0.45), ("gpt2_mfu_compile_fixed", ">=", 0.40),
           ("nbce_step_ratio_n48", "<=", 1.1)]  # fmt: skip
SVD_MIN_S = 30.0  # the svd projection's first step (its SVDs) starts only with this much of the part's time left
GRADIENT_FREEING = "absent: the gradient-freeing ProjectedAdamW option (issue 16) has not landed"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _clock(device: str) -> float:
    _sync(device)
    return time.perf_counter()


def _past(deadline: float | None, needed: float = 0.0) -> bool:
    return deadline is not None and time.monotonic() + needed > deadline


def _oom_errors() -> tuple[type[BaseException], ...]:
    return (torch.cuda.OutOfMemoryError, MemoryError) if hasattr(torch.cuda, "OutOfMemoryError") else (MemoryError,)


def randn(shape: tuple[int, ...], seed: int, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal values drawn on ``device`` (a 16k x 128k draw on the host would take seconds)."""
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device, dtype=dtype)


def llama(config_kwargs: dict[str, Any], device: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A random-weight `LlamaForCausalLM` of the given shape, initialised directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config_kwargs))
    return model.to(dtype)


# ----------------------------------------------------------------------------------------------- 1. throughput


def part_throughput(shapes: dict, device: str, out_dir: Path, tiny: bool, deadline: float | None) -> dict:
    """`benchmarks/throughput.py`'s measurement (its `run`, the shipped accelerate configs), GPU command's settings."""
    import torch._dynamo

    args = throughput.build_parser().parse_args(["--device", device, *shapes["throughput_args"]])
    name = "throughput_tiny.json" if tiny else f"throughput_{'gpu' if device == 'cuda' else 'cpu'}.json"
    limit = torch._dynamo.config.patch(recompile_limit=TINY_RECOMPILE_LIMIT) if tiny else nullcontext()
    with limit:
        data = throughput.run(args, out_dir / name, deadline, log=lambda line: print(f"[throughput] {line}"))
    section = {key: value for key, value in data.items() if key != "protocol"}
    return {"file": name, "command_args": shapes["throughput_args"], **section}


# ----------------------------------------------------------------------------------------------- 2. NBCE


def nbce_rows(n: int, shapes: dict, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """The NBCE batch of random token ids: row 0 the question alone, row k context k then the question; left-padded
    with id 0 (the ids are drawn from 3 up, above Llama's special tokens)."""
    rng = random.Random(seed)
    question = [rng.randrange(3, vocab) for _ in range(shapes["nbce_question_tokens"])]
    low, high = shapes["nbce_context_tokens"]
    rows = [question] + [[rng.randrange(3, vocab) for _ in range(rng.randint(low, high))] + question for _ in range(n)]
    longest = max(map(len, rows))
    ids = torch.tensor([[0] * (longest - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in rows])
    return {"input_ids": ids, "attention_mask": mask}


def part_nbce(shapes: dict, device: str, deadline: float | None) -> dict:
    """Per-token decode time of batched `generate` with `NBCELogitsProcessor` vs without it, n = 4 / 16 / 48, from
    the same prefilled KV cache (as `benchmarks/nbce_longcontext.py`'s speed part); and two token identities."""
    from _nbce_common import prefill_all_but_last

    from hf_ext.generation import NBCELogitsProcessor

    model = llama(shapes["nbce_llama"], device).eval()
    vocab, new_tokens = model.config.vocab_size, shapes["nbce_new_tokens"]
    params = sum(p.numel() for p in model.parameters())
    common = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}

    def generate(batch: dict, nbce: NBCELogitsProcessor | None, past=None) -> torch.Tensor:
        with torch.inference_mode():
            extra = {"past_key_values": past} if past is not None else {}
            return model.generate(**batch, logits_processor=[nbce] if nbce else [], **common, **extra)

    # Identity: one context and beta = 0 make NBCE's combined distribution the context row's own (its argmax is in
    # every nucleus), so the NBCE tokens must equal plain greedy decoding of that row, token for token.
    one = {key: value.to(device) for key, value in nbce_rows(1, shapes, vocab, seed=100).items()}
    plain_one, nbce_one = generate(one, None), generate(one, NBCELogitsProcessor(beta=0.0))
    result: dict[str, Any] = {
        "shape": shapes["nbce_llama"], "parameters": params, "dtype": "bfloat16", "new_tokens": new_tokens,
        "identity_one_context_beta0": bool(torch.equal(nbce_one[1, -new_tokens:], plain_one[1, -new_tokens:])),
        "identity_check": "1 context, beta 0: the NBCE tokens equal plain greedy decoding of the context row; and at "
        "every n, all NBCE rows carry the same generated tokens",
        "settings": {},
    }  # fmt: skip
    for n in shapes["nbce_ns"]:
        if _past(deadline):
            result["stopped_early"] = True
            break
        batch = {key: value.to(device) for key, value in nbce_rows(n, shapes, vocab, seed=n).items()}
        cache = prefill_all_but_last(model, batch)
        times: dict[str, list[float]] = {"plain": [], "nbce": []}
        outputs: dict[str, torch.Tensor] = {}
        for repeat in range(1 + shapes["nbce_repeats"]):  # repeat 0 warms up
            for name in ("plain", "nbce") if repeat % 2 == 0 else ("nbce", "plain"):
                past = copy.deepcopy(cache)
                start = _clock(device)
                outputs[name] = generate(batch, NBCELogitsProcessor(beta=0.25) if name == "nbce" else None, past)
                seconds = _clock(device) - start
                if repeat:
                    times[name].append(seconds / new_tokens)
        generated = outputs["nbce"][:, -new_tokens:]
        plain, nbce = statistics.median(times["plain"]), statistics.median(times["nbce"])
        result["settings"][str(n)] = {
            "rows": n + 1, "prompt_tokens": int(batch["attention_mask"].sum()),
            "padded_length": batch["input_ids"].shape[1],
            "plain_seconds_per_token": plain, "nbce_seconds_per_token": nbce, "ratio": nbce / plain,
            "rows_identical": bool((generated == generated[:1]).all()),
        }  # fmt: skip
        print(f"[nbce] n={n}: {result['settings'][str(n)]}", flush=True)
        del cache
    result["tokens_identical"] = result["identity_one_context_beta0"] and all(
        s["rows_identical"] for s in result["settings"].values()
    )
    return result


# ----------------------------------------------------------------------------------------------- 3. ProjectedAdamW


def part_projected(shapes: dict, device: str, deadline: float | None) -> dict:
    """Train-step time, optimizer-state bytes and peak memory: torch AdamW (fused on CUDA) vs ProjectedAdamW (random,
    svd) on a ~1B Llama in bf16, interleaved on the same model and batch (as `benchmarks/projected_optimizer.py`)."""
    from projected_optimizer import PROJECTED_TARGETS

    from hf_ext.optim import create_projected_optimizer, optimizer_state_bytes

    model = llama(shapes["projected_llama"], device).train()
    batch, length = shapes["projected_batch"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=generator).to(device)
    interval = 200  # ProjectedAdamW's default basis period: the timed rounds hold one basis, its cost is amortised
    optimizers: dict[str, torch.optim.Optimizer] = {
        "adamw": torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=device == "cuda")
    }
    for projection in ("random", "svd"):
        optimizers[f"projected_{projection}"] = create_projected_optimizer(
            model, target_modules=PROJECTED_TARGETS, rank=shapes["projected_rank"], lr=1e-5, weight_decay=0.0,
            projection=projection, update_interval=interval,
        )  # fmt: skip

    def train_step(name: str) -> tuple[float, float]:
        start = _clock(device)
        model(input_ids=ids, labels=ids).loss.backward()
        middle = _clock(device)
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return _clock(device) - start, _clock(device) - middle

    first: dict[str, tuple[float, float]] = {}
    skipped = []
    for name in list(optimizers):  # creates the states (and the first bases: the svd ones take the longest)
        if name == "projected_svd" and _past(deadline, SVD_MIN_S):
            skipped.append(name)
            del optimizers[name]
            continue
        first[name] = train_step(name)
    names = list(optimizers)
    steps: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    stopped = False
    for round_index in range(shapes["projected_rounds"]):
        if _past(deadline):
            stopped = True
            break
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            steps[name].append(train_step(name))
    result: dict[str, Any] = {
        "shape": shapes["projected_llama"], "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "bfloat16", "batch": [batch, length], "rank": shapes["projected_rank"], "update_interval": interval,
        "target_modules": PROJECTED_TARGETS, "adamw_fused": device == "cuda", "rounds": len(steps["adamw"]),
        "stopped_early": stopped, "skipped": skipped, "gradient_freeing": GRADIENT_FREEING, "optimizers": {},
    }  # fmt: skip
    for name in names:
        with PeakMemory(device) as peak:  # untimed
            train_step(name)
        timed = steps[name] or [first[name]]
        mean_step = statistics.mean(t for t, _ in timed)
        mean_opt = statistics.mean(o for _, o in timed)
        result["optimizers"][name] = {
            "mean_step_seconds": mean_step, "mean_optimizer_step_seconds": mean_opt,
            "first_optimizer_step_seconds": first[name][1],  # state creation (+ the bases of a projected one)
            "amortised_step_seconds": mean_step + max(first[name][1] - mean_opt, 0.0) / interval,
            "state_bytes": optimizer_state_bytes(optimizers[name]), "peak_step_bytes": peak.bytes,
            "step_seconds": [t for t, _ in timed],
        }  # fmt: skip
        print(f"[projected] {name}: {mean_step * 1e3:.1f} ms/step, optimizer {mean_opt * 1e3:.1f} ms", flush=True)
    adamw = result["optimizers"]["adamw"]
    for name in names[1:]:
        run = result["optimizers"][name]
        run["step_ratio_vs_adamw"] = run["mean_step_seconds"] / adamw["mean_step_seconds"]
        run["amortised_step_ratio_vs_adamw"] = run["amortised_step_seconds"] / adamw["amortised_step_seconds"]
        run["optimizer_step_ratio_vs_adamw"] = run["mean_optimizer_step_seconds"] / adamw["mean_optimizer_step_seconds"]
        run["state_bytes_ratio_vs_adamw"] = run["state_bytes"] / adamw["state_bytes"]
    return result


# ----------------------------------------------------------------------------------------------- 4. exact kNN


def reference_knn(x: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k nearest other points by brute force: float64 matmul + topk, ``block`` rows at a time."""
    x64 = x.double()
    x64 = x64 / x64.norm(dim=1, keepdim=True)
    n = x64.shape[0]
    values = torch.empty(n, k, dtype=torch.float64, device=x.device)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        scores = x64[start:stop] @ x64.T  # (block, n)
        rows = torch.arange(stop - start, device=x.device)
        scores[rows, rows + start] = -torch.inf  # self excluded
        values[start:stop], indices[start:stop] = scores.topk(k, dim=1)
        del scores
    return values, indices


def part_knn(shapes: dict, device: str, deadline: float | None) -> dict:
    """`nearest_neighbours` (fp32 screen on CUDA) vs float64 matmul + topk: seconds and identical neighbour sets."""
    from hf_ext.retrieval.knn import nearest_neighbours

    n, dim, k, block = shapes["knn_points"], shapes["knn_dim"], shapes["knn_k"], shapes["knn_block"]
    x = randn((n, dim), 0, device)
    warm = x[: min(n, 4096)]
    nearest_neighbours(warm, k=k)
    reference_knn(warm, k, block)
    start = _clock(device)
    values, indices = nearest_neighbours(x, k=k)
    ours = _clock(device) - start
    print(f"[knn] nearest_neighbours: {ours:.1f} s", flush=True)
    start = _clock(device)
    ref_values, ref_indices = reference_knn(x, k, block)
    reference = _clock(device) - start
    same = (indices.sort(dim=1).values == ref_indices.sort(dim=1).values).all(dim=1)
    result = {
        "points": n, "dim": dim, "k": k, "metric": "cosine", "data": "standard Gaussian points (seed 0)",
        "screen": "float32 (the 'auto' choice on CUDA)" if device == "cuda" else "auto", "reference_block": block,
        "seconds": ours, "reference_seconds": reference, "speedup_vs_reference": reference / ours,
        "identical": bool(same.all()), "rows_differing": int((~same).sum()),
        "max_abs_value_difference": float((values - ref_values).abs().max()),
    }  # fmt: skip
    print(f"[knn] {result}", flush=True)
    return result


# ----------------------------------------------------------------------------------------------- 5. losses


def pairwise_cosent(scores: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """The CoSENT loss through the B x B matrix of score differences (the original CoSENT code, and
    sentence-transformers' `CoSENTLoss` before its suffix-scan rewrite)."""
    scores = scores * scale
    scores = scores[:, None] - scores[None, :]
    labels = (labels[:, None] < labels[None, :]).float()
    scores = scores - (1 - labels) * 1e12
    scores = torch.cat((torch.zeros(1, device=scores.device), scores.view(-1)), dim=0)
    return torch.logsumexp(scores, dim=0)


def _measure(fn: Callable[[], torch.Tensor], leaf: torch.Tensor, device: str, repeats: int) -> dict[str, Any]:
    """Median fwd + bwd seconds over ``repeats`` (after one warm-up), then peak memory in one more, untimed call."""
    try:
        times = []
        for repeat in range(1 + repeats):
            leaf.grad = None
            start = _clock(device)
            loss = fn()
            loss.backward()
            seconds = _clock(device) - start
            if repeat:
                times.append(seconds)
        value, grad = float(loss), leaf.grad.detach().clone()
        leaf.grad = None
        del loss
        with PeakMemory(device) as peak:
            fn().backward()
        leaf.grad = None
    except _oom_errors() as error:
        leaf.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(error).splitlines()[0][:200]}"}
    return {"seconds": statistics.median(times), "peak_bytes": peak.bytes, "loss": value, "grad": grad}


def _compare(runs: dict[str, dict], base: str) -> None:
    """Loss and gradient differences of every run against ``base`` (the gradients themselves are dropped)."""
    reference = runs[base]
    reference_grad = reference.pop("grad", None)
    for name, run in runs.items():
        grad = run.pop("grad", None)
        if name == base or "error" in run or grad is None or reference_grad is None:
            continue
        run["loss_relative_difference"] = abs(run["loss"] - reference["loss"]) / max(abs(reference["loss"]), 1e-30)
        scale = float(reference_grad.abs().max()) or 1.0
        run["grad_max_difference_relative"] = float((grad.float() - reference_grad.float()).abs().max()) / scale


def _cosent_runs(st_loss, first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor, device: str,
                 repeats: int) -> dict[str, dict]:  # fmt: skip
    from sentence_transformers.util import pairwise_cos_sim

    from hf_ext.losses import cosent_loss

    methods = {
        "hf_ext": lambda: cosent_loss(pairwise_cos_sim(first, second), labels, scale=20.0),
        "sentence_transformers": lambda: st_loss.compute_loss_from_embeddings([first, second], labels),
        "pairwise_matrix": lambda: pairwise_cosent(pairwise_cos_sim(first, second), labels, 20.0),
    }
    return {name: _measure(fn, first, device, repeats) for name, fn in methods.items()}


def part_losses(shapes: dict, device: str, deadline: float | None) -> dict:
    """`cosent_loss` vs sentence-transformers' CoSENTLoss (and the B x B formula) at B = 1k / 16k / 64k, fwd + bwd;
    `tvd_loss` vs `F.cross_entropy` at 16k tokens x 128k vocabulary: time and peak memory."""
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss as STCoSENTLoss

    from hf_ext.losses import tvd_loss

    repeats = shapes["loss_repeats"]
    st_loss = STCoSENTLoss(model=torch.nn.Identity(), scale=20.0)
    source = inspect.getsource(STCoSENTLoss.compute_loss_from_embeddings)
    result: dict[str, Any] = {
        "sentence_transformers_form": "suffix scan (O(B) memory)" if "logcumsumexp" in source else "B x B matrix",
        "cosent": {}, "tvd": {},
    }  # fmt: skip
    for size in shapes["cosent_batches"]:
        if _past(deadline):
            result["stopped_early"] = True
            break
        first, second = randn((size, 384), size, device).requires_grad_(True), randn((size, 384), size + 1, device)
        generator = torch.Generator().manual_seed(size)
        labels = (torch.randint(0, 26, (size,), generator=generator) / 5).to(device)  # 0-5 in steps of 0.2: ties
        runs = _cosent_runs(st_loss, first, second, labels, device, repeats)
        _compare(runs, "hf_ext")
        result["cosent"][str(size)] = runs
        print(f"[losses] cosent B={size}: {runs}", flush=True)
    if not _past(deadline):
        tokens, vocab = shapes["tvd_tokens"], shapes["tvd_vocab"]
        logits = randn((tokens, vocab), 1, device, torch.bfloat16).requires_grad_(True)
        labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(1)).to(device)
        runs = {
            "tvd_loss": _measure(lambda: tvd_loss(logits, labels, gamma=0.5), logits, device, repeats),
            # transformers' causal-LM loss upcasts the logits before cross-entropy
            "cross_entropy": _measure(lambda: F.cross_entropy(logits.float(), labels), logits, device, repeats),
            "cross_entropy_bf16": _measure(lambda: F.cross_entropy(logits, labels), logits, device, repeats),
        }
        for run in runs.values():
            run.pop("grad", None)
        with torch.no_grad():  # gamma = 0 is cross-entropy
            tvd0, ce = float(tvd_loss(logits, labels, gamma=0.0)), float(F.cross_entropy(logits.float(), labels))
        result["tvd"] = {"tokens": tokens, "vocab": vocab, "logits_dtype": "bfloat16", "gamma": 0.5, **runs,
                         "gamma0_vs_cross_entropy_relative_difference": abs(tvd0 - ce) / abs(ce)}  # fmt: skip
        print(f"[losses] tvd: {result['tvd']}", flush=True)
        del logits
    if not _past(deadline):
        result["tvd_hidden"] = _hidden_state_losses(shapes, device, repeats)
        print(f"[losses] tvd from hidden states: {result['tvd_hidden']}", flush=True)
    return result


def _hidden_state_losses(shapes: dict, device: str, repeats: int) -> dict[str, Any]:
    """The LM loss from bf16 hidden states and a Llama-3-sized head, both needing gradients: the full logits with
    `tvd_loss`, `linear_tvd_loss`, and TRL's fused LM head kernel when TRL is installed (its Triton path on a GPU)."""
    from hf_ext.losses import linear_tvd_loss, tvd_loss

    tokens, vocab, width = shapes["tvd_tokens"], shapes["tvd_vocab"], shapes["tvd_hidden"]
    hidden = randn((tokens, width), 2, device, torch.bfloat16).requires_grad_(True)
    weight = (randn((vocab, width), 3, device, torch.bfloat16) / width**0.5).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(4)).to(device)

    def fresh(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            weight.grad = None  # the head's gradient is part of the work, not carried between calls
            return fn()

        return call

    methods: dict[str, Callable[[], torch.Tensor]] = {
        "linear_tvd_loss": lambda: linear_tvd_loss(hidden, weight, labels, gamma=0.5, min_weight=0.2),
        "full_logits_tvd_loss": lambda: tvd_loss(hidden @ weight.T, labels, gamma=0.5, min_weight=0.2),
    }
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        def trl_nll() -> torch.Tensor:
            args = (hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))
            return -ChunkedLogProbFunction.apply(*args)[0].mean()

        methods["trl_fused_nll"] = trl_nll
    except ImportError:
        pass
    runs = {name: _measure(fresh(fn), hidden, device, repeats) for name, fn in methods.items()}
    _compare(runs, "full_logits_tvd_loss")
    return {"tokens": tokens, "vocab": vocab, "hidden": width, "dtype": "bfloat16", "trl": "trl_fused_nll" in runs,
            **runs}  # fmt: skip


# ----------------------------------------------------------------------------------------------- the suite


def _get(data: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def summarize(data: dict) -> dict:
    parts = data.get("parts", {})
    s: dict[str, Any] = {"device": data.get("device"), "tiny": data.get("tiny"), "ran": data.get("ran", []),
                         "skipped": data.get("skipped", {}), "failed": sorted(k for k, v in parts.items()
                                                                               if "error" in v)}  # fmt: skip
    tp = _get(parts, "throughput", "summary") or {}
    for key in ("bert_buckets_vs_fixed", "bert_bf16_compile_vs_fp32", "bert_mfu_compile_fixed",
                "gpt2_buckets_vs_fixed", "gpt2_mfu_compile_fixed", "bert_unbucketed_vs_static",
                "gpt2_unbucketed_vs_static", "bert_bf16_compile_static_compile_seconds",
                "bert_bf16_compile_varying_compile_seconds", "bert_unbucketed_recompile_limit_hit"):  # fmt: skip
        if tp.get(key) is not None:
            s[key] = tp[key]
    settings = _get(parts, "nbce", "settings") or {}
    if settings:
        largest = max(settings, key=int)
        s[f"nbce_step_ratio_n{largest}"] = settings[largest]["ratio"]
        s["nbce_tokens_identical"] = parts["nbce"]["tokens_identical"]
    random_run = _get(parts, "projected", "optimizers", "projected_random")
    if random_run:
        s["projected_step_ratio_vs_adamw"] = random_run["step_ratio_vs_adamw"]
        s["projected_state_bytes_ratio_vs_adamw"] = random_run["state_bytes_ratio_vs_adamw"]
        svd_run = parts["projected"]["optimizers"].get("projected_svd")
        if svd_run:
            s["projected_svd_amortised_step_ratio_vs_adamw"] = svd_run["amortised_step_ratio_vs_adamw"]
    knn = parts.get("knn", {})
    if "identical" in knn:
        s["knn_identical_1m"], s["knn_seconds_1m"], s["knn_points"] = knn["identical"], knn["seconds"], knn["points"]
    tvd, ce = _get(parts, "losses", "tvd", "tvd_loss"), _get(parts, "losses", "tvd", "cross_entropy")
    if tvd and ce and "peak_bytes" in tvd and "peak_bytes" in ce:
        s["tvd_peak_mem_ratio_vs_ce"] = tvd["peak_bytes"] / ce["peak_bytes"]
    fused, full = _get(parts, "losses", "tvd_hidden", "linear_tvd_loss"), _get(parts, "losses", "tvd_hidden",
                                                                              "full_logits_tvd_loss")  # fmt: skip
    if fused and full and "peak_bytes" in fused and "peak_bytes" in full:
        s["linear_tvd_peak_mem_ratio_vs_full_logits"] = fused["peak_bytes"] / full["peak_bytes"]
    trl = _get(parts, "losses", "tvd_hidden", "trl_fused_nll")
    if fused and trl and "peak_bytes" in fused and "peak_bytes" in trl:
        s["linear_tvd_peak_mem_ratio_vs_trl_fused"] = fused["peak_bytes"] / trl["peak_bytes"]
    targets = {}
    for key, sign, target in TARGETS:
        if s.get(key) is not None:
            met = s[key] >= target if sign == ">=" else s[key] <= target
            targets[key] = {"value": s[key], "target": f"{sign} {target}", "met": bool(met),
                            "off_by": 0.0 if met else s[key] - target}  # fmt: skip
    s["targets"] = targets
    return s


def run_suite(args: argparse.Namespace) -> dict:
    tiny = args.tiny
    shapes = SHAPES["tiny" if tiny else "full"]
    device = args.device
    out_dir = args.out
    slug = "tiny" if tiny else ("h200" if device == "cuda" and "H200" in torch.cuda.get_device_name() else device)
    path = out_dir / f"gpu_suite_{slug}.json"
    block = protocol(
        selection_split="none: timings and exactness checks of fixed settings; nothing is chosen",
        test_split="random-weight models and random inputs at issue 17's shapes (throughput: real token lengths)",
        chosen={}, seeds=[0], device=device, extra_libraries=("triton",),
        optional_packages={name: importlib.util.find_spec(name) is not None for name in ("datasets", "evaluate")},
    )  # fmt: skip
    data: dict[str, Any] = {"protocol": load_results(path, block)["protocol"], "tiny": tiny, "parts": {},
                            "ran": [], "skipped": {}, "budget_s": args.budget_s}  # fmt: skip
    data["device"] = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"
    deadline = STARTED + args.budget_s
    estimates, min_start = (TINY_ESTIMATE_S, TINY_MIN_START_S) if tiny else (ESTIMATE_S, MIN_START_S)
    selected = [part for part in PARTS if part in args.parts]
    functions = {"nbce": part_nbce, "projected": part_projected, "knn": part_knn, "losses": part_losses}
    for index, part in enumerate(selected):
        reserve = sum(estimates[later] for later in selected[index + 1 :])
        part_deadline = deadline - reserve
        remaining = deadline - time.monotonic()
        if remaining < min_start[part]:
            data["skipped"][part] = f"time budget: {remaining:.0f} s left of {args.budget_s} s"
            print(f"[suite] skipping {part}: {data['skipped'][part]}", flush=True)
            continue
        start = time.monotonic()
        print(f"[suite] {part} (until {part_deadline - STARTED:.0f} s of {args.budget_s} s)", flush=True)
        try:
            if part == "throughput":
                section = part_throughput(shapes, device, out_dir, tiny, part_deadline)
            else:
                section = functions[part](shapes, device, part_deadline)
        except Exception as error:  # record it and go on: the lent machine must yield every other figure
            section = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
            print(f"[suite] {part} failed: {section['traceback']}", flush=True)
        if device == "cuda":
            section["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        section["seconds"] = time.monotonic() - start
        data["parts"][part] = section
        data["ran"].append(part)
        save_results(path, data, summarize)
        print(f"[suite] {part} done in {section['seconds']:.0f} s ({time.monotonic() - STARTED:.0f} s so far)")
    data["total_seconds"] = time.monotonic() - STARTED
    save_results(path, data, summarize)
    print(json.dumps(data["summary"], indent=2))
    print(f"[suite] wrote {path}")
    return data


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"


def table(data: dict) -> str:
    """The docs pages' tables (markdown) from a suite results file."""
    parts, out = data.get("parts", {}), []
    if "summary" in parts.get("throughput", {}):
        out += ["### Throughput", "", throughput.table(parts["throughput"]), ""]
    nbce = parts.get("nbce", {})
    if nbce.get("settings"):
        out += [
            "### NBCE overhead per generated token",
            "",
            "| contexts | rows | plain s/token | NBCE s/token | ratio | rows identical |",
            "|---|---|---|---|---|---|",
        ]
        for n, row in nbce["settings"].items():
            plain, ours = row["plain_seconds_per_token"], row["nbce_seconds_per_token"]
            out.append(
                f"| {n} | {row['rows']} | {plain:.4f} | {ours:.4f} | {row['ratio']:.2f}x | {row['rows_identical']} |"
            )
        out += [f"1 context, beta 0, NBCE tokens = plain greedy: {nbce['identity_one_context_beta0']}", ""]
    projected = parts.get("projected", {})
    if projected.get("optimizers"):
        out += [
            "### ProjectedAdamW vs AdamW",
            "",
            "| optimizer | step ms | vs AdamW | optimizer step ms | first step s | state | peak step memory |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, run in projected["optimizers"].items():
            ratio = f"{run['step_ratio_vs_adamw']:.2f}x" if "step_ratio_vs_adamw" in run else "1.00x"
            out.append(f"| {name} | {run['mean_step_seconds'] * 1e3:.1f} | {ratio} | "
                       f"{run['mean_optimizer_step_seconds'] * 1e3:.1f} | {run['first_optimizer_step_seconds']:.2f} | "
                       f"{_mib(run['state_bytes'])} | {_mib(run['peak_step_bytes'])} |")  # fmt: skip
        out += [f"gradient-freeing variant: {projected['gradient_freeing']}", ""]
    knn = parts.get("knn", {})
    if "identical" in knn:
        out += [
            "### Exact kNN",
            "",
            "| N | d | k | nearest_neighbours s | float64 matmul + topk s | identical sets |",
            "|---|---|---|---|---|---|",
            f"| {knn['points']:,} | {knn['dim']} | {knn['k']} | {knn['seconds']:.1f} | "
            f"{knn['reference_seconds']:.1f} | {knn['identical']} ({knn['rows_differing']} rows differ) |",
            "",
        ]
    losses = parts.get("losses", {})
    if losses.get("cosent"):
        out += ["### Losses (forward + backward)", "", "| loss | size | method | seconds | peak memory |",
                "|---|---|---|---|---|"]  # fmt: skip
        for size, runs in losses["cosent"].items():
            for name, run in runs.items():
                cell = f"{run['seconds']:.4f} | {_mib(run['peak_bytes'])}" if "seconds" in run else f"{run['error']} |"
                out.append(f"| CoSENT | B = {int(size):,} | {name} | {cell} |")
        tvd = losses.get("tvd", {})
        for name in ("tvd_loss", "cross_entropy", "cross_entropy_bf16"):
            run = tvd.get(name)
            if run:
                cell = f"{run['seconds']:.4f} | {_mib(run['peak_bytes'])}" if "seconds" in run else f"{run['error']} |"
                out.append(f"| TVD / CE | {tvd['tokens']:,} x {tvd['vocab']:,} | {name} | {cell} |")
        hidden = losses.get("tvd_hidden", {})
        for name in ("linear_tvd_loss", "full_logits_tvd_loss", "trl_fused_nll"):
            run = hidden.get(name)
            if run:
                cell = f"{run['seconds']:.4f} | {_mib(run['peak_bytes'])}" if "seconds" in run else f"{run['error']} |"
                size = f"{hidden['tokens']:,} x {hidden['hidden']:,} -> {hidden['vocab']:,}"
                out.append(f"| LM loss from hidden states | {size} | {name} | {cell} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    parser.add_argument("--out", type=Path, default=default_out, help="results folder ($OUT when set)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: every part in seconds (the test)")
    parser.add_argument("--budget_s", type=float, default=480.0, help="seconds from the start for all parts")
    parser.add_argument("--table", type=Path, nargs="?", const=ROOT / "benchmarks" / "results" / "gpu_suite_h200.json",
                        default=None, help="print the docs pages' tables from this results file and exit")  # fmt: skip
    args = parser.parse_args()
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return
    if args.budget_s <= 0:
        raise ValueError(f"`--budget_s` must be > 0, got {args.budget_s}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda` but CUDA is not available here: pass `--device cpu` (with `--tiny`).")
    run_suite(args)


if __name__ == "__main__":
    main()
