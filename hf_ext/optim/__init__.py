"""Optimizers: full-weight training with low-rank optimizer state."""

from __future__ import annotations

from .checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from .factory import create_projected_optimizer, optimizer_state_bytes, projected_parameter_names
from .freeing import FreedGradient, StepInBackward
from .measure import measure_training_memory
from .memory import LLAMA3_SHAPES, TrainingMemory, estimate_training_memory, memory_table
from .projected_adamw import ProjectedAdamW
from .projection import project, project_back, projection_side, random_basis, svd_basis

__all__ = [
    "LLAMA3_SHAPES",
    "FreedGradient",
    "ProjectedAdamW",
    "StepInBackward",
    "TrainingMemory",
    "create_projected_optimizer",
    "estimate_training_memory",
    "load_sharded_checkpoint",
    "measure_training_memory",
    "memory_table",
    "optimizer_state_bytes",
    "project",
    "project_back",
    "projected_parameter_names",
    "projection_side",
    "random_basis",
    "save_sharded_checkpoint",
    "svd_basis",
]
