"""Trainers: `Trainer` subclasses and their configs."""

from __future__ import annotations

from .tvd_config import TVDConfig
from .tvd_trainer import TVDTrainer, tvd_compute_loss_func

__all__ = ["TVDConfig", "TVDTrainer", "tvd_compute_loss_func"]
