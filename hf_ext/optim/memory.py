"""A memory model of training: bytes of weights, gradients and optimizer state per process, for 8B/70B at no cost.

`estimate_training_memory` reads only parameter shapes, so a model built on the meta device (from a config, no
weights) gives Llama-3-70B's figures in a second. Activations are excluded, as are transient buffers: FSDP2's
all-gathered weights and unsharded gradients of the block being computed, DDP's gradient buckets (none with
``gradient_as_bucket_view=True``), an optimizer step's temporaries, allocator fragmentation.

Example:

```python
>>> from transformers import LlamaConfig
>>> from hf_ext.optim import estimate_training_memory
>>> config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
...                      num_key_value_heads=2, vocab_size=1000)
>>> adamw = estimate_training_memory(config, "adamw")
>>> projected = estimate_training_memory(config, "projected", rank=8)
>>> projected.optimizer_state < adamw.optimizer_state
True

```
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .factory import ALL_LINEAR, _projected_parameters
from .projection import projection_side
from .sharded import row_range

METHODS = ("adamw", "lora", "galore", "galore_layerwise", "apollo", "projected", "projected_freeing")
SHARDINGS = ("ddp", "fsdp2")
COUNTER_BYTES = {"adamw": 4, "lora": 4, "galore": 0, "galore_layerwise": 0, "apollo": 0, "projected": 4}
PERIOD_BYTES = 8  # ProjectedAdamW's int64 period counter of a projected weight
# Llama 3's published dimensions (Meta's model cards / config.json), for `memory_table`.
LLAMA3_SHAPES: dict[str, dict[str, int]] = {
    "Llama-3-8B": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "intermediate_size": 14336, "vocab_size": 128256},
    "Llama-3-70B": {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "intermediate_size": 28672, "vocab_size": 128256},
}  # fmt: skip


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one process holds: weights, gradients (their peak) and optimizer state."""

    weights: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _meta_model(model_or_config: Any, dtype: torch.dtype | None) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if not isinstance(model_or_config, PretrainedConfig):
        raise ValueError(
            f"`model_or_config` must be a torch.nn.Module or a transformers PretrainedConfig, got "
            f"{type(model_or_config).__name__}."
        )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_or_config, dtype=dtype)


def _units(model: nn.Module) -> dict[int, str]:
    """Each parameter's FSDP2 unit as `fully_shard` per block wraps it (``_no_split_modules``; the rest: the root)."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    units: dict[int, str] = {}
    for name, module in model.named_modules():
        if type(module).__name__ in blocks:
            for param in module.parameters():
                units.setdefault(id(param), name)
    return units


class _Layout:
    """This process's part of a tensor: all of it (DDP) or `fully_shard`'s dim-0 shard (FSDP2)."""

    def __init__(self, sharded: bool, world_size: int, process_index: int) -> None:
        self.sharded, self.world_size, self.process_index = sharded, world_size, process_index

    def rows(self, rows: int, *, padded: bool) -> int:
        if not self.sharded:
            return rows
        if padded:  # FSDP2 keeps every shard of a weight (and its gradient) in a buffer of ceil(rows / n) rows
            return -(-rows // self.world_size)
        start, stop = row_range(rows, self.world_size, self.process_index)
        return stop - start

    def numel(self, shape: Sequence[int], *, padded: bool = False, sharded: bool = True) -> int:
        if not shape:
            return 1
        rows = self.rows(shape[0], padded=padded) if sharded else shape[0]
        return rows * int(torch.Size(shape[1:]).numel())


def _low_rank_state(shape: Sequence[int], rank: int, layout: _Layout, size: int, basis_size: int | None) -> int:
    """Moments ``rank x longer side`` (2 of them) and, if stored, a ``shorter side x rank`` basis, as laid out by
    `ProjectedAdamW` (right side: moments row-sharded, basis replicated; left: the reverse)."""
    rows, cols = shape
    side = projection_side(shape)
    moments = (rows, rank) if side == "right" else (rank, cols)
    basis = (cols, rank) if side == "right" else (rows, rank)
    total = 2 * layout.numel(moments, sharded=side == "right") * size
    if basis_size is not None:
        total += layout.numel(basis, sharded=side == "left") * basis_size
    return total


def estimate_training_memory(
    model_or_config: nn.Module | Any,
    method: str,
    *,
    rank: int | None = None,
    world_size: int = 1,
    sharding: str = "ddp",
    target_modules: str | Sequence[str] = ALL_LINEAR,
    dtype: torch.dtype | None = None,
    state_dtype: torch.dtype | None = None,
    process_index: int = 0,
) -> TrainingMemory:
    r"""Bytes of weights, gradients and optimizer state one process holds when training with ``method``.

    Activations and transient buffers are excluded (see the module docstring). Methods and their assumptions (``r``
    the rank; a target weight ``rows x cols`` with shorter side ``s`` and longer side ``l``; other trainable
    parameters get the method's AdamW; ``dtype`` the weights' and gradients'):

    - ``"adamw"``: `torch.optim.AdamW` on every parameter: two moments in the parameter's dtype, a float32 step.
    - ``"lora"``: peft LoRA on the targets: frozen weights plus ``A`` (``r x cols``) and ``B`` (``rows x r``) in
      float32 under half-precision weights (peft's ``autocast_adapter_dtype``), else in ``dtype``; gradients and
      AdamW state for the adapters only.
    - ``"galore"``: GaLore (galore-torch): 2-D targets projected at rank ``r`` on the shorter side, moments
      ``r x l`` (two), the projection matrix ``s x r`` stored, all in the gradient's dtype; full gradients.
      ``"galore_layerwise"``: the same state, each gradient freed after its layer's step (one process only).
    - ``"apollo"``: APOLLO (apollo-torch 1.0.3 as released): a rank-``r`` random projection ``s x r`` drawn
      from a seed each period and kept, moments ``r x l`` (two) and the norm-growth limiter's scalar in the
      gradient's dtype, channel-wise scales computed each step (not kept); full gradients. (The paper's
      accounting regenerates the projection instead of keeping it: ``s x r`` less per weight.)
    - ``"projected"``: `ProjectedAdamW` (`create_projected_optimizer`): float32 moments ``r x l`` (two), a float32
      basis ``s x r``, a float32 step and an int64 period per target; float32 AdamW moments for the rest.
      ``"projected_freeing"``: the same with ``step_in_backward=True``: gradients are freed as they are used, so
      the peak is the largest single gradient (FSDP2: the largest block's gradient shards, which share one
      reduce-scatter buffer until the block's last weight stepped), plus, on one process, the gradients of shared
      (tied) weights, whose first part waits in the autograd engine through backward and which step after it.
      Under FSDP2 a shared weight's gradient shard exists only after its unit's reduce-scatter, at the end of
      backward, when the blocks' gradients are freed: it counts within its unit (the root's). Its unsharded
      partial gradient, which the engine holds meanwhile (a full copy of the weight: 108 MiB for SmolLM2-135M's
      tied embedding in float32), is one of FSDP2's unsharded buffers and excluded like them.

    Sharding: ``"ddp"`` (everything replicated: these are also one process's figures when ``world_size=1``) or
    ``"fsdp2"`` (`fully_shard` per block, ``_no_split_modules``: weights and gradients in padded shards of
    ``ceil(rows / world_size)`` rows; AdamW moments and `ProjectedAdamW`'s row-sharded states in exact shards, its
    rank-``r``-sized states replicated, see `ProjectedAdamW`). GaLore and APOLLO do not run on FSDP2 (GaLore has no
    FSDP support, APOLLO supports FSDP1): their ``"fsdp2"`` figures assume ProjectedAdamW's layout.

    Args:
        model_or_config (`torch.nn.Module` or `transformers.PretrainedConfig`): the model (any device; the meta
            device costs nothing) or a causal-LM config, built on the meta device.
        method (`str`): one of ``"adamw"``, ``"lora"``, ``"galore"``, ``"galore_layerwise"``, ``"apollo"``,
            ``"projected"``, ``"projected_freeing"``.
        rank (`int`, *optional*): the rank ``r`` (required except for ``"adamw"``).
        world_size (`int`, *optional*, defaults to `1`): processes.
        sharding (`str`, *optional*, defaults to `"ddp"`): ``"ddp"`` or ``"fsdp2"``.
        target_modules (`str` or `list[str]`, *optional*, defaults to `"all-linear"`): the projected (or LoRA)
            weights, as in `create_projected_optimizer` (all linear layers but the output layer).
        dtype (`torch.dtype`, *optional*): the weights' dtype (default: the model's; a config: its ``dtype``).
        state_dtype (`torch.dtype`, *optional*): override the moments' dtype (e.g. float32 moments for AdamW on
            bf16 weights); default: what each optimizer does, as listed above.
        process_index (`int`, *optional*, defaults to `0`): which process's shard (FSDP2 shards differ by a row).

    Returns:
        `TrainingMemory`: ``weights``, ``gradients``, ``optimizer_state`` (bytes) and their ``total``.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if sharding not in SHARDINGS:
        raise ValueError(f"`sharding` must be one of {SHARDINGS}, got {sharding!r}.")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"`world_size` must be an int >= 1, got {world_size!r}.")
    if not isinstance(process_index, int) or not 0 <= process_index < world_size:
        raise ValueError(f"`process_index` must be in [0, {world_size}), got {process_index!r}.")
    if method != "adamw" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"`rank` must be an int >= 1 for {method!r}, got {rank!r}.")
    if world_size > 1 and method == "galore_layerwise":
        raise ValueError("`galore_layerwise` runs on one process only (GaLore's layer-wise mode): use world_size=1.")
    if world_size > 1 and sharding == "ddp" and method == "projected_freeing":
        raise ValueError("`projected_freeing` is refused under DDP (its hooks fire before the all-reduce): use fsdp2.")
    model = _meta_model(model_or_config, dtype)
    layout = _Layout(sharding == "fsdp2", world_size, process_index)
    targets = {id(p) for _, p in _projected_parameters(model, target_modules)} if method != "adamw" else set()
    units = _units(model)
    uses: dict[int, int] = defaultdict(int)
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] += 1
    weights = state = 0
    grads: list[tuple[str, int]] = []  # (FSDP2 unit, bytes) of each gradient; unit "" + shared: kept to the step
    for name, param in model.named_parameters():
        size = (dtype or param.dtype).itemsize
        weights += layout.numel(param.shape, padded=True) * size
        if not param.requires_grad:
            continue
        unit = units.get(id(param), "root") if layout.sharded else name  # DDP / one process: one buffer each
        if uses[id(param)] > 1 and not layout.sharded:  # a shared (tied) weight: kept from its first part to the step
            unit = ""
        target = id(param) in targets and param.dim() == 2
        if method == "lora":
            if target:
                adapter = 4 if size < 4 else size  # peft: float32 adapters on half-precision weights
                moment = state_dtype.itemsize if state_dtype else adapter
                rows, cols = param.shape
                for shape in ((rank, cols), (rows, rank)):  # lora_A, lora_B
                    weights += layout.numel(shape, padded=True) * adapter
                    grads.append((unit, layout.numel(shape, padded=True) * adapter))
                    state += 2 * layout.numel(shape) * moment + COUNTER_BYTES["lora"]
            continue
        grads.append((unit, layout.numel(param.shape, padded=True) * size))
        low_rank = target and rank is not None and rank <= min(param.shape)
        projected = method in ("projected", "projected_freeing")
        if method == "adamw" or not low_rank:
            moment = state_dtype.itemsize if state_dtype else (4 if projected and size < 8 else size)
            state += 2 * layout.numel(param.shape) * moment + COUNTER_BYTES["projected" if projected else "adamw"]
        elif projected:
            moment = state_dtype.itemsize if state_dtype else 4
            state += _low_rank_state(param.shape, rank, layout, moment, 4) + COUNTER_BYTES["projected"] + PERIOD_BYTES
        else:  # galore / apollo: state and the kept projection in the gradient's dtype; APOLLO's limiter scalar
            moment = state_dtype.itemsize if state_dtype else size
            state += _low_rank_state(param.shape, rank, layout, moment, size) + (size if method == "apollo" else 0)
    return TrainingMemory(weights, _peak_gradients(grads, method), state)


def _peak_gradients(grads: Iterable[tuple[str, int]], method: str) -> int:
    grads = list(grads)
    if method not in ("projected_freeing", "galore_layerwise"):
        return sum(nbytes for _, nbytes in grads)
    per_unit: dict[str, int] = defaultdict(int)
    for unit, nbytes in grads:
        per_unit[unit] += nbytes
    kept = per_unit.pop("", 0)  # shared weights: their (partial) gradient lives through backward
    return kept + max(per_unit.values(), default=0)


def memory_table(
    configs: dict[str, Any],
    *,
    rank: int,
    world_size: int,
    dtype: torch.dtype = torch.bfloat16,
    methods: Sequence[str] = ("adamw", "lora", "galore", "apollo", "projected", "projected_freeing"),
    shardings: Sequence[str] = ("ddp", "fsdp2"),
) -> str:
    """A markdown table of `estimate_training_memory` (GiB per process: weights + gradients + state = total).

    ``configs``: names to transformers configs (or dimension dicts such as `LLAMA3_SHAPES`' values, which build
    `transformers.LlamaConfig`). Rows that a method cannot run (layer-wise GaLore or freeing under multi-process
    DDP) are skipped.
    """
    from transformers import LlamaConfig

    gib = 2**30
    lines = [
        f"| model | method | sharding ({world_size} processes) | weights | gradients | optimizer state | total |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, config in configs.items():
        config = LlamaConfig(**config) if isinstance(config, dict) else config
        model = _meta_model(config, dtype)
        for sharding in shardings:
            for method in methods:
                if sharding == "ddp" and world_size > 1 and method in ("projected_freeing", "galore_layerwise"):
                    continue
                memory = estimate_training_memory(
                    model, method, rank=rank, world_size=world_size, sharding=sharding, dtype=dtype
                )
                figures = " | ".join(
                    f"{value / gib:.1f}" for value in (memory.weights, memory.gradients, memory.optimizer_state)
                )
                lines.append(f"| {name} | {method} | {sharding} | {figures} | {memory.total / gib:.1f} |")
    return "\n".join(lines) + "\n"
