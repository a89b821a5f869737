"""Length buckets: pad every batch to one of a few fixed lengths, so a compiled model sees at most that many shapes.

`torch.compile` with static shapes specialises on the sequence length: free-length batches recompile at every new
length (throughput falls to a few percent of the fixed-shape one), while rounding lengths up to a handful of
buckets costs only the extra padding.

- `BucketPadCollator(collator, buckets)`: wraps any transformers collator (``DataCollatorWithPadding``,
  ``DataCollatorForLanguageModeling``, ...) and pads its output's sequence dimension to the smallest bucket;
- `pad_to_bucket(batch, buckets, pad_token_id)`: the same on an already padded batch (dict of tensors);
- `bucket_sentence_transformer(model, buckets)`: sentence-transformers tokenises inside the model
  (``model.preprocess``), so the buckets go there: every feature batch it builds is padded to a bucket;
- `default_buckets(max_length)`: three buckets, max_length / 4, / 2 and max_length (rounded to multiples of 8).

Example:

```python
>>> from transformers import AutoTokenizer, DataCollatorWithPadding
>>> from hf_ext import minilm_path
>>> from hf_ext.data import BucketPadCollator
>>> tokenizer = AutoTokenizer.from_pretrained(minilm_path())
>>> collator = BucketPadCollator(DataCollatorWithPadding(tokenizer), buckets=(32, 64, 128))
>>> batch = collator([tokenizer("a short one"), tokenizer("and a slightly longer sentence")])
>>> batch["input_ids"].shape
torch.Size([2, 32])

```
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

# Padding values per key; any other 2-D tensor of the batch's sequence length is padded with 0.
PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "labels": -100, "special_tokens_mask": 1}


def default_buckets(max_length: int, count: int = 3) -> tuple[int, ...]:
    """``count`` buckets: ``max_length`` and ``max_length / 2, / 4, ...`` rounded down to multiples of 8."""
    if max_length < 8 or count < 1:
        raise ValueError(f"`max_length` must be >= 8 and `count` >= 1, got {max_length} and {count}.")
    buckets = {max_length} | {max(8, (max_length >> shift) // 8 * 8) for shift in range(1, count)}
    return tuple(sorted(buckets))


def _check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence) or not buckets:
        raise ValueError(f"`buckets` must be a non-empty list of positive lengths, got {buckets!r}.")
    if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in buckets):
        raise ValueError(f"`buckets` must hold positive integers, got {list(buckets)}.")
    return tuple(sorted(set(buckets)))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``; a longer sequence is an error (never silently truncated)."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(
        f"A batch has sequences of {length} tokens, longer than the largest bucket ({buckets[-1]}): truncate to "
        f"at most {buckets[-1]} tokens (tokenizer `max_length`) or add a larger bucket to `buckets`."
    )


def pad_to_bucket(batch: dict[str, Any], buckets: Sequence[int], pad_token_id: int, side: str = "right") -> dict:
    """Pad every ``(batch, seq)`` tensor of ``batch`` (those of ``input_ids``' length) to the bucket of that length.

    ``input_ids`` get ``pad_token_id``, ``labels`` -100, masks 0 (see `PAD_VALUES`); other keys (e.g. multi-label
    targets that happen to have the same width) are left alone. ``side`` is the tokenizer's padding side.
    """
    buckets = _check_buckets(buckets)
    if side not in ("left", "right"):
        raise ValueError(f"`side` must be 'left' or 'right', got {side!r}.")
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("`batch` must hold `input_ids` as a (batch, seq) tensor to be padded to a bucket.")
    length = input_ids.shape[1]
    extra = bucket_for(length, buckets) - length
    if extra == 0:
        return batch
    padded = copy.copy(batch)  # keeps a BatchEncoding a BatchEncoding
    for key, value in batch.items():
        sequence_key = key in ("input_ids", "position_ids") or key in PAD_VALUES or key.endswith("_mask")
        if not sequence_key or not isinstance(value, Tensor) or value.dim() != 2 or value.shape[1] != length:
            continue
        fill = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
        pad = torch.full((value.shape[0], extra), fill, dtype=value.dtype, device=value.device)
        padded[key] = torch.cat([value, pad] if side == "right" else [pad, value], dim=1)
    return padded


class BucketPadCollator:
    """Wrap a collator so that every batch's sequence length is one of ``buckets``.

    Args:
        collator (callable): the collator to wrap; it must expose ``tokenizer`` (transformers collators do) unless
            ``pad_token_id`` is given.
        buckets (`Sequence[int]`): the allowed lengths (e.g. `default_buckets(max_length)`).
        pad_token_id (`int`, *optional*): defaults to the wrapped collator's ``tokenizer.pad_token_id``.
    """

    def __init__(self, collator: Callable, buckets: Sequence[int], pad_token_id: int | None = None) -> None:
        self.collator = collator
        self.buckets = _check_buckets(buckets)
        tokenizer = getattr(collator, "tokenizer", None)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            raise ValueError("Pass `pad_token_id`: the collator has no tokenizer with a pad token.")
        self.pad_token_id = int(pad_token_id)
        self.side = getattr(tokenizer, "padding_side", "right")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return pad_to_bucket(self.collator(features), self.buckets, self.pad_token_id, self.side)


def bucket_sentence_transformer(model, buckets: Sequence[int]):
    """Make a `SentenceTransformer` (or `CrossEncoder`) pad every tokenised batch to a bucket; returns the model.

    sentence-transformers tokenises inside the model (``model.preprocess``, which its data collator and ``encode``
    call), so the padding goes there; ``max_seq_length`` must not exceed the largest bucket. Apply it before
    building the trainer.
    """
    buckets = _check_buckets(buckets)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or tokenizer.pad_token_id is None:
        raise ValueError("`model` must have a tokenizer with a pad token to pad to buckets.")
    max_length = getattr(model, "max_seq_length", None) or getattr(model, "max_length", None)
    if max_length is not None and max_length > buckets[-1]:
        raise ValueError(
            f"The model's max_seq_length ({max_length}) exceeds the largest bucket ({buckets[-1]}): set "
            f"`model.max_seq_length = {buckets[-1]}` or add a bucket of {max_length}."
        )
    # sentence-transformers >= 6 tokenises through `preprocess` (its data collator and `encode` both call it);
    # older versions through `tokenize`. Patch the instance, so the trainer's collator picks it up.
    name = "preprocess" if hasattr(model, "preprocess") else "tokenize"
    original = getattr(model, name)

    def bucketed(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return pad_to_bucket(original(*args, **kwargs), buckets, tokenizer.pad_token_id, tokenizer.padding_side)

    setattr(model, name, bucketed)
    model.length_buckets = buckets
    return model
