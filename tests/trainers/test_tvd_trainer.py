"""TVDTrainer: cross-entropy at gamma = 0 (vs the stock Trainer) and a brute-force TaiLr loss at gamma > 0, for
classification, causal LM, seq2seq and token classification; accumulation and multi-process equivalence."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
)

from hf_ext.assets import load_bbc_news, minilm_path
from hf_ext.testing import run_distributed
from hf_ext.trainers import TVDTrainer, tvd_compute_loss_func

from ._tvd_utils import assert_same_weights, bbc_text, params, tvd_args

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="module")
def bbc_titles() -> datasets.Dataset:
    """Real BBC News titles with their 5 topic labels, tokenised with the real MiniLM tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_bbc_news().shuffle(seed=0).select(range(48))
    return data.map(lambda b: tokenizer(b["title"], truncation=True, max_length=32), batched=True).select_columns(
        ["input_ids", "attention_mask", "token_type_ids", "label"]
    )


@pytest.fixture(scope="module")
def bbc_text_lm(tiny_llama_dir: Path) -> datasets.Dataset:
    """Real BBC article openings of varying lengths (so batches have padding), SmolLM2 tokenizer."""
    return bbc_text(tiny_llama_dir, 48)


def _classifier(tiny_bert_dir: Path) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig.from_pretrained(tiny_bert_dir, num_labels=5, **NO_DROPOUT)
    return BertForSequenceClassification.from_pretrained(tiny_bert_dir, config=config)


def _lm_collator(tokenizer_dir: Path) -> DataCollatorForLanguageModeling:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def test_gamma_zero_matches_the_stock_trainer_for_classification(tiny_bert_dir, bbc_titles, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    collator = DataCollatorWithPadding(tokenizer)
    runs = {}
    for name, cls in (("trainer", Trainer), ("tvd", TVDTrainer)):
        model = _classifier(tiny_bert_dir)
        trainer = cls(model=model, args=tvd_args(tmp_path / name), train_dataset=bbc_titles, data_collator=collator)
        batch = trainer._prepare_inputs(collator([bbc_titles[i] for i in range(4)]))
        first_loss = trainer.compute_loss(model, batch).item()
        trainer.train()
        runs[name] = (first_loss, params(model), trainer.state.log_history)
    assert runs["tvd"][0] == pytest.approx(runs["trainer"][0], abs=1e-6)
    assert_same_weights(runs["tvd"][1], runs["trainer"][1], atol=1e-5)
    logged = [entry for entry in runs["tvd"][2] if "tvd_weight_mean" in entry]
    assert logged and all(entry["tvd_weight_mean"] == 1.0 and entry["tvd_gamma"] == 0.0 for entry in logged)


def test_gamma_zero_matches_the_stock_trainer_for_causal_lm(tiny_llama_dir, bbc_text_lm, tmp_path) -> None:
    runs = {}
    for name, cls in (("trainer", Trainer), ("tvd", TVDTrainer)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        collator = _lm_collator(tiny_llama_dir)
        trainer = cls(model=model, args=tvd_args(tmp_path / name), train_dataset=bbc_text_lm, data_collator=collator)
        batch = trainer._prepare_inputs(collator([bbc_text_lm[i] for i in range(4)]))
        first_loss = trainer.compute_loss(model, batch).item()
        trainer.train()
        runs[name] = (first_loss, params(model))
    assert runs["tvd"][0] == pytest.approx(runs["trainer"][0], abs=1e-6)
    assert_same_weights(runs["tvd"][1], runs["trainer"][1], atol=1e-5)


def test_gamma_above_zero_trains_differently_and_logs_weights(tiny_bert_dir, bbc_titles, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = _classifier(tiny_bert_dir)
    args = tvd_args(tmp_path, tvd_gamma=0.9, tvd_min_weight=0.2, tvd_gamma_schedule="linear", tvd_gamma_start=0.1)
    collator = DataCollatorWithPadding(tokenizer)
    trainer = TVDTrainer(model=model, args=args, train_dataset=bbc_titles, data_collator=collator)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "tvd_weight_mean" in entry]
    gammas = [entry["tvd_gamma"] for entry in logged]
    assert gammas == sorted(gammas) and 0.1 <= gammas[0] < gammas[-1] <= 0.9  # the linear schedule
    assert all(0.2 <= entry["tvd_weight_mean"] < 1.0 for entry in logged)


def _brute_force_tailr(logits: torch.Tensor, labels: torch.Tensor, gamma: float, min_weight: float) -> float:
    """The TaiLr loss target by target: w = p / (gamma + (1 - gamma) p) clamped to [min_weight, 1], mean of -w log p
    over the targets that are not -100. ``logits`` (..., classes) and ``labels`` (...) already aligned."""
    flat_logits, flat_labels = logits.detach().double().reshape(-1, logits.shape[-1]), labels.reshape(-1).tolist()
    total, count = 0.0, 0
    for row, label in zip(flat_logits, flat_labels, strict=True):
        if label == -100:
            continue
        p = float(torch.softmax(row, dim=0)[label])
        weight = min(max(p / (gamma + (1 - gamma) * p), min_weight), 1.0)
        total += -weight * math.log(p)
        count += 1
    return total / count


def test_gamma_above_zero_trains_differently_from_gamma_zero(tiny_bert_dir, bbc_titles, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    collator = DataCollatorWithPadding(tokenizer)
    initial = params(_classifier(tiny_bert_dir))
    runs = {}
    for gamma in (0.0, 0.9):
        model = _classifier(tiny_bert_dir)
        args = tvd_args(tmp_path / str(gamma), tvd_gamma=gamma, tvd_min_weight=0.2 if gamma else 0.0)
        trainer = TVDTrainer(model=model, args=args, train_dataset=bbc_titles, data_collator=collator)
        batch = trainer._prepare_inputs(collator([bbc_titles[i] for i in range(8)]))
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch).item()
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        assert loss == pytest.approx(
            _brute_force_tailr(logits, batch["labels"], gamma, 0.2 if gamma else 0.0), rel=1e-5
        )
        trainer.train()
        runs[gamma] = (loss, params(model))
    assert runs[0.9][0] < 0.8 * runs[0.0][0]  # the weights (about 1/(0.9 + 0.1 * 5) = 0.7 at p = 1/5) scale it down
    moved = max(float((runs[0.0][1][n] - initial[n]).abs().max()) for n in initial)
    apart = max(float((runs[0.9][1][n] - runs[0.0][1][n]).abs().max()) for n in initial)
    assert moved > 5e-3 and apart > 0.1 * moved  # same data, seed and steps: only gamma differs


# ----------------------------------------------------------------------------- seq2seq and token classification


@pytest.fixture(scope="module")
def bbc_seq2seq() -> datasets.Dataset:
    """BBC titles -> the first words of their article (real text of varying lengths), MiniLM's WordPiece tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_bbc_news().shuffle(seed=2).select(range(48))

    def encode(batch: dict) -> dict:
        inputs = tokenizer(batch["title"], truncation=True, max_length=24)
        targets = [" ".join(text.split()[: 4 + i % 7]) for i, text in enumerate(batch["text"])]
        inputs["labels"] = tokenizer(targets, truncation=True, max_length=16)["input_ids"]
        return inputs

    return data.map(encode, batched=True).select_columns(["input_ids", "attention_mask", "labels"])


def _tiny_t5(vocab_size: int, pad_id: int, eos_id: int) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0, pad_token_id=pad_id, eos_token_id=eos_id,
                      decoder_start_token_id=pad_id)  # fmt: skip
    return T5ForConditionalGeneration(config)


@pytest.fixture(scope="module")
def bbc_token_tags() -> datasets.Dataset:
    """BBC titles tagged per word piece (0: a word's first piece, 1: a continuation, 2: punctuation), with -100 on
    the special tokens, so some targets are ignored besides the padding."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_bbc_news().shuffle(seed=3).select(range(48))

    def tag(piece: str) -> int:
        if piece in tokenizer.all_special_tokens:
            return -100
        return 1 if piece.startswith("##") else 0 if piece[0].isalnum() else 2

    def encode(batch: dict) -> dict:
        inputs = tokenizer(batch["title"], truncation=True, max_length=32)
        inputs["labels"] = [[tag(p) for p in tokenizer.convert_ids_to_tokens(ids)] for ids in inputs["input_ids"]]
        return inputs

    return data.map(encode, batched=True).select_columns(["input_ids", "attention_mask", "token_type_ids", "labels"])


def _tagger(tiny_bert_dir: Path) -> BertForTokenClassification:
    torch.manual_seed(0)
    config = BertConfig.from_pretrained(tiny_bert_dir, num_labels=3, **NO_DROPOUT)
    return BertForTokenClassification.from_pretrained(tiny_bert_dir, config=config)


@pytest.mark.parametrize("task", ["seq2seq", "token_classification"])
def test_gamma_zero_matches_the_stock_trainer_and_gamma_above_zero_is_tailr(
    task: str, tiny_bert_dir, bbc_seq2seq, bbc_token_tags, tmp_path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    if task == "seq2seq":
        data = bbc_seq2seq

        def build():
            return _tiny_t5(tokenizer.vocab_size, tokenizer.pad_token_id, tokenizer.sep_token_id)

        collator = DataCollatorForSeq2Seq(tokenizer)  # labels padded with -100; no decoder_input_ids in the batch
    else:
        data, build, collator = (
            bbc_token_tags,
            lambda: _tagger(tiny_bert_dir),
            DataCollatorForTokenClassification(tokenizer),
        )
    rows = collator([data[i] for i in range(6)])
    assert (rows["labels"] == -100).any() and "decoder_input_ids" not in rows  # padding and ignored targets
    runs = {}
    for name, cls, gamma in (("trainer", Trainer, 0.0), ("tvd", TVDTrainer, 0.0), ("tailr", TVDTrainer, 0.6)):
        model = build()
        args = tvd_args(tmp_path / name, max_steps=6, tvd_gamma=gamma, tvd_min_weight=0.3 if gamma else 0.0)
        trainer = cls(model=model, args=args, train_dataset=data, data_collator=collator)
        batch = trainer._prepare_inputs(collator([data[i] for i in range(6)]))
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch).item()
            logits = model(**batch).logits  # the model's own decoder inputs (seq2seq: labels shifted right)
        expected = _brute_force_tailr(logits, batch["labels"], gamma, 0.3 if gamma else 0.0)
        assert loss == pytest.approx(expected, rel=1e-5)
        trainer.train()
        runs[name] = (loss, params(model))
    assert runs["tvd"][0] == pytest.approx(runs["trainer"][0], abs=1e-6)
    assert_same_weights(runs["tvd"][1], runs["trainer"][1], atol=1e-5)
    assert any((runs["tailr"][1][n] - runs["tvd"][1][n]).abs().max() > 1e-4 for n in runs["tvd"][1])


def _one_step(tiny_llama_dir: Path, data: datasets.Dataset, tmp: Path, batch: int, accumulation: int) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    args = tvd_args(tmp, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                 optim="sgd", learning_rate=1.0, tvd_gamma=0.5, tvd_min_weight=0.2,
                 lr_scheduler_type="constant")  # fmt: skip
    trainer = TVDTrainer(model=model, args=args, train_dataset=data, data_collator=_lm_collator(tiny_llama_dir))
    trainer.train()
    return params(model)


def test_accumulation_4x2_gives_the_update_of_batch_8_with_padding(tiny_llama_dir, bbc_text_lm, tmp_path) -> None:
    eight = bbc_text_lm.select(range(8))  # exactly one optimizer step's samples, whatever the order
    lengths = [len(ids) for ids in eight["input_ids"]]
    assert len(set(lengths)) > 3  # real padding inside every micro-batch
    big = _one_step(tiny_llama_dir, eight, tmp_path / "big", batch=8, accumulation=1)
    accumulated = _one_step(tiny_llama_dir, eight, tmp_path / "acc", batch=2, accumulation=4)
    assert_same_weights(accumulated, big, atol=1e-5)
    initial = params(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    assert any((big[n] - initial[n]).abs().max() > 1e-3 for n in big)  # the step did move the weights


def _distributed_step(rank: int, world_size: int, tiny_llama_dir: str, data_dir: str, tmp: str) -> dict:
    data = datasets.load_from_disk(data_dir)
    return _one_step(Path(tiny_llama_dir), data, Path(tmp) / f"rank{rank}", batch=4, accumulation=1)


def test_two_gloo_processes_give_the_update_of_one_process(tiny_llama_dir, bbc_text_lm, tmp_path) -> None:
    eight = bbc_text_lm.select(range(8))
    eight.save_to_disk(str(tmp_path / "data"))
    single = _one_step(tiny_llama_dir, eight, tmp_path / "single", batch=8, accumulation=1)
    results = run_distributed(_distributed_step, world_size=2, args=(str(tiny_llama_dir), str(tmp_path / "data"),
                                                                     str(tmp_path)))  # fmt: skip
    for result in results:
        assert_same_weights(result, single, atol=1e-5)


def test_compute_loss_func_for_the_stock_trainer_matches_tvd_trainer(tiny_llama_dir, bbc_text_lm, tmp_path) -> None:
    finals = {}
    for name in ("func", "tvd"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        args = tvd_args(tmp_path / name, tvd_gamma=0.5, tvd_min_weight=0.2, max_steps=5, gradient_accumulation_steps=2)
        if name == "func":
            loss_func = tvd_compute_loss_func(0.5, task="causal_lm", min_weight=0.2)
            trainer = Trainer(model=model, args=args, train_dataset=bbc_text_lm,
                              data_collator=_lm_collator(tiny_llama_dir), compute_loss_func=loss_func)  # fmt: skip
        else:
            trainer = TVDTrainer(model=model, args=args, train_dataset=bbc_text_lm,
                                 data_collator=_lm_collator(tiny_llama_dir))  # fmt: skip
        trainer.train()
        finals[name] = params(model)
    assert_same_weights(finals["func"], finals["tvd"], atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tvd_gamma": 1.01}, r"`tvd_gamma` must be a number in \[0, 1\]"),
        ({"tvd_gamma_start": -0.5}, r"`tvd_gamma_start` must be a number in \[0, 1\]"),
        ({"tvd_min_weight": 2.0}, r"`tvd_min_weight` must be a number in \[0, 1\]"),
        ({"tvd_gamma_schedule": "cosine"}, "`tvd_gamma_schedule` must be one of"),
    ],
)
def test_config_rejects_bad_settings(tmp_path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tvd_args(tmp_path, **kwargs)


def test_trainer_and_loss_func_reject_bad_setups(tiny_bert_dir, tmp_path) -> None:
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="`args` must be a TVDConfig"):
        TVDTrainer(model=_classifier(tiny_bert_dir), args=TrainingArguments(output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="`task` must be one of"):
        tvd_compute_loss_func(0.5, task="lm")
    with pytest.raises(ValueError, match=r"`gamma` must be a number in \[0, 1\]"):
        tvd_compute_loss_func(1.5)
