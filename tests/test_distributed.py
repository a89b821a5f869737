from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_ext.distributed import all_gather_with_grad
from hf_ext.testing import DistributedTestError, run_distributed

# Rank r holds ROWS[r] inputs: unequal on purpose (the last batch of an epoch).
ROWS = (5, 3)
DIM = 4


def _inputs() -> tuple[torch.nn.Linear, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, 3)
    chunks = list(torch.randn(sum(ROWS), DIM).split(ROWS))
    return model, chunks


def _global_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """A loss coupling every pair of the global batch (like CoSENT): not separable per rank."""
    sims = F.normalize(embeddings, dim=-1) @ F.normalize(embeddings, dim=-1).T
    return torch.logsumexp(20 * sims.flatten(), dim=0)


def _ddp_step(rank: int, world_size: int) -> dict:
    model, chunks = _inputs()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    gathered = all_gather_with_grad(ddp(chunks[rank]))
    loss = _global_loss(gathered)
    loss.backward()
    return {
        "loss": loss.item(),
        "rows": gathered.shape[0],
        "grads": [p.grad.clone() for p in model.parameters()],
    }


def test_all_gather_with_grad_under_ddp_matches_single_process() -> None:
    model, chunks = _inputs()
    reference = _global_loss(model(torch.cat(chunks)))
    reference.backward()
    results = run_distributed(_ddp_step, world_size=2)
    for result in results:
        assert result["rows"] == sum(ROWS)
        assert result["loss"] == pytest.approx(reference.item(), rel=1e-6)
        for grad, param in zip(result["grads"], model.parameters(), strict=True):
            torch.testing.assert_close(grad, param.grad, rtol=1e-5, atol=1e-6)


def test_all_gather_with_grad_is_identity_without_a_process_group() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x


def test_all_gather_with_grad_rejects_scalars_and_non_tensors() -> None:
    with pytest.raises(ValueError, match="`tensor` must have at least one dimension"):
        all_gather_with_grad(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"`tensor` must be a torch\.Tensor"):
        all_gather_with_grad([1.0, 2.0])


def _fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise RuntimeError("boom on rank one")
    return rank


def test_run_distributed_reports_the_failing_rank() -> None:
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1.*boom on rank one"):
        run_distributed(_fail_on_rank_one, world_size=2)


def test_run_distributed_rejects_bad_world_size() -> None:
    with pytest.raises(ValueError, match="`world_size` must be an int >= 1"):
        run_distributed(_fail_on_rank_one, world_size=0)
