"""NBCE vs the oracle, truncation, full concatenation and other poolings: needle QA over many BBC articles.

    python benchmarks/nbce_longcontext.py                          # everything, 100 cases (hours on 2 CPU cores)
    python benchmarks/nbce_longcontext.py --ns 4 16 --cases 100    # the cheaper settings first (resumable)
    python benchmarks/nbce_longcontext.py --parts icl speed        # many-shot classification, per-token time
    python benchmarks/nbce_longcontext.py --table                  # the docs page's table from the results file

Parts (results go to benchmarks/results/nbce_longcontext.json after every case; finished cases are reused):

- ``needle``: case i draws (seeded) one BBC article, inserts a fact ("<name>'s secret number is <4 digits>.") at a
  random sentence boundary, and draws 47 other articles as distractors; every article is cut to
  ``--context_tokens`` tokens, so 48 contexts (48 x 192 tokens) go past SmolLM2's 8,192-token window. The
  settings n = 4 / 16 / 48 use the fact's article plus the first n - 1 distractors (nested), the fact's article at a
  seeded position. Methods: ``oracle`` (plain greedy `generate` on the fact's article alone), NBCE with
  ``entropy`` / ``mean`` / ``max`` pooling (beta 0.25, greedy), and ``truncation``: the n articles concatenated
  and cut to what fits the window (at n = 4 and 16 nothing is cut: that is full concatenation). An answer is
  right when it holds the number as a whole token (`answer_correct`: "942857" does not count for 9428). The
  three poolings share one prefill of the NBCE batch (its KV cache is copied), and each is charged the full
  prefill time in its tokens/s.
- ``icl``: many-shot in-context classification of BBC titles (the NBCE paper's setting): ``--icl_windows``
  windows of demonstrations (``--icl_window`` tokens each) pooled by NBCE vs one window vs no demonstration;
  label log-probabilities of the five topic words; the windows' KV caches are computed once.
- ``speed``: per generated token, `generate` with the NBCE processor vs the same batched `generate` without it
  (the processor's overhead), n = 4 / 16 / 48.
- ``tasks``: the harder tasks of `_nbce_tasks` (multi-key, multi-value, multi-query, one long document), ``--task_n``
  contexts each: ``--task_dev_cases`` dev cases choose each pooling's beta (entropy, max, mean, and divergence from
  the context-free row, `DivergenceNBCE`) from a ladder extended while the best sits at an end; then
  ``--task_cases`` test cases, once each: the oracle (the evidence contexts alone, concatenated), truncation (all
  contexts concatenated, cut to the window) and every pooling at its dev-chosen beta. KV bytes from the tensors
  (NBCE: every row's prefill; truncation: its cache at the end).
- ``cache``: contexts read once (`NBCEContextCache`): the time to the first token of a second question over the same
  48 contexts with the contexts' cache vs without it (interleaved, median), the cache's bytes (from its tensors),
  and both questions' answers with the cache against those without.

Memory is counted from the tensors: the bytes of each method's KV cache at the end of generation (`tensor_bytes` of
the cache `generate` returns; NBCE's holds every row).

    python benchmarks/nbce_longcontext.py --rescore   # re-apply the answer matching to the stored answers
    python benchmarks/nbce_longcontext.py --rescore_from benchmarks/results/pre_protocol/nbce_longcontext.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import load_results, machine, protocol, save_results, tensor_bytes
from _nbce_common import (
    answer_correct,
    chat_ids,
    continue_from,
    cut,
    plain_generate,
    prefill_all_but_last,
    truncated_prompt,
)
from _nbce_tasks import run_tasks, summarize_tasks, tasks_table
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LogitsProcessor

from hf_ext import bbc_news_train_test_split, load_bbc_news, smollm2_path
from hf_ext.generation import NBCEContextCache, nbce_generate
from hf_ext.generation.nbce_hub.custom_generate.generate import (
    NBCELogitsProcessor,
    nbce_batch,
    nbce_combine,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
POOLINGS = ("entropy", "mean", "max")
NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dalia",
    "Emeka",
    "Farah",
    "Goran",
    "Hana",
    "Ivan",
    "Jonas",
    "Kemal",
    "Lena",
    "Mateo",
    "Nadia",
    "Oskar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
    "Umar",
    "Vera",
    "Wiktor",
    "Yuki",
]


# ----------------------------------------------------------------------------------------------- helpers


def make_case(index: int, articles: list[str], tokenizer, context_tokens: int, max_n: int) -> dict:
    """Case ``index``: the fact's article (with the fact inserted), ``max_n - 1`` distractors, the fact's position."""
    rng = random.Random(1000 + index)
    picked = rng.sample(range(len(articles)), max_n)
    name, number = rng.choice(NAMES), str(rng.randint(1000, 9999))
    fact = f"{name}'s secret number is {number}."
    target = cut(tokenizer, articles[picked[0]], context_tokens - len(tokenizer(fact)["input_ids"]) - 1)
    boundaries = [0] + [m.end() for m in re.finditer(r"[.!?]\s+", target)]
    at = rng.choice(boundaries)
    target = f"{target[:at]}{fact} {target[at:]}"
    distractors = [cut(tokenizer, articles[i], context_tokens) for i in picked[1:]]
    return {
        "target": target,
        "distractors": distractors,
        "question": f"What is {name}'s secret number?",
        "answer": number,
        "positions": {str(n): rng.randrange(n) for n in (4, 16, 48) if n <= max_n},
    }


def contexts_for(case: dict, n: int) -> list[str]:
    contexts = case["distractors"][: n - 1]
    contexts.insert(case["positions"][str(n)], case["target"])
    return contexts


def nbce_all_poolings(model, tokenizer, contexts: list[str], question: str, max_new_tokens: int) -> dict:
    """NBCE answers for every pooling from one shared prefill (its KV cache copied per pooling)."""
    batch = {k: v.to(model.device) for k, v in nbce_batch(tokenizer, contexts, question).items()}
    start = time.perf_counter()
    cache = prefill_all_but_last(model, batch)
    prefill = time.perf_counter() - start
    results = {"prompt_tokens": int(batch["attention_mask"].sum()), "rows": int(batch["input_ids"].shape[0])}
    for pooling in POOLINGS:
        processor = NBCELogitsProcessor(beta=0.25, pooling=pooling)
        start = time.perf_counter()
        out = continue_from(model, tokenizer, batch, cache, processor, max_new_tokens)
        new = out.sequences[0, batch["input_ids"].shape[1] :]
        results[pooling] = {
            "answer": tokenizer.decode(new, skip_special_tokens=True),
            "seconds": prefill + time.perf_counter() - start,
            "new_tokens": int(new.numel()),
            "kv_cache_bytes": tensor_bytes(out.past_key_values),
        }
    return results


# ----------------------------------------------------------------------------------------------- parts


def needle(data: dict, out: Path, model, tokenizer, args) -> None:
    articles = [f"{row['title']}\n{row['text']}" for row in load_bbc_news()]
    window = model.config.max_position_embeddings
    budget = window - args.max_new_tokens
    cases = data.setdefault("needle_cases", {})
    previous = data.get("needle_config")
    if previous and (previous["dtype"], previous["context_tokens"]) != (args.dtype, args.context_tokens):
        raise SystemExit(f"{out} holds needle cases run with {previous}: use the same --dtype / --context_tokens or "
                         "another --output.")  # fmt: skip
    data["needle_config"] = {
        "context_tokens": args.context_tokens,
        "max_new_tokens": args.max_new_tokens,
        "window": window,
        "beta": 0.25,
        "dtype": args.dtype,
        "device": str(model.device),
    }
    for index in range(args.cases):
        record = cases.setdefault(str(index), {})
        todo = [n for n in args.ns if f"n{n}" not in record] + (["oracle"] if "oracle" not in record else [])
        if not todo:
            continue
        case = make_case(index, articles, tokenizer, args.context_tokens, max(48, *args.ns))
        if "oracle" not in record:
            ids = chat_ids(tokenizer, f"{case['target']}\n\n{case['question']}")
            answer, seconds, kv_bytes = plain_generate(model, tokenizer, ids, args.max_new_tokens)
            record["oracle"] = {
                "answer": answer,
                "correct": answer_correct(answer, case["answer"]),
                "seconds": seconds,
                "kv_cache_bytes": kv_bytes,
            }
        for n in args.ns:
            if f"n{n}" in record:
                continue
            contexts = contexts_for(case, n)
            result = nbce_all_poolings(model, tokenizer, contexts, case["question"], args.max_new_tokens)
            for pooling in POOLINGS:
                result[pooling]["correct"] = answer_correct(result[pooling]["answer"], case["answer"])
            ids, fits = truncated_prompt(tokenizer, contexts, case["question"], budget)
            answer, seconds, kv_bytes = plain_generate(model, tokenizer, ids, args.max_new_tokens)
            result["truncation"] = {
                "answer": answer,
                "correct": answer_correct(answer, case["answer"]),
                "seconds": seconds,
                "prompt_tokens": len(ids),
                "fits": fits,
                "kv_cache_bytes": kv_bytes,
            }
            record[f"n{n}"] = result
        line = {
            k: (v["correct"] if k == "oracle" else {m: v[m]["correct"] for m in (*POOLINGS, "truncation")})
            for k, v in record.items()
        }
        print(f"[needle] case {index}: {line}", flush=True)
        save_results(out, data, summarize)


def rescore(data: dict, tokenizer, context_tokens: int) -> None:
    """Re-apply `answer_correct` to every stored answer (the cases are re-drawn from their seeds for the numbers)."""
    articles = [f"{row['title']}\n{row['text']}" for row in load_bbc_news()]
    changed = 0
    for index, record in data.get("needle_cases", {}).items():
        number = make_case(int(index), articles, tokenizer, context_tokens, 48)["answer"]
        results = [record["oracle"]] if "oracle" in record else []
        results += [r[m] for key, r in record.items() if key != "oracle" for m in (*POOLINGS, "truncation")]
        for result in results:
            correct = answer_correct(result["answer"], number)
            changed += correct != result["correct"]
            result["correct"] = correct
    data["rescored"] = {"rule": "whole-token number match (answer_correct)", "verdicts_changed": changed,
                        "note": "only the verdicts were recomputed (on protocol.machine); answers and timings are the "
                        "stored run's, from its own machine"}  # fmt: skip
    print(f"[rescore] {changed} verdicts changed", flush=True)


def _label_scores(model, cache: DynamicCache | None, ids: list[int], label_ids: list[int]) -> torch.Tensor:
    """Next-token logits after ``ids`` (continuing ``cache``, which is left untouched)."""
    past = copy.deepcopy(cache) if cache is not None else DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(
            input_ids=torch.tensor([ids], device=model.device), past_key_values=past, use_cache=True, logits_to_keep=1
        ).logits[0, -1]
    return logits.float()


def icl(data: dict, out: Path, model, tokenizer, args) -> None:
    split = bbc_news_train_test_split()
    train, test = split["train"], split["test"]
    labels = ["business", "entertainment", "politics", "sport", "tech"]  # the words the model is asked for
    label_ids = [tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in labels]
    if len(set(label_ids)) != len(labels):
        raise RuntimeError("The five topic words do not start with distinct tokens for this tokenizer.")
    header = "Classify each news headline by topic: business, entertainment, politics, sport or tech.\n\n"
    rng = random.Random(0)
    order = rng.sample(range(len(train)), len(train))
    windows, cursor = [], 0
    for _ in range(args.icl_windows):
        text = header
        while cursor < len(order):
            row = train[order[cursor]]
            demo = f"Headline: {row['title']}\nTopic: {labels[row['label']]}\n\n"
            if len(tokenizer(text + demo)["input_ids"]) > args.icl_window:
                break
            text, cursor = text + demo, cursor + 1
        windows.append(text)
    caches = []
    for text in windows:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(
                input_ids=torch.tensor([tokenizer(text)["input_ids"]], device=model.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        caches.append(cache)
    picks = random.Random(1).sample(range(len(test)), min(args.icl_cases, len(test)))
    correct = {"zero_shot": 0, "one_window": 0, **{f"nbce_{p}": 0 for p in POOLINGS}}
    start = time.perf_counter()
    for i in picks:
        row = test[i]
        query = f"Headline: {row['title']}\nTopic:"
        query_ids = tokenizer(query, add_special_tokens=False)["input_ids"]
        prior = _label_scores(model, None, tokenizer(header + query)["input_ids"], label_ids)
        per_window = [_label_scores(model, cache, query_ids, label_ids) for cache in caches]
        logits = torch.stack([prior, *per_window])  # (1 + windows, vocab)
        guesses = {"zero_shot": int(prior[label_ids].argmax()), "one_window": int(per_window[0][label_ids].argmax())}
        for pooling in POOLINGS:
            combined, _ = nbce_combine(logits, beta=0.25, pooling=pooling, top_p=1.0)
            guesses[f"nbce_{pooling}"] = int(combined[label_ids].argmax())
        for key, guess in guesses.items():
            correct[key] += int(guess == row["label"])
    demos_per_window = [text.count("Headline:") for text in windows]
    data["icl"] = {
        "cases": len(picks),
        "windows": len(windows),
        "window_tokens": args.icl_window,
        "demonstrations": sum(demos_per_window),
        "demonstrations_one_window": demos_per_window[0],
        "accuracy": {key: value / len(picks) for key, value in correct.items()},
        "seconds": time.perf_counter() - start,
    }
    print(f"[icl] {data['icl']}", flush=True)
    save_results(out, data, summarize)


class FullSortNBCE(LogitsProcessor):
    """The NBCE step as its definition reads, written out here (no package code): every row's nucleus by a full sort,
    entropy pooling over the nucleus renormalised, the context-free prior, greedy. The reference the fast
    processor's tokens are checked against."""

    def __init__(self, beta: float = 0.25, eta: float = 0.1, top_p: float = 0.95) -> None:
        self.beta, self.eta, self.top_p, self.previous = beta, eta, top_p, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float(), dim=-1)  # (1 + contexts, vocab)
        ordered, order = logp.sort(dim=-1, descending=True)
        mass_before = ordered.exp().cumsum(dim=-1) - ordered.exp()  # a token stays while the mass before it < top_p
        nucleus = torch.full_like(logp, -torch.inf).scatter(-1, order, ordered.masked_fill(mass_before >= self.top_p,
                                                                                          -torch.inf))  # fmt: skip
        q = torch.softmax(nucleus[1:].double(), dim=-1)  # each context's nucleus, renormalised
        entropy = -(q * torch.where(q > 0, q.log(), torch.zeros_like(q))).sum(dim=-1)
        if self.previous is not None:
            entropy[self.previous - 1] -= self.eta  # the previous step's context is favoured by eta
        self.previous = int(entropy.argmin()) + 1
        prior, pooled = nucleus[0], nucleus[self.previous]
        merged = torch.where(torch.isfinite(prior), (1 + self.beta) * pooled - self.beta * prior, pooled)
        return torch.full_like(scores, -torch.inf).index_fill_(1, merged.argmax().view(1), 0.0)


def speed(data: dict, out: Path, model, tokenizer, args) -> None:
    """Decode time per token from the same prefilled cache: batched `generate` with and without the processor; the
    processor's tokens checked against `FullSortNBCE`'s (not timed)."""
    articles = [f"{row['title']}\n{row['text']}" for row in load_bbc_news()]
    case = make_case(0, articles, tokenizer, args.context_tokens, 48)
    rows = {}
    for n in (4, 16, 48):
        batch = nbce_batch(tokenizer, contexts_for(case, n), case["question"])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        cache = prefill_all_but_last(model, batch)
        times: dict[str, list[float]] = {"plain": [], "nbce": []}
        tokens: dict[str, torch.Tensor] = {}
        for repeat in range(-1, args.speed_repetitions):  # -1: the full-sort reference, once
            for name in ("reference",) if repeat < 0 else ("plain", "nbce") if repeat % 2 == 0 else ("nbce", "plain"):
                processors = {"nbce": [NBCELogitsProcessor(beta=0.25)], "reference": [FullSortNBCE()]}.get(name, [])
                past = copy.deepcopy(cache)
                start = time.perf_counter()
                with torch.inference_mode():
                    tokens[name] = model.generate(
                        **batch,
                        past_key_values=past,
                        max_new_tokens=args.speed_tokens,
                        min_new_tokens=args.speed_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.eos_token_id,
                        logits_processor=processors,
                    )
                if name != "reference":
                    times[name].append((time.perf_counter() - start) / args.speed_tokens)
        plain, nbce = statistics.median(times["plain"]), statistics.median(times["nbce"])
        rows[str(n)] = {
            "rows": n + 1,
            "plain_seconds_per_token": plain,
            "nbce_seconds_per_token": nbce,
            "ratio": nbce / plain,
            "tokens_identical_to_full_sort": bool(torch.equal(tokens["nbce"], tokens["reference"])),
        }
        print(f"[speed] n={n}: {rows[str(n)]}", flush=True)
    data["speed"] = {"device": str(model.device), "new_tokens": args.speed_tokens, "rows": rows}
    save_results(out, data, summarize)


def cache_ttft(data: dict, out: Path, model, tokenizer, args) -> None:
    """Time to the first token of a second question over one 48-context set, with the contexts' cache and without."""
    articles = [f"{row['title']}\n{row['text']}" for row in load_bbc_news()]
    case = make_case(0, articles, tokenizer, args.context_tokens, 48)
    contexts = contexts_for(case, 48)
    questions = [case["question"], make_case(1, articles, tokenizer, args.context_tokens, 48)["question"]]
    cache = NBCEContextCache(model, tokenizer)
    start = time.perf_counter()
    with torch.inference_mode():
        cache.read(contexts)
    read_seconds = time.perf_counter() - start

    def answer(question: str, cached: bool, max_new_tokens: int) -> str:
        with torch.inference_mode():
            return nbce_generate(model, tokenizer, contexts, question, max_new_tokens=max_new_tokens,
                                 context_cache=cache if cached else None)  # fmt: skip

    answers = {
        name: [answer(q, name == "cache", args.max_new_tokens) for q in questions] for name in ("cache", "plain")
    }
    times: dict[str, list[float]] = {"cache": [], "plain": []}
    for repeat in range(args.speed_repetitions):
        for name in ("cache", "plain") if repeat % 2 == 0 else ("plain", "cache"):
            start = time.perf_counter()
            answer(questions[1], name == "cache", 1)
            times[name].append(time.perf_counter() - start)
    cached, plain = statistics.median(times["cache"]), statistics.median(times["plain"])
    data["cache"] = {
        "contexts": len(contexts), "rows": len(contexts) + 1, "questions": questions, "answers": answers,
        "answers_identical": answers["cache"] == answers["plain"], "reads": cache.reads,
        "read_seconds": read_seconds, "ttft_seconds_cache": cached, "ttft_seconds_plain": plain,
        "ttft_ratio": cached / plain, "cache_bytes": cache.nbytes, "cache_positions": cache.num_tokens,
        "repetitions": args.speed_repetitions, "device": str(model.device), "machine": machine(model.device),
    }  # fmt: skip
    same = data["cache"]["answers_identical"]
    print(f"[cache] ttft {cached:.3f} s with the cache vs {plain:.3f} s without ({cached / plain:.3f}x), "
          f"{cache.nbytes / 2**20:.0f} MiB, answers identical: {same}", flush=True)  # fmt: skip
    save_results(out, data, summarize)


# ----------------------------------------------------------------------------------------------- summary


def summarize(data: dict) -> dict:
    summary: dict = {}
    cases = data.get("needle_cases", {})
    oracle = [r["oracle"] for r in cases.values() if "oracle" in r]
    for n in (4, 16, 48):
        done = [r[f"n{n}"] for r in cases.values() if f"n{n}" in r]
        if not done:
            continue
        summary[f"n{n}_cases"] = len(done)
        summary[f"n{n}_oracle_acc"] = statistics.mean(
            r["oracle"]["correct"] for r in cases.values() if f"n{n}" in r and "oracle" in r
        )
        for method, key in (
            ("entropy", "nbce"),
            ("mean", "mean_pool"),
            ("max", "max_pool"),
            ("truncation", "truncation"),
        ):
            summary[f"n{n}_{key}_acc"] = statistics.mean(r[method]["correct"] for r in done)
            seconds = sum(r[method]["seconds"] for r in done)
            tokens = sum(r[method].get("new_tokens", 0) for r in done) if method in POOLINGS else None
            if tokens:
                summary[f"n{n}_{key}_new_tokens_per_s"] = tokens / seconds
            summary[f"n{n}_{key}_seconds_per_case"] = seconds / len(done)
        for method, key in (("entropy", "nbce"), ("truncation", "truncation")):
            kv = [r[method]["kv_cache_bytes"] for r in done if "kv_cache_bytes" in r[method]]
            if kv:
                summary[f"n{n}_{key}_kv_cache_mib_max"] = max(kv) / 2**20
        summary[f"n{n}_truncation_cut_share"] = statistics.mean(not r["truncation"]["fits"] for r in done)
        summary[f"n{n}_prompt_tokens_mean"] = statistics.mean(r["prompt_tokens"] for r in done)
    if oracle:
        summary["oracle_acc_all_cases"] = statistics.mean(r["correct"] for r in oracle)
    summary["n_cases"] = min((summary[f"n{n}_cases"] for n in (4, 16, 48) if f"n{n}_cases" in summary), default=0)
    if "n48_nbce_acc" in summary:
        summary["n48_nbce_over_oracle"] = summary["n48_nbce_acc"] / max(summary["n48_oracle_acc"], 1e-9)
    if "icl" in data:
        summary["icl_accuracy"] = data["icl"]["accuracy"]
    if "speed" in data:
        for n, row in data["speed"]["rows"].items():
            summary[f"step_ratio_n{n}"] = row["ratio"]
            if "tokens_identical_to_full_sort" in row:
                summary[f"step_tokens_identical_n{n}"] = row["tokens_identical_to_full_sort"]
    summary.update(summarize_tasks(data))
    if "cache" in data:
        cache = data["cache"]
        summary["cache_ttft_ratio_n48"] = cache["ttft_ratio"]
        summary["cache_ttft_seconds_n48"] = cache["ttft_seconds_cache"]
        summary["nocache_ttft_seconds_n48"] = cache["ttft_seconds_plain"]
        summary["cache_read_seconds_n48"] = cache["read_seconds"]
        summary["cache_bytes_n48"] = cache["cache_bytes"]
        summary["cache_answers_identical_n48"] = cache["answers_identical"]
    return summary


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ns = [n for n in (4, 16, 48) if f"n{n}_cases" in s]
    for key, label in (
        ("oracle", "oracle (fact's article only)"),
        ("nbce", "NBCE entropy"),
        ("mean_pool", "mean pooling"),
        ("max_pool", "max pooling"),
        ("truncation", "truncation / full concat"),
    ):
        style = "s--" if key == "oracle" else "o-"  # dashed: NBCE often lies on the oracle's line
        axes[0].plot(ns, [s[f"n{n}_{key}_acc"] for n in ns], style, label=label, alpha=0.8)
    axes[0].set_xscale("log")
    axes[0].minorticks_off()
    axes[0].set_xticks(ns, [f"{n}\n({s[f'n{n}_cases']} cases)" for n in ns])
    axes[0].set_xlabel("contexts n")
    axes[0].set_ylabel("needle accuracy")
    axes[0].legend()
    axes[0].set_title("needle QA over BBC articles (SmolLM2-135M, 8k window)")
    if "icl" not in data:
        axes[1].set_axis_off()
    else:
        acc = data["icl"]["accuracy"]
        axes[1].bar(list(acc), list(acc.values()))
        axes[1].tick_params(axis="x", rotation=20)
        axes[1].set_title(
            f"many-shot BBC topic ICL: {data['icl']['demonstrations']} demos in "
            f"{data['icl']['windows']} windows vs {data['icl']['demonstrations_one_window']} in one"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(data: dict) -> str:
    s = data["summary"]
    lines = [
        "| contexts n (cases) | oracle | NBCE entropy | mean pooling | max pooling | truncation / full concat |",
        "|---|---|---|---|---|---|",
    ]
    for n in (4, 16, 48):
        if f"n{n}_cases" in s:
            cells = " | ".join(
                f"{s[f'n{n}_{k}_acc']:.2f}" for k in ("oracle", "nbce", "mean_pool", "max_pool", "truncation")
            )
            lines.append(f"| {n} ({s[f'n{n}_cases']}) | {cells} |")
    if any(key.endswith("_dev_cases") for key in s):
        lines += ["", tasks_table(data)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["needle", "icl", "speed", "cache", "tasks"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--model", default=None, help="causal LM id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--ns", nargs="+", type=int, default=[4, 16, 48], choices=[4, 16, 48])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--context_tokens", type=int, default=192)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--icl_window", type=int, default=512)
    parser.add_argument("--icl_windows", type=int, default=8)
    parser.add_argument("--icl_cases", type=int, default=200)
    parser.add_argument("--speed_tokens", type=int, default=16)
    parser.add_argument("--speed_repetitions", type=int, default=4)
    parser.add_argument("--task_n", type=int, default=8, help="contexts per case in the harder tasks")
    parser.add_argument("--task_cases", type=int, default=100, help="test cases per harder task")
    parser.add_argument("--task_dev_cases", type=int, default=12, help="dev cases per harder task")
    parser.add_argument("--task_new_tokens", type=int, default=32, help="answer length limit in the harder tasks")
    parser.add_argument("--output", type=Path, default=RESULTS / "nbce_longcontext.json")
    parser.add_argument("--table", action="store_true", help="print the docs page's table from --output and exit")
    parser.add_argument("--rescore", action="store_true", help="re-apply `answer_correct` to the stored answers")
    parser.add_argument("--rescore_from", type=Path, default=None,
                        help="take the needle answers of another results file (e.g. the pre-protocol run), re-score "
                        "them with `answer_correct` into --output, and exit")  # fmt: skip
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.output.read_text())))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_results(args.output, protocol(
        selection_split="needle, icl, speed, cache: none (the method author's settings: beta 0.25, entropy pooling, "
        "top-p 0.95, stickiness 0.1); tasks: each task's dev cases (seeds 500000 + 1000 * task + i) choose each "
        "pooling's beta (tasks.<task>.chosen)", test_split=f"needle: {args.cases} seeded cases (seeds 1000 + i); "
        "tasks: test cases (seeds 600000 + 1000 * task + i), each run once at the dev-chosen betas",
        chosen={}, seeds=[0], device=device, cases=args.cases,
    ))  # fmt: skip
    path = args.model or str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.rescore_from is not None:
        source = json.loads(args.rescore_from.read_text())
        if "needle_cases" in data:
            raise SystemExit(f"{args.output} holds needle cases of its own: rescore them with --rescore.")
        data["needle_cases"], data["needle_config"] = source["needle_cases"], source["needle_config"]
        data["needle_source"] = {"file": str(args.rescore_from.resolve().relative_to(ROOT)),
                                 "machine": source["protocol"]["machine"],
                                 "note": "answers, timings and KV bytes are that run's (its machine, its dtype); only "
                                 "the verdicts are recomputed here"}  # fmt: skip
        args.rescore = True
    if args.rescore:
        rescore(data, tokenizer, args.context_tokens)
        save_results(args.output, data, summarize)
        print(json.dumps(data["summary"], indent=2))
        return
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device).eval()
    if "needle" in args.parts:
        needle(data, args.output, model, tokenizer, args)
    if "icl" in args.parts:
        icl(data, args.output, model, tokenizer, args)
    if "speed" in args.parts:
        speed(data, args.output, model, tokenizer, args)
    if "cache" in args.parts:
        cache_ttft(data, args.output, model, tokenizer, args)
    if "tasks" in args.parts:
        run_tasks(data, args.output, model, tokenizer, args, summarize)
    save_results(args.output, data, summarize)
    plot(data, args.output.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    sys.exit(main())
