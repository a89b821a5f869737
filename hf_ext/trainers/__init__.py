"""Trainers: `Trainer` subclasses, their configs, and callbacks."""

from __future__ import annotations

from .recompile_callback import RecompileCounter, compile_enabled, compiled_graphs
from .tvd_config import TVDConfig
from .tvd_trainer import TVDTrainer, tvd_compute_loss_func

__all__ = ["RecompileCounter", "TVDConfig", "TVDTrainer", "compile_enabled", "compiled_graphs", "tvd_compute_loss_func"]
