"""TVD (TaiLr): cross-entropy re-weighted towards total variation distance, against over-confidence.

Per target with model probability ``p``: ``w = p / (gamma + (1 - gamma) p)``, computed without gradient and
clamped to ``[min_weight, 1]``; the loss is ``-w log p`` (plus an un-reweighted label-smoothing term). ``gamma = 0``
gives ``w = 1``: plain cross-entropy. At ``gamma = 1``, ``w = p``: the gradient is that of ``1 - p`` (the TVD to the
one-hot target), which a noisy target cannot blow up the way it blows up ``-log p``; with ``min_weight = 0`` this is
Dynamic Fine-Tuning (DFT, Wu et al. 2025: ``-p.detach() log p``, TRL's ``SFTConfig(loss_type="dft")``).

The log-probabilities are computed by a custom autograd function that walks the rows in chunks, in float32, in
both passes: it keeps only O(rows) statistics for the backward pass (no log-softmax copy of the logits, which
`F.cross_entropy` keeps), so its peak memory is at most `F.cross_entropy`'s, whatever the vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["tvd_loss", "tvd_weights"]

# Rows processed at once by the chunked log-softmax: bounds the float32 temporaries to chunk x vocab.
_DEFAULT_CHUNK_ROWS = 1024


class _TargetLogProbs(torch.autograd.Function):
    """Per row: ``log p(target)`` and ``mean_c log p(c)``, chunked, float32; gradients for both."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, chunk_rows: int) -> tuple[Tensor, Tensor]:
        rows = logits.shape[0]
        dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 for half inputs, fp64 stays fp64
        logsumexp = torch.empty(rows, dtype=dtype, device=logits.device)
        target_logp = torch.empty_like(logsumexp)
        mean_logp = torch.empty_like(logsumexp)
        for start in range(0, rows, chunk_rows):
            chunk = logits[start : start + chunk_rows].to(dtype)  # (chunk, vocab)
            lse = torch.logsumexp(chunk, dim=-1)
            logsumexp[start : start + chunk_rows] = lse
            target_logp[start : start + chunk_rows] = (
                chunk.gather(1, target[start : start + chunk_rows, None])[:, 0] - lse
            )
            mean_logp[start : start + chunk_rows] = chunk.mean(dim=-1) - lse
        ctx.save_for_backward(logits, target, logsumexp)
        ctx.chunk_rows = chunk_rows
        return target_logp, mean_logp

    @staticmethod
    def backward(ctx, grad_target: Tensor, grad_mean: Tensor) -> tuple[Tensor, None, None]:
        logits, target, logsumexp = ctx.saved_tensors
        rows, vocab = logits.shape
        dtype = logsumexp.dtype
        grad_logits = torch.empty_like(logits)
        grad_target = grad_target.to(dtype)
        grad_mean = grad_mean.to(dtype)
        for start in range(0, rows, ctx.chunk_rows):
            end = start + ctx.chunk_rows
            g_t, g_m = grad_target[start:end, None], grad_mean[start:end, None]  # (chunk, 1)
            # d log p(t) / d z = onehot(t) - softmax(z);  d mean_c log p(c) / d z = 1/vocab - softmax(z)
            grad = torch.exp(logits[start:end].to(dtype) - logsumexp[start:end, None]).mul_(-(g_t + g_m))
            grad.add_(g_m / vocab)
            grad.scatter_add_(1, target[start:end, None], g_t)
            grad_logits[start:end] = grad
        return grad_logits, None, None


def _normalise(total: Tensor, count: Tensor, num_items_in_batch: int | Tensor | None) -> Tensor:
    """``total`` over the Trainer's ``num_items_in_batch`` (the whole step's targets) when given, else over this
    call's ``count``. An all-ignored batch sums to exactly 0: dividing by max(denominator, 1) then returns 0, not
    0/0 = NaN."""
    if num_items_in_batch is None:
        return total / count.clamp_min(1.0)
    return total / torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device).clamp_min(1.0)


def tvd_weights(target_logp: Tensor, gamma: float, min_weight: float = 0.0) -> Tensor:
    """``w = p / (gamma + (1 - gamma) p)`` clamped to ``[min_weight, 1]``, without gradient.

    Computed as ``1 / (1 - gamma + gamma * exp(-log p))``: exactly 1 at ``gamma = 0``, and 0 (never NaN) where ``p``
    underflows.
    """
    with torch.no_grad():
        weights = 1.0 / (1.0 - gamma + gamma * torch.exp(-target_logp))
        return weights.clamp_(min=min_weight, max=1.0)


def _check_weight_settings(gamma: float, min_weight: float) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"`gamma` must be a number in [0, 1], got {gamma!r}.")
    if isinstance(min_weight, bool) or not isinstance(min_weight, (int, float)) or not 0.0 <= min_weight <= 1.0:
        raise ValueError(f"`min_weight` must be a number in [0, 1], got {min_weight!r}.")


def _check_chunk_rows(chunk_rows: int) -> None:
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"`chunk_rows` must be an int >= 1, got {chunk_rows!r}.")


def _check_label_range(labels: Tensor, counted: Tensor, size: int, ignore_index: int, what: str) -> None:
    """Every counted label in ``[0, size)``; ``what`` names them in the error (``class indices``, ``token ids``)."""
    bad = counted & ((labels < 0) | (labels >= size))
    if bool(bad.any()):
        raise ValueError(f"`labels` must be {what} in [0, {size}) or ignore_index={ignore_index}; got "
                         f"{labels[bad][:5].tolist()}.")  # fmt: skip


def _validate(logits: Tensor, labels: Tensor, gamma: float, min_weight: float, label_smoothing: float) -> None:
    _check_weight_settings(gamma, min_weight)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"`label_smoothing` must be a number in [0, 1], got {label_smoothing!r}.")
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 2:
        raise ValueError("`logits` must be a floating-point tensor of shape (..., num_classes).")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError("`labels` must be an integer tensor of class indices.")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"`labels` must have the shape of `logits` without its last (class) dimension: got labels "
            f"{tuple(labels.shape)} for logits {tuple(logits.shape)}."
        )


def tvd_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    gamma: float,
    min_weight: float = 0.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    num_items_in_batch: int | Tensor | None = None,
    chunk_rows: int = _DEFAULT_CHUNK_ROWS,
    return_weight_mean: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The TaiLr loss: cross-entropy with each target's term weighted by ``w = p / (gamma + (1 - gamma) p)``.

    Args:
        logits (`torch.Tensor` of shape `(..., num_classes)`): any floating dtype (bf16/fp16 are computed in fp32).
        labels (`torch.Tensor` of shape `(...)`): class indices; ``ignore_index`` marks targets to skip. Already
            aligned with ``logits`` (shift causal-LM labels first).
        gamma (`float`): in [0, 1]. 0 is cross-entropy; the TaiLr paper uses 0.1 (translation) to 0.8
            (summarisation); 1 with ``min_weight=0`` is DFT.
        min_weight (`float`, *optional*, defaults to `0.0`): the floor ``b`` of the weights, in [0, 1] (the paper
            uses 0.2-0.3, so no target is ignored entirely).
        ignore_index (`int`, *optional*, defaults to `-100`): label value of targets that contribute nothing.
        label_smoothing (`float`, *optional*, defaults to `0.0`): as in `F.cross_entropy`; its term is not
            re-weighted: ``(1 - eps) * w * (-log p_t) + eps * mean_c(-log p_c)``.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): divide the summed loss by this (the Trainer's
            count of targets over the whole accumulated / multi-process batch) instead of by this call's count.
        chunk_rows (`int`, *optional*, defaults to `1024`): rows of logits handled at once.
        return_weight_mean (`bool`, *optional*, defaults to `False`): also return the mean weight of the
            counted targets (for logging; 1.0 at gamma = 0).

    Returns:
        `torch.Tensor`: the scalar loss (float32), or ``(loss, weight_mean)``. An all-ignored batch gives 0 with
        zero gradients.

    Example:

    ```python
    >>> import torch
    >>> logits, labels = torch.randn(8, 5), torch.tensor([0, 1, 2, 3, 4, 0, 1, -100])
    >>> bool(torch.isclose(tvd_loss(logits, labels, gamma=0.0), torch.nn.functional.cross_entropy(logits, labels)))
    True
    >>> tvd_loss(logits, labels, gamma=0.5, min_weight=0.2) < tvd_loss(logits, labels, gamma=0.0)
    tensor(True)

    ```
    """
    _validate(logits, labels, gamma, min_weight, label_smoothing)
    _check_chunk_rows(chunk_rows)
    num_classes = logits.shape[-1]
    logits = logits.reshape(-1, num_classes)
    labels = labels.reshape(-1)
    counted = labels != ignore_index
    if not torch.compiler.is_compiling():
        _check_label_range(labels, counted, num_classes, ignore_index, "class indices")
    count = counted.sum().to(torch.promote_types(logits.dtype, torch.float32))
    if gamma == 0.0 and logits.dtype in (torch.float32, torch.float64):
        # Every weight is exactly 1: this is cross-entropy, computed by F.cross_entropy itself (the same numbers as
        # transformers' own losses). Half-precision logits take the chunked path, which upcasts chunk by chunk.
        total = F.cross_entropy(
            logits, labels, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
        )
        weights = torch.ones_like(total)
        mask = None
    else:
        safe_labels = torch.where(counted, labels, torch.zeros_like(labels))
        target_logp, mean_logp = _TargetLogProbs.apply(logits, safe_labels, chunk_rows)
        weights = tvd_weights(target_logp, gamma, min_weight)
        per_target = -(1.0 - label_smoothing) * weights * target_logp
        if label_smoothing > 0:
            per_target = per_target - label_smoothing * mean_logp
        mask = counted.to(per_target.dtype)
        total = (per_target * mask).sum()
    loss = _normalise(total, count, num_items_in_batch)
    if return_weight_mean:
        weight_mean = weights if mask is None else (weights * mask).sum() / count.clamp_min(1.0)
        return loss, weight_mean
    return loss
