"""What the benchmark scripts share: writing a results file, and a peak-memory probe.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and ``from _common import ...``
works; child processes started with ``python -c`` get it through `child_env`.

Example:

```python
>>> import torch
>>> from _common import PeakMemory
>>> with PeakMemory("cpu") as peak:
...     x = torch.ones(1024, 1024)
>>> peak.bytes >= 0
True
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def save_results(path: Path, data: dict, summarize: Callable[[dict], dict]) -> None:
    """Write ``data`` to ``path`` as JSON that opens with ``summary`` (recomputed with ``summarize``), in place."""
    data["summary"] = summarize(data)
    ordered = {"summary": data.pop("summary"), **data}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ordered, indent=2))
    data.update(ordered)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -c`` child that imports `_common` (this folder first on PYTHONPATH)."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


class PeakMemory:
    """Peak memory growth over a block: CUDA allocator peak, or the CPU resident set's high-water mark (Linux).

    On CPU the kernel's peak (VmHWM) is reset to the current resident set on entry (``/proc/self/clear_refs``), so
    ``bytes`` is the growth of the peak over the resident set at entry; on CUDA it is ``max_memory_allocated``
    over the memory allocated at entry.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.bytes = 0

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
            self._base = self._status("VmRSS:")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self.bytes = self._status("VmHWM:") - self._base
