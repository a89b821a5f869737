"""`tvd_loss`, the pure function: cross-entropy at gamma = 0, the TaiLr reference otherwise, memory, edge cases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_ext.losses import tvd_loss


def reference_tailr(logits, labels, gamma, min_weight=0.0, label_smoothing=0.0, ignore_index=-100):
    """The paper's criterion written directly: w = p / (gamma + (1 - gamma) p), no grad, clamped to [b, 1]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = labels != ignore_index
    logp_t = logp[keep].gather(1, labels[keep][:, None])[:, 0]
    p = logp_t.exp()
    w = (p / (gamma + (1 - gamma) * p)).detach().clamp(min_weight, 1.0)
    return ((1 - label_smoothing) * -(w * logp_t) - label_smoothing * logp[keep].mean(dim=-1)).mean()


def _data(rows: int = 24, classes: int = 9, dtype=torch.float64):
    logits = (torch.randn(rows, classes, dtype=dtype) * 3).requires_grad_()
    labels = torch.randint(0, classes, (rows,))
    labels[::5] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gamma_one_without_a_floor_is_dft(dtype) -> None:
    """DFT as TRL writes it (``per_token_loss = -log_probs * log_probs.exp().detach()``, summed over the targets and
    divided by their count), loss and gradients; with a floor the weight is ``max(p, b)``."""
    logits, labels = _data(dtype=torch.float64)
    keep = labels != -100
    log_probs = torch.log_softmax(logits, dim=-1)[keep].gather(1, labels[keep][:, None])[:, 0]
    trl = (-log_probs * log_probs.exp().detach()).sum() / keep.sum()
    ours = tvd_loss(logits.to(dtype), labels, gamma=1.0, min_weight=0.0)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(ours.double(), trl, rtol=tolerance, atol=tolerance)
    if dtype == torch.float64:
        (g_ours,) = torch.autograd.grad(ours, logits)
        (g_trl,) = torch.autograd.grad(trl, logits)
        torch.testing.assert_close(g_ours, g_trl, rtol=1e-12, atol=1e-12)
    floored = (-log_probs * log_probs.exp().detach().clamp(min=0.1)).mean()
    torch.testing.assert_close(tvd_loss(logits, labels, gamma=1.0, min_weight=0.1), floored, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_gamma_zero_is_exactly_cross_entropy(label_smoothing: float) -> None:
    logits, labels = _data()
    ours = tvd_loss(logits, labels, gamma=0.0, label_smoothing=label_smoothing)
    theirs = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1024])
def test_chunked_path_at_gamma_zero_is_cross_entropy_on_upcast_half_logits(label_smoothing: float, chunk_rows: int):
    # bf16 logits take the chunked float32 path even at gamma = 0
    logits, labels = _data(dtype=torch.float32)
    half = logits.detach().bfloat16().requires_grad_()
    ours = tvd_loss(half, labels, gamma=0.0, label_smoothing=label_smoothing, chunk_rows=chunk_rows)
    upcast = half.detach().float().requires_grad_()
    theirs = F.cross_entropy(upcast, labels, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, half)
    (g_theirs,) = torch.autograd.grad(theirs, upcast)
    torch.testing.assert_close(g_ours, g_theirs.bfloat16(), rtol=1e-2, atol=1e-4)


def test_gamma_zero_gradients_pass_gradcheck() -> None:
    logits, labels = _data(rows=7, classes=5)
    assert torch.autograd.gradcheck(lambda x: tvd_loss(x, labels, gamma=0.0, label_smoothing=0.1, chunk_rows=3), logits)


@pytest.mark.parametrize(
    ("gamma", "min_weight", "label_smoothing"), [(0.1, 0.3, 0.0), (0.5, 0.2, 0.1), (0.9, 0.0, 0.0)]
)
def test_matches_the_tailr_reference(gamma: float, min_weight: float, label_smoothing: float) -> None:
    logits, labels = _data()
    ours = tvd_loss(logits, labels, gamma=gamma, min_weight=min_weight, label_smoothing=label_smoothing, chunk_rows=4)
    ref = reference_tailr(logits, labels, gamma, min_weight, label_smoothing)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def test_weights_down_weight_unlikely_targets_and_floor_at_min_weight() -> None:
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    labels = torch.tensor([0, 0])  # the first target is likely (w ~ 1), the second very unlikely (w ~ 0)
    _, mean_w = tvd_loss(logits, labels, gamma=0.5, return_weight_mean=True)
    assert 0.49 < mean_w.item() < 0.51
    _, floored = tvd_loss(logits, labels, gamma=0.5, min_weight=0.2, return_weight_mean=True)
    assert 0.59 < floored.item() < 0.61
    assert tvd_loss(logits, labels, gamma=0.5) < F.cross_entropy(logits, labels)


def test_num_items_in_batch_divides_the_sum() -> None:
    logits, labels = _data()
    counted = int((labels != -100).sum())
    total = tvd_loss(logits, labels, gamma=0.3) * counted
    torch.testing.assert_close(tvd_loss(logits, labels, gamma=0.3, num_items_in_batch=100), total / 100)
    torch.testing.assert_close(tvd_loss(logits, labels, gamma=0.3, num_items_in_batch=torch.tensor(100)), total / 100)


def test_leading_dimensions_are_flattened() -> None:
    logits, labels = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    torch.testing.assert_close(
        tvd_loss(logits, labels, gamma=0.4), tvd_loss(logits.reshape(12, 11), labels.reshape(12), gamma=0.4)
    )


def test_all_ignored_batch_gives_zero_loss_and_zero_gradients() -> None:
    logits = torch.randn(4, 6, requires_grad=True)
    labels = torch.full((4,), -100)
    for kwargs in ({}, {"num_items_in_batch": 0}, {"label_smoothing": 0.1}):
        loss = tvd_loss(logits, labels, gamma=0.5, **kwargs)
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_computed_in_fp32(dtype: torch.dtype) -> None:
    logits, labels = torch.randn(64, 1000) * 20, torch.randint(0, 1000, (64,))
    half = logits.to(dtype).requires_grad_()
    loss = tvd_loss(half, labels, gamma=0.2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, tvd_loss(half.detach().float(), labels, gamma=0.2), rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, half)
    assert grad.dtype == dtype and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 1.5}, r"`gamma` must be a number in \[0, 1\]"),
        ({"gamma": -0.1}, r"`gamma` must be a number in \[0, 1\]"),
        ({"gamma": 0.5, "min_weight": 1.5}, r"`min_weight` must be a number in \[0, 1\]"),
        ({"gamma": 0.5, "label_smoothing": -0.1}, "`label_smoothing`"),
        ({"gamma": 0.5, "labels": torch.tensor([0, 1, 9, 2])}, r"`labels` must be class indices in \[0, 5\)"),
        ({"gamma": 0.5, "labels": torch.tensor([0, 1, -3, 2])}, r"`labels` must be class indices"),
        ({"gamma": 0.5, "labels": torch.tensor([0, 1, 2])}, "`labels` must have the shape of `logits`"),
        ({"gamma": 0.5, "labels": torch.tensor([0.0, 1.0, 2.0, 3.0])}, "`labels` must be an integer tensor"),
        ({"gamma": 0.5, "logits": torch.randn(5)}, "`logits` must be a floating-point tensor of shape"),
        ({"gamma": 0.5, "chunk_rows": 0}, "`chunk_rows` must be an int >= 1"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_argument(kwargs: dict, match: str) -> None:
    arguments = {"logits": torch.randn(4, 5), "labels": torch.tensor([0, 1, -100, 4]), **kwargs}
    with pytest.raises(ValueError, match=match):
        tvd_loss(arguments.pop("logits"), arguments.pop("labels"), **arguments)


_PEAK_CHILD = r"""
import json, sys, torch
import torch.nn.functional as F
from hf_ext.losses import tvd_loss
which, rows, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
logits = torch.randn(rows, vocab, requires_grad=True)
labels = torch.randint(0, vocab, (rows,))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set to the current one
loss = F.cross_entropy(logits, labels) if which == "ce" else tvd_loss(logits, labels, gamma=0.5, min_weight=0.2)
loss.backward()
print(json.dumps({"peak_growth": status("VmHWM:") - before, "logits_bytes": logits.numel() * 4}))
"""


@pytest.mark.slow
def test_peak_memory_on_a_smollm2_sized_vocabulary_is_at_most_cross_entropys() -> None:
    # logits (4096, 49152) fp32 = 805 MB: cross-entropy keeps a log-softmax copy for backward, tvd_loss does not.
    peaks = {}
    for which in ("ce", "tvd"):
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_CHILD, which, "4096", "49152"], capture_output=True, text=True, check=True
        )
        peaks[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks["tvd"]["peak_growth"] <= peaks["ce"]["peak_growth"], peaks
    # and it is not just noise: the gradient alone is one full copy of the logits
    assert peaks["tvd"]["peak_growth"] >= 0.9 * peaks["tvd"]["logits_bytes"], peaks
