"""Train a bi-encoder (SentenceTransformer) or a cross-encoder (CrossEncoder) with CoSENT on STS data.

Launch (embedded offline MiniLM and STS Benchmark; evaluates on dev during training and on test at the end,
saves the model and its card under outputs/cosent-bi):

    accelerate launch --config_file "$(python -c 'import hf_ext; print(hf_ext.accelerate_config_path("cpu"))')" \\
        recipes/train_cosent.py --model_type bi

    accelerate launch recipes/train_cosent.py --model_type cross            # MiniLM + a fresh 1-logit head
    accelerate launch recipes/train_cosent.py --model_type bi \\
        --model_name_or_path sentence-transformers/all-mpnet-base-v2 \\
        --dataset_name sentence-transformers/stsb --label_column score      # any Hub model / data set
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/train_cosent.py \\
        --model_type bi --gather_across_devices true                        # 2 processes, global-batch ranking

`--loss` also trains the peers the benchmark compares against (sentence-transformers' own losses), with the
same data, initialisation and hyper-parameters.
"""

from __future__ import annotations

import json
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from sentence_transformers import (
    CrossEncoder,
    CrossEncoderTrainer,
    CrossEncoderTrainingArguments,
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.cross_encoder import losses as ce_losses
from sentence_transformers.cross_encoder.evaluation import CrossEncoderCorrelationEvaluator
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
from transformers import HfArgumentParser, set_seed

from hf_ext import CachedCoSENTLoss, CoSENTLoss, CrossEncoderCoSENTLoss, load_stsb, minilm_path
from hf_ext.data import bucket_sentence_transformer, default_buckets
from hf_ext.trainers import compile_enabled

CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "cosent.md"
BI_LOSSES = ("cosent", "cached_cosent", "st_cosent", "st_angle", "st_cosine")
CROSS_LOSSES = ("cosent", "st_bce", "st_mse")


@dataclass
class CoSENTRecipeArguments:
    model_type: str = field(metadata={"help": "`bi` (SentenceTransformer) or `cross` (CrossEncoder)."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or folder to start from. Default: the embedded all-MiniLM-L6-v2."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub data set id with train/validation/test splits. Default: the embedded STS-B."},
    )
    sentence1_column: str = field(default="sentence1", metadata={"help": "First text column."})
    sentence2_column: str = field(default="sentence2", metadata={"help": "Second text column."})
    label_column: str = field(
        default="label", metadata={"help": "Gold similarity column (the embedded STS-B's `label` is score / 5)."}
    )
    loss: str = field(
        default="cosent",
        metadata={"help": f"bi: one of {BI_LOSSES}; cross: one of {CROSS_LOSSES}. `st_*` are the peers."},
    )
    scale: float | None = field(default=None, metadata={"help": "CoSENT scale. Default: 20 (bi), 1 (cross)."})
    gather_across_devices: bool = field(
        default=False, metadata={"help": "Rank the pairs of every process together (hf_ext losses only)."}
    )
    mini_batch_size: int = field(default=32, metadata={"help": "Mini-batch size of `cached_cosent`."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N dev/test pairs only (quick checks)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    evaluate_before_training: bool = field(default=True, metadata={"help": "Also report test Spearman before."})

    def __post_init__(self) -> None:
        if self.model_type not in ("bi", "cross"):
            raise ValueError(f"`model_type` must be 'bi' or 'cross', got {self.model_type!r}.")
        choices = BI_LOSSES if self.model_type == "bi" else CROSS_LOSSES
        if self.loss not in choices:
            raise ValueError(f"`loss` must be one of {choices} for model_type={self.model_type!r}, got {self.loss!r}.")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"`scale` must be > 0, got {self.scale}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"`{name}` must be >= 2, got {value}.")


def load_splits(args: CoSENTRecipeArguments) -> dict[str, datasets.Dataset]:
    """train / validation / test with exactly (sentence1, sentence2, label) columns, in that order."""
    if args.dataset_name is None:
        raw = {split: load_stsb(split) for split in ("train", "validation", "test")}
    else:
        loaded = datasets.load_dataset(args.dataset_name)
        missing = {"train", "validation", "test"} - set(loaded)
        if missing:
            raise ValueError(f"`dataset_name` {args.dataset_name!r} lacks the splits {sorted(missing)}.")
        raw = dict(loaded)
    columns = [args.sentence1_column, args.sentence2_column, args.label_column]
    splits = {}
    for name, data in raw.items():
        absent = [c for c in columns if c not in data.column_names]
        if absent:
            raise ValueError(f"split {name!r} has no column(s) {absent}; it has {data.column_names}.")
        renames = dict(zip(columns, ["sentence1", "sentence2", "label"], strict=True))
        data = data.select_columns(columns).rename_columns(renames)
        splits[name] = data.cast_column("label", datasets.Value("float32"))
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_eval_samples}
    for name, limit in limits.items():
        if limit is not None:
            splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
    return splits


def build_model(args: CoSENTRecipeArguments) -> SentenceTransformer | CrossEncoder:
    path = args.model_name_or_path or str(minilm_path())
    if args.model_type == "bi":
        model = SentenceTransformer(path)
        model.max_seq_length = args.max_seq_length
        return model
    return CrossEncoder(path, num_labels=1, max_length=args.max_seq_length)


def build_loss(args: CoSENTRecipeArguments, model) -> torch.nn.Module:
    scale = args.scale if args.scale is not None else (20.0 if args.model_type == "bi" else 1.0)
    hf_kwargs = {"scale": scale, "gather_across_devices": args.gather_across_devices}
    factories = {
        "bi": {
            "cosent": lambda: CoSENTLoss(model, **hf_kwargs),
            "cached_cosent": lambda: CachedCoSENTLoss(model, mini_batch_size=args.mini_batch_size, **hf_kwargs),
            "st_cosent": lambda: st_losses.CoSENTLoss(model, scale=scale),
            "st_angle": lambda: st_losses.AnglELoss(model, scale=scale),
            "st_cosine": lambda: st_losses.CosineSimilarityLoss(model),
        },
        "cross": {
            "cosent": lambda: CrossEncoderCoSENTLoss(model, **hf_kwargs),
            "st_bce": lambda: ce_losses.BinaryCrossEntropyLoss(model),
            "st_mse": lambda: ce_losses.MSELoss(model, activation_fn=torch.nn.Sigmoid()),
        },
    }
    return factories[args.model_type][args.loss]()


def build_evaluator(args: CoSENTRecipeArguments, data: datasets.Dataset, name: str):
    if args.model_type == "bi":
        return EmbeddingSimilarityEvaluator(
            data["sentence1"], data["sentence2"], data["label"], name=name, batch_size=64
        )
    pairs = list(zip(data["sentence1"], data["sentence2"], strict=True))
    return CrossEncoderCorrelationEvaluator(pairs, data["label"], name=name, batch_size=64)


def spearman(args: CoSENTRecipeArguments, metrics: dict[str, float], name: str) -> float:
    key = f"{name}_spearman_cosine" if args.model_type == "bi" else f"{name}_spearman"
    return float(metrics[key])


def render_card(args: CoSENTRecipeArguments, training_args, loss, results: dict, output_dir: Path) -> Path:
    """Put the measured results (from `model_cards/cosent.md`) on top of sentence-transformers' own card."""
    card = string.Template(CARD_TEMPLATE.read_text()).substitute(
        model_type={"bi": "bi-encoder (SentenceTransformer)", "cross": "cross-encoder (CrossEncoder)"}[args.model_type],
        base_model=args.model_name_or_path or "sentence-transformers/all-MiniLM-L6-v2 (embedded offline copy)",
        dataset=args.dataset_name or "STS Benchmark (embedded offline copy)",
        loss=type(loss).__name__,
        loss_config=json.dumps(loss.get_config_dict(), default=str),
        train_pairs=results["train_pairs"],
        epochs=training_args.num_train_epochs,
        batch_size=training_args.per_device_train_batch_size,
        learning_rate=training_args.learning_rate,
        seed=training_args.seed,
        test_before=f"{results['test_spearman_before']:.4f}" if results["test_spearman_before"] is not None else "n/a",
        dev_after=f"{results['dev_spearman']:.4f}",
        test_after=f"{results['test_spearman']:.4f}",
        train_seconds=f"{results['train_seconds']:.0f}",
        command=results["command"],
    )
    readme = output_dir / "README.md"
    upstream = readme.read_text() if readme.is_file() else ""
    if upstream.startswith("---\n"):  # keep the Hub metadata block first, then our results, then upstream's card
        end = upstream.index("\n---\n", 4) + len("\n---\n")
        text = upstream[:end] + "\n" + card + "\n" + upstream[end:]
    else:
        text = card + "\n" + upstream
    readme.write_text(text)
    return readme


def main(args: CoSENTRecipeArguments, training_args) -> dict:
    set_seed(training_args.seed)  # the same seed gives the same initialisation (the cross-encoder's fresh head)
    splits = load_splits(args)
    model = build_model(args)
    if compile_enabled(training_args):  # static shapes for torch.compile: pad every batch to one of 3 lengths
        bucket_sentence_transformer(model, default_buckets(args.max_seq_length))
    loss = build_loss(args, model)
    test_evaluator = build_evaluator(args, splits["test"], "sts-test")
    before = spearman(args, test_evaluator(model), "sts-test") if args.evaluate_before_training else None
    trainer_cls = SentenceTransformerTrainer if args.model_type == "bi" else CrossEncoderTrainer
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        loss=loss,
        evaluator=build_evaluator(args, splits["validation"], "sts-dev"),
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    results = {
        "model_type": args.model_type,
        "loss": args.loss,
        "train_pairs": len(splits["train"]),
        "test_spearman_before": before,
        "dev_spearman": spearman(args, build_evaluator(args, splits["validation"], "sts-dev")(model), "sts-dev"),
        "test_spearman": spearman(args, test_evaluator(model), "sts-test"),
        "train_seconds": train_seconds,
        "command": " ".join(["recipes/train_cosent.py", *sys.argv[1:]]),
    }
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        model.save_pretrained(str(output_dir))
        render_card(args, training_args, loss, results, output_dir)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        before_text = f"{before:.4f} -> " if before is not None else ""
        print(
            f"\nSTS test Spearman ({args.model_type}-encoder, {type(loss).__name__}): "
            f"{before_text}{results['test_spearman']:.4f}; model and card saved to {output_dir}"
        )
    trainer.accelerator.end_training()
    return results


def parse_args(argv: list[str] | None = None):
    """Recipe arguments first; then the trainer's own arguments for the chosen model type."""
    recipe_parser = HfArgumentParser(CoSENTRecipeArguments)
    (args, rest) = recipe_parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    args_cls = SentenceTransformerTrainingArguments if args.model_type == "bi" else CrossEncoderTrainingArguments
    parser = HfArgumentParser(args_cls)
    parser.set_defaults(
        output_dir=f"outputs/cosent-{args.model_type}",
        num_train_epochs=1,
        per_device_train_batch_size=32,
        learning_rate=2e-5 if args.model_type == "bi" else 5e-5,
        warmup_steps=0.1,  # a float is a fraction of the training steps (transformers >= 5)
        eval_strategy="steps",
        eval_steps=60,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        seed=42,
        dataloader_drop_last=False,
    )
    (training_args,) = parser.parse_args_into_dataclasses(args=rest)
    return args, training_args


if __name__ == "__main__":
    main(*parse_args())
