"""BBC News, tokenized for topic classification or cut into causal-LM blocks (the recipes' embedded default data).

Example:

```python
>>> from transformers import AutoTokenizer
>>> from hf_ext import smollm2_path
>>> from hf_ext.data import bbc_lm_data
>>> train, test = bbc_lm_data(AutoTokenizer.from_pretrained(smollm2_path()), block_size=128, max_eval_blocks=64)
>>> len(test)
64

```
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..assets import bbc_news_train_test_split

if TYPE_CHECKING:  # `datasets` is imported where it is used: `import hf_ext` works without it
    import datasets


def _limit(data: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    if limit is not None and limit < 1:
        raise ValueError(f"A sample limit must be >= 1 or None, got {limit}.")
    return data if limit is None else data.select(range(min(limit, len(data))))


def lm_blocks(texts: list[str], tokenizer, block_size: int) -> datasets.Dataset:
    """Concatenate the texts (each ended by EOS) and cut them into full blocks of ``block_size`` tokens."""
    if block_size < 2:
        raise ValueError(f"`block_size` must be >= 2, got {block_size}.")
    ids = [token for text in texts for token in [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]]
    blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    import datasets

    return datasets.Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks]})


def bbc_lm_data(
    tokenizer,
    block_size: int = 128,
    *,
    split_seed: int = 0,
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """BBC article text (the deterministic 80/20 split) as train and held-out blocks of ``block_size`` tokens."""
    splits = bbc_news_train_test_split(test_size=0.2, seed=split_seed)
    train = _limit(lm_blocks(splits["train"]["text"], tokenizer, block_size), max_train_blocks)
    test = _limit(lm_blocks(splits["test"]["text"], tokenizer, block_size), max_eval_blocks)
    return train, test


def bbc_classification_data(
    tokenizer,
    max_length: int = 128,
    *,
    split_seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    train_labels: list[int] | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """BBC News topic classification: ``title\\nbody`` truncated to ``max_length`` tokens, column ``label``.

    ``train_labels`` replaces the training labels (e.g. with noisy ones), after ``max_train_samples``.
    """
    splits = bbc_news_train_test_split(test_size=0.2, seed=split_seed)
    train, test = _limit(splits["train"], max_train_samples), _limit(splits["test"], max_eval_samples)
    if train_labels is not None:
        if len(train_labels) != len(train):
            raise ValueError(f"`train_labels` has {len(train_labels)} labels for {len(train)} training examples.")
        train = train.remove_columns("label").add_column("label", list(train_labels))

    def tokenize(batch: dict) -> dict:
        texts = [f"{title}\n{text}" for title, text in zip(batch["title"], batch["text"], strict=True)]
        return tokenizer(texts, truncation=True, max_length=max_length)

    columns = ["id", "title", "text"]
    return (
        train.map(tokenize, batched=True, remove_columns=columns),
        test.map(tokenize, batched=True, remove_columns=columns),
    )
