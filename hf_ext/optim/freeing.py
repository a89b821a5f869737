"""Gradient-freeing steps: each weight is projected, stepped and its gradient freed during the backward pass.

`StepInBackward` wraps a `ProjectedAdamW` and registers `Tensor.register_post_accumulate_grad_hook` on every
parameter: as soon as a weight's gradient is complete, the hook steps that weight and frees its gradient, so
training memory is about weights + optimizer state + the largest single gradient instead of weights + state + all
gradients. On FSDP2 (`fully_shard`) weights the hook fires on the sharded parameter after the reduce-scatter,
with the averaged gradient shard (FSDP calls the hooks of its sharded parameters).

A freed gradient is replaced by a storage-less marker of the same shape (`FreedGradient`) that remembers the
gradient's norm. What a step in backward cannot honour is refused with a ValueError naming the weight, never
silently wrong:

- gradient accumulation (a second backward before ``zero_grad``: the engine would add to the freed gradient);
- gradient clipping that would act: the gradient's norm is answered from the marker, so ``clip_grad_norm_`` (and
  `Trainer`'s logged ``grad_norm``) sees the true total norm; scaling by 1 (the norm under ``max_norm``, or the
  ``max_norm=inf`` of a norm only logged) is then exact, and any other scale raises, since the weights already
  stepped with the unclipped gradients;
- any other use of a gradient after backward.

DDP is refused too: its hooks fire on this process's own gradient, before DDP's all-reduce, so each rank would step
with a different gradient. FSDP1's flattened parameters are refused (the projection needs 2-D weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._pytree import tree_leaves

from .projected_adamw import ProjectedAdamW, _is_flat, _name
from .sharded import is_dtensor

aten = torch.ops.aten
_METADATA_OPS = (aten.view.default, aten.alias.default, aten.detach.default)
_NORM_OPS = (aten.linalg_vector_norm.default, aten._foreach_norm.Scalar)
_SCALE_OPS = (aten.mul_.Tensor, aten.mul_.Scalar, aten._foreach_mul_.Tensor, aten._foreach_mul_.Scalar)
TO_DO = (
    "With `Trainer`: `gradient_accumulation_steps=1` and `max_grad_norm=0` (or a bound the norm never reaches). "
    "Otherwise build the optimizer with `step_in_backward=False`."
)


def _refuse(marker: FreedGradient, what: str) -> ValueError:
    return ValueError(
        f"The gradient of `{marker.weight_name}` was already used and freed by its step in backward "
        f"(`step_in_backward=True`): {what}. {TO_DO}"
    )


class FreedGradient(Tensor):
    """A storage-less stand-in for a gradient already used by a step in backward, which remembers its norm.

    It has the gradient's shape, dtype and device (so it can be a ``.grad``) but holds no memory. Its 2-norm
    (``linalg_vector_norm``, ``_foreach_norm``) is the freed gradient's; scaling it by exactly 1 is a no-op; every
    other operation raises a ValueError naming the weight. ``zero_grad`` (or ``model.zero_grad()``, with torch's
    default ``set_to_none=True``) removes it.
    """

    weight_name: str
    norm: Tensor  # 0-dim: the freed gradient's 2-norm (this rank's part of a sharded gradient)

    @staticmethod
    def __new__(cls, like: Tensor, name: str, norm: Tensor, shape: tuple[int, ...] | None = None) -> FreedGradient:
        """A marker with ``like``'s shape (or ``shape``, contiguous), dtype and device, for the weight ``name``."""
        strides = like.stride() if shape is None else torch.empty(shape, device="meta").stride()
        marker = Tensor._make_wrapper_subclass(
            cls, like.shape if shape is None else shape, strides=strides, dtype=like.dtype, device=like.device,
            requires_grad=False,
        )  # fmt: skip
        marker.weight_name = name
        marker.norm = norm
        return marker

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        marker = next(a for a in tree_leaves((args, kwargs)) if isinstance(a, FreedGradient))  # lists: foreach ops
        if func in _METADATA_OPS:  # DTensor wraps its local part through a view: stay a marker
            shape = tuple(args[1]) if func is aten.view.default else None
            return FreedGradient(marker, marker.weight_name, marker.norm, shape)
        if func in _NORM_OPS:
            return _norms(func, args, kwargs)
        if func in _SCALE_OPS:
            return _scale(func, args, marker)
        if func in (aten.add_.Tensor, aten._foreach_add_.List):
            raise _refuse(
                marker,
                "gradient accumulation (a second backward before `zero_grad`) is not supported, nor a gradient that "
                "arrives in two parts (a weight shared by modules in two FSDP2 units: pass its name in "
                "`step_after_backward`, as `create_projected_optimizer` does for the model's shared weights)",
            )
        raise _refuse(marker, f"`{func}` after backward is not supported")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"FreedGradient({self.weight_name}, shape={tuple(self.shape)})"


def _norms(func: Any, args: tuple, kwargs: dict) -> Any:
    """2-norms: the remembered ones of markers, computed ones of real tensors (a foreach list may mix them)."""
    tensors = args[0]
    single = func is aten.linalg_vector_norm.default
    names = ("ord", "dim", "keepdim") if single else ("ord", "dtype")
    options = {**dict(zip(names, args[1:], strict=False)), **kwargs}  # positional ones, then keywords
    dtype = options.get("dtype")
    if float(options.get("ord", 2)) != 2.0 or options.get("dim") not in (None, [], ()) or options.get("keepdim"):
        marker = next(t for t in tree_leaves(tensors) if isinstance(t, FreedGradient))
        raise _refuse(marker, f"only its 2-norm over all elements is kept, not `{func}` with {options}")

    def norm(tensor: Tensor) -> Tensor:
        value = tensor.norm if isinstance(tensor, FreedGradient) else torch.linalg.vector_norm(tensor)
        return value if dtype is None else value.to(dtype)

    return norm(tensors) if single else [norm(t) for t in tensors]


def _scale(func: Any, args: tuple, marker: FreedGradient) -> Any:
    """Clipping's in-place scale: exact when the factor is 1 (nothing to clip), refused otherwise."""
    tensors, factor = args[0], args[1]
    factors = factor if isinstance(factor, (list, tuple)) else [factor]
    values = [float(f) for f in factors]
    if any(value != 1.0 for value in values):
        raise _refuse(
            marker,
            f"gradient clipping would scale it by {min(values):.4g} (the total norm exceeds `max_norm`), but the "
            "weights already stepped with the unclipped gradients",
        )
    if func in (aten._foreach_mul_.Tensor, aten._foreach_mul_.Scalar):
        for tensor in tensors:
            if not isinstance(tensor, FreedGradient):
                tensor.mul_(factor)
        return None
    return tensors


def _freed(param: Tensor, name: str) -> Tensor:
    """The marker for ``param``'s gradient: a DTensor of markers for a DTensor weight (FSDP2 checks the type)."""
    grad = param.grad
    part = grad.to_local() if is_dtensor(grad) else grad
    marker = FreedGradient(part, name, torch.linalg.vector_norm(part))
    if not is_dtensor(grad):
        return marker
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(marker, grad.device_mesh, grad.placements, shape=grad.shape, stride=grad.stride())


def is_freed(grad: Tensor | None) -> bool:
    """Whether ``grad`` is a gradient already used and freed by a step in backward."""
    if grad is None:
        return False
    return isinstance(grad.to_local() if is_dtensor(grad) else grad, FreedGradient)


class StepInBackward(Optimizer):
    r"""Steps a `ProjectedAdamW` weight by weight during backward and frees each gradient (gradient-freeing steps).

    Peak training memory becomes weights + optimizer state + activations + the largest single gradient (plus the
    step's transient buffers for that weight), instead of + every gradient. The wrapped optimizer's arithmetic is
    unchanged, so the weights follow the normal ``backward(); step()`` trajectory. `step` only steps parameters
    whose gradient no hook consumed (none, normally; all of them on the first step after the parameters were
    replaced, e.g. by accelerate's FSDP2 preparation, after which the hooks follow the new parameters), so the
    usual loop and `Trainer` work unchanged. ``param_groups`` and ``state`` are the wrapped optimizer's (learning
    rate schedulers act on them); `state_dict` / `load_state_dict` are its, so checkpoints (DCP included) are the
    same as without gradient-freeing.

    Refused with a ValueError naming the weight: gradient accumulation, gradient clipping that would change the
    gradients (clipping that would not, and the norm `Trainer` logs, are exact: the norms are remembered), DDP
    (hooks fire before DDP's all-reduce) and FSDP1's flattened parameters. Works on one process and on FSDP2
    (`fully_shard`) weights, whose norms are this rank's, so a DTensor norm reduces them as for real gradients.

    Args:
        optimizer (`ProjectedAdamW`): the optimizer to step in backward.
        step_after_backward (`Iterable[str]`, *optional*): names (the groups' ``param_names``) of parameters to step
            in `step` instead, with their gradient kept until then: weights shared by several modules, whose
            gradient FSDP2 may reduce in two parts when the modules sit in different units (tied embeddings under
            transformers' FSDP2 plan, which shards ``lm_head`` on its own). `create_projected_optimizer` passes the
            model's shared weights.

    Example:

    ```python
    >>> import torch
    >>> from hf_ext.optim import ProjectedAdamW, StepInBackward
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    >>> opt = StepInBackward(ProjectedAdamW(model.parameters(), lr=1e-3, rank=4))
    >>> for _ in range(2):
    ...     opt.zero_grad()
    ...     model(torch.randn(16, 64)).square().mean().backward()  # the weights step here
    ...     opt.step()  # nothing left to do
    >>> model[0].weight.grad  # freed
    FreedGradient(parameter 0 of its group (shape (128, 64)), shape=(128, 64))

    ```
    """

    def __init__(self, optimizer: ProjectedAdamW, *, step_after_backward: Iterable[str] = ()) -> None:
        if not isinstance(optimizer, ProjectedAdamW):
            raise ValueError(f"`optimizer` must be a ProjectedAdamW, got {type(optimizer).__name__}.")
        self._own: dict[str, Any] = {"param_groups": [], "state": {}}  # torch's __init__ fills these, then unused
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer  # from here on `param_groups` and `state` are the wrapped optimizer's
        self.step_after_backward = frozenset(step_after_backward)
        names = {n for group in self.param_groups for n in group.get("param_names", ())}
        unknown = sorted(self.step_after_backward - names)
        if unknown:
            raise ValueError(f"`step_after_backward` names no parameter of the optimizer's groups: {unknown}.")
        self._hooks: dict[Tensor, Any] = {}
        self._sync_hooks()

    # The wrapped optimizer's groups and state, even when something replaces them (torch's `load_state_dict` makes
    # new group dicts; accelerate swaps the parameters): learning-rate schedulers and DCP see one set of groups.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        inner = self.__dict__.get("optimizer")
        return self._own["param_groups"] if inner is None else inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is None:
            self._own["param_groups"] = value
        else:
            inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        inner = self.__dict__.get("optimizer")
        return self._own["state"] if inner is None else inner.state

    @state.setter
    def state(self, value: Any) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is None:
            self._own["state"] = value
        else:
            inner.state = value

    def _sync_hooks(self) -> None:
        """Hooks on exactly the current parameters (accelerate replaces them with FSDP2 shards after creation)."""
        current: dict[Tensor, str] = {}
        for group in self.param_groups:
            for position, param in enumerate(group["params"]):
                name = _name(group, position, param)
                if _is_flat(param):
                    raise ValueError(
                        f"`{name}` is a flattened FSDP1 parameter: gradient-freeing steps support one process and "
                        "FSDP2 (`fully_shard`). Shard with FSDP2, or use `step_in_backward=False`."
                    )
                if param.requires_grad and name not in self.step_after_backward:
                    current[param] = name
        for param in [p for p in self._hooks if p not in current]:
            self._hooks.pop(param).remove()
        for param, name in current.items():
            if param not in self._hooks:
                self._hooks[param] = param.register_post_accumulate_grad_hook(self._hook(name))

    def _hook(self, name: str) -> Callable[[Tensor], None]:
        def step_and_free(param: Tensor) -> None:
            if not is_dtensor(param) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise ValueError(
                    f"Gradient-freeing steps cannot step `{name}`: it is a plain (replicated) tensor in a "
                    f"{dist.get_world_size()}-process job, as under DDP, where this hook fires on this process's "
                    "own gradient before DDP's all-reduce, so each rank would step with a different gradient. Shard "
                    "the model with FSDP2 (`fully_shard`), whose hooks fire after the reduce-scatter, or use "
                    "`step_in_backward=False`."
                )
            self.optimizer.step_parameter(param)
            param.grad = _freed(param, name)

        return step_and_free

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Evaluate ``closure`` (its backward steps the weights) and step any parameter no hook consumed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for position, param in enumerate(group["params"]):
                if param.grad is not None and not is_freed(param.grad):
                    self.optimizer.step_parameter(param)
                    param.grad = _freed(param, _name(group, position, param))
        self._sync_hooks()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Remove the freed-gradient markers (whatever ``set_to_none``: they hold no memory to zero)."""
        for group in self.param_groups:
            for param in group["params"]:
                if is_freed(param.grad) or set_to_none:
                    param.grad = None
                elif param.grad is not None:
                    param.grad.zero_()
        self._sync_hooks()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
