"""Low-rank projections of a weight's gradient: where `ProjectedAdamW` keeps its moments.

A 2-D gradient ``G`` of shape ``(rows, cols)`` is projected on its shorter side with an orthonormal basis
``P`` of shape ``(side, rank)``: ``R = Pᵀ G`` (``rows <= cols``, "left") or ``R = G P`` ("right"), and an update
``N`` computed in that space is mapped back with ``P N`` or ``N Pᵀ``. Two bases:

- random: Gaussian, orthonormalised by QR, drawn from ``(seed, parameter index, period)``, so every process draws
  the same basis without communication (the Flora idea);
- svd: the top ``rank`` singular vectors of the current gradient (GaLore's choice).

The optimizer makes one basis per weight and period and keeps it in its state.

Example:

```python
>>> import torch
>>> from hf_ext.optim.projection import project, project_back, random_basis, projection_side
>>> grad = torch.randn(64, 256)
>>> side = projection_side(grad.shape)  # "left": 64 <= 256
>>> basis = random_basis(64, 8, seed=0, index=3, period=0, device=grad.device)
>>> reduced = project(grad, basis, side)  # (8, 256)
>>> project_back(reduced, basis, side).shape
torch.Size([64, 256])

```
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SIDES = ("left", "right")


def projection_side(shape: torch.Size | tuple[int, ...]) -> str:
    """``"left"`` when the rows are the shorter side (project ``Pᵀ G``), else ``"right"`` (project ``G P``)."""
    rows, cols = shape
    return "left" if rows <= cols else "right"


def side_length(shape: torch.Size | tuple[int, ...], side: str) -> int:
    return shape[0] if side == "left" else shape[1]


def _seed_of(seed: int, index: int, period: int) -> int:
    """A generator seed from the three numbers, well mixed (no collisions between (index, period) pairs)."""
    return int(np.random.SeedSequence([seed, index, period]).generate_state(1, np.uint64)[0]) % (2**63 - 1)


def random_basis(side: int, rank: int, *, seed: int, index: int, period: int, device: torch.device | str) -> Tensor:
    """An orthonormal ``(side, rank)`` basis drawn from ``(seed, index, period)``: the same on every call and process.

    Drawn in float32 with a generator on ``device`` (CPU and CUDA streams differ, so processes that must agree
    need the same device type, as DDP ranks have).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(_seed_of(seed, index, period))
    gaussian = torch.randn(side, rank, generator=generator, device=device, dtype=torch.float32)
    return orthonormalize(gaussian)


def _cholesky_qr(matrix: Tensor) -> Tensor:
    gram = matrix.T @ matrix  # (rank, rank)
    lower = torch.linalg.cholesky(gram)
    return torch.linalg.solve_triangular(lower.T, matrix, upper=True, left=False)  # matrix @ lower⁻ᵀ


def orthonormalize(matrix: Tensor) -> Tensor:
    """Orthonormal columns spanning those of a tall ``(side, rank)`` matrix.

    Tall Gaussian matrices (``side >= 4 * rank``) are well conditioned, so CholeskyQR twice (two small Gram
    factorisations; several times faster than Householder QR on CPU) is accurate to float32 rounding; squarer
    ones use `torch.linalg.qr`.
    """
    side, rank = matrix.shape
    if side >= 4 * rank:
        return _cholesky_qr(_cholesky_qr(matrix))
    basis, _ = torch.linalg.qr(matrix)
    return basis


def svd_basis(grad: Tensor, rank: int, side: str) -> Tensor:
    """The top ``rank`` singular vectors of ``grad`` on ``side``: ``(side_length, rank)``, float32."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return (u[:, :rank] if side == "left" else vh[:rank].T).contiguous()


def project(grad: Tensor, basis: Tensor, side: str) -> Tensor:
    """``Pᵀ G`` (left, ``(rank, cols)``) or ``G P`` (right, ``(rows, rank)``)."""
    return basis.T @ grad if side == "left" else grad @ basis


def project_back(reduced: Tensor, basis: Tensor, side: str) -> Tensor:
    """``P N`` (left) or ``N Pᵀ`` (right): the full-size ``(rows, cols)`` update."""
    return basis @ reduced if side == "left" else reduced @ basis.T


def change_basis(reduced: Tensor, old: Tensor, new: Tensor, side: str) -> Tensor:
    """Carry a projected tensor into a new subspace: ``P_newᵀ P_old M`` (left) or ``M P_oldᵀ P_new`` (right)."""
    return carry_first_moment(reduced, new.T @ old, side)


def carry_first_moment(reduced: Tensor, transition: Tensor, side: str) -> Tensor:
    """`change_basis` from the transition ``T = P_newᵀ P_old`` (``rank x rank``): ``T M`` (left) or ``M Tᵀ``."""
    return transition @ reduced if side == "left" else reduced @ transition.T


def change_basis_second_moment(second: Tensor, old: Tensor, new: Tensor, side: str) -> Tensor:
    """Carry an elementwise second moment into a new subspace (its diagonal, treating coordinates as uncorrelated).

    New coordinate ``i`` is ``sum_j T_ij x_j`` plus a part outside the old subspace, with ``T = P_newᵀ P_old``:
    its second moment is ``sum_j T_ij² v_j`` plus ``(1 - sum_j T_ij²)`` times the mean of ``v`` over the old
    coordinates (the part the old subspace never saw gets the average, an isotropic prior). Unchanged when
    ``new == old``; never near zero where the carried first moment is not, so ``m / sqrt(v)`` stays bounded.
    """
    return carry_second_moment(second, new.T @ old, side)


def carry_second_moment(second: Tensor, transition: Tensor, side: str) -> Tensor:
    """`change_basis_second_moment` from the transition ``T = P_newᵀ P_old`` (``rank x rank``).

    The mean runs over the projected coordinates of each column (left) or row (right), so a row-sharded right-side
    moment is carried shard by shard.
    """
    weights = transition.square()
    unseen = (1.0 - weights.sum(dim=1)).clamp(min=0.0)  # rounding can push a norm of 1 slightly above 1
    if side == "left":  # second: (rank, cols)
        return weights @ second + unseen[:, None] * second.mean(dim=0, keepdim=True)
    return second @ weights.T + unseen[None, :] * second.mean(dim=1, keepdim=True)  # second: (rows, rank)
