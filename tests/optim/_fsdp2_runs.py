"""What two gloo processes with `fully_shard` compute for the FSDP2 tests: one spawn per session, many experiments.

Spawning two processes costs 15-30 s here (each imports hf_ext), so `run_all` does every multi-process experiment
of tests/optim/test_sharded.py, test_freeing.py and test_memory.py in one `run_distributed` call (the session
fixture ``fsdp2_runs`` in conftest.py); each test then checks its part against a single-process reference built
with the same helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_ext.optim import ProjectedAdamW

HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
STEPS = 20
RESUME_AT = 8  # mid-period: periods of INTERVAL steps start at 1, 7, 13, 19
INTERVAL = 6
RANK = 3
ROWS = 16  # batch rows; each of the 2 ranks takes half


def mlp(seed: int = 0) -> nn.Module:
    """(25, 12): basis on the unsharded columns (right); (7, 25): basis on the sharded rows (left). Both uneven
    over 2 ranks (13/12 and 4/3 rows), as are the biases."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 25), nn.Tanh(), nn.Linear(25, 7))


def batches(steps: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(ROWS, 12, generator=generator), torch.randn(ROWS, 7, generator=generator)) for _ in range(steps)
    ]


def named_groups(model: nn.Module, **projected: Any) -> list[dict]:
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if n.endswith("weight")], "rank": RANK, **projected},
        {"params": [(n, p) for n, p in named if n.endswith("bias")]},
    ]


def optimizer(model: nn.Module, projection: str) -> ProjectedAdamW:
    return ProjectedAdamW(named_groups(model, projection=projection, update_interval=INTERVAL), **HYPER)


def train(model: nn.Module, opt: torch.optim.Optimizer, data, part: slice = slice(None)) -> None:
    for x, y in data:
        opt.zero_grad()
        (model(x[part]) - y[part]).square().mean().backward()
        opt.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = value.detach().clone()
    return out


# ----------------------------------------------------------------------------------------- in each process


def _shard(model: nn.Module, mesh, **kwargs: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def _trajectory(mesh, half: slice, projection: str) -> dict[str, torch.Tensor]:
    model = _shard(mlp(), mesh)
    train(model, optimizer(model, projection), batches(), half)
    return full_params(model)


def _state_kinds(opt: ProjectedAdamW) -> dict[str, dict[str, str]]:
    """For each weight, each state tensor: 'sharded <global shape>' (DTensor) or 'replicated <shape>'."""
    kinds = {}
    for group in opt.param_groups:
        for name, param in zip(group["param_names"], group["params"], strict=True):
            kinds[name] = {
                key: f"{'sharded' if hasattr(v, 'full_tensor') else 'replicated'} {tuple(v.shape)}"
                for key, v in opt.state[param].items()
                if v.dim() > 0
            }
    return kinds


def _checkpoints(mesh, half: slice, projection: str, path: Path) -> dict[str, Any]:
    """Save at RESUME_AT through DCP (sharded) and resume in fresh objects; also the full and per-rank states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    data = batches()
    model = _shard(mlp(), mesh)
    opt = optimizer(model, projection)
    train(model, opt, data[:RESUME_AT], half)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    pieces = {  # what a per-rank torch.save of the local shards would hold
        "state": {pid: {k: v.to_local() if hasattr(v, "to_local") else v for k, v in s.items()} for pid, s in
                  opt.state_dict()["state"].items()},
        "param_groups": opt.state_dict()["param_groups"],
    }  # fmt: skip
    kinds = _state_kinds(opt)

    resumed = _shard(mlp(seed=99), mesh)
    resumed_opt = optimizer(resumed, projection)
    model_state, optim_state = get_state_dict(resumed, resumed_opt)  # templates (DCP steps once with zero grads)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(resumed, resumed_opt, data[RESUME_AT:], half)

    single = mlp()  # a single-process state (plain, full tensors) loaded into sharded weights: each rank its rows
    single_opt = optimizer(single, projection)
    train(single, single_opt, data[:RESUME_AT])
    into = _shard(mlp(seed=99), mesh)
    into_opt = optimizer(into, projection)
    set_model_state_dict(into, single.state_dict(), options=StateDictOptions(full_state_dict=True))
    into_opt.load_state_dict(single_opt.state_dict())
    train(into, into_opt, data[RESUME_AT:], half)
    return {"resumed": full_params(resumed), "from_one_process": full_params(into), "full_optim_state": full,
            "pieces": pieces, "state_kinds": kinds}  # fmt: skip


def _bad_placement(mesh) -> str:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    model = mlp()
    fully_shard(model[0], mesh=mesh, shard_placement_fn=lambda param: Shard(param.dim() - 1))  # (25, 12): columns
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        optimizer(model, "random")
    except ValueError as error:
        return str(error)
    return "no error"


def _freeing(mesh, half: slice) -> dict[str, Any]:
    """Gradient-freeing steps on sharded weights: the trajectory, what is left after a backward, the refusals."""
    from hf_ext.optim import StepInBackward
    from hf_ext.optim.freeing import is_freed

    from ._tensor_bytes import tensor_bytes

    def clip(model: nn.Module, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    data = batches()
    x, y = data[0]
    normal = _shard(mlp(), mesh)
    optimizer(normal, "random")
    model = _shard(mlp(), mesh)
    StepInBackward(optimizer(model, "random"))
    for net in (normal, model):  # the same gradient: at the initial weights
        (net(x[half]) - y[half]).square().mean().backward()
    out: dict[str, Any] = {
        "all_freed": all(is_freed(p.grad) for p in model.parameters()),
        "grad_bytes_after_backward": tensor_bytes(p.grad for p in model.parameters()),
        "normal_grad_bytes_after_backward": tensor_bytes(p.grad for p in normal.parameters()),
        "norms": (clip(normal, float("inf")), clip(model, float("inf"))),
        "clipping_that_would_not_act": _error(lambda: clip(model, 1e6)),
        "clipping": _error(lambda: clip(model, 1e-3)),
        "accumulation": _error(lambda: (model(x[half]) - y[half]).square().mean().backward()),  # no zero_grad
    }
    model = _shard(mlp(), mesh)
    train(model, StepInBackward(optimizer(model, "random")), data, half)
    out["params"] = full_params(model)
    return out


def _memory(mesh) -> dict[str, dict[str, int]]:
    """Each method's measured bytes on this rank (`_measure`), `fully_shard` per decoder layer and at the root."""
    from torch.distributed.fsdp import fully_shard
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from ._measure import METHODS, measure

    def shard(model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, LlamaDecoderLayer):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    return {method: measure(method, shard) for method in METHODS}


def _trainer_runs(model_dir: str, out: Path) -> dict[str, str]:
    """recipes/train_projected_fsdp.py (Trainer on transformers' FSDP2): 6 steps, checkpoints at 3 and 6; the same
    resumed from its step-3 checkpoint; with gradient-freeing. Returns each run's output folder."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
    from train_projected_fsdp import main, parse_args

    common = ["--model_name_or_path", model_dir, "--rank", "4", "--update_interval", "2", "--projection", "svd",
              "--learning_rate", "1e-2", "--max_train_samples", "48", "--max_eval_samples", "4", "--block_size", "32",
              "--max_steps", "6", "--save_steps", "3", "--max_grad_norm", "0", "--per_device_train_batch_size", "2",
              "--disable_tqdm", "true", "--logging_steps", "100"]  # fmt: skip
    runs = {
        "uninterrupted": [],
        "resumed": ["--resume_from_checkpoint", str(out / "uninterrupted" / "checkpoint-3")],
        "freeing": ["--step_in_backward", "true"],
    }
    for name, extra in runs.items():
        main(*parse_args([*common, "--output_dir", str(out / name), *extra]))
    return {name: str(out / name) for name in runs}


def _freeing_under_ddp(half: slice) -> str:
    from torch.nn.parallel import DistributedDataParallel

    from hf_ext.optim import StepInBackward

    model = mlp()
    ddp = DistributedDataParallel(model)
    opt = StepInBackward(optimizer(model, "random"))
    x, y = batches(1)[0]
    opt.zero_grad()
    return _error(lambda: (ddp(x[half]) - y[half]).square().mean().backward())


def _error(action: Callable[[], object]) -> str:
    try:
        action()
    except ValueError as error:
        return str(error)
    return "no error"


def run_all(rank: int, world_size: int, checkpoint_dir: str, model_dir: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    half = slice(rank * ROWS // world_size, (rank + 1) * ROWS // world_size)
    out: dict[str, Any] = {
        "random": _trajectory(mesh, half, "random"),
        "svd": _trajectory(mesh, half, "svd"),
        "checkpoints": _checkpoints(mesh, half, "svd", Path(checkpoint_dir) / "svd"),
        "bad_placement": _bad_placement(mesh),
        "checkpoint_dir": checkpoint_dir,
        "freeing": _freeing(mesh, half),
        "memory": _memory(mesh),
        "trainer": _trainer_runs(model_dir, Path(checkpoint_dir) / "trainer"),
        "freeing_under_ddp": _freeing_under_ddp(half),  # last: a refused backward leaves DDP mid-step
    }
    return out
