"""The TVD (TaiLr) loss straight from the last hidden states and the LM head, without the full logits.

A causal LM's logits are ``tokens x vocab`` floats: 8,192 tokens of SmolLM2's 49,152-word vocabulary are 1.6 GB in
float32, and their gradient as much again. `linear_tvd_loss` projects ``chunk_rows`` hidden states at a time
through the head, keeps per token only its target log-probability and log-normaliser, and recomputes each chunk's
logits in the backward pass, so its temporaries are ``chunk_rows x vocab`` whatever the number of tokens (what
TRL's fused LM head does for its ``"nll"`` and ``"dft"`` losses). The TaiLr weight depends only on the target's
probability, so the loss is exactly `tvd_loss` on the materialised logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tvd import (
    _DEFAULT_CHUNK_ROWS,
    _check_chunk_rows,
    _check_label_range,
    _check_weight_settings,
    _normalise,
    tvd_weights,
)

__all__ = ["linear_tvd_loss"]


class _LinearTargetLogProbs(torch.autograd.Function):
    """Per row: ``log softmax(h W^T + b)[target]``, chunked over rows in both passes, float32 (float64 stays)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, chunk_rows: int) -> Tensor:
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logsumexp = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        target_logp = torch.empty_like(logsumexp)
        for start in range(0, hidden.shape[0], chunk_rows):
            end = start + chunk_rows
            logits = _project(hidden[start:end], weight, bias, dtype)  # (chunk, vocab)
            target_logit = logits.gather(1, target[start:end, None])[:, 0]
            top = logits.amax(dim=-1)
            lse = logits.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top)  # in place: one chunk at a time
            logsumexp[start:end] = lse
            target_logp[start:end] = target_logit - lse
            del logits  # before the next chunk's logits exist
        ctx.save_for_backward(hidden, weight, bias, target, logsumexp)
        ctx.chunk_rows = chunk_rows
        return target_logp

    @staticmethod
    def backward(ctx, grad_target: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        hidden, weight, bias, target, logsumexp = ctx.saved_tensors
        dtype = logsumexp.dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_bias else None
        grad_target = grad_target.to(dtype)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            end = start + ctx.chunk_rows
            g = grad_target[start:end, None]  # (chunk, 1)
            # d log p(t) / d z = onehot(t) - softmax(z), times the incoming gradient, in place on the logits
            grad = _project(hidden[start:end], weight, bias, dtype).sub_(logsumexp[start:end, None]).exp_().mul_(-g)
            grad.scatter_add_(1, target[start:end, None], g)
            if need_hidden:
                grad_hidden[start:end] = grad.to(weight.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(grad.T, hidden[start:end].to(dtype))
            if need_bias:
                grad_bias += grad.sum(dim=0)
            del grad  # before the next chunk's gradient exists
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The LM head on a chunk, in the weights' dtype (as ``nn.Linear`` computes it), then upcast."""
    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    return logits.to(dtype)


def linear_tvd_loss(
    hidden_states: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    gamma: float,
    min_weight: float = 0.0,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    chunk_rows: int = _DEFAULT_CHUNK_ROWS,
    return_weight_mean: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`tvd_loss` of ``hidden_states @ weight.T + bias`` against ``labels``, without materialising those logits.

    Args:
        hidden_states (`torch.Tensor` of shape `(..., hidden)`): the last hidden states (after the final norm),
            already aligned with ``labels`` (for a causal LM: positions ``:-1`` against labels ``1:``).
        weight (`torch.Tensor` of shape `(vocab, hidden)`): the LM head's weight, same dtype as ``hidden_states``.
        labels (`torch.Tensor` of shape `(...)`): target ids; ``ignore_index`` marks targets to skip (they cost no
            projection).
        gamma (`float`): in [0, 1]; 0 is cross-entropy, 1 with ``min_weight=0`` is DFT.
        min_weight (`float`, *optional*, defaults to `0.0`): the floor of the weights, in [0, 1].
        bias (`torch.Tensor` of shape `(vocab,)`, *optional*): the LM head's bias, if it has one.
        ignore_index (`int`, *optional*, defaults to `-100`): label value of targets that contribute nothing.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): divide the summed loss by this (the Trainer's
            count of targets over the accumulated / multi-process batch) instead of by this call's count.
        chunk_rows (`int`, *optional*, defaults to `1024`): tokens projected at once; the temporaries are
            ``chunk_rows x vocab`` float32.
        return_weight_mean (`bool`, *optional*, defaults to `False`): also return the mean weight of the
            counted targets (for logging; 1.0 at gamma = 0).

    Returns:
        `torch.Tensor`: the scalar loss (float32; float64 for float64 inputs), or ``(loss, weight_mean)``. An
        all-ignored batch gives 0 with zero gradients.

    Example:

    ```python
    >>> import torch
    >>> from hf_ext.losses import linear_tvd_loss, tvd_loss
    >>> hidden, head = torch.randn(6, 16), torch.randn(50, 16)
    >>> labels = torch.tensor([3, 7, -100, 0, 49, 12])
    >>> fused = linear_tvd_loss(hidden, head, labels, gamma=0.5, min_weight=0.2, chunk_rows=4)
    >>> bool(torch.isclose(fused, tvd_loss(hidden @ head.T, labels, gamma=0.5, min_weight=0.2)))
    True

    ```
    """
    if not isinstance(hidden_states, Tensor) or not hidden_states.is_floating_point() or hidden_states.dim() < 2:
        raise ValueError("`hidden_states` must be a floating-point tensor of shape (..., hidden).")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden_states.shape[-1]:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"`weight` must be the LM head's (vocab, hidden={hidden_states.shape[-1]}) matrix, got {got}.")
    if weight.dtype != hidden_states.dtype:
        raise ValueError(f"`weight` ({weight.dtype}) and `hidden_states` ({hidden_states.dtype}) must share a dtype "
                         "(the LM head computes in one).")  # fmt: skip
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"`bias` must be a ({weight.shape[0]},) tensor or None.")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError("`labels` must be an integer tensor of token ids.")
    if labels.shape != hidden_states.shape[:-1]:
        raise ValueError(f"`labels` must have the shape of `hidden_states` without its last dimension: got labels "
                         f"{tuple(labels.shape)} for hidden_states {tuple(hidden_states.shape)}.")  # fmt: skip
    _check_weight_settings(gamma, min_weight)
    _check_chunk_rows(chunk_rows)
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    labels = labels.reshape(-1)
    counted = labels != ignore_index
    _check_label_range(labels, counted, weight.shape[0], ignore_index, "token ids")
    target_logp = _LinearTargetLogProbs.apply(hidden_states[counted], weight, bias, labels[counted], chunk_rows)
    weights = tvd_weights(target_logp, gamma, min_weight)
    # `hidden_states[counted]` keeps the graph connected when nothing is counted: the sum is a differentiable 0
    total = -(weights * target_logp).sum()
    count = counted.sum().to(total.dtype)
    loss = _normalise(total, count, num_items_in_batch)
    if return_weight_mean:
        return loss, weights.sum() / count.clamp_min(1.0)
    return loss
