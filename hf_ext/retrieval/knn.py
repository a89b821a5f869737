"""Exact k nearest neighbours of every point: a fast low-precision screen, then exact re-checks of the few in doubt.

The screen scores all pairs with one matrix product per chunk of rows in a cheap dtype: bfloat16 where that is
measured to be faster on this machine (CPUs with fast bf16 matrix units: AMX, or AVX512-BF16 on some), else float32.
Every screened value ``a`` comes with a rigorous bound, so the exact value lies in ``[a - slack, a + slack]``. Per
row, a column whose upper end is below the k-th best lower end cannot be among the k nearest; a column that fewer
than k others can reach is among them whatever the exact values; only the columns in between are re-scored, first in
float32 (with its own bound), then, if still in doubt, in float64. The answer is the exact one (float64
similarities of the float32 input, ties broken by the lower index) whatever the screen's dtype: the dtype changes
the speed, never the result.

The screen's bound, for row ``x_i`` and column ``x_j`` whose screen-dtype copies ``l_i``, ``l_j`` differ from them
by ``d_i``, ``d_j``: ``|x_i.x_j - a| <= |d_i| |x_j| + |l_i| |d_j| + gamma_K sum_l |row_il key_jl| + B |a|``, where
``gamma_K = K u / (1 - K u)`` is the worst-case float32 accumulation error over the product's ``K`` terms
(``u = 2^-24``; bf16 products are exact in float32), ``row_i`` / ``key_j`` are the product's operands (the sum is
bounded block by block: ``|l_i| |l_j|`` plus the extra columns below), and
``B = u_out / (1 - u_out)`` covers the rounding of the float32 sum to the product's dtype (``2^-8`` for bf16, none
for a float32 product). On CUDA a float32 product may run in TF32, so its inputs are taken as rounded to 11 bits.
Two devices keep the window small: a bfloat16 screen subtracts from each row an estimate of its k-th best value
inside the product (one more column), so that the values near the cut, and their rounding, are small; and the
euclidean metric ranks by ``x_i.x_j - |x_j|^2 / 2`` with ``|x_j|^2 / 2`` split into bf16 parts in the product.
``SAFETY`` multiplies every bound (1: they are worst-case bounds of the rounding model above; the tests check that
this machine's matmul stays inside them). Subnormal numbers, which AMX flushes to zero, are far below the bounds'
absolute slack.

Columns are read in ``STRIPES`` interleaved groups per row (column ``c`` in group ``c mod (N / STRIPES)``): a
group's maximum is a cheap vectorised reduction, and only the groups whose maximum reaches the floor set by the k-th
best group maximum are looked at column by column.

Example:

```python
>>> import torch
>>> from hf_ext.retrieval.knn import nearest_neighbours
>>> x = torch.randn(5000, 384)
>>> values, indices = nearest_neighbours(x, k=10)  # (5000, 10) float64 cosines and int64 ids, best first
>>> bool((indices != torch.arange(5000)[:, None]).all())  # self excluded
True

```
"""

from __future__ import annotations

import torch
from torch import Tensor

METRICS = ("cosine", "euclidean")
# Column groups per row taken by the first topk beyond k, at least; rows that need more are redone with exactly
# as many as they need. A narrow topk is much cheaper than a wide one.
SCREEN_MARGIN = 8
# Columns per group (see the module docstring).
STRIPES = 16
# Columns scored per chunk (spread over the points) to estimate each row's k-th best value for the shift.
SHIFT_SAMPLE = 1024
# Every error bound is multiplied by this (see the module docstring).
SAFETY = 1.0
# Below this many points `screen_dtype="auto"` screens in float32 without timing anything: a bf16 screen saves less
# there (on 2 AMD EPYC cores, 0.3 s at 10k points) than the one-off timing costs (about 1.6 s at 384 dimensions).
MIN_POINTS_FOR_BF16 = 16384
# `screen_dtype="auto"` times both screens (once per process, metric, dimension and thread count) on the first
# PROBE_ROWS rows of PROBE_POINTS Gaussian points, a real chunk's shape (a whole 4,096-point kNN is dominated by fixed
# costs: on 2 AMD EPYC cores it timed bf16 only 1.08x faster where a 50k-point run is 2.2x), and takes the faster;
# bfloat16 must win by PROBE_MARGIN.
PROBE_POINTS = 16384
PROBE_ROWS = 2048
PROBE_MARGIN = 1.05
_MEASURED_SCREEN: dict[tuple, torch.dtype] = {}
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
_TF32_ROUNDOFF = 2.0**-11
# float64 rounding in the bounds themselves and in the re-checks (~1e-16 relative) is covered by a relative slack on
# every bound and an absolute one of TINY * (1 + max |x|^2).
_RELATIVE_SLACK = 1e-6
_TINY = 1e-12


def fast_bf16_matmul(device: torch.device) -> bool:
    """Whether the CPU reports bf16 matrix instructions (AMX or AVX512-BF16). Informative only: whether they are
    *faster* than float32 differs between CPUs that report them, so `screen_dtype="auto"` measures instead."""
    if device.type != "cpu":
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def probe_seconds(dtype: torch.dtype, metric: str, dim: int) -> float:
    """Seconds this CPU takes, with a ``dtype`` screen, for the exact neighbours (k = 10) of `PROBE_ROWS` rows among
    `PROBE_POINTS` seeded Gaussian points: the screen's matrix product at a real chunk's shape plus the re-checks it
    leaves, set-up excluded; one warm-up, then the best of two (the measurement behind `screen_dtype="auto"`)."""
    import time

    generator = torch.Generator().manual_seed(0)
    x64, _ = prepare_exact(torch.randn(PROBE_POINTS, dim, generator=generator, dtype=torch.float32), metric)
    search = _Search(x64, metric, dtype, 10, 1024, with_values=False)
    best = float("inf")
    for attempt in range(3):
        start = time.perf_counter()
        search.run(PROBE_ROWS)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best


def measured_screen_dtype(metric: str, dim: int) -> torch.dtype:
    """The faster screen on this CPU for ``metric`` and ``dim``, timed once per process (and thread count) by
    `probe_seconds`; bfloat16 only if it beats float32 by `PROBE_MARGIN`."""
    key = (metric, dim, torch.get_num_threads())
    if key not in _MEASURED_SCREEN:
        fp32 = probe_seconds(torch.float32, metric, dim)
        bf16 = probe_seconds(torch.bfloat16, metric, dim)
        _MEASURED_SCREEN[key] = torch.bfloat16 if bf16 * PROBE_MARGIN < fp32 else torch.float32
    return _MEASURED_SCREEN[key]


def _resolve_screen_dtype(
    screen_dtype: str | torch.dtype, device: torch.device, n: int, metric: str = "cosine", dim: int = 0
) -> torch.dtype:
    if screen_dtype == "auto":
        if device.type != "cpu" or n < MIN_POINTS_FOR_BF16:
            return torch.float32
        return measured_screen_dtype(metric, dim)
    if screen_dtype in ("float32", torch.float32):
        return torch.float32
    if screen_dtype in ("bfloat16", torch.bfloat16):
        if device.type != "cpu":
            raise ValueError("`screen_dtype='bfloat16'` runs on CPU only: use 'auto' or 'float32' on accelerators.")
        return torch.bfloat16
    raise ValueError(f"`screen_dtype` must be 'auto', 'float32' or 'bfloat16', got {screen_dtype!r}.")


def as_matrix(x, name: str) -> Tensor:
    """``x`` as a float32 ``(n, dim)`` tensor, refused (naming ``name``) if empty, not 2-D or not finite."""
    tensor = torch.as_tensor(x)
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty 2-D array (n, dim), got shape {tuple(tensor.shape)}.")
    tensor = tensor.float()
    if not torch.isfinite(tensor.abs().amax()):  # NaN and inf both propagate through the maximum
        raise ValueError(f"`{name}` holds NaN or infinite values.")
    return tensor


def prepare(x: Tensor, metric: str, name: str) -> Tensor:
    """``x`` (any float dtype) with unit rows for cosine (zero rows refused, naming ``name``), as is for euclidean."""
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
    if metric == "cosine":
        norms = x.norm(dim=1)
        if (norms == 0).any():
            raise ValueError(f"`{name}` has zero vectors (row {int((norms == 0).nonzero()[0])}): cosine is undefined.")
        return x / norms[:, None]
    return x


def prepare_exact(x, metric: str) -> tuple[Tensor, float]:
    """``x`` as float64 (`prepare` on the float32 input held exactly; for euclidean, scaled by a power of two to a
    largest entry in [0.5, 1), which changes no ranking and keeps the screen's squares far from overflow and
    underflow) and that scale."""
    tensor = as_matrix(x, "x")
    if tensor.device.type == "mps":  # no float64 there: the work moves to the CPU
        tensor = tensor.cpu()
    tensor = prepare(tensor.double(), metric, "x")
    if metric == "cosine":
        return tensor, 1.0
    largest = tensor.abs().amax()
    scale = 2.0 ** -(torch.frexp(largest).exponent.item()) if largest > 0 else 1.0
    return tensor * scale, scale


def check_k(k: int, n: int, name: str = "k") -> None:
    """``k`` must be an int in ``[1, n - 1]`` (neighbours other than the point itself)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k >= n:
        raise ValueError(f"`{name}` must be an int in [1, {n - 1}] (fewer than the {n} points), got {k!r}.")


def _split(values: Tensor, dtype: torch.dtype, parts: int) -> list[Tensor]:
    """``values`` (float64) as a sum of ``parts`` terms of ``dtype`` (hi, mid, lo ...), most significant first."""
    out, rest = [], values
    for _ in range(parts):
        piece = rest.to(dtype)
        out.append(piece)
        rest = rest - piece.double()
    return out


def _row_norms(x: Tensor, low: Tensor, x32: Tensor) -> Tensor:
    """``(rows, 5)``: ``|x|, |low|, |x - low|, |x32|, |x - x32|`` per row, in float64."""
    low, x32 = low.double(), x32.double()
    return torch.stack([x.norm(dim=1), low.norm(dim=1), (x - low).norm(dim=1), x32.norm(dim=1),
                        (x - x32).norm(dim=1)], dim=1)  # fmt: skip


def _gamma(terms: int) -> float:
    u = _UNIT_ROUNDOFF[torch.float32]
    return terms * u / (1 - terms * u)


class _Bound:
    """``A_ij = sum_t row[i, t] * col[j, t] + constant``: a bound that factors into row and column terms."""

    def __init__(self, col: Tensor, constant: float) -> None:
        self.col, self.col_max, self.constant = col, col.max(dim=0).values, constant

    def row_wide(self, row: Tensor) -> Tensor:
        """``max_j A_ij`` per row, ``(R,)``."""
        return row @ self.col_max + self.constant

    def pairs(self, row: Tensor, columns: Tensor) -> Tensor:
        """``A_ij`` for each row's ``columns`` (``(R, W)``)."""
        return (row[:, None, :] * self.col[columns]).sum(-1) + self.constant


class _Screen:
    """The operands of the screen and of the re-checks for ``x`` (float64, normalised for cosine), and their
    error bounds (see the module docstring)."""

    def __init__(self, x: Tensor, metric: str, dtype: torch.dtype, k: int) -> None:
        self.x, self.dtype, self.k = x, dtype, k
        self.low, self.x32 = x.to(dtype), x.float()  # the screen's copy, the float32 re-check's copy
        # |x_i|, |l_i|, |d_i| = |x_i - l_i| and the same for the float32 copy, a block of rows at a time (no N x dim
        # temporaries: those cost more in page faults than in arithmetic)
        norms = torch.cat([_row_norms(x[i : i + 8192], self.low[i : i + 8192], self.x32[i : i + 8192])
                           for i in range(0, x.shape[0], 8192)])  # fmt: skip
        self.x_norm, low_norm, deviation, norm32, deviation32 = norms.unbind(1)
        tiny = _TINY * (1 + float(self.x_norm.max()) ** 2)
        extra = []
        offset = torch.zeros_like(self.x_norm)  # sum of |offset parts| per column
        residual, self.offset_parts, self.half_square = 0.0, 0, None
        if metric == "euclidean":  # rank by x_i.x_j - |x_j|^2 / 2 (= (|x_i|^2 - |x_i - x_j|^2) / 2)
            self.half_square = self.x_norm.square() / 2
            parts = _split(self.half_square, dtype, 2)  # residual ~2^-16 |x|^2: far inside the bound
            extra += [-p for p in parts]
            offset = sum(p.double().abs() for p in parts)
            self.offset_parts = len(parts)
            residual = float((self.half_square - sum(p.double() for p in parts)).abs().max())
        self.shifted = dtype == torch.bfloat16
        if self.shifted:
            extra.append(-torch.ones(x.shape[0], dtype=dtype, device=x.device))
        self.keys_t = torch.empty(x.shape[1] + len(extra), x.shape[0], dtype=dtype, device=x.device)
        self.keys_t[: x.shape[1]] = self.low.T  # (K, N): the matmul's fast layout
        for row, values in enumerate(extra, start=x.shape[1]):
            self.keys_t[row] = values
        self.accumulation = _gamma(self.keys_t.shape[0])
        if x.device.type == "cuda" and dtype == torch.float32:  # TF32 may round the inputs to 11 bits
            self.accumulation += 2 * _TF32_ROUNDOFF + _TF32_ROUNDOFF**2
        # screen: |d_i| |x_j| + |l_i| |d_j| + gamma (|l_i| |l_j| + sum |offset parts_j| + |shift_i|), the last being
        # the sum of |row_l key_l| over the product's terms, block by block (the shift is known per chunk)
        ones = torch.ones_like(offset)
        self.screen_bound = _Bound(SAFETY * torch.stack([self.x_norm, deviation, low_norm, offset, ones], dim=1),
                                   SAFETY * (1 + _RELATIVE_SLACK) * (residual + tiny))  # fmt: skip
        self.screen_row = torch.stack([deviation, low_norm, self.accumulation * low_norm,
                                       self.accumulation * ones], dim=1)  # fmt: skip
        out = 0.0 if dtype == torch.float32 else _UNIT_ROUNDOFF[dtype]
        self.relative = SAFETY * out / (1 - out)  # B
        # float32 re-check: |e_i| |x_j| + |y_i| |e_j| + gamma_dim |y_i| |y_j|, y = float32 copy, e = its error
        # (gamma_dim covers the rounded float32 products too; on CUDA the dot products may run in TF32)
        dot_error = _gamma(x.shape[1]) + (2 * _TF32_ROUNDOFF + _TF32_ROUNDOFF**2 if x.device.type == "cuda" else 0.0)
        self.recheck_bound = _Bound(SAFETY * torch.stack([self.x_norm, deviation32, norm32], dim=1), SAFETY * tiny)
        self.recheck_row = (1 + _RELATIVE_SLACK) * torch.stack([deviation32, norm32,
                                                                dot_error * norm32], dim=1)  # fmt: skip
        n = x.shape[0]
        self.sample = torch.linspace(0, n - 1, min(SHIFT_SAMPLE, n), device=x.device).long().unique()
        self._workspace: dict[str, Tensor] = {}

    def operands(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        """For points ``start:stop``: the rows' side of the product ``(R, K)``, their bound terms ``(R, 5)`` and the
        value subtracted from each row's screened values (float64, ``(R,)``)."""
        low = self.low[start:stop]
        parts = [low]
        if self.offset_parts:
            parts.append(low.new_ones(len(low), self.offset_parts))
        shift = torch.zeros(len(low), dtype=torch.float64, device=low.device)
        if self.shifted:
            estimate = self._estimate(start, stop)
            parts.append(estimate[:, None])
            shift = estimate.double()
        rows = torch.cat(parts, dim=1)
        row_terms = torch.cat([self.screen_row[start:stop], self.accumulation * shift.abs()[:, None]], dim=1)
        return rows, (1 + _RELATIVE_SLACK) * row_terms, shift

    def _estimate(self, start: int, stop: int) -> Tensor:
        """Per row, a screen-dtype estimate of its k-th best value, from a sample of the columns."""
        sample = self.sample
        scores = (self.low[start:stop] @ self.low[sample].T).float()  # (R, m)
        if self.half_square is not None:
            scores -= self.half_square[sample].float()
        scores[sample[None, :] == torch.arange(start, stop, device=sample.device)[:, None]] = -torch.inf
        rank = min(len(sample) - 1, max(1, round(self.k * len(sample) / self.x.shape[0])))
        estimate = scores.topk(rank, dim=1).values[:, -1]
        return torch.nan_to_num(estimate, neginf=0.0).to(self.dtype)

    def threshold(self, kth: Tensor, absolute: Tensor) -> Tensor:
        """The lowest screened value that can still be among the exact top-k, given each row's k-th screened value
        ``kth`` (or a lower bound of it) and a bound ``absolute`` of its ``A_ij``: ``a + A + B|a| >= kth - A -
        B|kth|``."""
        b = self.relative
        v = kth - 2 * absolute - b * kth.abs()
        return torch.where(v >= 0, v / (1 + b), v / (1 - b))

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A reusable work tensor (fresh multi-MB allocations cost page faults at every chunk)."""
        size = 1
        for dim in shape:
            size *= dim
        flat = self._workspace.get(name)
        if flat is None or flat.numel() < size or flat.dtype != dtype:
            flat = torch.empty(max(2 * size, 1), dtype=dtype, device=self.x.device)  # room to grow
            self._workspace[name] = flat
        return flat[:size].view(shape)

    def exact(self, rows: Tensor, cols: Tensor) -> Tensor:
        """The float64 similarity of the pairs ``(rows[p], cols[p])``: cosine, or minus the squared distance (taken
        directly, not from dot products: exact even for near-duplicates)."""
        dim = self.x.shape[1]
        a = torch.index_select(self.x, 0, rows, out=self.buffer("rows", (len(rows), dim), self.x.dtype))
        b = torch.index_select(self.x, 0, cols, out=self.buffer("cols", (len(cols), dim), self.x.dtype))
        if self.half_square is None:
            return torch.einsum("pd,pd->p", a, b)
        a = a.sub_(b)
        return -torch.einsum("pd,pd->p", a, a)

    def recheck(self, rows: Tensor, cols: Tensor) -> Tensor:
        """The screen's ranked quantity (``x_i.x_j``, minus ``|x_j|^2 / 2`` for euclidean) from the float32 copies:
        within `recheck_bound` of the exact one."""
        dim = self.x.shape[1]
        a = torch.index_select(self.x32, 0, rows, out=self.buffer("rows32", (len(rows), dim), torch.float32))
        b = torch.index_select(self.x32, 0, cols, out=self.buffer("cols32", (len(cols), dim), torch.float32))
        dot = torch.einsum("pd,pd->p", a, b).double()
        return dot if self.half_square is None else dot - self.half_square[cols]


def nearest_neighbours(
    x, k: int = 10, *, metric: str = "cosine", chunk_size: int = 1024, screen_dtype: str | torch.dtype = "auto"
) -> tuple[Tensor, Tensor]:
    """The exact ``k`` nearest other points of every point of ``x``.

    Args:
        x (`Tensor` or array of shape `(N, dim)`): the points (on CPU or CUDA, where the work stays; MPS inputs,
            which have no float64, are worked on and returned on CPU).
        k (`int`, *optional*, defaults to `10`): neighbours per point, in ``[1, N - 1]``.
        metric (`str`, *optional*, defaults to `"cosine"`): ``cosine`` or ``euclidean``.
        chunk_size (`int`, *optional*, defaults to `1024`): rows screened at once (memory ``chunk_size x N``).
        screen_dtype (`str`, *optional*, defaults to `"auto"`): the screen's matmul dtype: ``bfloat16`` (CPU only)
            or ``float32``; ``auto`` takes float32 on accelerators and below 16,384 points, else whichever screen
            a one-off timing on this CPU finds faster (`measured_screen_dtype`, ~1.6 s once per process). The
            result does not depend on it.

    Returns:
        ``(values, indices)``, both ``(N, k)``, best first: float64 similarities (cosine, or minus the squared
        euclidean distance) and int64 indices. Self is excluded; ties at equal float64 similarity go to the lower
        index.
    """
    return _neighbours(x, k, metric, chunk_size, screen_dtype, with_values=True)


def neighbour_sets(
    x, k: int = 10, *, metric: str = "cosine", chunk_size: int = 1024, screen_dtype: str | torch.dtype = "auto"
) -> Tensor:
    """The ids of each point's exact ``k`` nearest other points, ``(N, k)``, in no particular order: the sets of
    `nearest_neighbours` (same arguments), faster, as columns certain to be in a set are never re-scored."""
    return _neighbours(x, k, metric, chunk_size, screen_dtype, with_values=False)[1]


def _neighbours(x, k: int, metric: str, chunk_size: int, screen_dtype, with_values: bool) -> tuple[Tensor, Tensor]:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an int >= 1, got {chunk_size!r}.")
    x64, scale = prepare_exact(x, metric)
    n = x64.shape[0]
    check_k(k, n)
    dtype = _resolve_screen_dtype(screen_dtype, x64.device, n, metric, x64.shape[1])
    search = _Search(x64, metric, dtype, k, chunk_size, with_values)
    search.run(n)
    return (search.values / scale**2 if scale != 1.0 else search.values), search.indices


class _Search:
    """The exact kNN of every row of ``x64`` (float64, prepared), chunk by chunk: the screen's keys, the output
    and the working buffer, made once; `run` fills the rows of the first chunks."""

    def __init__(self, x64: Tensor, metric: str, dtype: torch.dtype, k: int, chunk_size: int, with_values: bool):
        n = x64.shape[0]
        self.n, self.chunk_size, self.with_values = n, chunk_size, with_values
        self.screen = _Screen(x64, metric, dtype, k)
        self.stripes = STRIPES if n >= STRIPES * (k + SCREEN_MARGIN) else 1
        padded = -(-n // self.stripes) * self.stripes
        self.keys_t = self.screen.keys_t
        if padded > n:
            self.keys_t = torch.cat([self.keys_t, self.keys_t.new_zeros(self.keys_t.shape[0], padded - n)], dim=1)
        self.values = torch.empty(n, k, dtype=torch.float64, device=x64.device)
        self.indices = torch.empty(n, k, dtype=torch.long, device=x64.device)
        self.buffer = torch.empty(min(chunk_size, n), padded, dtype=dtype, device=x64.device)
        self.width = min(k + SCREEN_MARGIN, padded // self.stripes)

    def run(self, rows: int) -> None:
        """The neighbours of rows ``0 .. rows - 1`` (all of them: ``rows = n``)."""
        n, device = self.n, self.values.device
        for start in range(0, rows, self.chunk_size):
            stop = min(start + self.chunk_size, rows)
            operand, row_terms, shift = self.screen.operands(start, stop)
            scores = torch.mm(operand, self.keys_t, out=self.buffer[: stop - start])  # (R, padded), screened
            scores[:, n:] = -torch.inf
            ids = torch.arange(start, stop, device=device)
            scores[ids - start, ids] = -torch.inf  # self excluded
            chunk = _Chunk(self.screen, ids, row_terms, shift, self.with_values)
            self.width = _select(scores, chunk, self.stripes, self.width, self.values[start:stop],
                                 self.indices[start:stop])  # fmt: skip


class _Chunk:
    """The rows of one chunk: ids, bound terms, shift; `part` restricts to some of them."""

    def __init__(self, screen: _Screen, rows: Tensor, row_terms: Tensor, shift: Tensor, with_values: bool) -> None:
        self.screen, self.rows, self.row_terms = screen, rows, row_terms
        self.shift, self.with_values = shift, with_values

    def part(self, which: Tensor) -> _Chunk:
        return _Chunk(self.screen, self.rows[which], self.row_terms[which], self.shift[which], self.with_values)


def _select(scores: Tensor, chunk: _Chunk, stripes: int, width: int, out_values: Tensor, out_indices: Tensor) -> int:
    """The exact top-k of a chunk's screened ``scores`` ``(R, padded)``, written to ``out_*``.

    Takes the ``width`` best column groups per row; rows that need more (more groups reach the floor) are redone
    with exactly as many as they need. Returns the width to start the next chunk with (enough for 90% of these
    rows: neighbouring chunks need similar widths).
    """
    k, screen = chunk.screen.k, chunk.screen
    groups = scores.shape[1] // stripes
    group_max = scores.view(len(chunk.rows), stripes, groups).amax(dim=1) if stripes > 1 else scores  # (R, groups)
    top = group_max.topk(width, dim=1)
    # the k-th best group maximum is a lower bound of the row's k-th best value (k distinct columns reach it), and
    # no column of a group whose maximum is below the floor can be among the exact top-k
    floor = screen.threshold(top.values[:, k - 1].double(), screen.screen_bound.row_wide(chunk.row_terms))
    need = (top.values.double() >= floor[:, None]).sum(1)  # groups at or above the floor, if fewer than width
    closed = (need < width) | (width == groups)
    done = torch.nonzero(closed)[:, 0]
    _gather_and_finish(scores, top.indices[done], done, chunk, stripes, out_values, out_indices)
    if not bool(closed.all()):
        todo = torch.nonzero(~closed)[:, 0]
        need[todo] = (group_max[todo].double() >= floor[todo, None]).sum(1)
        chosen = group_max[todo].topk(int(need[todo].max()), dim=1).indices
        _gather_and_finish(scores, chosen, todo, chunk, stripes, out_values, out_indices)
    return min(groups, max(k + SCREEN_MARGIN, int(need.float().quantile(0.9)) + 1))


def _gather_and_finish(scores: Tensor, chosen: Tensor, which: Tensor, chunk: _Chunk, stripes: int,
                       out_values: Tensor, out_indices: Tensor) -> None:  # fmt: skip
    """Every column of the ``chosen`` groups (``(len(which), width)``) of the chunk rows ``which``, then `_finish`."""
    if not len(which):
        return
    groups = scores.shape[1] // stripes
    offsets = groups * torch.arange(stripes, device=scores.device)[None, :, None]
    columns = (chosen[:, None, :] + offsets).flatten(1)  # (rows, stripes * width)
    gathered = scores.take(columns + (which * scores.shape[1])[:, None])
    values, indices = _finish(gathered, columns, chunk.part(which))
    out_values[which], out_indices[which] = values, indices


def _decide(lowest: Tensor, highest: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """For each row's columns with exact values in ``[lowest, highest]`` (``-inf`` for none): which can be in the
    exact top-k (``candidate``: upper end at or above the k-th best lower end) and which are in it whatever the
    exact values (``certain``: fewer than k others have an upper end at or above its lower end)."""
    candidate = highest >= lowest.topk(k, dim=1).values[:, -1:]
    ceiling = torch.where(candidate, highest, -torch.inf).sort(dim=1, descending=True).values
    reach = torch.searchsorted(-ceiling, -lowest.contiguous(), right=True)  # columns with an upper end >= its lower
    return candidate, candidate & (reach - 1 < k)


def _finish(screened: Tensor, columns: Tensor, chunk: _Chunk) -> tuple[Tensor, Tensor]:
    """The exact top-k of rows from every column that may matter (``screened`` values at ``columns``, ``(R, W)``).

    Intervals from the screen's bound; then the columns in doubt get float32 values with their own (much smaller)
    bound; the columns still in doubt (and, when values are wanted, every candidate) get float64 values; ties go
    to the lower index.
    """
    screen, k, n = chunk.screen, chunk.screen.k, chunk.screen.x.shape[0]
    # the row-wide bound first (cheap), to keep a few columns per row; then each column's own bound on those
    floor = screen.threshold(screened.topk(k, dim=1).values[:, -1].double(),
                             screen.screen_bound.row_wide(chunk.row_terms))  # fmt: skip
    keep = screened.double() >= floor[:, None]
    screened, order = torch.where(keep, screened.double(), -torch.inf).topk(int(keep.sum(1).max()), dim=1)
    columns = columns.gather(1, order).clamp_max(n - 1)  # padding columns are -inf, never kept
    valid = torch.isfinite(screened)
    slack = screen.screen_bound.pairs(chunk.row_terms, columns) + screen.relative * screened.abs()
    slack = torch.where(valid, slack, 0.0)
    lowest, highest = screened - slack, screened + slack  # in the shifted units of the screen
    candidate, certain = _decide(lowest, highest, k)
    if not chunk.with_values:  # float32 re-check of the columns in doubt
        doubt = (candidate & ~certain).nonzero(as_tuple=True)
        value = screen.recheck(chunk.rows[doubt[0]], columns[doubt]) - chunk.shift[doubt[0]]
        bound = (chunk.screen.recheck_row[chunk.rows[doubt[0]]] * screen.recheck_bound.col[columns[doubt]]).sum(1)
        bound = bound + screen.recheck_bound.constant
        lowest, highest = lowest.index_put(doubt, value - bound), highest.index_put(doubt, value + bound)
        candidate, certain = _decide(lowest, highest, k)
    # float64 for what is still in doubt (or every candidate, for values); certain columns sort first, others last
    if chunk.with_values:
        certain = torch.zeros_like(certain)
    exact = torch.where(certain, torch.inf, -torch.inf).to(screened)
    wanted = (candidate & ~certain).nonzero(as_tuple=True)
    exact[wanted] = screen.exact(chunk.rows[wanted[0]], columns[wanted])
    columns, order = columns.sort(dim=1)  # lower index first; a stable sort by value then keeps it among equals
    exact, order = exact.gather(1, order).sort(dim=1, descending=True, stable=True)
    return exact[:, :k], columns.gather(1, order[:, :k])
