"""Full-weight fine-tuning with ProjectedAdamW (LoRA-sized optimizer state): causal LM or BBC classification.

Launch (embedded offline models and data; saves the model, its card and results.json under --output_dir):

    accelerate launch --config_file "$(python -c 'import hf_ext; print(hf_ext.accelerate_config_path("cpu"))')" \\
        recipes/train_projected.py --task causal_lm --rank 64 --max_steps 100

    accelerate launch recipes/train_projected.py --task classification --rank 16 --projection svd
    accelerate launch recipes/train_projected.py --task causal_lm --optimizer adamw   # the torch.optim.AdamW baseline

Causal LM: the embedded SmolLM2 on BBC article text in blocks of ``--block_size`` tokens; reports held-out loss
and perplexity. Classification: the embedded MiniLM with a fresh 5-way head on BBC News; reports test accuracy.
Any Hub model id works with ``--model_name_or_path``; every `TrainingArguments` field is a flag.
"""

from __future__ import annotations

import json
import math
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

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
    TrainingArguments,
    set_seed,
)

from hf_ext import BBC_NEWS_LABELS, minilm_path, smollm2_path
from hf_ext.data import BucketPadCollator, bbc_classification_data, bbc_lm_data, default_buckets
from hf_ext.optim import create_projected_optimizer, optimizer_state_bytes, projected_parameter_names
from hf_ext.trainers import RecompileCounter, compile_enabled

CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "projected.md"
TASKS = ("causal_lm", "classification")


@dataclass
class ProjectedRecipeArguments:
    task: str = field(default="causal_lm", metadata={"help": f"One of {TASKS}."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or folder. Default: embedded SmolLM2 (causal_lm) or MiniLM."}
    )
    optimizer: str = field(default="projected", metadata={"help": "`projected` (ProjectedAdamW) or `adamw`."})
    rank: int = field(default=64, metadata={"help": "Projection rank of the target weights."})
    projection: str = field(default="random", metadata={"help": "`random` or `svd` bases."})
    update_interval: int = field(default=200, metadata={"help": "Steps between basis changes."})
    projection_scale: float = field(default=1.0, metadata={"help": "Scale of the projected update."})
    target_modules: str = field(
        default="all-linear", metadata={"help": "`all-linear`, a regex, or comma-separated module names."}
    )
    block_size: int = field(default=128, metadata={"help": "Causal LM: tokens per block."})
    max_length: int = field(default=128, metadata={"help": "Classification: truncate title + body to this."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N test examples."})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {self.task!r}.")
        if self.optimizer not in ("projected", "adamw"):
            raise ValueError(f"`optimizer` must be 'projected' or 'adamw', got {self.optimizer!r}.")
        if self.rank < 1:
            raise ValueError(f"`rank` must be >= 1, got {self.rank}.")

    def targets(self) -> str | list[str]:
        if self.target_modules == "all-linear" or "," not in self.target_modules:
            return self.target_modules
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


def build_model(args: ProjectedRecipeArguments):
    if args.task == "causal_lm":
        path = args.model_name_or_path or str(smollm2_path())
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    path = args.model_name_or_path or str(minilm_path())
    labels = list(BBC_NEWS_LABELS)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def accuracy(model, data, collator, batch_size: int = 32) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = collator([data[i] for i in range(start, min(start + batch_size, len(data)))])
        labels = batch.pop("labels")
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
        correct += int((logits.argmax(-1).cpu() == labels).sum())
    return correct / len(data)


def render_card(args: ProjectedRecipeArguments, results: dict, output_dir: Path) -> None:
    """`model_cards/projected.md` with the Hub metadata on top: the base model (the embedded default's Hub id, or the
    id given) and each test metric once, in the model-index and in the text's table."""
    metrics = results["test"]
    embedded = SMOLLM2_HUB_ID if args.task == "causal_lm" else MINILM_HUB_ID
    metadata = transformers_card_metadata(
        base_model=base_model_id(args.model_name_or_path, embedded), model_name=output_dir.name, task=args.task,
        tags=["projected-adamw" if args.optimizer == "projected" else "adamw"],
        dataset_name="BBC News (embedded offline copy)", metrics=metrics,
    )  # fmt: skip
    card = string.Template(CARD_TEMPLATE.read_text()).substitute(
        metadata=metadata, task=args.task, base_model=base_model_text(args.model_name_or_path, embedded),
        target_modules=args.target_modules if args.optimizer == "projected" else "no (plain AdamW)",
        rank=args.rank, projection=args.projection, update_interval=args.update_interval,
        scale=args.projection_scale, state_mib=f"{results['optimizer_state_bytes'] / 2**20:.1f}",
        adamw_state_mib=f"{results['adamw_state_bytes_estimate'] / 2**20:.1f}",
        metrics="\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()),
        command=results["command"],
    )  # fmt: skip
    (output_dir / "README.md").write_text(card)


def main(args: ProjectedRecipeArguments, training_args: TrainingArguments) -> dict:
    set_seed(training_args.seed)
    model, tokenizer = build_model(args)
    if args.task == "causal_lm":
        train, test = bbc_lm_data(tokenizer, args.block_size, max_train_blocks=args.max_train_samples,
                                  max_eval_blocks=args.max_eval_samples)  # fmt: skip
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:
        train, test = bbc_classification_data(tokenizer, args.max_length, max_train_samples=args.max_train_samples,
                                              max_eval_samples=args.max_eval_samples)  # fmt: skip
        collator = DataCollatorWithPadding(tokenizer)
    callbacks = []
    if compile_enabled(training_args):  # static shapes for torch.compile: pad every batch to one of 3 lengths
        length = args.block_size if args.task == "causal_lm" else args.max_length
        collator = BucketPadCollator(collator, default_buckets(length))
        callbacks.append(RecompileCounter())
    targets = args.targets()
    if args.optimizer == "projected":
        optimizer = create_projected_optimizer(
            model, target_modules=targets, rank=args.rank, lr=training_args.learning_rate,
            weight_decay=training_args.weight_decay, projection=args.projection,
            update_interval=args.update_interval, scale=args.projection_scale,
            betas=(training_args.adam_beta1, training_args.adam_beta2), eps=training_args.adam_epsilon,
        )  # fmt: skip
        trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                          data_collator=collator, optimizers=(optimizer, None), callbacks=callbacks)  # fmt: skip
    else:
        trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                          data_collator=collator, callbacks=callbacks)  # fmt: skip
    train_output = trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    projected = set(projected_parameter_names(model, targets))
    adamw_bytes = sum(2 * 4 * p.numel() for n, p in model.named_parameters() if p.requires_grad)
    if args.task == "causal_lm":
        eval_loss = trainer.evaluate()["eval_loss"]
        test_metrics = {"eval_loss": eval_loss, "perplexity": math.exp(eval_loss)}
    else:
        test_metrics = {"accuracy": accuracy(model, test, collator)}
    results = {
        "task": args.task,
        "optimizer": args.optimizer,
        "rank": args.rank if args.optimizer == "projected" else None,
        "projection": args.projection if args.optimizer == "projected" else None,
        "projected_weights": len(projected) if args.optimizer == "projected" else 0,
        "optimizer_state_bytes": optimizer_state_bytes(inner),
        "adamw_state_bytes_estimate": adamw_bytes,
        "train_examples": len(train),
        "train_seconds": train_output.metrics.get("train_runtime"),
        "train_loss": train_output.training_loss,
        "test": test_metrics,
        "command": " ".join(["recipes/train_projected.py", *sys.argv[1:]]),
    }
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        trainer.save_model(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
        render_card(args, results, output_dir)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        print(f"\n{args.task} ({args.optimizer}): test {test_metrics}; optimizer state "
              f"{results['optimizer_state_bytes'] / 2**20:.1f} MiB; saved to {output_dir}")  # fmt: skip
    trainer.accelerator.end_training()
    return results


def parse_args(argv: list[str] | None = None) -> tuple[ProjectedRecipeArguments, TrainingArguments]:
    parser = HfArgumentParser((ProjectedRecipeArguments, TrainingArguments))
    parser.set_defaults(output_dir="outputs/projected", max_steps=100, per_device_train_batch_size=8,
                        learning_rate=1e-4, warmup_steps=0.1, logging_steps=10, save_strategy="no",
                        report_to="none", seed=42)  # fmt: skip
    return parser.parse_args_into_dataclasses(args=argv)


if __name__ == "__main__":
    main(*parse_args())
