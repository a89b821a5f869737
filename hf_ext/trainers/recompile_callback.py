"""RecompileCounter: a `TrainerCallback` that counts torch.compile (re)compilations and says when shapes run wild."""

from __future__ import annotations

import os
import warnings

from transformers import TrainerCallback


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_enabled(args) -> bool:
    """Whether the run compiles the model: ``TrainingArguments.torch_compile`` or an accelerate dynamo config."""
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower()
    return bool(getattr(args, "torch_compile", False)) or backend not in ("", "no")


def _collator_of(dataloader):
    collate = getattr(dataloader, "collate_fn", None)
    return getattr(collate, "data_collator", collate)  # Trainer wraps collators in RemoveColumnsCollator


class RecompileCounter(TrainerCallback):
    """Count compilations during training; warn once when they exceed the expected number of shapes.

    With compile on and a collator that is not a `BucketPadCollator`, it warns once at the start of training with
    the fix. Evaluation (another mode) and a last, smaller batch add graphs too: pass ``expected`` to allow for
    them. The count is kept in ``self.count`` and added to each ``state.log_history`` entry as
    ``compiled_graphs``.

    Args:
        expected (`int`, *optional*): the number of shapes the run should see (the bucket count); defaults to the
            training collator's bucket count, or 1.

    Example:

    ```python
    >>> from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
    >>> from transformers import Trainer, TrainingArguments
    >>> from hf_ext import minilm_path
    >>> from hf_ext.data import BucketPadCollator, bbc_classification_data
    >>> from hf_ext.trainers import RecompileCounter
    >>> tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    >>> model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5)
    >>> train, _ = bbc_classification_data(tokenizer, max_length=64, max_train_samples=8)
    >>> collator = BucketPadCollator(DataCollatorWithPadding(tokenizer), (32, 64))
    >>> counter = RecompileCounter()
    >>> # torch_compile=True is what it watches; compiling is left out here (a minute on CPU)
    >>> args = TrainingArguments(output_dir="outputs/buckets", max_steps=1, per_device_train_batch_size=8,
    ...                          logging_strategy="no", save_strategy="no", report_to="none")
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[counter])
    >>> trainer.train().global_step  # it prints the run's summary
    {'train_runtime': ...}
    1
    >>> counter.expected, counter.count  # one graph per bucket expected; none built without compile
    (2, 0)

    ```
    """

    def __init__(self, expected: int | None = None) -> None:
        if expected is not None and expected < 1:
            raise ValueError(f"`expected` must be >= 1, got {expected}.")
        self.expected = expected
        self.count = 0
        self._start = 0
        self._warned = False

    def on_train_begin(self, args, state, control, train_dataloader=None, model=None, **kwargs):
        self._start = compiled_graphs()
        self._warned = False
        collator = _collator_of(train_dataloader) if train_dataloader is not None else None
        # sentence-transformers models pad inside the model (hf_ext.data.bucket_sentence_transformer)
        buckets = getattr(collator, "buckets", None) or getattr(model, "length_buckets", None)
        if self.expected is None:
            self.expected = len(buckets) if buckets else 1
        if compile_enabled(args) and train_dataloader is not None and not buckets:
            warnings.warn(
                "torch.compile is on but batches are not padded to length buckets: every new sequence length "
                "recompiles the model. Wrap the collator: `BucketPadCollator(collator, default_buckets(max_length))` "
                "(hf_ext.data).",
                stacklevel=2,
            )

    def on_step_end(self, args, state, control, **kwargs):
        self.count = compiled_graphs() - self._start
        if self.count > self.expected and not self._warned:
            self._warned = True
            warnings.warn(
                f"torch.compile built {self.count} graphs, more than the {self.expected} shapes expected: batch "
                "shapes vary. Pad to a few fixed lengths with hf_ext.data.BucketPadCollator.",
                stacklevel=2,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.log_history:  # Trainer has stored a copy of ``logs`` already: annotate the stored entry
            state.log_history[-1]["compiled_graphs"] = self.count
