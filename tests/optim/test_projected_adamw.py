from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from hf_ext.optim import ProjectedAdamW, optimizer_state_bytes
from hf_ext.optim.projection import (
    change_basis,
    change_basis_second_moment,
    project,
    project_back,
    projection_side,
    random_basis,
    svd_basis,
)
from hf_ext.testing import run_distributed

HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6)).to(dtype)


def _batches(steps: int, rows: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        batches.append((torch.randn(rows, 12, generator=generator), torch.randn(rows, 6, generator=generator)))
    return batches


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> dict[str, torch.Tensor]:
    for x, y in batches:
        optimizer.zero_grad()
        (model(x.to(next(model.parameters()).dtype)) - y).square().mean().backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _groups(model: nn.Module, **projected) -> list[dict]:
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    biases = [m.bias for m in model if isinstance(m, nn.Linear)]
    return [{"params": weights, **projected}, {"params": biases}]


def _assert_close(a: dict, b: dict, atol: float) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


# ------------------------------------------------------------------------------------------- equivalence


def test_without_projected_groups_it_is_adamw_over_20_steps() -> None:
    batches = _batches(20)
    reference = _mlp()
    expected = _train(reference, torch.optim.AdamW(reference.parameters(), **HYPER), batches)
    model = _mlp()
    got = _train(model, ProjectedAdamW(_groups(model), **HYPER), batches)
    _assert_close(got, expected, atol=1e-6)


def test_identity_basis_at_full_rank_is_adamw_over_20_steps() -> None:
    def identity(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
        return torch.eye(grad.shape[0] if side == "left" else grad.shape[1])[:, :rank]

    batches = _batches(20)
    reference = _mlp()
    expected = _train(reference, torch.optim.AdamW(reference.parameters(), **HYPER), batches)
    model = _mlp()
    # rank = the shorter side of every weight (12 for 24x12, 6 for 6x24): the projected path, not the fallback.
    groups = [
        {"params": [model[0].weight], "rank": 12, "projection": identity, "update_interval": 100},
        {"params": [model[2].weight], "rank": 6, "projection": identity, "update_interval": 100},
        {"params": [model[0].bias, model[2].bias]},
    ]
    optimizer = ProjectedAdamW(groups, **HYPER)
    got = _train(model, optimizer, batches)
    assert optimizer.state[model[0].weight]["exp_avg"].shape == (24, 12)  # right side: 24 x 12 @ 12 x 12
    assert "period" in optimizer.state[model[2].weight]  # really the projected path
    _assert_close(got, expected, atol=1e-5)


def test_rank_above_the_shorter_side_falls_back_to_adamw() -> None:
    batches = _batches(10)
    reference = _mlp()
    expected = _train(reference, torch.optim.AdamW(reference.parameters(), **HYPER), batches)
    model = _mlp()
    optimizer = ProjectedAdamW(_groups(model, rank=13), **HYPER)  # 24x12 and 6x24: both shorter sides < 13
    got = _train(model, optimizer, batches)
    _assert_close(got, expected, atol=1e-6)
    assert "period" not in optimizer.state[model[0].weight]


@pytest.mark.parametrize("projection", ["random", "svd"])
def test_projected_training_converges_steadily_and_keeps_rank_sized_state(projection: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32))
    x = torch.randn(64, 32)
    y = torch.tanh(x @ torch.randn(32, 32) / 6)
    optimizer = ProjectedAdamW(_groups(model, rank=4), lr=1e-2, update_interval=10, projection=projection)
    losses = []
    for _ in range(150):  # 15 basis changes
        optimizer.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(later < earlier for earlier, later in zip(losses[29::30], losses[59::30], strict=False))
    assert optimizer.state[model[0].weight]["exp_avg"].shape == (64, 4)  # 64x32: right side
    assert optimizer.state[model[2].weight]["exp_avg"].shape == (4, 64)  # 32x64: left side
    assert optimizer.state[model[0].weight]["basis"].shape == (32, 4)
    if projection == "random":  # parameter 0, period 14: drawn from the seed, as every DDP rank draws it
        expected = random_basis(32, 4, seed=0, index=0, period=14, device="cpu")
        assert torch.equal(optimizer.state[model[0].weight]["basis"], expected)
    full_adamw = sum(2 * p.numel() * 4 for p in model.parameters())
    assert optimizer_state_bytes(optimizer) < 0.25 * full_adamw


# ------------------------------------------------------------------------------------------- subspace changes


def test_both_moments_are_carried_into_the_new_basis() -> None:
    model = _mlp()
    optimizer = ProjectedAdamW(_groups(model, rank=3), update_interval=4, **HYPER)
    batches = _batches(5)
    _train(model, optimizer, batches[:4])
    state = optimizer.state[model[0].weight]  # 24 x 12: right side, basis (12, 3)
    old_m, old_v, period = state["exp_avg"].clone(), state["exp_avg_sq"].clone(), int(state["period"])
    old = random_basis(12, 3, seed=0, index=0, period=0, device="cpu")
    new = random_basis(12, 3, seed=0, index=0, period=1, device="cpu")
    optimizer.zero_grad()
    x, y = batches[4]
    (model(x) - y).square().mean().backward()
    reduced = project(model[0].weight.grad, new, "right")
    optimizer.step()
    assert period == 0 and int(state["period"]) == 1
    carried = old_m @ (old.T @ new)
    torch.testing.assert_close(state["exp_avg"], 0.9 * carried + 0.1 * reduced, rtol=1e-5, atol=1e-7)
    carried_v = change_basis_second_moment(old_v, old, new, "right")
    torch.testing.assert_close(state["exp_avg_sq"], 0.99 * carried_v + 0.01 * reduced.square(), rtol=1e-5, atol=1e-9)


def test_change_basis_is_the_projection_of_the_back_projected_moment() -> None:
    for shape in ((6, 20), (20, 6)):
        side = projection_side(shape)
        length = min(shape)
        old = random_basis(length, 3, seed=1, index=0, period=0, device="cpu")
        new = random_basis(length, 3, seed=1, index=0, period=1, device="cpu")
        moment = project(torch.randn(shape), old, side)
        expected = project(project_back(moment, old, side), new, side)
        torch.testing.assert_close(change_basis(moment, old, new, side), expected)
        torch.testing.assert_close(change_basis(moment, old, old, side), moment, rtol=1e-5, atol=1e-6)


def test_second_moment_carry_is_the_rotated_diagonal_plus_the_mean_for_the_unseen_part() -> None:
    old = random_basis(20, 3, seed=0, index=0, period=0, device="cpu")
    new = random_basis(20, 3, seed=0, index=0, period=1, device="cpu")
    second = torch.rand(3, 7)  # left side: (rank, cols)
    weights = (new.T @ old).square()
    expected = weights @ second + (1 - weights.sum(1))[:, None] * second.mean(0, keepdim=True)
    torch.testing.assert_close(change_basis_second_moment(second, old, new, "left"), expected)
    torch.testing.assert_close(change_basis_second_moment(second, old, old, "left"), second, rtol=1e-4, atol=1e-6)
    # within the old subspace, an isotropic second moment stays isotropic
    flat = torch.full((7, 3), 2.0)  # right side: (rows, rank)
    torch.testing.assert_close(change_basis_second_moment(flat, old, new, "right"), flat)


def test_random_basis_is_orthonormal_reproducible_and_changes_with_period_and_index() -> None:
    basis = random_basis(50, 8, seed=3, index=2, period=5, device="cpu")
    torch.testing.assert_close(basis.T @ basis, torch.eye(8), rtol=0, atol=1e-5)
    assert torch.equal(basis, random_basis(50, 8, seed=3, index=2, period=5, device="cpu"))
    assert not torch.allclose(basis, random_basis(50, 8, seed=3, index=2, period=6, device="cpu"))
    assert not torch.allclose(basis, random_basis(50, 8, seed=3, index=3, period=5, device="cpu"))


def test_svd_basis_spans_the_top_singular_vectors() -> None:
    u, _ = torch.linalg.qr(torch.randn(30, 30))
    v, _ = torch.linalg.qr(torch.randn(10, 10))
    grad = u[:, :10] @ torch.diag(torch.arange(10, 0, -1).float()) @ v.T  # (30, 10): right side
    basis = svd_basis(grad, 3, "right")
    top = v[:, :3]
    torch.testing.assert_close((basis @ basis.T) @ top, top, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- state and resuming


@pytest.mark.parametrize("projection", ["random", "svd"])
def test_state_dict_loads_weights_only_and_a_resumed_run_equals_an_uninterrupted_one(projection: str) -> None:
    batches = _batches(12)
    model = _mlp()
    optimizer = ProjectedAdamW(_groups(model, rank=3), update_interval=4, projection=projection, **HYPER)
    uninterrupted = _train(model, optimizer, batches)

    model = _mlp()
    optimizer = ProjectedAdamW(_groups(model, rank=3), update_interval=4, projection=projection, **HYPER)
    _train(model, optimizer, batches[:6])  # stops mid-period (periods of 4 steps)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = _mlp(seed=99)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = ProjectedAdamW(_groups(resumed_model, rank=3), update_interval=4, projection=projection, **HYPER)
    resumed.load_state_dict(checkpoint["optimizer"])
    got = _train(resumed_model, resumed, batches[6:])
    _assert_close(got, uninterrupted, atol=0.0)


def test_bf16_parameters_keep_float32_moments_through_a_state_dict_round_trip() -> None:
    model = _mlp(dtype=torch.bfloat16)
    optimizer = ProjectedAdamW(_groups(model, rank=3), update_interval=300, **HYPER)
    _train(model, optimizer, _batches(3))
    state = optimizer.state[model[0].weight]
    assert state["exp_avg"].dtype == torch.float32 and optimizer.state[model[0].bias]["exp_avg"].dtype == torch.float32
    reloaded = ProjectedAdamW(_groups(model, rank=3), update_interval=300, **HYPER)
    reloaded.load_state_dict(optimizer.state_dict())
    for key in ("exp_avg", "exp_avg_sq", "period", "step"):
        assert reloaded.state[model[0].weight][key].dtype == state[key].dtype
        assert torch.equal(reloaded.state[model[0].weight][key], state[key])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_closure_is_evaluated_with_gradients_enabled() -> None:
    model = _mlp()
    optimizer = ProjectedAdamW(_groups(model, rank=3), **HYPER)
    x, y = _batches(1)[0]

    def closure() -> float:
        optimizer.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss.item()

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert isinstance(loss, float) and optimizer.state[model[0].weight]["step"] == 1


# ------------------------------------------------------------------------------------------- distributed


def _ddp_run(rank: int, world_size: int, steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = _mlp()
    ddp = DistributedDataParallel(model)
    optimizer = ProjectedAdamW(_groups(model, rank=3), update_interval=3, **HYPER)
    for x, y in _batches(steps, rows=16):
        half = slice(rank * 8, (rank + 1) * 8)
        optimizer.zero_grad()
        (ddp(x[half]) - y[half]).square().mean().backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_two_gloo_processes_give_the_weights_of_one_process() -> None:
    model = _mlp()
    single = _train(model, ProjectedAdamW(_groups(model, rank=3), update_interval=3, **HYPER), _batches(7))
    for result in run_distributed(_ddp_run, world_size=2, args=(7,)):
        _assert_close(result, single, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "`lr`"),
        ({"betas": (1.0, 0.9)}, "`betas`"),
        ({"betas": (0.9, -0.1)}, "`betas`"),
        ({"eps": -1e-8}, "`eps`"),
        ({"weight_decay": -0.1}, "`weight_decay`"),
        ({"rank": 0}, "`rank`"),
        ({"rank": 2.5}, "`rank`"),
        ({"update_interval": 0}, "`update_interval`"),
        ({"scale": 0.0}, "`scale`"),
        ({"projection": "qr"}, "`projection`"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProjectedAdamW(_mlp().parameters(), **kwargs)


def test_a_bad_group_override_raises() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="`update_interval`"):
        ProjectedAdamW([{"params": model.parameters(), "rank": 2, "update_interval": -5}])


def test_a_callable_projection_of_the_wrong_shape_raises() -> None:
    model = _mlp()
    optimizer = ProjectedAdamW(_groups(model, rank=3, projection=lambda grad, rank, side: torch.eye(5)), **HYPER)
    with pytest.raises(ValueError, match="basis of shape"):
        _train(model, optimizer, _batches(1))


def test_fsdp_sharded_weights_in_a_projected_group_are_refused() -> None:
    flat = nn.Parameter(torch.randn(40))
    flat._fsdp_flattened = True  # what FSDP marks its flat parameters with
    with pytest.raises(ValueError, match="sharded"):
        ProjectedAdamW([{"params": [flat], "rank": 4}])
    ProjectedAdamW([{"params": [flat]}])  # without `rank`: exact AdamW, accepted


def test_float64_weights_are_not_rounded_and_a_callable_projection_survives_weights_only_loading() -> None:
    def identity(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
        return torch.eye(grad.shape[0] if side == "left" else grad.shape[1])[:, :rank]

    model = _mlp(dtype=torch.float64)
    with torch.no_grad():
        model[0].bias.fill_(1 + 1e-12)
    optimizer = ProjectedAdamW(_groups(model, rank=3, projection=identity), lr=0.0, weight_decay=0.0)
    _train(model, optimizer, _batches(2))
    assert model[0].bias[0].item() == 1 + 1e-12  # lr 0: untouched, not rounded through float32
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    reloaded = ProjectedAdamW(_groups(model, rank=3, projection=identity), lr=0.0, weight_decay=0.0)
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert reloaded.param_groups[0]["projection"] is identity
    assert reloaded.state[model[0].weight]["step"].device.type == "cpu"
