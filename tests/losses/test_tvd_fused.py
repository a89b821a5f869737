"""`linear_tvd_loss`: the TaiLr loss of ``h W^T + b`` written out on the full logits, chunked or not; its memory."""

from __future__ import annotations

import pytest
import torch

from hf_ext.losses import linear_tvd_loss
from hf_ext.tensor_memory import TensorBytes


def reference(hidden, weight, bias, labels, gamma, min_weight=0.0, ignore_index=-100, denominator=None):
    """The paper's criterion on the materialised logits: w = p / (gamma + (1 - gamma) p), no grad, clamped."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    keep = labels != ignore_index
    logp_t = torch.log_softmax(logits, dim=-1)[keep].gather(1, labels[keep][:, None])[:, 0]
    p = logp_t.exp()
    w = (p / (gamma + (1 - gamma) * p)).detach().clamp(min_weight, 1.0)
    total = -(w * logp_t).sum()
    return total / (keep.sum() if denominator is None else denominator)


def _data(rows=37, hidden=8, vocab=53, dtype=torch.float64, with_bias=True):
    torch.manual_seed(rows)
    h = (torch.randn(rows, hidden, dtype=dtype) * 2).requires_grad_()
    w = torch.randn(vocab, hidden, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, dtype=dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, vocab, (rows,))
    labels[::4] = -100
    return h, w, b, labels


@pytest.mark.parametrize(("gamma", "min_weight"), [(0.0, 0.0), (0.5, 0.2), (0.9, 0.0), (1.0, 0.0), (1.0, 0.1)])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1024])
@pytest.mark.parametrize("with_bias", [True, False])
def test_loss_and_gradients_match_the_full_logits_reference(gamma, min_weight, chunk_rows, with_bias) -> None:
    h, w, b, labels = _data(with_bias=with_bias)
    params = [h, w] if b is None else [h, w, b]
    ours = linear_tvd_loss(h, w, labels, bias=b, gamma=gamma, min_weight=min_weight, chunk_rows=chunk_rows)
    want = reference(h, w, b, labels, gamma, min_weight)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    for g_ours, g_want in zip(torch.autograd.grad(ours, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(g_ours, g_want, rtol=1e-10, atol=1e-12)


def test_batched_shapes_and_num_items_in_batch() -> None:
    h, w, b, labels = _data(rows=24)
    ours = linear_tvd_loss(h.reshape(2, 12, -1), w, labels.reshape(2, 12), bias=b, gamma=0.5, num_items_in_batch=40)
    torch.testing.assert_close(ours, reference(h, w, b, labels, 0.5, denominator=40), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_float32_and_stays_finite(dtype) -> None:
    h, w, _, labels = _data(rows=64, hidden=16, vocab=300, dtype=torch.float32, with_bias=False)
    h16, w16 = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    ours = linear_tvd_loss(h16, w16, labels, gamma=0.5, min_weight=0.2, chunk_rows=16)
    assert ours.dtype == torch.float32
    want = reference(h16.float(), w16.float(), None, labels, 0.5, 0.2)
    torch.testing.assert_close(ours.double(), want, rtol=2e-2, atol=2e-2)
    g_h, g_w = torch.autograd.grad(ours, [h16, w16])
    assert g_h.dtype == g_w.dtype == dtype and torch.isfinite(g_h).all() and torch.isfinite(g_w).all()
    r_h, r_w = torch.autograd.grad(want, [h16, w16])  # the reference's gradients, through the same upcast
    torch.testing.assert_close(g_w.double(), r_w.double(), rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(g_h.double(), r_h.double(), rtol=5e-2, atol=5e-3)


def test_an_all_ignored_batch_is_zero_with_zero_gradients() -> None:
    h, w, b, _ = _data()
    loss = linear_tvd_loss(h, w, torch.full((37,), -100), bias=b, gamma=0.5)
    assert loss.item() == 0.0
    assert all(g.abs().sum() == 0 for g in torch.autograd.grad(loss, [h, w, b]))


def _peak(rows: int, hidden: int, vocab: int, chunk: int) -> int:
    h = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    with TensorBytes() as probe:
        linear_tvd_loss(h, w, labels, gamma=0.5, chunk_rows=chunk).backward()
    return probe.peak


def test_temporaries_are_chunk_rows_by_vocab_not_tokens_by_vocab() -> None:
    hidden, vocab, chunk = 32, 8192, 128
    small, large = _peak(1024, hidden, vocab, chunk), _peak(4096, hidden, vocab, chunk)
    grads = (4096 + 2 * vocab) * hidden * 4  # h.grad, w.grad and w's float32 accumulator
    assert large <= 1.1 * chunk * vocab * 4 + grads + 2 * 4096 * hidden * 4 + 64 * 4096, large  # one chunk
    # 3,072 more tokens cost O(tokens x hidden) bytes, not a row of logits each (3,072 x 8,192 x 4 = 96 MiB)
    assert large - small <= 3072 * (4 * hidden * 4 + 64), (small, large)
    assert large < 4096 * vocab * 4 / 4  # a quarter of what the logits alone would take


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 1.5}, r"`gamma` must be a number in \[0, 1\]"),
        ({"gamma": 0.5, "min_weight": -0.1}, r"`min_weight` must be a number in \[0, 1\]"),
        ({"gamma": 0.5, "chunk_rows": 0}, r"`chunk_rows` must be an int >= 1"),
        ({"gamma": 0.5, "weight": torch.randn(53, 7)}, r"`weight` must be the LM head's \(vocab, hidden=8\) matrix"),
        ({"gamma": 0.5, "weight": torch.randn(53, 8, dtype=torch.float32)}, r"must share a dtype"),
        ({"gamma": 0.5, "bias": torch.randn(52, dtype=torch.float64)}, r"`bias` must be a \(53,\) tensor"),
        ({"gamma": 0.5, "labels": torch.full((37,), 53)}, r"token ids in \[0, 53\) or ignore_index=-100; got \[53"),
        ({"gamma": 0.5, "labels": torch.zeros(36, dtype=torch.long)}, r"`labels` must have the shape"),
        ({"gamma": 0.5, "labels": torch.zeros(37)}, r"`labels` must be an integer tensor"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match) -> None:
    h, w, _, labels = _data()
    args = {"hidden_states": h, "weight": w, "labels": labels, **kwargs}
    with pytest.raises(ValueError, match=match):
        linear_tvd_loss(args.pop("hidden_states"), args.pop("weight"), args.pop("labels"), **args)
