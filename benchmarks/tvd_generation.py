"""TaiLr's claim on generation: cross-entropy vs TVD vs DFT fine-tuning SmolLM2 to title BBC articles.

    python benchmarks/tvd_generation.py            # the dev sweep, then 3 seeds per method on test (resumable)
    python benchmarks/tvd_generation.py --table    # the docs page's table from the results file
    python benchmarks/tvd_generation.py --max_train 48 --max_dev 8 --max_test 8 --max_steps 3 --seeds 0 \\
        --gammas 0.5 --floors 0.2 --output /tmp/tvd_gen_smoke.json   # the whole pipeline, small

Data: the 2,096 de-duplicated BBC News articles (`load_bbc_news`): `bbc_news_train_test_split` (20% test,
stratified by topic, seed 0), its train part split again (stratified, seed 0) into train and a 12.5% dev split.
Each example is the embedded SmolLM2-135M-Instruct's chat template with the user turn "Write a title for this BBC
News article." and the body cut to ``--body_tokens`` tokens; the targets are the title and the end-of-turn token
(the prompt is masked with -100).

Training: `TVDTrainer` with ``tvd_fused_lm_head`` for every method, so they share the code, the initialisation,
the data order (the seed) and the budget (``--max_steps`` steps of ``--batch_size``, AdamW, linear decay):

- ``ce``: gamma 0, which is exactly cross-entropy (`tests/trainers/test_tvd_trainer.py` against the stock
  `Trainer`);
- ``tvd``: TaiLr, gamma and floor chosen on dev from ``--gammas`` x ``--floors``;
- ``dft``: gamma 1, no floor: TRL's ``SFTConfig(loss_type="dft")`` (loss and gradients equal:
  `tests/trainers/test_trl_parity.py`);
- ``dft_floor``: gamma 1, floor 0.1 (what DFT's authors suggest against repetition).

**Protocol**: the dev split chooses, by ROUGE-L of the greedy titles (seed 0), each method's learning rate from
``--lrs`` and TVD's gamma and floor (at its chosen rate); a best value at an open end of its sweep is extended
(a gamma halved towards 0, or halfway to 1), a learning rate doubled or halved, a floor stepped by 0.1 (0 is its closed
end), up to 3 times each. The test split is scored once per method at its chosen setting over
``--seeds``; TVD - CE and TVD - DFT are paired by seed. Measured on the reference titles: perplexity (teacher
forcing) and token-level ECE (top-1 confidence against top-1 = the reference token, 15 bins); on greedy titles (at
most 32 new tokens): ROUGE-L F1 (``rouge-score``, stemmed), distinct-2 (distinct word bigrams / word bigrams over
all titles) and repetition (per title, the share of words that repeat an earlier word of it; mean over titles).

Cost, measured on a 2-core Xeon (AMX, float32; in a 4-step probe bf16 autocast, ``--bf16``, trained 1.2x faster):
~4.3 s a training step over the whole data (100 steps ~7 min), 0.38 s an article scored (dev 210 ~80 s, test 420
~160 s); ~27 dev runs and 12 test runs, ~6 hours in all. Run nothing beside it: a second job on the same two
cores made both ~7x slower. Every run is saved when it ends, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from _common import (
    MAX_EXTENSIONS,
    bracketed_grid,
    choose,
    extension,
    fmt_mean_std,
    fmt_paired,
    load_results,
    mean_std,
    paired,
    protocol,
    save_results,
)
from tqdm.auto import tqdm

from hf_ext import bbc_news_train_test_split, smollm2_path
from hf_ext.metrics import confidence_calibration
from hf_ext.trainers import TVDConfig, TVDTrainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INSTRUCTION = "Write a title for this BBC News article."
METHODS = ("ce", "tvd", "dft", "dft_floor")
FIXED = {"ce": {"gamma": 0.0, "min_weight": 0.0}, "dft": {"gamma": 1.0, "min_weight": 0.0},
         "dft_floor": {"gamma": 1.0, "min_weight": 0.1}}  # fmt: skip
TVD_DEFAULT = {"gamma": 0.5, "min_weight": 0.2}  # TVD's setting while its learning rate is chosen
METRICS = ("ppl", "ece", "rougeL", "distinct2", "repetition")
LOWER_IS_BETTER = {"ppl", "ece", "repetition"}


# ------------------------------------------------------------------------------------------------------- data


def splits(seed: int = 0) -> dict[str, datasets.Dataset]:
    """train / dev / test articles: the package's stratified test split, and a stratified dev slice of train."""
    parts = bbc_news_train_test_split(test_size=0.2, seed=seed)
    train_dev = parts["train"].train_test_split(test_size=0.125, seed=seed, stratify_by_column="label")
    return {"train": train_dev["train"], "dev": train_dev["test"], "test": parts["test"]}


def encode(tokenizer, article: dict, body_tokens: int) -> dict[str, list[int]]:
    """Prompt ids (chat template, generation prompt) and target ids (the title and the end-of-turn token)."""
    body = tokenizer.decode(tokenizer(article["text"], add_special_tokens=False)["input_ids"][:body_tokens])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{INSTRUCTION}\n\n{body}"}],
                                           add_generation_prompt=True, tokenize=False)  # fmt: skip
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(article["title"].strip() + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"prompt_ids": prompt_ids, "target_ids": target_ids}


def training_rows(encoded: list[dict]) -> datasets.Dataset:
    rows = [{"input_ids": e["prompt_ids"] + e["target_ids"],
             "labels": [-100] * len(e["prompt_ids"]) + e["target_ids"]} for e in encoded]  # fmt: skip
    for row in rows:
        row["attention_mask"] = [1] * len(row["input_ids"])
    return datasets.Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------------- metrics


def distinct_2(titles: list[str]) -> float:
    """Distinct word bigrams over all word bigrams of all titles (lower-cased, split on whitespace)."""
    bigrams = [tuple(words[i : i + 2]) for t in titles for words in [t.lower().split()] for i in range(len(words) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def repetition(titles: list[str]) -> float:
    """Mean over titles of the share of words that repeat an earlier word of the same title."""
    shares = []
    for title in titles:
        words = title.lower().split()
        shares.append(1.0 - len(set(words)) / len(words) if words else 0.0)
    return sum(shares) / len(shares) if shares else 0.0


@torch.no_grad()
def reference_scores(model, tokenizer, encoded: list[dict], batch_size: int) -> dict[str, float]:
    """Perplexity and token-level ECE of the reference titles under teacher forcing."""
    model.eval()
    nll, count, confidences, correct = 0.0, 0, [], []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        width = max(len(e["prompt_ids"]) + len(e["target_ids"]) for e in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, e in enumerate(rows):
            seq = e["prompt_ids"] + e["target_ids"]
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, len(e["prompt_ids"]) : len(seq)] = torch.tensor(e["target_ids"])
            mask[r, : len(seq)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
        targets, keep = labels[:, 1:], labels[:, 1:] != -100
        target_logp = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0][keep]
        top_logp, top = logp.max(dim=-1)
        nll -= float(target_logp.sum())
        count += int(keep.sum())
        confidences.append(top_logp[keep].exp())
        correct.append((top == targets)[keep])
    ece, _ = confidence_calibration(torch.cat(confidences).numpy(), torch.cat(correct).numpy())
    return {"ppl": math.exp(nll / count), "ece": ece, "target_tokens": count}


@torch.no_grad()
def greedy_titles(model, tokenizer, encoded: list[dict], batch_size: int, max_new_tokens: int = 32) -> list[str]:
    model.eval()
    titles = []
    for start in range(0, len(encoded), batch_size):
        prompts = [e["prompt_ids"] for e in encoded[start : start + batch_size]]
        width = max(map(len, prompts))  # left padding: every prompt ends where generation starts
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        titles += [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    return titles


def score(model, tokenizer, articles: datasets.Dataset, encoded: list[dict], batch_size: int) -> dict[str, Any]:
    from rouge_score import rouge_scorer

    scores = reference_scores(model, tokenizer, encoded, batch_size)
    titles = greedy_titles(model, tokenizer, encoded, batch_size)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(articles["title"], titles, strict=True)]
    return {**scores, "rougeL": sum(rouge) / len(rouge), "distinct2": distinct_2(titles),
            "repetition": repetition(titles), "examples": [[r, h] for r, h in zip(articles["title"][:5], titles[:5],
                                                                                strict=True)]}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ runs


def run(data: dict, out: Path, method: str, setting: dict, seed: int, split: str, inputs: dict, args) -> dict:
    """Train one setting from the base model with ``seed``, score it on ``split``; reused when already in ``out``."""
    runs = data.setdefault("runs", {})
    key = _key(split, method, setting, seed)
    if key in runs:
        return runs[key]["metrics"]
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    print(f"[{key}] {setting} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    output_dir = tempfile.mkdtemp(prefix="tvd-gen-")
    config = TVDConfig(output_dir=output_dir, tvd_gamma=setting["gamma"], tvd_min_weight=setting["min_weight"],
                       tvd_fused_lm_head=True, learning_rate=setting["lr"], max_steps=args.max_steps,
                       per_device_train_batch_size=args.batch_size, lr_scheduler_type="linear", warmup_steps=0,
                       weight_decay=0.0, bf16=args.bf16, seed=seed, data_seed=seed,
                       logging_steps=max(1, args.max_steps // 10), save_strategy="no", report_to="none",
                       use_cpu=not torch.cuda.is_available(), disable_tqdm=True, dataloader_num_workers=0)  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = TVDTrainer(model=model, args=config, train_dataset=inputs["train_rows"], data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    shutil.rmtree(output_dir, ignore_errors=True)
    start = time.perf_counter()
    device_type = next(trainer.model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.bf16):
        metrics = score(trainer.model, tokenizer, inputs[split], inputs[f"{split}_encoded"], args.eval_batch_size)
    runs[key] = {"method": method, "setting": setting, "seed": seed, "split": split, "metrics": metrics,
                 "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start,
                 "train_losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}  # fmt: skip
    print(f"[{key}] " + ", ".join(f"{m} {metrics[m]:.4f}" for m in METRICS), flush=True)
    save_results(out, data, summarize)
    return metrics


def _key(split: str, method: str, setting: dict, seed: int) -> str:
    return f"{split}/{method}/lr{setting['lr']:g}_g{setting['gamma']:g}_b{setting['min_weight']:g}/seed{seed}"


def select(data: dict, out: Path, inputs: dict, args) -> dict[str, dict]:
    """Each method's setting, chosen on dev by ROUGE-L (seed 0); every sweep extended past a best open end."""
    chosen: dict[str, dict] = {}
    selection: dict[str, Any] = {}

    def dev_rouge(method: str, setting: dict) -> float:
        return run(data, out, method, setting, 0, "dev", inputs, args)["rougeL"]

    for method in METHODS:
        base = FIXED.get(method, TVD_DEFAULT)
        lrs = list(args.lrs)
        for _ in range(MAX_EXTENSIONS + 1):
            sweep = {lr: dev_rouge(method, {"lr": lr, **base}) for lr in lrs}
            pick = choose(sweep)
            more = extension(lrs, pick["value"], "lr")
            if more is None or len(lrs) >= len(args.lrs) + MAX_EXTENSIONS:
                break
            lrs.append(more)
        selection[f"{method}_lr"] = pick
        chosen[method] = {"lr": pick["value"], **base}
    lr = chosen["tvd"]["lr"]
    search = bracketed_grid(
        lambda g, b: dev_rouge("tvd", {"lr": lr, "gamma": g, "min_weight": b}),
        {"gamma": args.gammas, "floor": args.floors},
        {"gamma": "share", "floor": "floor"},
    )
    best = search["best"]
    selection["tvd_grid"] = {f"gamma={g:g},floor={b:g}": v for (g, b), v in search["grid"].items()}
    selection["tvd_gamma"], selection["tvd_floor"] = search["gamma"], search["floor"]
    chosen["tvd"] = {"lr": lr, "gamma": best[0], "min_weight": best[1]}
    data["selection"] = selection
    data["chosen"] = chosen
    return chosen


def summarize(data: dict) -> dict:
    s: dict[str, Any] = {}
    chosen = data.get("chosen", {})
    tests: dict[str, dict[int, dict]] = {}
    for run_data in data.get("runs", {}).values():
        if run_data["split"] == "test":
            tests.setdefault(run_data["method"], {})[run_data["seed"]] = run_data["metrics"]
    for method, by_seed in tests.items():
        for metric in METRICS:
            stats = mean_std(m[metric] for m in by_seed.values())
            s[f"{method}_{metric}"], s[f"{method}_{metric}_std"] = stats["mean"], stats["std"]
            s[f"{method}_seeds"] = stats["n"]
    for ours, theirs in (("tvd", "ce"), ("tvd", "dft"), ("dft_floor", "dft")):
        if ours in tests and theirs in tests:
            for metric in ("rougeL", "ppl", "ece"):
                p = paired({k: v[metric] for k, v in tests[ours].items()},
                           {k: v[metric] for k, v in tests[theirs].items()}, metric not in LOWER_IS_BETTER)  # fmt: skip
                s[f"{ours}_minus_{theirs}_{metric}"], s[f"{ours}_minus_{theirs}_{metric}_agree"] = p["mean"], p["agree"]
    if "tvd" in chosen:
        s["tvd_gamma"], s["tvd_min_weight"] = chosen["tvd"]["gamma"], chosen["tvd"]["min_weight"]
    for method, setting in chosen.items():
        s[f"{method}_lr"] = setting["lr"]
    return s


def table(data: dict) -> str:
    chosen = data.get("chosen", {})
    tests: dict[str, list[dict]] = {}
    for run_data in data.get("runs", {}).values():
        if run_data["split"] == "test":
            tests.setdefault(run_data["method"], []).append(run_data["metrics"])
    lines = ["| method (dev-chosen setting) | test perplexity | token ECE | ROUGE-L | distinct-2 | repetition |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for method in METHODS:
        if method not in tests:
            continue
        c = chosen[method]
        cells = [fmt_mean_std(mean_std(m[k] for m in tests[method]), 3 if k == "ppl" else 4) for k in METRICS]
        lines.append(f"| {method} (lr {c['lr']:g}, gamma {c['gamma']:g}, floor {c['min_weight']:g}) | "
                     + " | ".join(cells) + " |")  # fmt: skip
    s = data.get("summary", {})
    pairs = []
    for ours, theirs in (("tvd", "ce"), ("tvd", "dft"), ("dft_floor", "dft")):
        if f"{ours}_minus_{theirs}_rougeL" in s:
            by_seed = {m: {r["seed"]: r["metrics"]["rougeL"] for r in data["runs"].values()
                           if r["split"] == "test" and r["method"] == m} for m in (ours, theirs)}  # fmt: skip
            pairs.append(f"- {ours} - {theirs}, ROUGE-L (paired by seed): {fmt_paired(paired(*by_seed.values()))}")
    return "\n".join(lines + (["", *pairs] if pairs else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-5, 1e-4, 2e-4],
                        help="learning rates each method chooses from on dev")  # fmt: skip
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    parser.add_argument("--floors", nargs="+", type=float, default=[0.0, 0.1, 0.2])
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--body_tokens", type=int, default=64)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                        help="bf16 autocast in training and scoring (default: float32 throughout)")  # fmt: skip
    parser.add_argument("--max_train", type=int, default=None, help="train articles used (default: all)")
    parser.add_argument("--max_dev", type=int, default=None)
    parser.add_argument("--max_test", type=int, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS / "tvd_generation.json")
    parser.add_argument("--table", action="store_true", help="print the docs page's table from --output and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.output.read_text())))
        return
    for name in ("max_steps", "batch_size", "eval_batch_size", "body_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(not 0 <= g <= 1 for g in args.gammas) or any(not 0 <= b <= 1 for b in args.floors):
        parser.error("--gammas and --floors must lie in [0, 1]")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    parts = splits()
    inputs: dict[str, Any] = {}
    for split, limit in (("train", args.max_train), ("dev", args.max_dev), ("test", args.max_test)):
        articles = parts[split] if limit is None else parts[split].select(range(min(limit, len(parts[split]))))
        inputs[split] = articles
        inputs[f"{split}_encoded"] = [encode(tokenizer, a, args.body_tokens) for a in tqdm(articles, desc=split)]
    inputs["train_rows"] = training_rows(inputs["train_encoded"])
    names = ("lrs", "gammas", "floors", "max_steps", "batch_size", "body_tokens", "bf16")
    config = {k: getattr(args, k) for k in names}
    config.update({f"n_{s}": len(inputs[s]) for s in ("train", "dev", "test")})
    data = load_results(args.output, protocol(
        selection_split=f"BBC dev articles ({len(inputs['dev'])}, a stratified 12.5% of train), ROUGE-L, seed 0",
        test_split=f"BBC test articles ({len(inputs['test'])}, the stratified 20% of bbc_news_train_test_split)",
        chosen={}, seeds=args.seeds, extra_libraries=["rouge-score"], config=config,
    ))  # fmt: skip
    if data.get("config", config) != config:
        raise SystemExit(f"{args.output} holds runs of another configuration ({data['config']}); pass --output.")
    data["config"] = config
    chosen = select(data, args.output, inputs, args)
    data["protocol"]["chosen"] = chosen
    for seed in args.seeds:
        for method in METHODS:
            run(data, args.output, method, chosen[method], seed, "test", inputs, args)
    save_results(args.output, data, summarize)
    print(table(data))


if __name__ == "__main__":
    main()
