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
import shutil
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from _model_card import MINILM_HUB_ID, base_model_text
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
# The bi-encoder's training defaults: the choice of benchmarks/cosent_sts.py's bi_sweep on STS-B dev (seed 0), a
# coordinate search over learning rate and batch size from batch 16 that settled at batch 4, lr 1e-5 (dev Spearman
# 0.8896; batch 4 is the ladder's lower end). tests/test_recipe_defaults.py checks them against the committed results.
BI_DEFAULTS = {"batch_size": 4, "learning_rate": 1e-5}
# The cross-encoder's: CrossEncoderCoSENTLoss's scale chosen on dev at 5e-5 (1 / 5 / 20 / 50), then its learning
# rate at that scale (2e-5 ... 5e-4: best 2e-4, dev 0.8596); BCE and MSE chose 2e-4 as well, at batch 32.
CROSS_DEFAULTS = {"batch_size": 32, "learning_rate": 2e-4, "scale": 20.0}
# Dev is evaluated (and a checkpoint saved) every fifth of the run: five dev passes of ~13 s on 2 cores instead of
# ten, which keeps `make quickstart` with its first install within 8 minutes. The committed sweep scored dev every
# tenth; the fifths are a subset of its points, and tests/test_recipe_defaults.py checks that choosing from those
# points alone makes every choice of the sweep and keeps every reported checkpoint. Not bit-identical runs: each
# evaluation's data loader draws one number from torch's RNG, so the schedule shifts the dropout masks like a new
# seed (the quickstart at seed 42: test 0.8472 with ten evaluations, 0.8486 with five).
EVAL_FRACTION = 0.2


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
    scale: float | None = field(default=None, metadata={"help": "CoSENT scale. Default: 20 (bi and cross)."})
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
    evaluate_test: bool = field(
        default=True,
        metadata={
            "help": "Report the test Spearman (before and after). Sweeps set it false: settings are chosen on dev "
            "and the test split is evaluated once per chosen setting."
        },
    )

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
    else:
        model = CrossEncoder(path, num_labels=1, max_length=args.max_seq_length)
    if args.model_name_or_path is None:  # the card's base model: the Hub id, not the embedded folder's path
        model.model_card_data.base_model = MINILM_HUB_ID
    return model


def build_loss(args: CoSENTRecipeArguments, model) -> torch.nn.Module:
    scale = args.scale if args.scale is not None else (20.0 if args.model_type == "bi" else CROSS_DEFAULTS["scale"])
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


def spearman_key(args: CoSENTRecipeArguments, name: str) -> str:
    """The evaluator's Spearman metric name (``sts-dev_spearman_cosine`` for a bi-encoder)."""
    return f"{name}_spearman_cosine" if args.model_type == "bi" else f"{name}_spearman"


def spearman(args: CoSENTRecipeArguments, metrics: dict[str, float], name: str) -> float:
    return float(metrics[spearman_key(args, name)])


def kept_dev_spearman(args: CoSENTRecipeArguments, trainer, dev_curve: list[dict], dev_evaluator) -> float:
    """Dev Spearman of the weights the run keeps: the last evaluation's when it scored exactly these weights (the
    final step was evaluated and it is the kept checkpoint, or no checkpoint is loaded back), else a new evaluation.
    Reusing it saves one dev pass (~13 s on 2 cores) and leaves the card's dev metrics those of the kept weights."""
    state, training_args = trainer.state, trainer.args
    if dev_curve and dev_curve[-1]["step"] == state.global_step:
        best = state.best_model_checkpoint
        kept_is_last = best is None or Path(best).name == f"checkpoint-{state.global_step}"
        if not training_args.load_best_model_at_end or kept_is_last:
            return float(dev_curve[-1]["dev_spearman"])
    return spearman(args, dev_evaluator(trainer.model), "sts-dev")


def render_card(args: CoSENTRecipeArguments, training_args, loss, results: dict, output_dir: Path) -> Path:
    """Put the recipe's summary (from `model_cards/cosent.md`) on top of sentence-transformers' own card, whose
    Metrics section and model-index hold the dev and test metrics after training, each once: the summary gives the
    test Spearman before training and the change, not the numbers listed there again."""
    before, after = results["test_spearman_before"], results["test_spearman"]
    listed = "the metrics after training, dev and test, are in Metrics below"
    if after is None:
        test_line = "not evaluated (`--evaluate_test false`); the dev metrics after training are in Metrics below"
    elif before is None:
        test_line = f"not evaluated before training ({listed})"
    else:
        test_line = f"{before:.4f} before training, {after - before:+.4f} from training ({listed})"
    card = string.Template(CARD_TEMPLATE.read_text()).substitute(
        model_type={"bi": "bi-encoder (SentenceTransformer)", "cross": "cross-encoder (CrossEncoder)"}[args.model_type],
        base_model=base_model_text(args.model_name_or_path, MINILM_HUB_ID),
        dataset=args.dataset_name or "STS Benchmark (embedded offline copy)",
        loss=type(loss).__name__,
        loss_config=json.dumps(loss.get_config_dict(), default=str),
        train_pairs=results["train_pairs"],
        epochs=training_args.num_train_epochs,
        batch_size=training_args.per_device_train_batch_size,
        learning_rate=training_args.learning_rate,
        seed=training_args.seed,
        test_line=test_line,
        checkpoint=results["checkpoint"],
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
    test_evaluator = build_evaluator(args, splits["test"], "sts-test") if args.evaluate_test else None
    before = None
    if test_evaluator is not None and args.evaluate_before_training:
        before = spearman(args, test_evaluator(model), "sts-test")
    # One dev evaluator object for the whole run (the card lists each evaluator's metrics once).
    dev_evaluator = build_evaluator(args, splits["validation"], "sts-dev")
    trainer_cls = SentenceTransformerTrainer if args.model_type == "bi" else CrossEncoderTrainer
    trainer = trainer_cls(
        model=model, args=training_args, train_dataset=splits["train"], loss=loss, evaluator=dev_evaluator
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    dev_curve = [
        {"step": entry["step"], "dev_spearman": entry[f"eval_{spearman_key(args, 'sts-dev')}"]}
        for entry in trainer.state.log_history
        if f"eval_{spearman_key(args, 'sts-dev')}" in entry
    ]
    best = trainer.state.best_model_checkpoint
    results = {
        "model_type": args.model_type,
        "loss": args.loss,
        "train_pairs": len(splits["train"]),
        "test_spearman_before": before,
        "dev_spearman": kept_dev_spearman(args, trainer, dev_curve, dev_evaluator),
        "test_spearman": spearman(args, test_evaluator(model), "sts-test") if test_evaluator is not None else None,
        "dev_curve": dev_curve,
        "checkpoint": f"best on dev ({Path(best).name})" if best and training_args.load_best_model_at_end else "last",
        "train_seconds": train_seconds,
        "command": " ".join(["recipes/train_cosent.py", *sys.argv[1:]]),
    }
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        model.save_pretrained(str(output_dir))
        for checkpoint in output_dir.glob("checkpoint-*"):  # the chosen weights are saved above
            shutil.rmtree(checkpoint, ignore_errors=True)
        render_card(args, training_args, loss, results, output_dir)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps({k: v for k, v in results.items() if k != "dev_curve"}, indent=2))
        if results["test_spearman"] is not None:
            before_text = f"{before:.4f} -> " if before is not None else ""
            gain = f" ({results['test_spearman'] - before:+.4f})" if before is not None else ""
            print(
                f"\nSTS test Spearman ({args.model_type}-encoder, {type(loss).__name__}): "
                f"{before_text}{results['test_spearman']:.4f}{gain}; model and card saved to {output_dir}"
            )
    trainer.accelerator.end_training()
    return results


def _given(argv: list[str], name: str) -> str | None:
    """The value of ``--name`` in ``argv`` (``--name value`` or ``--name=value``), None when absent."""
    for i, item in enumerate(argv):
        if item == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith(f"--{name}="):
            return item.split("=", 1)[1]
    return None


def parse_args(argv: list[str] | None = None):
    """Recipe arguments first; then the trainer's own arguments for the chosen model type.

    The training defaults were chosen on STS-B dev (``python benchmarks/cosent_sts.py --parts bi_sweep``; the sweep
    and the choice are in benchmarks/results/cosent_sts.json). Dev is evaluated every fifth of the run
    (`EVAL_FRACTION`) and the checkpoint with the best dev Spearman is the one kept; checkpoints follow the
    evaluation schedule unless ``--save_*`` is given.
    """
    recipe_parser = HfArgumentParser(CoSENTRecipeArguments)
    (args, rest) = recipe_parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    args_cls = SentenceTransformerTrainingArguments if args.model_type == "bi" else CrossEncoderTrainingArguments
    for name in ("strategy", "steps"):  # saving follows evaluation, so the best-on-dev checkpoint exists
        if _given(rest, f"eval_{name}") is not None and _given(rest, f"save_{name}") is None:
            rest = [*rest, f"--save_{name}", _given(rest, f"eval_{name}")]
    no_eval = _given(rest, "eval_strategy") == "no"
    parser = HfArgumentParser(args_cls)
    parser.set_defaults(
        output_dir=f"outputs/cosent-{args.model_type}",
        num_train_epochs=1,
        per_device_train_batch_size=(BI_DEFAULTS if args.model_type == "bi" else CROSS_DEFAULTS)["batch_size"],
        learning_rate=(BI_DEFAULTS if args.model_type == "bi" else CROSS_DEFAULTS)["learning_rate"],
        warmup_steps=0.1,  # a float is a fraction of the training steps (transformers >= 5)
        eval_strategy="steps",
        eval_steps=EVAL_FRACTION,  # a float is a fraction of the training steps
        save_strategy="no" if no_eval else "steps",
        save_steps=EVAL_FRACTION,
        save_only_model=True,
        save_total_limit=1,
        load_best_model_at_end=not no_eval,
        metric_for_best_model=spearman_key(args, "sts-dev"),
        greater_is_better=True,
        logging_steps=20,
        report_to="none",
        seed=42,
        dataloader_drop_last=False,
    )
    (training_args,) = parser.parse_args_into_dataclasses(args=rest)
    return args, training_args


if __name__ == "__main__":
    main(*parse_args())
