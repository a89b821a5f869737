from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, DataCollatorWithPadding

from hf_ext.assets import minilm_path
from hf_ext.data import BucketPadCollator, bucket_for, bucket_sentence_transformer, default_buckets, pad_to_bucket


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def test_default_buckets_are_three_multiples_of_eight_up_to_the_max() -> None:
    assert default_buckets(128) == (32, 64, 128)
    assert default_buckets(100) == (24, 48, 100)
    assert default_buckets(512, count=4) == (64, 128, 256, 512)


def test_collator_pads_to_the_smallest_bucket_and_keeps_the_tokens(tokenizer) -> None:
    texts = ["a short one", "and a slightly longer sentence than that"]
    plain = DataCollatorWithPadding(tokenizer)([tokenizer(t) for t in texts])
    bucketed = BucketPadCollator(DataCollatorWithPadding(tokenizer), (8, 16, 32))([tokenizer(t) for t in texts])
    length = plain["input_ids"].shape[1]
    assert length not in (8, 16, 32) and bucketed["input_ids"].shape == (2, bucket_for(length, (8, 16, 32)))
    assert torch.equal(bucketed["input_ids"][:, :length], plain["input_ids"])
    assert (bucketed["input_ids"][:, length:] == tokenizer.pad_token_id).all()
    assert torch.equal(bucketed["attention_mask"].sum(1), plain["attention_mask"].sum(1))


def test_language_model_labels_are_padded_with_ignore_index(tokenizer) -> None:
    collator = BucketPadCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False), (16, 64))
    batch = collator([tokenizer("one two three"), tokenizer("four five")])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 16)
    assert (batch["labels"][:, 6:] == -100).all()


def test_left_padding_is_kept_on_the_left() -> None:
    batch = {"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
    padded = pad_to_bucket(batch, (4,), pad_token_id=0, side="left")
    assert padded["input_ids"].tolist() == [[0, 0, 5, 6], [0, 7, 8, 9]]
    assert padded["attention_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]


@pytest.mark.parametrize(
    ("buckets", "match"), [((), "non-empty"), ((16, 0), "positive"), ("16", "non-empty"), ((4,), "longer than")]
)
def test_bad_buckets_and_too_long_batches_raise(tokenizer, buckets, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BucketPadCollator(DataCollatorWithPadding(tokenizer), buckets)([tokenizer("a sentence of some eight words")])


def test_sentence_transformer_tokenize_pads_to_buckets(minilm) -> None:
    import copy

    model = copy.deepcopy(minilm)
    model.max_seq_length = 64
    bucket_sentence_transformer(model, (16, 32, 64))
    features = model.preprocess(["a cat", "a dog sleeps on the warm mat by the door"])
    assert features["input_ids"].shape[1] == 16
    assert (
        minilm.preprocess(["a cat", "a dog sleeps on the warm mat by the door"])["input_ids"].shape[1] == 12
    )  # unbucketed: the longest
    plain = minilm.encode(["a dog sleeps on the mat"], convert_to_tensor=True)
    bucketed = model.encode(["a dog sleeps on the mat"], convert_to_tensor=True)
    torch.testing.assert_close(bucketed, plain, rtol=1e-4, atol=1e-5)  # padding is masked out
    with pytest.raises(ValueError, match="max_seq_length"):
        bucket_sentence_transformer(copy.deepcopy(minilm), (16, 32))


@pytest.mark.parametrize(("max_length", "count"), [(4, 3), (128, 0)])
def test_default_buckets_rejects_a_tiny_max_length_or_count(max_length: int, count: int) -> None:
    with pytest.raises(ValueError, match="`max_length` must be >= 8 and `count` >= 1"):
        default_buckets(max_length, count)


def test_lm_blocks_and_sample_limits_reject_nonsense(tokenizer) -> None:
    from hf_ext.data import bbc_lm_data, lm_blocks

    with pytest.raises(ValueError, match="`block_size` must be >= 2"):
        lm_blocks(["some text"], tokenizer, 1)
    with pytest.raises(ValueError, match="sample limit must be >= 1"):
        bbc_lm_data(tokenizer, 32, max_eval_blocks=0)
