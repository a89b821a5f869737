"""ProjectedAdamW: full-weight training whose Adam moments live in a low-rank projection of each gradient."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .projection import carry_first_moment, carry_second_moment, projection_side, random_basis, side_length, svd_basis
from .sharded import (
    RowShard,
    as_row_sharded,
    broadcast_basis,
    local,
    place_loaded_state,
    project_rows,
    row_shard,
    rows_of,
    transition,
)

PROJECTIONS = ("random", "svd")
BasisFn = Callable[[Tensor, int, str], Tensor]  # (grad, rank, side) -> (side_length, rank) orthonormal basis


COUNTERS = ("step", "period")  # CPU scalars in the state; everything else has the shapes `state_shapes` gives


def _is_flat(param: Tensor) -> bool:
    """FSDP1's flattened parameters: a 1-D concatenation of weights, which no projection of a 2-D weight can use."""
    return bool(getattr(param, "_fsdp_flattened", False))


def is_projected(param: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``param`` gets the projected step in ``group``: a 2-D weight whose shorter side is at least ``rank``."""
    rank = group["rank"]
    return rank is not None and param.dim() == 2 and rank <= min(param.shape)


def state_shapes(param: Tensor, group: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Global shape of each state tensor of ``param`` and whether it is sharded like its (row-sharded) weight.

    Projected ``(rows, cols)`` weights: basis ``(side, rank)``; moments ``(rank, cols)`` (left) or ``(rows, rank)``
    (right). Left: the basis is row-sharded, the moments replicated; right: the reverse. AdamW: the weight's shape,
    sharded like it.
    """
    shape = tuple(param.shape)
    if not is_projected(param, group):
        return {"exp_avg": (shape, True), "exp_avg_sq": (shape, True)}
    rank, side = group["rank"], projection_side(shape)
    moments = (rank, shape[1]) if side == "left" else (shape[0], rank)
    return {
        "exp_avg": (moments, side == "right"),
        "exp_avg_sq": (moments, side == "right"),
        "basis": ((side_length(shape, side), rank), side == "left"),
    }


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
    projected weights, ``period`` and ``basis``. Errors name the weight when the groups carry ``param_names``
    (``ProjectedAdamW(model.named_parameters())``, or `create_projected_optimizer`).

    Distributed: under DDP every rank sees the same averaged gradient and draws the same random basis, so ranks stay
    identical without communication. Under FSDP2 (`fully_shard`: DTensor weights sharded on their rows, ``n``
    ranks) each rank steps its rows without gathering weights or gradients (`hf_ext.optim.sharded`). Communication
    per ``rows x cols`` weight, in float32 words, on top of FSDP's own all-gather and reduce-scatter of the weight:

    | basis | side | per step | per period (every ``update_interval`` steps) |
    |---|---|---|---|
    | random | right (``rows > cols``) | none | none |
    | random | left (``rows <= cols``) | all-reduce of ``Pᵀ G``: ``rank x cols`` | all-reduce of ``T``: ``rank²`` |
    | svd / callable | right | none | all-gather of ``G``: ``rows x cols``; broadcast of ``P``: ``cols x rank`` |
    | svd / callable | left | ``rank x cols`` | all-gather of ``G``; broadcast of ``P``: ``rows x rank``; ``rank²`` |

    ``T = P_newᵀ P_old``. The per-step all-reduce is ``rank / rows`` of FSDP's reduce-scatter. The svd basis is
    exact (the gathered gradient's SVD, the first rank's copy broadcast so all agree): one full gradient per weight
    per period, transiently, on each rank. Sharded like the weight (DTensor, global shapes): right-side moments
    (``rows x rank``), left-side bases (``rows x rank``: each rank keeps its rows of the basis every rank draws),
    AdamW moments. Replicated (plain tensors, rank-``r`` sized): right-side bases (``cols x rank``), left-side
    moments (``rank x cols``). The state has a single process's global shapes, so checkpoints through
    `torch.distributed.checkpoint` (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, sharded or full)
    reshard to any world size; `load_state_dict` also takes a full (single-process) state on a sharded model.
    FSDP1's flattened parameters and other DTensor placements (``Shard(1)``, 2-D meshes) in a projected group raise
    a ValueError naming the weight.

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
    >>> opt.state[model[0].weight]["exp_avg"].shape  # the (128, 64) weight's moments: rank 4 on its shorter side
    torch.Size([128, 4])

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
            for position, param in enumerate(group["params"]):
                name = _name(group, position, param)
                if _is_flat(param):
                    raise ValueError(
                        f"ProjectedAdamW projects 2-D weights, but `{name}` is a flattened, sharded FSDP1 parameter. "
                        "Shard the model with FSDP2 (`torch.distributed.fsdp.fully_shard`, DTensor shards on dim 0), "
                        "use DDP, or put flattened parameters in a group without `rank` (exact AdamW)."
                    )
                if is_projected(param, group):
                    row_shard(param, name)  # raises for placements the projection cannot use

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with a callable ``projection`` replaced by the marker ``"callable"`` (tensors, strings
        and numbers only, so ``torch.load(weights_only=True)`` works); `load_state_dict` puts the callable back."""
        state = super().state_dict()
        for group in state["param_groups"]:
            if callable(group.get("projection")):
                group["projection"] = "callable"
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, with float32 moments and CPU counters kept, and each state tensor placed like its weight.

        Every state tensor must have its global shape (`state_shapes`): a DTensor on the weight's mesh, or a plain
        tensor (a full state, e.g. from one process or ``full_state_dict=True``: this rank keeps its rows, no
        communication). Anything else (per-rank pieces saved at another world size) raises a ValueError naming the
        weight.
        """
        # checked and placed before anything changes: torch casts every floating state tensor to its parameter's
        # dtype, but moments stay float32 and counters exact, on the CPU (no device sync when read each step)
        placed: dict[Tensor, dict[str, Tensor]] = {}
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        entries = [(g, i, p) for g in self.param_groups for i, p in enumerate(g["params"])]
        pairs = zip(saved_ids, entries, strict=True) if len(saved_ids) == len(entries) else ()  # else torch raises
        for pid, (group, position, param) in pairs:
            name = _name(group, position, param)
            shapes = state_shapes(param, group)
            shard = row_shard(param, name) if is_projected(param, group) else None
            for key, value in state_dict["state"].get(pid, {}).items():
                if not isinstance(value, Tensor):
                    continue
                if key in COUNTERS:
                    value = value.to(device="cpu", copy=True)
                else:
                    shape, sharded = shapes.get(key, (tuple(value.shape), False))
                    value = place_loaded_state(value, param, name, key, shape, sharded, shard)
                placed.setdefault(param, {})[key] = value
        callables = [group["projection"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, projection in zip(self.param_groups, callables, strict=True):
            if group["projection"] == "callable":
                if not callable(projection):
                    raise ValueError("The state was saved with a callable `projection`: build the optimizer with it.")
                group["projection"] = projection
        for param, values in placed.items():
            self.state[param].update(values)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimisation step (``closure`` re-evaluates the loss with gradients enabled, as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            for position, param in enumerate(group["params"]):
                index += 1  # the parameter's global position: part of its random basis's seed
                if param.grad is not None:
                    self._step_parameter(param, group, position, index)
        return loss

    @torch.no_grad()
    def step_parameter(self, param: Tensor) -> None:
        """Step one parameter with its current gradient (what `step` does for each), e.g. from a gradient hook.

        Raises:
            `KeyError`: when ``param`` is in no parameter group.
        """
        where = self.__dict__.get("_positions", {}).get(param)  # (group number, position in it, global index)
        if where is None or not _holds(self.param_groups, param, *where[:2]):  # groups replaced or params swapped
            self._positions = {}
            index = -1
            for number, group in enumerate(self.param_groups):
                for position, member in enumerate(group["params"]):
                    index += 1
                    self._positions[member] = (number, position, index)
            where = self._positions[param]
        number, position, index = where
        if param.grad is not None:
            self._step_parameter(param, self.param_groups[number], position, index)

    def _step_parameter(self, param: Tensor, group: dict[str, Any], position: int, index: int) -> None:
        if param.grad.is_sparse:
            raise RuntimeError("ProjectedAdamW does not support sparse gradients.")
        if is_projected(param, group):
            self._projected_step(param, group, index, row_shard(param, _name(group, position, param)))
        else:
            self._adamw_step(param, group)

    def _adamw_step(self, param: Tensor, group: dict[str, Any]) -> None:
        """torch's single-tensor AdamW arithmetic (moments in float32 whatever the parameter's dtype).

        On DTensor weights the moments are DTensors placed like the weight, and the arithmetic runs on the local
        parts (pointwise: no communication)."""
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            dtype = torch.float64 if param.dtype == torch.float64 else torch.float32  # never below float32
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        weight, exp_avg, exp_avg_sq = local(param), local(state["exp_avg"]), local(state["exp_avg_sq"])
        exact = param.dtype in (torch.float32, torch.float64)  # low-precision weights: update an fp32 copy
        work = weight if exact else weight.float()
        grad = local(param.grad)
        grad = grad if grad.dtype == work.dtype else grad.to(work.dtype)
        state["step"] += 1
        step = float(state["step"])
        work.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        work.addcdiv_(exp_avg, denom, value=-step_size)
        if work is not weight:
            weight.copy_(work)

    def _basis(self, group: dict[str, Any], param: Tensor, index: int, period: int, shard: RowShard | None) -> Tensor:
        """This rank's part of the period's basis: its rows (left side of a row-sharded weight) or all of it."""
        shape = tuple(param.shape)
        side = projection_side(shape)
        projection, rank = group["projection"], group["rank"]
        length = side_length(shape, side)
        if projection == "random":  # every rank draws the full basis (no communication), then keeps its rows
            basis = random_basis(length, rank, seed=group["seed"], index=index, period=period, device=param.grad.device)
        else:
            grad = (param.grad.full_tensor() if shard is not None else param.grad).float()  # one gather per period
            if projection == "svd":
                basis = svd_basis(grad, rank, side)
            else:
                basis = projection(grad, rank, side).to(device=grad.device, dtype=torch.float32)
                if tuple(basis.shape) != (length, rank):
                    raise ValueError(
                        f"`projection` returned a basis of shape {tuple(basis.shape)}, expected {(length, rank)}."
                    )
            if shard is not None:
                basis = broadcast_basis(basis, shard)
        return rows_of(basis, shard) if shard is not None and side == "left" else basis

    def _projected_step(self, param: Tensor, group: dict[str, Any], index: int, shard: RowShard | None) -> None:
        state = self.state[param]
        grad = local(param.grad).float()  # (rows, cols), or this rank's rows of it
        side = projection_side(param.shape)
        rank = group["rank"]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["period"] = torch.tensor(-1, dtype=torch.int64)
        state["step"] += 1
        step = int(state["step"])
        period = (step - 1) // group["update_interval"]
        if period != int(state["period"]):
            basis = self._basis(group, param, index, period, shard)
            if "exp_avg" in state:
                carry = transition(basis, local(state["basis"]), side, shard)  # (rank, rank)
                exp_avg = carry_first_moment(local(state["exp_avg"]), carry, side)
                exp_avg_sq = carry_second_moment(local(state["exp_avg_sq"]), carry, side)
            else:
                reduced_shape = (rank, grad.shape[1]) if side == "left" else (grad.shape[0], rank)
                exp_avg = torch.zeros(reduced_shape, dtype=torch.float32, device=grad.device)
                exp_avg_sq = torch.zeros(reduced_shape, dtype=torch.float32, device=grad.device)
            state["exp_avg"] = _keep(exp_avg, shard, sharded=side == "right")
            state["exp_avg_sq"] = _keep(exp_avg_sq, shard, sharded=side == "right")
            state["basis"] = _keep(basis, shard, sharded=side == "left")
            state["period"].fill_(period)
        basis = local(state["basis"])
        reduced = project_rows(grad, basis, side, shard)  # left + sharded: all-reduced (rank, cols)
        exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        exp_avg.lerp_(reduced, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(reduced, reduced, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        normalized = exp_avg / denom  # (rank, cols) or (rows, rank)
        weight = local(param)
        work = weight if param.dtype in (torch.float32, torch.float64) else weight.float()
        if group["weight_decay"]:
            work.mul_(1 - lr * group["weight_decay"])
        # W -= step * P N (left) or N Pᵀ (right), fused into one in-place matmul-add (no full-size temporary)
        basis, normalized = basis.to(work.dtype), normalized.to(work.dtype)
        pair = (basis, normalized) if side == "left" else (normalized, basis.T)
        work.addmm_(*pair, alpha=-step_size * group["scale"])
        if work is not weight:
            weight.copy_(work)


def _holds(groups: list[dict[str, Any]], param: Tensor, number: int, position: int) -> bool:
    members = groups[number]["params"] if number < len(groups) else []
    return position < len(members) and members[position] is param


def _name(group: dict[str, Any], position: int, param: Tensor) -> str:
    """The weight's name when the group has ``param_names`` (torch's named parameters), else a description."""
    names = group.get("param_names")
    if names is not None and position < len(names):
        return names[position]
    return f"parameter {position} of its group (shape {tuple(param.shape)})"


def _keep(tensor: Tensor, shard: RowShard | None, *, sharded: bool) -> Tensor:
    """A state tensor as kept: this rank's rows wrapped as a row-sharded DTensor, or the (replicated) tensor."""
    return as_row_sharded(tensor, shard, tensor.shape[1]) if shard is not None and sharded else tensor
