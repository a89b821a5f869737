"""ProjectedAdamW: full-weight training whose Adam moments live in a low-rank projection of each gradient."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .projection import (
    change_basis,
    change_basis_second_moment,
    project,
    projection_side,
    random_basis,
    side_length,
    svd_basis,
)

PROJECTIONS = ("random", "svd")
BasisFn = Callable[[Tensor, int, str], Tensor]  # (grad, rank, side) -> (side_length, rank) orthonormal basis


def _is_sharded(param: Tensor) -> bool:
    """FSDP's flat or DTensor parameters: not the full 2-D weight the projection needs."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    return isinstance(param, DTensor) or bool(getattr(param, "_fsdp_flattened", False))


def _check_hyperparameters(group: dict[str, Any]) -> None:
    if not group["lr"] >= 0.0:
        raise ValueError(f"Invalid learning rate `lr`: {group['lr']} (expected >= 0).")
    if not group["eps"] >= 0.0:
        raise ValueError(f"Invalid `eps`: {group['eps']} (expected >= 0).")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid `betas`: {betas} (expected two values in [0, 1)).")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"Invalid `weight_decay`: {group['weight_decay']} (expected >= 0).")
    rank = group.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"Invalid `rank`: {rank!r} (expected an int >= 1, or no `rank` for plain AdamW).")
    interval = group["update_interval"]
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"Invalid `update_interval`: {interval!r} (expected an int >= 1).")
    if not group["scale"] > 0.0:
        raise ValueError(f"Invalid `scale`: {group['scale']} (expected > 0).")
    projection = group["projection"]
    if not callable(projection) and projection not in PROJECTIONS:
        raise ValueError(f"Invalid `projection`: {projection!r} (expected one of {PROJECTIONS} or a callable).")


class ProjectedAdamW(Optimizer):
    r"""AdamW whose moments, for the weights of groups with a ``rank``, live in a rank-``r`` projection of the gradient.

    A parameter group is projected when it carries a ``rank`` key (GaLore's convention; it may also override
    ``projection``, ``update_interval``, ``scale`` and ``seed``). Other groups, 1-D parameters and weights whose
    shorter side is smaller than ``rank`` get exact AdamW (decoupled weight decay, torch's arithmetic). For a
    projected ``(rows, cols)`` weight with basis ``P`` on its shorter side (``side``, ``rank`` columns):

    - ``R = Pᵀ G`` or ``G P``; Adam moments of ``R`` (``rank x cols`` or ``rows x rank``, float32);
    - ``W <- W (1 - lr * weight_decay) - lr * scale * P (m̂ / (sqrt(v̂) + eps))`` (or ``(...) Pᵀ``);
    - every ``update_interval`` steps a new basis. The first moment is carried into it
      (``m <- P_newᵀ P_old m``), and so is the second moment, by its diagonal: with ``T = P_newᵀ P_old``,
      ``v_i <- sum_j T_ij² v_j + (1 - sum_j T_ij²) mean(v)`` (`change_basis_second_moment`). Resetting ``v`` while
      carrying ``m`` is unstable (a carried ``m`` over a fresh, near-zero ``v`` gives huge steps; it diverged on a small
      MLP), and carrying ``T² v`` alone underestimates it by ``rank / side`` after a random resample.

    Args:
        params (`Iterable`): parameters or parameter groups (dicts); a group with ``rank`` is projected.
        lr (`float`, *optional*, defaults to `1e-3`): learning rate.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`): Adam's decay rates, in [0, 1).
        eps (`float`, *optional*, defaults to `1e-8`): added to the denominator.
        weight_decay (`float`, *optional*, defaults to `1e-2`): decoupled weight decay, on the full weight.
        rank (`int`, *optional*): default rank of every group (so ``Trainer``'s ``optimizer_cls_and_kwargs`` can
            project all 2-D weights); groups set their own with a ``rank`` key. None: no projection by default.
        projection (`str` or callable, *optional*, defaults to `"random"`): ``"random"`` (Gaussian, orthonormalised,
            drawn from ``(seed, parameter index, period)``: the same on every process without communication),
            ``"svd"`` (top singular vectors of the gradient at the period's first step), or a function
            ``(grad, rank, side) -> basis`` of shape ``(side_length, rank)``. Each basis is made once per period and
            kept in the state (``side_length x rank`` floats, at most half the moments' size): drawing a random one
            again at every step, as Flora does to save that memory, cost 1.5x AdamW's step time on SmolLM2 (CPU).
        update_interval (`int`, *optional*, defaults to `200`): steps between basis changes.
        scale (`float`, *optional*, defaults to `1.0`): multiplies the projected update (GaLore uses 0.25).
        seed (`int`, *optional*, defaults to `0`): seed of the random bases.

    State: only tensors (``torch.load(weights_only=True)`` works): ``step``, ``exp_avg``, ``exp_avg_sq`` and, for
    projected weights, ``period`` and ``basis``.

    Distributed: under DDP every rank sees the same averaged gradient and draws the same random basis, so ranks stay
    identical without communication. FSDP shards weights (flat or DTensor parameters), which a projection of the
    full weight cannot use: a projected group holding such a parameter raises a ValueError; use DDP, or keep those
    weights in groups without ``rank``.

    Example:

    ```python
    >>> import torch
    >>> from hf_ext.optim import ProjectedAdamW
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    >>> weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    >>> others = [m.bias for m in model if isinstance(m, torch.nn.Linear)]
    >>> opt = ProjectedAdamW([{"params": weights, "rank": 4}, {"params": others}], lr=1e-3, update_interval=50)
    >>> model(torch.randn(16, 64)).square().mean().backward()
    >>> opt.step()
    ```
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int | None = None,
        projection: str | BasisFn = "random",
        update_interval: int = 200,
        scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "rank": rank,
            "projection": projection,
            "update_interval": update_interval,
            "scale": scale,
            "seed": seed,
        }
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group)
        if group["rank"] is not None:
            for param in group["params"]:
                if _is_sharded(param):
                    raise ValueError(
                        "ProjectedAdamW projects full 2-D weights, but a parameter of a group with `rank` is sharded "
                        "(FSDP flat or DTensor parameter). Use DDP, or put sharded weights in a group without `rank` "
                        "(exact AdamW)."
                    )

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with a callable ``projection`` replaced by the marker ``"callable"`` (tensors, strings
        and numbers only, so ``torch.load(weights_only=True)`` works); `load_state_dict` puts the callable back."""
        state = super().state_dict()
        for group in state["param_groups"]:
            if callable(group.get("projection")):
                group["projection"] = "callable"
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        callables = [group["projection"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, projection in zip(self.param_groups, callables, strict=True):
            if group["projection"] == "callable":
                if not callable(projection):
                    raise ValueError("The state was saved with a callable `projection`: build the optimizer with it.")
                group["projection"] = projection
        # torch casts every floating state tensor to its parameter's dtype; moments stay float32 and counters exact.
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for pid, param in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, Tensor):  # counters stay on the CPU (no device sync when read each step)
                    device = "cpu" if key in ("step", "period") else param.device
                    self.state[param][key] = value.to(device=device, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimisation step (``closure`` re-evaluates the loss with gradients enabled, as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            for param in group["params"]:
                index += 1  # the parameter's global position: part of its random basis's seed
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("ProjectedAdamW does not support sparse gradients.")
                rank = group["rank"]
                if rank is not None and param.dim() == 2 and rank <= min(param.shape):
                    if _is_sharded(param):
                        raise ValueError("ProjectedAdamW cannot project a sharded (FSDP) weight: use DDP.")
                    self._projected_step(param, group, index)
                else:
                    self._adamw_step(param, group)
        return loss

    def _adamw_step(self, param: Tensor, group: dict[str, Any]) -> None:
        """torch's single-tensor AdamW arithmetic (moments in float32 whatever the parameter's dtype)."""
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            dtype = torch.float64 if param.dtype == torch.float64 else torch.float32  # never below float32
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        exact = param.dtype in (torch.float32, torch.float64)  # low-precision weights: update an fp32 copy
        work = param if exact else param.float()
        grad = param.grad if param.grad.dtype == work.dtype else param.grad.to(work.dtype)
        state["step"] += 1
        step = float(state["step"])
        work.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        work.addcdiv_(state["exp_avg"], denom, value=-step_size)
        if work is not param:
            param.copy_(work)

    def _basis(self, group: dict[str, Any], grad: Tensor, index: int, period: int) -> Tensor:
        side = projection_side(grad.shape)
        projection, rank = group["projection"], group["rank"]
        if projection == "random":
            length = side_length(grad.shape, side)
            return random_basis(length, rank, seed=group["seed"], index=index, period=period, device=grad.device)
        if projection == "svd":
            return svd_basis(grad, rank, side)
        basis = projection(grad, rank, side).to(device=grad.device, dtype=torch.float32)
        expected = (side_length(grad.shape, side), rank)
        if tuple(basis.shape) != expected:
            raise ValueError(f"`projection` returned a basis of shape {tuple(basis.shape)}, expected {expected}.")
        return basis

    def _projected_step(self, param: Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[param]
        grad = param.grad.float()  # (rows, cols)
        side = projection_side(grad.shape)
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["period"] = torch.tensor(-1, dtype=torch.int64)
        state["step"] += 1
        step = int(state["step"])
        period = (step - 1) // group["update_interval"]
        if period != int(state["period"]):
            basis = self._basis(group, grad, index, period)
            if "exp_avg" in state:
                old = state["basis"]
                state["exp_avg"] = change_basis(state["exp_avg"], old, basis, side)
                state["exp_avg_sq"] = change_basis_second_moment(state["exp_avg_sq"], old, basis, side)
            else:
                reduced_shape = project(grad, basis, side).shape
                state["exp_avg"] = torch.zeros(reduced_shape, dtype=torch.float32, device=grad.device)
                state["exp_avg_sq"] = torch.zeros(reduced_shape, dtype=torch.float32, device=grad.device)
            state["basis"] = basis
            state["period"].fill_(period)
        basis = state["basis"]
        reduced = project(grad, basis, side)
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        state["exp_avg"].lerp_(reduced, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(reduced, reduced, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        normalized = state["exp_avg"] / denom  # (rank, cols) or (rows, rank)
        work = param if param.dtype in (torch.float32, torch.float64) else param.float()
        if group["weight_decay"]:
            work.mul_(1 - lr * group["weight_decay"])
        # W -= step * P N (left) or N Pᵀ (right), fused into one in-place matmul-add (no full-size temporary)
        basis, normalized = basis.to(work.dtype), normalized.to(work.dtype)
        pair = (basis, normalized) if side == "left" else (normalized, basis.T)
        work.addmm_(*pair, alpha=-step_size * group["scale"])
        if work is not param:
            param.copy_(work)
