"""TRL parity: `tvd_compute_loss_func` inside TRL's `SFTTrainer` against TRL's own losses, on the embedded SmolLM2 with
a prompt-completion data set (TRL masks the prompt: completion-only targets).

At gamma = 1 with no floor TaiLr's weight is p: `loss_type="dft"`. At gamma = 0 it is cross-entropy:
`loss_type="nll"`. TRL computes both through its fused LM head, whose log-probabilities are accumulated in float32
whatever the model's dtype. That float32 sum over 49,152 logits (an error of ~sqrt(V) eps ~ 1e-5 relative) bounds
how closely anything can agree with it, so: the loss within 1e-6 and every gradient entry within 1e-5 of the largest
one. Measured (2-core EPYC): gamma = 1 on a float32 model, the loss equal and the gradients within 1.2e-6 of the
largest entry (6.3e-7 against 0.51); gamma = 0 on a float64 model (our side exact), the loss within 7e-9 and the
gradients within 1.6e-6 of the largest entry. In float32 on both sides, our gamma = 0 path (`F.cross_entropy`, kept
bit-equal to transformers' own loss) and TRL's kernel differ by 1.8e-6 relative in the loss, so that case runs in
float64."""

from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from hf_ext import load_bbc_news  # noqa: E402
from hf_ext.trainers import tvd_compute_loss_func  # noqa: E402


def _examples() -> list[dict[str, str]]:
    rows = list(load_bbc_news())[:2]
    return [{"prompt": f"Write a title for this article.\n\n{row['text'][:200]}", "completion": row["title"]}
            for row in rows]  # fmt: skip


def _loss_and_gradients(model_dir, dtype, loss_type: str, loss_func, tmp_path) -> tuple[torch.Tensor, dict]:
    """One completion-only batch through `SFTTrainer.compute_loss` and backward, from the same initial weights."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    args = trl.SFTConfig(output_dir=str(tmp_path / loss_type), loss_type=loss_type, per_device_train_batch_size=2,
                         max_length=128, report_to=[], use_cpu=True)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL 1.16 deprecates `compute_loss_func` (still supported)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_examples()),
                                 processing_class=AutoTokenizer.from_pretrained(model_dir),
                                 compute_loss_func=loss_func)  # fmt: skip
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    prompt_masked = (batch["labels"] == -100) & (batch["attention_mask"] == 1)
    assert prompt_masked.any() and (batch["labels"] != -100).any()  # completion-only targets
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(ours: tuple, theirs: tuple, loss_tol: float, grad_rtol: float) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = ours, theirs
    assert abs(float(loss_a) - float(loss_b)) <= loss_tol, (float(loss_a), float(loss_b))
    assert set(grads_a) == set(grads_b)
    scale = max(float(g.abs().max()) for g in grads_b.values())
    worst = max(float((grads_a[n].double() - grads_b[n].double()).abs().max()) for n in grads_b)
    assert worst <= grad_rtol * scale, (worst, scale)


@pytest.mark.slow
def test_gamma_one_without_floor_is_trls_dft_loss_and_gradients(smollm2_dir, tmp_path) -> None:
    theirs = _loss_and_gradients(smollm2_dir, torch.float32, "dft", None, tmp_path)
    ours = _loss_and_gradients(smollm2_dir, torch.float32, "nll", tvd_compute_loss_func(1.0, min_weight=0.0), tmp_path)
    _assert_same(ours, theirs, loss_tol=1e-6, grad_rtol=1e-5)


@pytest.mark.slow
def test_gamma_zero_is_trls_nll_loss_and_gradients(smollm2_dir, tmp_path) -> None:
    theirs = _loss_and_gradients(smollm2_dir, torch.float64, "nll", None, tmp_path)
    ours = _loss_and_gradients(smollm2_dir, torch.float64, "nll", tvd_compute_loss_func(0.0), tmp_path)
    _assert_same(ours, theirs, loss_tol=1e-6, grad_rtol=1e-5)
