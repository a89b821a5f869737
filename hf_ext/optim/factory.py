"""create_projected_optimizer: ProjectedAdamW parameter groups from a model, shaped like peft's factories."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from .freeing import StepInBackward
from .projected_adamw import ProjectedAdamW

ALL_LINEAR = "all-linear"


def _linear_types() -> tuple[type[nn.Module], ...]:
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layers
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _projected_parameters(model: nn.Module, target_modules: str | Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    if not isinstance(target_modules, str) and (
        not isinstance(target_modules, Sequence) or not all(isinstance(t, str) for t in target_modules)
    ):
        raise ValueError(
            f"`target_modules` must be 'all-linear', a regular expression or a list of module names, got "
            f"{target_modules!r}."
        )
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or not weight.requires_grad:
            continue
        if target_modules == ALL_LINEAR:
            selected = isinstance(module, _linear_types()) and module is not output and id(weight) not in embedding_ids
        else:
            selected = _matches(module_name, target_modules)
        if selected and id(weight) not in chosen:
            chosen[id(weight)] = (f"{module_name}.weight" if module_name else "weight", weight)
    return list(chosen.values())


def projected_parameter_names(model: nn.Module, target_modules: str | Sequence[str] = ALL_LINEAR) -> list[str]:
    """Names of the trainable 2-D weights the projection applies to.

    ``"all-linear"``: the weight of every linear layer except the output layer and any weight shared with an
    embedding (peft's convention); a string: a regular expression that must match the whole module name; a list:
    module names or name suffixes (``["q_proj", "v_proj"]``), as in peft. Explicit targets may name any 2-D weight,
    the output layer or an embedding included (``r"lm_head|.*_proj"`` also projects a tied LM head / embedding).
    """
    return [name for name, _ in _projected_parameters(model, target_modules)]


def create_projected_optimizer(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    rank: int,
    lr: float,
    weight_decay: float = 1e-2,
    step_in_backward: bool = False,
    **kwargs: Any,
) -> ProjectedAdamW | StepInBackward:
    """A `ProjectedAdamW` whose target weights are projected at ``rank``; everything else gets exact AdamW.

    Three groups: the target weights (``rank``, ``weight_decay``); other weights (``weight_decay``); biases, norms
    and other 1-D parameters (no weight decay, as `Trainer` does). The groups carry the parameters' names
    (``param_names``), which error messages use.

    Build it after `fully_shard` (FSDP2) when sharding by hand, or before ``accelerate``'s preparation, which swaps
    the parameters for their shards (`ProjectedAdamW` and `StepInBackward` follow the swap).

    Args:
        model (`torch.nn.Module`): the model to train (its trainable parameters).
        target_modules (`str` or `list[str]`, *optional*, defaults to `"all-linear"`): which weights to project
            (see `projected_parameter_names`).
        rank (`int`): projection rank (>= 1). A weight whose shorter side is below it gets full AdamW.
        lr (`float`): learning rate.
        weight_decay (`float`, *optional*, defaults to `1e-2`): decoupled weight decay of the weights.
        step_in_backward (`bool`, *optional*, defaults to `False`): return a `StepInBackward`, which steps each
            weight and frees its gradient during backward (peak memory: weights + state + the largest gradient).
            Its `step` has nothing left to do, so ``Trainer(..., optimizers=(optimizer, None))`` works unchanged
            with ``gradient_accumulation_steps=1`` and ``max_grad_norm=0`` (both refused otherwise: a ValueError
            at the first backward that would need them). One process or FSDP2; refused under DDP. Weights shared by
            several modules (tied embeddings) step after backward instead (`StepInBackward`'s
            ``step_after_backward``).
        kwargs: the other `ProjectedAdamW` arguments (``betas``, ``eps``, ``projection``, ``update_interval``,
            ``scale``, ``seed``).

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, Trainer
    >>> from hf_ext import smollm2_path
    >>> from hf_ext.optim import create_projected_optimizer
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    >>> optimizer = create_projected_optimizer(model, rank=64, lr=1e-4, update_interval=200)
    >>> [(len(group["params"]), group["rank"]) for group in optimizer.param_groups]  # linear weights; other; 1-D
    [(210, 64), (1, None), (61, None)]
    >>> # Trainer(model=model, args=..., train_dataset=..., optimizers=(optimizer, None))

    ```
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be an int >= 1, got {rank!r}.")
    if step_in_backward and isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "`step_in_backward=True` cannot be used with DDP: the gradient hooks fire before DDP's all-reduce, so each "
            "rank would step with its own gradient. Shard the model with FSDP2 (`fully_shard`), or keep "
            "`step_in_backward=False`."
        )
    projected = {id(param) for _, param in _projected_parameters(model, target_modules)}
    if not projected:
        raise ValueError(f"`target_modules` {target_modules!r} matches no trainable 2-D weight of the model.")
    groups: dict[str, list] = {"projected": [], "decay": [], "no_decay": []}
    for name, param in model.named_parameters():  # each parameter once (shared ones under their first name)
        if not param.requires_grad:
            continue
        if id(param) in projected:
            groups["projected"].append((name, param))
        elif param.dim() >= 2:
            groups["decay"].append((name, param))
        else:
            groups["no_decay"].append((name, param))
    param_groups = [{"params": groups["projected"], "rank": rank, "weight_decay": weight_decay}]
    if groups["decay"]:
        param_groups.append({"params": groups["decay"], "weight_decay": weight_decay})
    if groups["no_decay"]:
        param_groups.append({"params": groups["no_decay"], "weight_decay": 0.0})
    optimizer = ProjectedAdamW(param_groups, lr=lr, weight_decay=weight_decay, **kwargs)
    if not step_in_backward:
        return optimizer
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    shared = [name for name, param in model.named_parameters() if param.requires_grad and uses[id(param)] > 1]
    return StepInBackward(optimizer, step_after_backward=shared)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by an optimizer's state tensors (moments, counters, stored bases), summed over parameters.

    Example:

    ```python
    >>> import torch
    >>> from hf_ext.optim import optimizer_state_bytes
    >>> layer = torch.nn.Linear(4, 4)
    >>> opt = torch.optim.AdamW(layer.parameters())
    >>> layer(torch.randn(2, 4)).sum().backward(); opt.step()
    >>> optimizer_state_bytes(opt)  # two moments of 20 floats, two scalar steps
    168

    ```
    """
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if hasattr(value, "element_size")
    )
