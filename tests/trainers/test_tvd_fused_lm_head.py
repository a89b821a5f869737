"""`TVDTrainer(tvd_fused_lm_head=True)`: the update of the full-logits path (one process, accumulation, two gloo
processes, the real SmolLM2), without the logits in memory; what it cannot compute is refused."""

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
)

from hf_ext.assets import load_bbc_news
from hf_ext.tensor_memory import TensorBytes
from hf_ext.testing import run_distributed
from hf_ext.trainers import TVDConfig, TVDTrainer

from ._tvd_utils import assert_same_weights, bbc_text, params, tvd_args


def _args(tmp: Path, **kwargs) -> TVDConfig:
    return tvd_args(tmp, **{"max_steps": 5, "logging_steps": 1, "tvd_gamma": 0.5, "tvd_min_weight": 0.2, **kwargs})


def _text(tokenizer_dir: Path, n: int = 24) -> datasets.Dataset:
    return bbc_text(tokenizer_dir, n)


def _train(model_dir: Path, data: datasets.Dataset, tmp: Path, fused: bool, **kwargs) -> tuple[dict, list]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    collator = DataCollatorForLanguageModeling(AutoTokenizer.from_pretrained(model_dir), mlm=False)
    args = _args(tmp / ("fused" if fused else "full"), tvd_fused_lm_head=fused, **kwargs)
    trainer = TVDTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    logs = [(h["loss"], h["tvd_weight_mean"]) for h in trainer.state.log_history if "loss" in h]
    return params(model), logs


def test_fused_head_gives_the_full_logits_update_with_accumulation(tiny_llama_dir, tmp_path) -> None:
    data = _text(tiny_llama_dir)
    fused, fused_logs = _train(tiny_llama_dir, data, tmp_path, True, gradient_accumulation_steps=2)
    full, full_logs = _train(tiny_llama_dir, data, tmp_path, False, gradient_accumulation_steps=2)
    assert_same_weights(fused, full, atol=1e-6)
    assert len(fused_logs) == 5
    for (loss_a, weight_a), (loss_b, weight_b) in zip(fused_logs, full_logs, strict=True):
        assert loss_a == pytest.approx(loss_b, rel=1e-5) and weight_a == pytest.approx(weight_b, abs=1e-4)
    initial = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).named_parameters()}
    assert any((full[n] - initial[n]).abs().max() > 1e-3 for n in full)  # the steps did move the weights


def _distributed(rank: int, world_size: int, model_dir: str, data_dir: str, tmp: str) -> dict:
    data = datasets.load_from_disk(data_dir)
    params, _ = _train(Path(model_dir), data, Path(tmp) / f"rank{rank}", True, per_device_train_batch_size=4,
                       max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant")  # fmt: skip
    return params


def test_two_gloo_processes_give_the_one_process_update(tiny_llama_dir, tmp_path) -> None:
    eight = _text(tiny_llama_dir, 8)
    eight.save_to_disk(str(tmp_path / "data"))
    single, _ = _train(tiny_llama_dir, eight, tmp_path / "single", True, per_device_train_batch_size=8, max_steps=1,
                       optim="sgd", learning_rate=1.0, lr_scheduler_type="constant")  # fmt: skip
    results = run_distributed(_distributed, world_size=2, args=(str(tiny_llama_dir), str(tmp_path / "data"),
                                                                str(tmp_path)))  # fmt: skip
    for result in results:
        assert_same_weights(result, single, atol=1e-5)


def _step_peak(model_dir: Path, batch: dict, tmp: Path, fused: bool) -> tuple[int, float]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = TVDTrainer(model=model, args=_args(tmp / str(fused), tvd_fused_lm_head=fused))
    trainer.model.train()
    with TensorBytes() as probe:
        loss = trainer.training_step(trainer.model, dict(batch))
    return probe.peak, float(loss)


def test_a_training_step_never_holds_the_logits(tiny_llama_dir, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = " ".join(article["text"] for article in load_bbc_news().select(range(8)))
    ids = torch.tensor(tokenizer(text)["input_ids"][:2048]).view(4, 512)  # 2,048 targets: two chunks of rows
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    full_peak, full_loss = _step_peak(tiny_llama_dir, batch, tmp_path, False)
    fused_peak, fused_loss = _step_peak(tiny_llama_dir, batch, tmp_path, True)
    assert fused_loss == pytest.approx(full_loss, rel=1e-5)
    logits = ids.numel() * len(tokenizer) * 4  # 2,048 x 49,152 float32: 384 MiB
    assert full_peak - fused_peak >= logits, (full_peak, fused_peak, logits)  # the logits and more never exist
    assert fused_peak < 0.6 * logits, (fused_peak, logits)  # one chunk of 1,024 rows of logits at a time


@pytest.mark.slow
def test_the_real_smollm2_step_matches_the_full_logits_step(smollm2_dir, tmp_path) -> None:
    data = _text(smollm2_dir, 4)
    kwargs = {"max_steps": 1, "optim": "sgd", "learning_rate": 1e-2, "lr_scheduler_type": "constant"}
    fused, fused_logs = _train(smollm2_dir, data, tmp_path, True, **kwargs)
    full, full_logs = _train(smollm2_dir, data, tmp_path, False, **kwargs)
    assert fused_logs[0][0] == pytest.approx(full_logs[0][0], rel=1e-5)
    assert_same_weights(fused, full, atol=1e-6)


def test_what_the_fused_head_cannot_compute_is_refused(tiny_llama_dir, tiny_bert_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="`tvd_fused_lm_head` does not support `label_smoothing_factor`"):
        _args(tmp_path, tvd_fused_lm_head=True, label_smoothing_factor=0.1)
    args = _args(tmp_path, tvd_fused_lm_head=True)
    classifier = BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert_dir, num_labels=5))
    with pytest.raises(ValueError, match="`tvd_fused_lm_head` needs a causal LM"):
        TVDTrainer(model=classifier, args=args)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"transforms them further \(\{'final_logit_softcapping': 30.0\}\)"):
        TVDTrainer(model=model, args=args)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match=r"LM head to be a plain `nn.Linear`, got Sequential"):
        TVDTrainer(model=model, args=args)
