"""What the benchmark scripts share: the benchmark protocol, writing a results file, and a peak-memory probe.

The protocol (every benchmark, every figure):

- **Nothing is chosen on the reported data.** Hyper-parameters, scales, splits and poolings are chosen on a
  selection split (a dev split, a held-out slice of train, dev queries or dev cases) with `choose`, which also
  says whether the best value sits at an end of its sweep (then the sweep must be extended); the test split is
  evaluated once per chosen setting.
- **Seeds**: >= 3 for a headline; `mean_std` gives mean, sample std and n; every "A beats B" is a `paired`
  comparison over the same seeds (per-seed differences, their mean and spread, how many seeds agree).
- **Every results file records** its `protocol` block (`protocol(...)`): the machine (`machine()`: CPU model,
  AMX / AVX512-BF16, threads, device, library versions), the selection split, the chosen values and the seeds.
  `tests/test_results_protocol.py` checks every committed file for it.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and ``from _common import ...``
works; child processes started with ``python -c`` get it through `child_env`.

Example:

```python
>>> from _common import choose, mean_std, paired
>>> mean_std([0.80, 0.82, 0.81])["n"]
3
>>> paired({0: 0.82, 1: 0.83, 2: 0.81}, {0: 0.80, 1: 0.82, 2: 0.82})["agree"]
2
>>> choose({1e-5: 0.84, 2e-5: 0.86, 5e-5: 0.85})["value"], choose({1e-5: 0.84, 2e-5: 0.86})["at_edge"]
(2e-05, True)

```
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from hf_ext.tensor_memory import TensorBytes, reachable_tensors

HERE = Path(__file__).resolve().parent
LIBRARIES = ("torch", "transformers", "sentence-transformers", "accelerate", "peft", "numpy", "scipy")


# ----------------------------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flag(name: str) -> bool:
    check = getattr(torch.cpu, name, None)
    return bool(check()) if check is not None else False


def machine(device: str | torch.device = "cpu", extra_libraries: Iterable[str] = ()) -> dict[str, Any]:
    """What a figure was measured on: CPU model and bf16 features, cores / threads, device, library versions."""
    device = torch.device(device)
    versions = {}
    for name in (*LIBRARIES, *extra_libraries):
        try:
            versions[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name.replace("-", "_")] = None
    info = {
        "cpu_model": _cpu_model(),
        "cpu_has_amx": _cpu_flag("_is_amx_tile_supported"),
        "cpu_has_avx512_bf16": _cpu_flag("_is_avx512_bf16_supported"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "python": platform.python_version(),
        **versions,
    }
    return info


def protocol(
    *,
    selection_split: str,
    test_split: str,
    chosen: Mapping[str, Any],
    seeds: Iterable[int],
    device: str | torch.device = "cpu",
    extra_libraries: Iterable[str] = (),
    **notes: Any,
) -> dict[str, Any]:
    """The ``protocol`` block every results file carries.

    Args:
        selection_split (`str`): what chose the settings (``"STS-B dev"``, ``"20 dev queries"``), or
            ``"none: ..."`` with the reason when nothing is chosen (a timing with fixed settings).
        test_split (`str`): what the reported figures are measured on.
        chosen (`Mapping`): each chosen setting and its value (empty when nothing is chosen).
        seeds (`Iterable[int]`): the seeds of the reported figures.
        notes: anything else worth recording (sweeps, budgets).
    """
    if selection_split.strip().lower() in ("test", test_split.strip().lower()):
        raise ValueError(f"the selection split must not be the test split, got {selection_split!r}.")
    return {
        "machine": machine(device, extra_libraries),
        "selection_split": selection_split,
        "test_split": test_split,
        "chosen": dict(chosen),
        "seeds": sorted({int(s) for s in seeds}),
        **notes,
    }


# ----------------------------------------------------------------------------------------------- statistics


def mean_std(values: Iterable[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for a single value) and n."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value.")
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}  # fmt: skip


def fmt_mean_std(stats: Mapping[str, Any] | None, digits: int = 4) -> str:
    """``0.8221 ± 0.0008 (3 seeds)``, or ``0.8250 (1 seed)``: a single-seed cell says so."""
    if not stats:
        return "n/a"
    if stats["n"] == 1 or stats["std"] is None:
        return f"{stats['mean']:.{digits}f} (1 seed)"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} ({stats['n']} seeds)"


def paired(a: Mapping[Any, float], b: Mapping[Any, float], higher_is_better: bool = True) -> dict[str, Any]:
    """A vs B over the seeds both have: per-seed differences a - b, their mean, sample std, n, and ``agree``, the
    number of seeds on which A is better (higher, or lower when ``higher_is_better`` is False)."""
    common = sorted(set(a) & set(b), key=str)
    if not common:
        raise ValueError("paired needs at least one seed that both sides have.")
    diffs = {str(s): float(a[s]) - float(b[s]) for s in common}
    values = list(diffs.values())
    better = [d > 0 if higher_is_better else d < 0 for d in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "agree": sum(better), "diffs": diffs}  # fmt: skip


def fmt_paired(stats: Mapping[str, Any] | None, digits: int = 4) -> str:
    """``+0.0031 ± 0.0012, 3 of 3 seeds``."""
    if not stats:
        return "n/a"
    spread = f" ± {stats['std']:.{digits}f}" if stats["std"] is not None else ""
    return f"{stats['mean']:+.{digits}f}{spread}, {stats['agree']} of {stats['n']} seeds"


def choose(scores: Mapping[Any, float], higher_is_better: bool = True) -> dict[str, Any]:
    """The best value of a one-dimensional sweep on the selection split, and whether it sits at an end of the
    sweep (``at_edge``: the sweep must be extended on that side before the choice stands).

    Keys are the swept values (numbers: the ends are the smallest and largest; anything else: the first and last
    inserted); ties go to the first best in sweep order.
    """
    if not scores:
        raise ValueError("choose needs at least one swept value.")
    keys = list(scores)
    if all(isinstance(k, (int, float)) and not isinstance(k, bool) for k in keys):
        keys = sorted(keys)
    sign = 1.0 if higher_is_better else -1.0
    best = max(keys, key=lambda k: (sign * float(scores[k]), -keys.index(k)))
    return {"value": best, "score": float(scores[best]), "at_edge": len(keys) > 1 and best in (keys[0], keys[-1]),
            "sweep": {str(k): float(scores[k]) for k in keys}}  # fmt: skip


MAX_EXTENSIONS = 3  # per swept axis


def extension(values: list[float], best: float, axis: str) -> float | None:
    """The value to add when ``best`` sits at an open end of ``values`` (None: inside, or at a closed end).

    ``axis`` ``"lr"``: doubles or halves. ``"share"`` (a value in [0, 1): TaiLr's gamma, a label-smoothing factor):
    halves towards 0 or moves halfway to 1; 0 and 1 are closed ends. ``"floor"``: steps by 0.1 up to 1 (0 is its
    closed end: no weight below 0).
    """
    low, high = min(values), max(values)
    if len(values) < 2 or low < best < high:
        return None
    if axis == "lr":
        return best / 2 if best == low else best * 2
    if axis == "share":
        if best == low:
            return low / 2 if low > 0 else None
        return (1 + high) / 2 if high < 1 else None
    if axis != "floor":
        raise ValueError(f"`axis` must be 'lr', 'share' or 'floor', got {axis!r}.")
    if best == low:
        return max(0.0, round(low - 0.1, 6)) if low > 0 else None
    return min(1.0, round(high + 0.1, 6)) if high < 1 else None


def bracketed_grid(score: Callable[..., float], axes: Mapping[str, Iterable[float]], rules: Mapping[str, str],
                   max_extensions: int = MAX_EXTENSIONS) -> dict[str, Any]:  # fmt: skip
    """A grid search on the selection split that ends bracketed: ``score(*cell)`` (higher is better; cache it, the
    grid is scored again after each growth) over the product of ``axes``; while the best cell sits at an open end
    of an axis (`extension` with that axis' rule) the axis grows there, up to ``max_extensions`` values each.

    Returns ``best`` (the cell; ties: the smallest values, first axis first, as `choose`), ``grid`` (every cell's
    score), ``axes`` (as grown) and, per axis, the one-dimensional `choose` through the best cell.
    """
    grown_axes = {name: list(values) for name, values in axes.items()}
    sizes = {name: len(values) for name, values in grown_axes.items()}
    while True:
        cells = [()]
        for values in grown_axes.values():  # in sorted order, as `choose` breaks ties
            cells = [(*cell, value) for cell in cells for value in sorted(values)]
        grid = {cell: score(*cell) for cell in cells}
        best = max(grid, key=lambda cell: (grid[cell], -cells.index(cell)))
        grown = False
        for index, name in enumerate(grown_axes):
            more = extension(grown_axes[name], best[index], rules[name])
            if (
                more is not None
                and more not in grown_axes[name]
                and len(grown_axes[name]) < sizes[name] + max_extensions
            ):
                grown_axes[name].append(more)
                grown = True
        if not grown:
            break
    slices = {name: choose({cell[index]: value for cell, value in grid.items()
                            if all(cell[j] == best[j] for j in range(len(best)) if j != index)})
              for index, name in enumerate(grown_axes)}  # fmt: skip
    return {"best": best, "grid": grid, "axes": grown_axes, **slices}


# ----------------------------------------------------------------------------------------------- results files


def save_results(path: Path, data: dict, summarize: Callable[[dict], dict]) -> None:
    """Write ``data`` to ``path`` as JSON that opens with ``summary`` (recomputed with ``summarize``) and then
    ``protocol``, in place. The protocol block must be set by the benchmark (`protocol`); the machine is refreshed
    at every write, and a different machine found in the file is kept under ``protocol.earlier_machines``."""
    if "protocol" not in data:
        raise ValueError(f"{path.name}: set data['protocol'] = protocol(...) before saving results.")
    data["summary"] = summarize(data)
    ordered = {"summary": data.pop("summary"), "protocol": data.pop("protocol"), **data}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ordered, indent=2, default=_json_default, allow_nan=False))
    data.update(ordered)


def load_results(path: Path, new_protocol: dict) -> dict:
    """The results file at ``path`` (or an empty one) with ``new_protocol`` in place; when the file was written on
    another machine, that machine is kept in ``earlier_machines`` (its runs are reused)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    old = data.get("protocol", {})
    earlier = list(old.get("earlier_machines", []))
    if old.get("machine") and _machine_key(old["machine"]) != _machine_key(new_protocol["machine"]):
        earlier.append(old["machine"])
    data["protocol"] = {**new_protocol, **({"earlier_machines": earlier} if earlier else {})}
    return data


def _machine_key(info: Mapping[str, Any]) -> tuple:
    keys = ("cpu_model", "cpu_has_amx", "cpu_has_avx512_bf16", "cpu_capability", "device_name", "threads", "torch")
    return tuple(info.get(k) for k in keys)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def run_parallel(tasks: Iterable[Callable[[], Any]], jobs: int) -> list[Any]:
    """Run zero-argument callables (each typically waiting on a child process) ``jobs`` at a time, in order of
    completion; returns their results in the order given. The first exception is raised after all have ended."""
    from concurrent.futures import ThreadPoolExecutor

    tasks = list(tasks)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(task) for task in tasks]
    return [future.result() for future in futures]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -c`` child that imports `_common` (this folder first on PYTHONPATH)."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# ----------------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak bytes of the tensors allocated inside a block (over those alive at entry).

    On CUDA it is the allocator's ``max_memory_allocated`` minus the memory allocated at entry. On CPU every
    operator's output storages are counted while alive (a `TorchDispatchMode`), the same measure: memory counted
    from tensors, never a resident-set delta (which the allocator's reuse of freed pages can make read 0). Forward
    and backward are both seen; tensors made before the block (weights, inputs) are not counted unless resized.
    The CPU probe costs Python time per operator: never time code inside it.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.bytes = 0
        self._mode: TensorBytes | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._mode = TensorBytes(self.device.type)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            assert self._mode is not None
            self._mode.__exit__(*exc)
            self.bytes = self._mode.peak


def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct storages behind every tensor reachable from ``obj``: nested lists, tuples and dicts,
    and the attributes of other objects (a transformers KV cache and its layers, an optimizer's state)."""
    sizes: dict[int, int] = {}
    for tensor in reachable_tensors(obj):
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(sizes.values())
