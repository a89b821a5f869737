"""Accelerate config files shipped with hf_ext, found with `importlib.resources`.

Example:

```python
>>> from hf_ext import accelerate_config_path
>>> accelerate_config_path("cpu").name
'cpu.yaml'

```
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["accelerate_config_names", "accelerate_config_path"]


def accelerate_config_names() -> list[str]:
    """Names of the shipped configs (file names without ``.yaml``), sorted."""
    package = resources.files(__name__)
    return sorted(entry.name.removesuffix(".yaml") for entry in package.iterdir() if entry.name.endswith(".yaml"))


def accelerate_config_path(name: str) -> Path:
    """The path of the shipped accelerate config ``name`` (for ``accelerate launch --config_file``).

    Args:
        name (`str`): one of `accelerate_config_names()`, e.g. ``"cpu"``; a trailing ``.yaml`` is accepted.

    Raises:
        `ValueError`: when no config of that name is shipped (the message lists the valid names).
    """
    if not isinstance(name, str):
        raise ValueError(f"`name` must be a config name such as 'cpu', got {name!r}.")
    stem = name.removesuffix(".yaml")
    names = accelerate_config_names()
    if stem not in names:
        raise ValueError(f"No accelerate config named {name!r}; `name` must be one of {names}.")
    path = Path(str(resources.files(__name__).joinpath(f"{stem}.yaml")))
    return path
