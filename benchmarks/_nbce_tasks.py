"""The harder NBCE tasks (multi-key, multi-value, multi-query, one long document) and the divergence pooling.

Every case is drawn from its own seed out of BBC articles with seeded facts ("<name>'s secret number is <4 digits>."):

- ``multikey``: four facts of the same form, for four names, each in a different context; one name is asked.
- ``multivalue``: one name whose numbers sit in 2-4 different contexts ("One of <name>'s secret numbers is ...");
  all of them are asked.
- ``multiquery``: two names' facts in two contexts; both numbers asked in one question.
- ``longdoc``: one long document (BBC articles one after another) with one fact inserted at a sentence boundary,
  cut by `split_into_windows` into ``n`` windows (overlap 32 tokens, so the fact lies whole in a window).

An answer is right when it holds every asked number as a whole token (`answers_correct`); its recall is the share
of the asked numbers it holds. Dev cases (seeds from
``DEV_SEED``) and test cases (``TEST_SEED``) never share a seed.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import save_results, tensor_bytes
from _nbce_common import (
    answer_correct,
    answers_correct,
    chat_ids,
    continue_from,
    cut,
    plain_generate,
    prefill_all_but_last,
    truncated_prompt,
)
from transformers import LogitsProcessor

from hf_ext import load_bbc_news
from hf_ext.generation import NBCELogitsProcessor, nbce_batch, split_into_windows
from hf_ext.generation.nbce_hub.custom_generate.generate import _dense, _merge, _nucleus_candidates

TASKS = ("multikey", "multivalue", "multiquery", "longdoc")
DEV_SEED, TEST_SEED = 500_000, 600_000
LONGDOC_OVERLAP = 32
NAMES = ("Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jonas", "Kemal", "Lena",
         "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tara")  # fmt: skip


def _insert(rng: random.Random, text: str, fact: str) -> str:
    boundaries = [0] + [m.end() for m in re.finditer(r"[.!?]\s+", text)]
    at = rng.choice(boundaries)
    return f"{text[:at]}{fact} {text[at:]}"


def _numbers(rng: random.Random, count: int) -> list[str]:
    return [str(n) for n in rng.sample(range(1000, 10000), count)]


def _fresh(numbers: list[str], texts: list[str]) -> list[str]:
    """``numbers`` with each one the texts already hold (a year in an article, say) replaced by one they do not: the
    replacement comes from its own generator, so a case without such a clash is drawn exactly as before."""

    def held(number: str) -> bool:
        return any(re.search(rf"(?<![0-9]){number}(?![0-9])", text) for text in texts)

    rng = random.Random("fresh:" + ",".join(numbers))
    out: list[str] = []
    for number in numbers:
        while held(number) or number in out:
            number = str(rng.randrange(1000, 10000))
        out.append(number)
    return out


def make_task_case(task: str, split: str, index: int, articles: list[str], tokenizer, context_tokens: int,
                   n: int) -> dict:  # fmt: skip
    """One case: ``contexts`` (n), ``question``, ``answers`` (the numbers asked) and ``evidence`` (the indices of the
    contexts that hold them, the oracle's contexts)."""
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
    seed = (DEV_SEED if split == "dev" else TEST_SEED) + 1000 * TASKS.index(task) + index
    rng = random.Random(seed)
    if task == "longdoc":
        return _longdoc(rng, articles, tokenizer, context_tokens, n)
    picked = rng.sample(range(len(articles)), n)
    contexts = [cut(tokenizer, articles[i], context_tokens) for i in picked]
    if task == "multikey":
        names, numbers = rng.sample(NAMES, 4), _fresh(_numbers(rng, 4), contexts)
        facts = [f"{name}'s secret number is {number}." for name, number in zip(names, numbers, strict=True)]
        asked = rng.randrange(4)
        question, answers = f"What is {names[asked]}'s secret number?", [numbers[asked]]
    elif task == "multivalue":
        name, count = rng.choice(NAMES), rng.choice([2, 3, 4])
        answers = _fresh(_numbers(rng, count), contexts)
        facts = [f"One of {name}'s secret numbers is {number}." for number in answers]
        question, asked = f"What are all of {name}'s secret numbers?", None
    else:
        names, answers = rng.sample(NAMES, 2), _fresh(_numbers(rng, 2), contexts)
        facts = [f"{name}'s secret number is {number}." for name, number in zip(names, answers, strict=True)]
        question, asked = f"What are the secret numbers of {names[0]} and {names[1]}?", None
    where = rng.sample(range(n), len(facts))
    for fact, at in zip(facts, where, strict=True):
        room = context_tokens - len(tokenizer(fact, add_special_tokens=False)["input_ids"]) - 1
        contexts[at] = _insert(rng, cut(tokenizer, contexts[at], room), fact)
    evidence = sorted([where[asked]] if asked is not None else where)
    return {"contexts": contexts, "question": question, "answers": answers, "evidence": evidence, "seed": seed}


def _longdoc(rng: random.Random, articles: list[str], tokenizer, context_tokens: int, n: int) -> dict:
    """Articles one after another until the document fills ``n`` windows, a fact at a sentence boundary."""
    name, number = rng.choice(NAMES), _numbers(rng, 1)[0]
    step = context_tokens - LONGDOC_OVERLAP
    need = step * (n - 1) + context_tokens
    parts, length = [], 0
    for i in rng.sample(range(len(articles)), len(articles)):
        parts.append(articles[i])
        length += len(tokenizer(articles[i], add_special_tokens=False)["input_ids"])
        if length >= need + 64:
            break
    document = "\n\n".join(parts)
    number = _fresh([number], [document])[0]
    fact = f"{name}'s secret number is {number}."
    document = _insert(rng, document, fact)
    windows = split_into_windows(document, tokenizer, window=context_tokens, overlap=LONGDOC_OVERLAP)[:n]
    holding = [k for k, window in enumerate(windows) if fact in window]
    if not holding:  # the fact was past the n windows: a new draw of the position, from the same seed stream
        return _longdoc(rng, articles, tokenizer, context_tokens, n)
    return {"contexts": windows, "question": f"What is {name}'s secret number?", "answers": [number],
            "evidence": holding[:1]}  # fmt: skip


class DivergenceNBCE(LogitsProcessor):
    """NBCE whose pooling takes, each step, the context whose nucleus distribution diverges most from the
    context-free row 0: ``argmax_k KL(q_k || p_0)``, q_k row k's nucleus renormalised, p_0 row 0's full
    distribution (the previous step's context gets ``eta`` added); then the same combine as entropy pooling,
    ``(1 + beta) * log q_k - beta * log p_0^nucleus`` where row 0's nucleus holds the token, the pooled term alone
    elsewhere. A benchmark peer (not in the package), built on the package's nucleus search."""

    def __init__(self, beta: float = 0.25, eta: float = 0.1, top_p: float = 0.95) -> None:
        self.beta, self.eta, self.top_p = beta, eta, top_p
        self.chosen: list[int] = []
        self._length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._length is None or input_ids.shape[1] <= self._length:
            self.chosen = []
        self._length = input_ids.shape[1]
        logp = torch.log_softmax(scores.float(), dim=-1)  # (rows, vocab)
        values, index = _nucleus_candidates(logp, self.top_p)  # (rows, candidates), -inf outside each nucleus
        q = torch.softmax(values[1:].double(), dim=-1)
        logq = torch.where(q > 0, q.log(), torch.zeros_like(q))
        prior_at = logp[0].double().gather(0, index[1:].reshape(-1)).view_as(q)
        divergence = (q * (logq - torch.where(q > 0, prior_at, torch.zeros_like(prior_at)))).sum(-1)
        if self.chosen:
            divergence[self.chosen[-1] - 1] += self.eta
        chosen = int(divergence.argmax()) + 1
        self.chosen.append(chosen)
        rows = torch.tensor([0, chosen], device=scores.device)
        prior, pooled = _dense(values.index_select(0, rows), index.index_select(0, rows), logp.shape[-1])
        token = _merge(prior, pooled, self.beta).argmax()
        return torch.full_like(scores, -torch.inf).index_fill_(1, token.view(1), 0.0)


# ----------------------------------------------------------------------------------------------- the part


BETA_LADDER = (-0.25, 0.0, 0.25, 0.5, 1.0, 2.0)
BETA_START = (0.0, 0.25, 0.5)
DEFAULT_BETA = 0.25  # the method author's
TASK_POOLINGS = ("entropy", "max", "mean", "divergence")


def _setting(pooling: str, beta: float) -> str:
    return f"{pooling}@{beta:g}"


def nbce_settings(model, tokenizer, contexts: list[str], question: str, settings: list[tuple[str, float]],
                  max_new_tokens: int) -> tuple[dict, int]:  # fmt: skip
    """NBCE answers for every (pooling, beta) from one shared prefill, and the prefill's KV bytes."""
    batch = {k: v.to(model.device) for k, v in nbce_batch(tokenizer, contexts, question).items()}
    cache = prefill_all_but_last(model, batch)
    answers = {}
    for pooling, beta in settings:
        processor = (
            DivergenceNBCE(beta=beta) if pooling == "divergence" else NBCELogitsProcessor(beta=beta, pooling=pooling)
        )
        out = continue_from(model, tokenizer, batch, cache, processor, max_new_tokens)
        answers[_setting(pooling, beta)] = tokenizer.decode(
            out.sequences[0, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return answers, tensor_bytes(cache)


def _task_betas(dev: dict, pooling: str) -> tuple[list[float], float | None]:
    """The betas the dev cases must run for ``pooling``, and the choice once it stands (None until then).

    The best dev accuracy wins; among tied betas, the one nearest the author's 0.25. While the pick sits at an end
    of the betas run so far, the ladder adds the next beta beyond it (up to the ladder's ends)."""
    betas = list(BETA_START)
    while True:
        if not dev or any(_setting(pooling, b) not in case for case in dev.values() for b in betas):
            return betas, None
        scores = {b: statistics.mean(case[_setting(pooling, b)]["correct"] for case in dev.values()) for b in betas}
        best = max(scores.values())
        pick = min((b for b in betas if scores[b] == best), key=lambda b: (abs(b - DEFAULT_BETA), b))
        lower, upper = BETA_LADDER.index(min(betas)), BETA_LADDER.index(max(betas))
        if pick == min(betas) and lower > 0:
            betas.insert(0, BETA_LADDER[lower - 1])
        elif pick == max(betas) and upper < len(BETA_LADDER) - 1:
            betas.append(BETA_LADDER[upper + 1])
        else:
            return betas, pick


def run_tasks(data: dict, out: Path, model, tokenizer, args, summarize: Callable[[dict], dict]) -> None:
    """The ``tasks`` part: dev cases until every pooling's beta stands, then the test cases, saved after each."""
    articles = [f"{row['title']}\n{row['text']}" for row in load_bbc_news()]
    window = model.config.max_position_embeddings
    config = {"n": args.task_n, "context_tokens": args.context_tokens, "max_new_tokens": args.task_new_tokens,
              "dev_cases": args.task_dev_cases, "beta_ladder": list(BETA_LADDER), "beta_start": list(BETA_START),
              "poolings": list(TASK_POOLINGS), "dtype": args.dtype, "window": window}  # fmt: skip
    store = data.setdefault("tasks", {"config": config})
    if {k: v for k, v in store["config"].items() if k != "dev_cases"} != {
        k: v for k, v in config.items() if k != "dev_cases"
    }:
        raise SystemExit(f"{out} holds task cases run with {store['config']}: use the same settings or --output.")
    store["config"]["dev_cases"] = max(store["config"]["dev_cases"], args.task_dev_cases)

    def case_of(task: str, split: str, index: int) -> dict:
        return make_task_case(task, split, index, articles, tokenizer, args.context_tokens, args.task_n)

    for task in TASKS:  # dev: every pooling's beta ladder, until each choice stands
        record = store.setdefault(task, {"dev": {}, "test": {}, "chosen": {}})
        if record["test"] and args.task_dev_cases > len(record["dev"]):
            raise SystemExit(f"{task} has test cases run at the betas of {len(record['dev'])} dev cases: more dev "
                             "cases now could change the choice under them; keep --task_dev_cases or use "
                             "--output.")  # fmt: skip
        for index in range(args.task_dev_cases):
            record["dev"].setdefault(str(index), {})
        while True:
            todo = {p: _task_betas(record["dev"], p) for p in TASK_POOLINGS}
            record["chosen"] = {p: beta for p, (_, beta) in todo.items() if beta is not None}
            if len(record["chosen"]) == len(TASK_POOLINGS):
                break
            for index, result in record["dev"].items():
                missing = [(p, b) for p, (betas, _) in todo.items() for b in betas if _setting(p, b) not in result]
                if not missing:
                    continue
                case = case_of(task, "dev", int(index))
                answers, _ = nbce_settings(model, tokenizer, case["contexts"], case["question"], missing,
                                           args.task_new_tokens)  # fmt: skip
                for key, answer in answers.items():
                    result[key] = {"answer": answer, "correct": answers_correct(answer, case["answers"])}
                print(f"[tasks] {task} dev {index}: {sum(r['correct'] for r in result.values())}/{len(result)} right",
                      flush=True)  # fmt: skip
                save_results(out, data, summarize)
        print(f"[tasks] {task}: dev-chosen betas {record['chosen']}", flush=True)
    for index in range(args.task_cases):  # test: once per case, the tasks in turn
        for task in TASKS:
            record = store[task]
            if str(index) in record["test"]:
                continue
            case = case_of(task, "test", index)
            settings = [(p, record["chosen"][p]) for p in TASK_POOLINGS]
            start = time.perf_counter()
            answers, kv_bytes = nbce_settings(model, tokenizer, case["contexts"], case["question"], settings,
                                              args.task_new_tokens)  # fmt: skip
            result = {p: {"answer": answers[_setting(p, b)], "beta": b} for p, b in settings}
            result["nbce_seconds"], result["nbce_kv_bytes"] = time.perf_counter() - start, kv_bytes
            evidence = "\n\n".join(case["contexts"][k] for k in case["evidence"])
            ids = chat_ids(tokenizer, f"{evidence}\n\n{case['question']}")
            result["oracle"] = dict(
                zip(
                    ("answer", "seconds", "kv_bytes"),
                    plain_generate(model, tokenizer, ids, args.task_new_tokens),
                    strict=True,
                )
            )
            ids, fits = truncated_prompt(tokenizer, case["contexts"], case["question"], window - args.task_new_tokens)
            result["truncation"] = dict(
                zip(
                    ("answer", "seconds", "kv_bytes"),
                    plain_generate(model, tokenizer, ids, args.task_new_tokens),
                    strict=True,
                )
            )
            result["truncation"]["fits"] = fits
            for method in (*TASK_POOLINGS, "oracle", "truncation"):
                result[method]["correct"] = answers_correct(result[method]["answer"], case["answers"])
            result["answers"] = case["answers"]
            record["test"][str(index)] = result
            print(
                f"[tasks] {task} test {index}: "
                + ", ".join(f"{m} {int(result[m]['correct'])}" for m in (*TASK_POOLINGS, "oracle", "truncation")),
                flush=True,
            )
            save_results(out, data, summarize)


def summarize_tasks(data: dict) -> dict:
    """``{task}_{method}_acc`` (``nbce``: entropy pooling), case counts, the dev-chosen betas and KV bytes."""
    summary: dict = {}
    for task in TASKS:
        record = data.get("tasks", {}).get(task)
        if not record or not record["test"]:
            continue
        done = list(record["test"].values())
        summary[f"{task}_cases"] = len(done)
        summary[f"{task}_dev_cases"] = len(record["dev"])
        summary[f"{task}_chosen_beta"] = record["chosen"]
        for method in (*TASK_POOLINGS, "oracle", "truncation"):
            key = "nbce" if method == "entropy" else method
            summary[f"{task}_{key}_acc"] = statistics.mean(r[method]["correct"] for r in done)
            summary[f"{task}_{key}_recall"] = statistics.mean(
                statistics.mean(answer_correct(r[method]["answer"], number) for number in r["answers"]) for r in done
            )
        summary[f"{task}_nbce_kv_mib_mean"] = statistics.mean(r["nbce_kv_bytes"] for r in done) / 2**20
        summary[f"{task}_truncation_kv_mib_mean"] = statistics.mean(r["truncation"]["kv_bytes"] for r in done) / 2**20
        summary[f"{task}_truncation_cut_share"] = statistics.mean(not r["truncation"]["fits"] for r in done)
    return summary


def tasks_table(data: dict) -> str:
    """The harder tasks' table: accuracy (all asked numbers right; recall in brackets for multi-value) per method,
    with the dev-chosen beta of each pooling and the case counts."""
    s = data["summary"]
    methods = [("oracle", "oracle"), ("truncation", "truncation / full concat"), ("nbce", "NBCE entropy"),
               ("max", "max pooling"), ("mean", "mean pooling"), ("divergence", "divergence pooling")]  # fmt: skip
    lines = ["| task (test cases, dev cases) | " + " | ".join(name for _, name in methods) + " |",
             "|---" * (len(methods) + 1) + "|"]  # fmt: skip
    for task in TASKS:
        if f"{task}_cases" not in s:
            continue
        chosen = s[f"{task}_chosen_beta"]
        cells = []
        for key, _ in methods:
            cell = f"{s[f'{task}_{key}_acc']:.2f}"
            if task == "multivalue":
                cell += f" ({s[f'{task}_{key}_recall']:.2f})"
            pooling = "entropy" if key == "nbce" else key
            if pooling in chosen:
                cell += f", β {chosen[pooling]:g}"
            cells.append(cell)
        lines.append(f"| {task} ({s[f'{task}_cases']}, {s[f'{task}_dev_cases']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
