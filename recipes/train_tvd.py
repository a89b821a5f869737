"""Fine-tune with the TVD (TaiLr) loss: BBC News topic classification (optionally with noisy labels) or causal LM.

Launch (embedded offline models and data; saves the model, its card and results.json under outputs/tvd-*):

    accelerate launch --config_file "$(python -c 'import hf_ext; print(hf_ext.accelerate_config_path("cpu"))')" \\
        recipes/train_tvd.py --task classification --label_noise 0.4 --tvd_gamma 0.5 --tvd_min_weight 0.2

    accelerate launch recipes/train_tvd.py --task causal_lm --tvd_gamma 0.5 --max_steps 50  # SmolLM2 on BBC text
    accelerate launch recipes/train_tvd.py --task classification --trainer plain          # the stock Trainer

Classification: the embedded MiniLM with a fresh 5-way head on BBC News (title + body), a deterministic stratified
80/20 split; ``--label_noise`` flips that share of the *training* labels to another topic, uniformly (symmetric
noise); the test labels stay clean. Reports test accuracy, NLL and expected calibration error (15 bins).
Causal LM: the embedded SmolLM2 on BBC article text in blocks of ``--block_size`` tokens; reports held-out perplexity
and token-level ECE. Any Hub model id works with ``--model_name_or_path``; every `TVDConfig` field is a flag.
"""

from __future__ import annotations

import json
import math
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from _model_card import MINILM_HUB_ID, SMOLLM2_HUB_ID, base_model_id, base_model_text, transformers_card_metadata
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    set_seed,
)

from hf_ext import BBC_NEWS_LABELS, bbc_news_train_test_split, minilm_path, smollm2_path
from hf_ext.data import BucketPadCollator, bbc_classification_data, bbc_lm_data, default_buckets
from hf_ext.metrics import confidence_calibration, load_ece
from hf_ext.trainers import RecompileCounter, TVDConfig, TVDTrainer, compile_enabled

CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "tvd.md"
TASKS = ("classification", "causal_lm")


@dataclass
class TVDRecipeArguments:
    task: str = field(metadata={"help": f"One of {TASKS}."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or folder. Default: embedded MiniLM (classification) or SmolLM2."}
    )
    trainer: str = field(default="tvd", metadata={"help": "`tvd` (TVDTrainer) or `plain` (the stock Trainer)."})
    label_noise: float = field(default=0.0, metadata={"help": "Share of training labels flipped, in [0, 1)."})
    max_length: int = field(default=128, metadata={"help": "Classification: truncate title + body to this."})
    block_size: int = field(default=128, metadata={"help": "Causal LM: tokens per training / evaluation block."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N test examples."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the fixed 80/20 BBC News split."})
    validation_share: float = field(default=0.0, metadata={"help": (
        "Classification: hold out this share of the training examples (stratified by topic, the same articles for "
        "every seed; not trained on) and report metrics on them as `validation`, their labels as noisy as the "
        "rest: what a user has to choose gamma, floor or smoothing with. In [0, 0.5].")})  # fmt: skip
    evaluate_test: bool = field(default=True, metadata={"help": (
        "False: leave the test split alone (while choosing a setting on the validation slice); results and card "
        "then carry no test metrics. Needs --validation_share.")})  # fmt: skip

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {self.task!r}.")
        if self.trainer not in ("tvd", "plain"):
            raise ValueError(f"`trainer` must be 'tvd' or 'plain', got {self.trainer!r}.")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"`label_noise` must be in [0, 1), got {self.label_noise}.")
        if self.label_noise and self.task != "classification":
            raise ValueError("`label_noise` applies to --task classification only.")
        if isinstance(self.validation_share, bool) or not 0.0 <= self.validation_share <= 0.5:
            raise ValueError(f"`validation_share` must be a share in [0, 0.5], got {self.validation_share!r}.")
        if self.validation_share and self.task != "classification":
            raise ValueError("`validation_share` applies to --task classification only.")
        if not self.evaluate_test and not self.validation_share:
            raise ValueError("`evaluate_test=False` needs a `validation_share` > 0: nothing would be evaluated.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")


def flip_labels(labels: list[int], rate: float, num_classes: int, seed: int) -> list[int]:
    """Symmetric noise: each label, with probability ``rate``, becomes one of the other classes uniformly."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    flip = rng.random(len(labels_array)) < rate
    offsets = rng.integers(1, num_classes, size=len(labels_array))  # never the same class
    return np.where(flip, (labels_array + offsets) % num_classes, labels_array).tolist()


def stratified_holdout(labels: list[int], share: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, held out): ``round(share * count)`` of each label's examples held out, drawn with ``seed``;
    both lists in the original order."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    held = np.zeros(len(labels_array), dtype=bool)
    for label in np.unique(labels_array):
        members = np.flatnonzero(labels_array == label)
        held[rng.permutation(members)[: round(share * len(members))]] = True
    return np.flatnonzero(~held).tolist(), np.flatnonzero(held).tolist()


def classification_data(args: TVDRecipeArguments, tokenizer, seed: int):
    """(train, test), or (train, test, validation) with ``validation_share``: the validation examples are cut from
    the training ones after the label noise (seeded by ``seed``) and by ``split_seed``, so every seed and method
    holds out the same articles."""
    labels = list(bbc_news_train_test_split(test_size=0.2, seed=args.split_seed)["train"]["label"])
    labels = labels[: args.max_train_samples] if args.max_train_samples else labels  # the clean training labels
    noisy = flip_labels(labels, args.label_noise, len(BBC_NEWS_LABELS), seed) if args.label_noise else None
    train, test = bbc_classification_data(tokenizer, args.max_length, split_seed=args.split_seed,
                                          max_train_samples=args.max_train_samples,
                                          max_eval_samples=args.max_eval_samples, train_labels=noisy)  # fmt: skip
    if not args.validation_share:
        return train, test
    kept, held = stratified_holdout(labels, args.validation_share, args.split_seed)
    return train.select(kept), test, train.select(held)


def causal_lm_data(args: TVDRecipeArguments, tokenizer):
    return bbc_lm_data(tokenizer, args.block_size, split_seed=args.split_seed, max_train_blocks=args.max_train_samples,
                       max_eval_blocks=args.max_eval_samples)  # fmt: skip


@torch.no_grad()
def evaluate_classification(model, data: datasets.Dataset, collator, batch_size: int = 32) -> dict:
    model.eval()
    probs, labels = [], []
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        batch = collator(rows)
        labels.extend(batch.pop("labels").tolist())
        batch = {k: v.to(model.device) for k, v in batch.items()}
        probs.append(torch.softmax(model(**batch).logits.float(), dim=-1).cpu())
    probabilities = torch.cat(probs)
    targets = torch.tensor(labels)
    ece = load_ece().compute(predictions=probabilities.tolist(), references=labels)
    return {
        "accuracy": float((probabilities.argmax(-1) == targets).float().mean()),
        "nll": float(-probabilities[torch.arange(len(targets)), targets].clamp_min(1e-45).log().mean()),
        "ece": ece["expected_calibration_error"],
        "reliability": ece["bins"],
    }


@torch.no_grad()
def evaluate_causal_lm(model, data: datasets.Dataset, batch_size: int = 8) -> dict:
    model.eval()
    nll_sum, tokens, confidences, correct = 0.0, 0, [], []
    for start in range(0, len(data), batch_size):
        ids = torch.tensor(data["input_ids"][start : start + batch_size], device=model.device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        logp = torch.log_softmax(logits, dim=-1)
        nll_sum += float(-logp.gather(-1, targets[..., None]).sum())
        tokens += targets.numel()
        top_logp, top = logp.max(dim=-1)
        confidences.append(top_logp.exp().flatten().cpu())
        correct.append((top == targets).flatten().cpu())
    ece, bins = confidence_calibration(torch.cat(confidences).numpy(), torch.cat(correct).numpy())
    return {"perplexity": math.exp(nll_sum / tokens), "token_ece": ece, "tokens": tokens, "reliability": bins}


def render_card(args: TVDRecipeArguments, config: TVDConfig, results: dict, output_dir: Path) -> None:
    """`model_cards/tvd.md` with the Hub metadata on top: the base model (the embedded default's Hub id, or the id
    given) and each test metric once, in the model-index and in the text's table."""
    metrics = {k: v for k, v in results["test"].items() if k not in ("reliability", "tokens")}
    embedded = MINILM_HUB_ID if args.task == "classification" else SMOLLM2_HUB_ID
    metadata = transformers_card_metadata(
        base_model=base_model_id(args.model_name_or_path, embedded), model_name=output_dir.name, task=args.task,
        tags=["tvd", "tailr"], dataset_name="BBC News (embedded offline copy)", metrics=metrics,
    )  # fmt: skip
    card = string.Template(CARD_TEMPLATE.read_text()).substitute(
        metadata=metadata,
        task=args.task,
        base_model=base_model_text(args.model_name_or_path, embedded),
        trainer="TVDTrainer" if args.trainer == "tvd" else "Trainer (cross-entropy)",
        gamma=config.tvd_gamma if args.trainer == "tvd" else "n/a",
        min_weight=config.tvd_min_weight if args.trainer == "tvd" else "n/a",
        schedule=config.tvd_gamma_schedule,
        label_noise=args.label_noise,
        label_smoothing=config.label_smoothing_factor,
        held_out=f"; test metrics on {results['test']['tokens']} held-out tokens" if args.task == "causal_lm" else "",
        metrics="\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()),
        command=results["command"],
    )
    (output_dir / "README.md").write_text(card)


def main(args: TVDRecipeArguments, config: TVDConfig) -> dict:
    set_seed(config.seed)
    if args.task == "classification":
        path = args.model_name_or_path or str(minilm_path())
        tokenizer = AutoTokenizer.from_pretrained(path)
        labels = list(BBC_NEWS_LABELS)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
        )
        train, test, *validation = classification_data(args, tokenizer, config.seed)
        collator = DataCollatorWithPadding(tokenizer)
    else:
        path = args.model_name_or_path or str(smollm2_path())
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        (train, test), validation = causal_lm_data(args, tokenizer), []
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    callbacks = []
    if compile_enabled(config):  # static shapes for torch.compile: pad every batch to one of 3 lengths
        length = args.max_length if args.task == "classification" else args.block_size
        collator = BucketPadCollator(collator, default_buckets(length))
        callbacks.append(RecompileCounter())
    trainer_cls = TVDTrainer if args.trainer == "tvd" else Trainer
    trainer = trainer_cls(model=model, args=config, train_dataset=train, data_collator=collator, callbacks=callbacks)
    train_output = trainer.train()
    if not args.evaluate_test:
        test_metrics = {}
    elif args.task == "classification":
        test_metrics = evaluate_classification(model, test, collator)
    else:
        test_metrics = evaluate_causal_lm(model, test)
    held_out = {}
    if validation:
        held_out = {"validation": evaluate_classification(model, validation[0], collator),
                    "validation_examples": len(validation[0])}  # fmt: skip
    results = {
        "task": args.task,
        "trainer": args.trainer,
        "tvd_gamma": config.tvd_gamma if args.trainer == "tvd" else None,
        "tvd_min_weight": config.tvd_min_weight if args.trainer == "tvd" else None,
        "label_noise": args.label_noise,
        "label_smoothing": config.label_smoothing_factor,
        "seed": config.seed,
        "train_examples": len(train),
        "train_seconds": train_output.metrics.get("train_runtime"),
        "compiled_graphs": callbacks[0].count if callbacks else None,
        "test": test_metrics,
        **held_out,
        "command": " ".join(["recipes/train_tvd.py", *sys.argv[1:]]),
    }
    if trainer.is_world_process_zero():
        output_dir = Path(config.output_dir)
        trainer.save_model(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
        render_card(args, config, results, output_dir)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        summary = {k: round(v, 4) for k, v in test_metrics.items() if isinstance(v, float)}
        print(
            f"\n{args.task} ({results['trainer']}, gamma={results['tvd_gamma']}): test {summary}; saved to {output_dir}"
        )
    trainer.accelerator.end_training()
    return results


def parse_args(argv: list[str] | None = None) -> tuple[TVDRecipeArguments, TVDConfig]:
    parser = HfArgumentParser((TVDRecipeArguments, TVDConfig))
    parser.set_defaults(
        output_dir="outputs/tvd",
        num_train_epochs=2,
        per_device_train_batch_size=16,
        learning_rate=5e-5,
        warmup_steps=0.1,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    args, config = parser.parse_args_into_dataclasses(args=argv)
    return args, config


if __name__ == "__main__":
    main(*parse_args())
