"""Metrics: pure functions, and `evaluate` modules shipped as package data (loadable offline)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .calibration import calibration_bins, confidence_calibration, expected_calibration_error

__all__ = ["calibration_bins", "confidence_calibration", "ece_module_path", "expected_calibration_error", "load_ece"]


def ece_module_path() -> Path:
    """The folder of the `evaluate` ECE module (pass it to ``evaluate.load``; upload it to a Hub Space as is)."""
    return Path(str(resources.files(__name__).joinpath("expected_calibration_error")))


def load_ece(**kwargs):
    """``evaluate.load`` of the shipped ECE module: works offline. ``kwargs`` go to ``evaluate.load``.

    Example:

    ```python
    >>> ece = load_ece()
    >>> ece.compute(predictions=[[0.9, 0.1], [0.8, 0.2]], references=[0, 1])["expected_calibration_error"]
    0.45

    ```
    """
    import evaluate

    return evaluate.load(str(ece_module_path()), **kwargs)
