"""The peer optimizers the benchmarks run beside `ProjectedAdamW`: GaLore (galore-torch, also its layer-wise mode)
and APOLLO (apollo-torch), built on the same target weights, at the same rank, with their own defaults otherwise.

Installed for the benchmarks only (``pip install galore-torch apollo-torch bitsandbytes``; galore-torch imports
bitsandbytes); never copied into the package.
"""

from __future__ import annotations

import torch

from hf_ext.optim import projected_parameter_names

PEERS = ("galore", "galore_layerwise", "apollo")


class Layerwise:
    """GaLore's layer-wise mode as its README and transformers' ``galore_adamw_layerwise`` run it: one optimizer
    per weight, stepped and its gradient dropped in a post-accumulate-grad hook; ``step`` has nothing left to do."""

    def __init__(self, optimizers: dict[torch.nn.Parameter, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        for param, optimizer in optimizers.items():
            param.register_post_accumulate_grad_hook(self._hook(optimizer))

    @staticmethod
    def _hook(optimizer: torch.optim.Optimizer):
        def step_and_free(_param: torch.Tensor) -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step_and_free

    @property
    def state(self) -> dict:
        return {p: o.state[p] for p, o in self.optimizers.items() if p in o.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


def peer_optimizer(
    model: torch.nn.Module,
    method: str,
    *,
    rank: int,
    lr: float,
    update_proj_gap: int = 200,
    target_modules: str | list[str] = "all-linear",
    weight_decay: float = 0.0,
):
    """GaLore or APOLLO on the weights `projected_parameter_names(model, target_modules)` names (rank ``rank``,
    a new projection every ``update_proj_gap`` steps), AdamW on the rest; their defaults otherwise (GaLore: scale
    0.25, SVD projection; APOLLO: channel-wise scales, random projection, scale 1)."""
    every = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
    targets = {id(every[name]) for name in projected_parameter_names(model, target_modules)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    low_rank = [p for p in trainable if id(p) in targets]
    rest = [p for p in trainable if id(p) not in targets]
    if method.startswith("galore"):
        from galore_torch import GaLoreAdamW as optimizer_cls

        extra = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": 0.25, "proj_type": "std"}
    elif method == "apollo":
        from apollo_torch import APOLLOAdamW as optimizer_cls

        extra = {"rank": rank, "proj": "random", "scale_type": "channel", "scale": 1,
                 "update_proj_gap": update_proj_gap, "proj_type": "std"}  # fmt: skip
    else:
        raise ValueError(f"`method` must be one of {PEERS}, got {method!r}.")
    if method == "galore_layerwise":
        projected = {id(p) for p in low_rank}
        return Layerwise({p: optimizer_cls([{"params": [p], **(extra if id(p) in projected else {})}], lr=lr,
                                           weight_decay=weight_decay) for p in low_rank + rest})  # fmt: skip
    return optimizer_cls([{"params": rest}, {"params": low_rank, **extra}], lr=lr, weight_decay=weight_decay)
