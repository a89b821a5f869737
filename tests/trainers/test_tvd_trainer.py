"""TVDTrainer: cross-entropy at gamma = 0 (vs the stock Trainer), accumulation and multi-process equivalence."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    Trainer,
)

from hf_ext.assets import load_bbc_news, minilm_path
from hf_ext.testing import run_distributed
from hf_ext.trainers import TVDConfig, TVDTrainer, tvd_compute_loss_func

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _args(tmp: Path, **kwargs) -> TVDConfig:
    defaults = {
        "output_dir": str(tmp),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 20,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "tvd_gamma": 0.0,
        "tvd_min_weight": 0.0,
    }
    return TVDConfig(**{**defaults, **kwargs})


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
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = load_bbc_news().shuffle(seed=1).select(range(48))
    return data.map(
        lambda b: tokenizer([t[: 40 + 7 * (i % 9)] for i, t in enumerate(b["text"])]), batched=True
    ).select_columns(["input_ids", "attention_mask"])


def _classifier(tiny_bert_dir: Path) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig.from_pretrained(tiny_bert_dir, num_labels=5, **NO_DROPOUT)
    return BertForSequenceClassification.from_pretrained(tiny_bert_dir, config=config)


def _lm_collator(tokenizer_dir: Path) -> DataCollatorForLanguageModeling:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def test_gamma_zero_matches_the_stock_trainer_for_classification(tiny_bert_dir, bbc_titles, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    collator = DataCollatorWithPadding(tokenizer)
    runs = {}
    for name, cls in (("trainer", Trainer), ("tvd", TVDTrainer)):
        model = _classifier(tiny_bert_dir)
        trainer = cls(model=model, args=_args(tmp_path / name), train_dataset=bbc_titles, data_collator=collator)
        batch = trainer._prepare_inputs(collator([bbc_titles[i] for i in range(4)]))
        first_loss = trainer.compute_loss(model, batch).item()
        trainer.train()
        runs[name] = (first_loss, _params(model), trainer.state.log_history)
    assert runs["tvd"][0] == pytest.approx(runs["trainer"][0], abs=1e-6)
    _assert_same_weights(runs["tvd"][1], runs["trainer"][1], atol=1e-5)
    logged = [entry for entry in runs["tvd"][2] if "tvd_weight_mean" in entry]
    assert logged and all(entry["tvd_weight_mean"] == 1.0 and entry["tvd_gamma"] == 0.0 for entry in logged)


def test_gamma_zero_matches_the_stock_trainer_for_causal_lm(tiny_llama_dir, bbc_text_lm, tmp_path) -> None:
    runs = {}
    for name, cls in (("trainer", Trainer), ("tvd", TVDTrainer)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        collator = _lm_collator(tiny_llama_dir)
        trainer = cls(model=model, args=_args(tmp_path / name), train_dataset=bbc_text_lm, data_collator=collator)
        batch = trainer._prepare_inputs(collator([bbc_text_lm[i] for i in range(4)]))
        first_loss = trainer.compute_loss(model, batch).item()
        trainer.train()
        runs[name] = (first_loss, _params(model))
    assert runs["tvd"][0] == pytest.approx(runs["trainer"][0], abs=1e-6)
    _assert_same_weights(runs["tvd"][1], runs["trainer"][1], atol=1e-5)


def test_gamma_above_zero_trains_differently_and_logs_weights(tiny_bert_dir, bbc_titles, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = _classifier(tiny_bert_dir)
    args = _args(tmp_path, tvd_gamma=0.9, tvd_min_weight=0.2, tvd_gamma_schedule="linear", tvd_gamma_start=0.1)
    collator = DataCollatorWithPadding(tokenizer)
    trainer = TVDTrainer(model=model, args=args, train_dataset=bbc_titles, data_collator=collator)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "tvd_weight_mean" in entry]
    gammas = [entry["tvd_gamma"] for entry in logged]
    assert gammas == sorted(gammas) and 0.1 <= gammas[0] < gammas[-1] <= 0.9  # the linear schedule
    assert all(0.2 <= entry["tvd_weight_mean"] < 1.0 for entry in logged)


def _one_step(tiny_llama_dir: Path, data: datasets.Dataset, tmp: Path, batch: int, accumulation: int) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    args = _args(tmp, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                 optim="sgd", learning_rate=1.0, tvd_gamma=0.5, tvd_min_weight=0.2,
                 lr_scheduler_type="constant")  # fmt: skip
    trainer = TVDTrainer(model=model, args=args, train_dataset=data, data_collator=_lm_collator(tiny_llama_dir))
    trainer.train()
    return _params(model)


def test_accumulation_4x2_gives_the_update_of_batch_8_with_padding(tiny_llama_dir, bbc_text_lm, tmp_path) -> None:
    eight = bbc_text_lm.select(range(8))  # exactly one optimizer step's samples, whatever the order
    lengths = [len(ids) for ids in eight["input_ids"]]
    assert len(set(lengths)) > 3  # real padding inside every micro-batch
    big = _one_step(tiny_llama_dir, eight, tmp_path / "big", batch=8, accumulation=1)
    accumulated = _one_step(tiny_llama_dir, eight, tmp_path / "acc", batch=2, accumulation=4)
    _assert_same_weights(accumulated, big, atol=1e-5)
    initial = _params(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
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
        _assert_same_weights(result, single, atol=1e-5)


def test_compute_loss_func_for_the_stock_trainer_matches_tvd_trainer(tiny_llama_dir, bbc_text_lm, tmp_path) -> None:
    finals = {}
    for name in ("func", "tvd"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        args = _args(tmp_path / name, tvd_gamma=0.5, tvd_min_weight=0.2, max_steps=5, gradient_accumulation_steps=2)
        if name == "func":
            loss_func = tvd_compute_loss_func(0.5, task="causal_lm", min_weight=0.2)
            trainer = Trainer(model=model, args=args, train_dataset=bbc_text_lm,
                              data_collator=_lm_collator(tiny_llama_dir), compute_loss_func=loss_func)  # fmt: skip
        else:
            trainer = TVDTrainer(model=model, args=args, train_dataset=bbc_text_lm,
                                 data_collator=_lm_collator(tiny_llama_dir))  # fmt: skip
        trainer.train()
        finals[name] = _params(model)
    _assert_same_weights(finals["func"], finals["tvd"], atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tvd_gamma": 1.0}, r"`tvd_gamma` must be a number in \[0, 1\)"),
        ({"tvd_gamma_start": -0.5}, r"`tvd_gamma_start` must be a number in \[0, 1\)"),
        ({"tvd_min_weight": 2.0}, r"`tvd_min_weight` must be a number in \[0, 1\]"),
        ({"tvd_gamma_schedule": "cosine"}, "`tvd_gamma_schedule` must be one of"),
    ],
)
def test_config_rejects_bad_settings(tmp_path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kwargs)


def test_trainer_and_loss_func_reject_bad_setups(tiny_bert_dir, tmp_path) -> None:
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="`args` must be a TVDConfig"):
        TVDTrainer(model=_classifier(tiny_bert_dir), args=TrainingArguments(output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="`task` must be one of"):
        tvd_compute_loss_func(0.5, task="lm")
    with pytest.raises(ValueError, match=r"`gamma` must be a number in \[0, 1\)"):
        tvd_compute_loss_func(1.5)
