"""Optimizers: full-weight training with low-rank optimizer state."""

from __future__ import annotations

from .factory import create_projected_optimizer, optimizer_state_bytes, projected_parameter_names
from .projected_adamw import ProjectedAdamW
from .projection import project, project_back, projection_side, random_basis, svd_basis

__all__ = [
    "ProjectedAdamW",
    "create_projected_optimizer",
    "optimizer_state_bytes",
    "project",
    "project_back",
    "projected_parameter_names",
    "projection_side",
    "random_basis",
    "svd_basis",
]
