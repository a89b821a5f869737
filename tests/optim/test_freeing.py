"""Gradient-freeing steps (`StepInBackward`): the normal trajectory, freed gradients, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hf_ext.optim import FreedGradient, ProjectedAdamW, StepInBackward, create_projected_optimizer
from hf_ext.tensor_memory import TensorBytes

from ._fsdp2_runs import HYPER, batches, full_params, mlp, optimizer, train
from ._trainer_utils import _args, _assert_close, _model, _params, _trainer


@pytest.mark.parametrize("projection", ["random", "svd"])
def test_stepping_in_backward_follows_the_normal_trajectory_on_one_process(projection: str) -> None:
    data = batches()
    model = mlp()
    train(model, optimizer(model, projection), data)
    expected = full_params(model)
    model = mlp()
    opt = StepInBackward(optimizer(model, projection))
    train(model, opt, data)
    _assert_close(full_params(model), expected, atol=1e-6)
    assert all(isinstance(p.grad, FreedGradient) for p in model.parameters())
    assert opt.state is opt.optimizer.state and opt.state[model[2].weight]["exp_avg"].shape == (3, 25)


def _tower(width: int = 128, layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width, bias=False), nn.Tanh())])


def _peak_of_a_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> int:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()  # the first step makes the state, which the measured step then reuses
    opt.zero_grad()
    with TensorBytes() as probe:
        model(x).square().mean().backward()
        opt.step()
    return probe.peak


def test_gradients_are_freed_during_backward_so_the_peak_drops_by_all_but_the_largest_gradient() -> None:
    x = torch.randn(2, 128)
    model = _tower()
    normal = _peak_of_a_step(model, ProjectedAdamW(model.parameters(), rank=8, **HYPER), x)
    model = _tower()
    freeing = _peak_of_a_step(model, StepInBackward(ProjectedAdamW(model.parameters(), rank=8, **HYPER)), x)
    grads = [p.numel() * p.element_size() for p in model.parameters()]  # 4 x 64 KiB
    saved = sum(grads) - max(grads)
    assert normal - freeing >= 0.9 * saved, (normal, freeing, saved)
    assert freeing < normal - sum(grads) + 1.25 * max(grads), (normal, freeing)  # one gradient at a time


def test_gradient_accumulation_is_refused_naming_the_weight() -> None:
    model = mlp()
    StepInBackward(optimizer(model, "random"))
    x, y = batches(1)[0]
    (model(x) - y).square().mean().backward()
    with pytest.raises(ValueError, match=r"`2\.bias` was already used.*gradient accumulation.*max_grad_norm=0"):
        (model(x) - y).square().mean().backward()  # a second backward before zero_grad


def test_clipping_sees_the_true_norm_is_exact_when_it_would_not_act_and_refused_when_it_would() -> None:
    x, y = batches(1)[0]
    normal, model = mlp(), mlp()
    StepInBackward(optimizer(model, "random"))
    for net in (normal, model):  # the same gradients, at the initial weights; `model` has stepped in backward
        (net(x) - y).square().mean().backward()
    total = torch.nn.utils.clip_grad_norm_(normal.parameters(), float("inf"))
    torch.testing.assert_close(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")), total)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2 * float(total))  # scale 1: nothing to clip, exact
    with pytest.raises(ValueError, match=r"`\d\.(weight|bias)`.*clipping would scale it by 0\.5"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5 * float(total))
    with pytest.raises(ValueError, match="only its 2-norm"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, norm_type=1.0)
    with pytest.raises(ValueError, match="not supported"):
        model[0].weight.grad.sum()


def test_fsdp1_flattened_parameters_are_refused() -> None:
    flat = nn.Parameter(torch.randn(40))
    flat._fsdp_flattened = True  # what FSDP1 marks its flat parameters with
    with pytest.raises(ValueError, match=r"`flat`.*FSDP1.*FSDP2"):
        StepInBackward(ProjectedAdamW([("flat", flat)]))


def test_only_a_projected_adamw_is_wrapped() -> None:
    with pytest.raises(ValueError, match="`optimizer` must be a ProjectedAdamW"):
        StepInBackward(torch.optim.AdamW(mlp().parameters()))


# ------------------------------------------------------------------------------------------- FSDP2 and DDP


def test_under_fsdp2_stepping_in_backward_follows_the_normal_sharded_trajectory(fsdp2_runs: list[dict]) -> None:
    for result in fsdp2_runs:
        _assert_close(result["freeing"]["params"], result["random"], atol=1e-6)


def test_under_fsdp2_no_gradient_is_left_after_backward(fsdp2_runs: list[dict]) -> None:
    for result in fsdp2_runs:
        freeing = result["freeing"]
        assert freeing["all_freed"] and freeing["grad_bytes_after_backward"] == 0
        assert freeing["normal_grad_bytes_after_backward"] > 0  # this rank's gradient shards, kept by a normal step


def test_under_fsdp2_norms_are_the_sharded_gradients_and_binding_clipping_or_accumulation_are_refused(
    fsdp2_runs: list[dict],
) -> None:
    for result in fsdp2_runs:
        freeing = result["freeing"]
        normal_norm, freed_norm = freeing["norms"]
        assert abs(normal_norm - freed_norm) <= 1e-6 * normal_norm
        assert freeing["clipping_that_would_not_act"] == "no error"
        assert "gradient clipping would scale it" in freeing["clipping"]
        assert "gradient accumulation" in freeing["accumulation"]


def test_under_ddp_stepping_in_backward_is_refused_saying_why(fsdp2_runs: list[dict]) -> None:
    message = fsdp2_runs[0]["freeing_under_ddp"]
    assert "`2.bias`" in message and "before DDP's all-reduce" in message and "fully_shard" in message


# ------------------------------------------------------------------------------------------- with Trainer


def _trainer_run(tiny_llama_dir: Path, data, tmp: Path, step_in_backward: bool, **kwargs) -> dict:
    model = _model(tiny_llama_dir)
    optimizer = create_projected_optimizer(model, rank=4, lr=1e-2, update_interval=2, step_in_backward=step_in_backward)
    args = _args(tmp, **{"max_steps": 4, "lr_scheduler_type": "linear", "max_grad_norm": 1e3, **kwargs})
    _trainer(model, args, data, tiny_llama_dir, optimizers=(optimizer, None)).train()
    return _params(model)


def test_trainer_with_step_in_backward_follows_the_normal_trajectory(tiny_llama_dir, lm_data, tmp_path) -> None:
    expected = _trainer_run(tiny_llama_dir, lm_data, tmp_path / "normal", step_in_backward=False)
    got = _trainer_run(tiny_llama_dir, lm_data, tmp_path / "freeing", step_in_backward=True)
    _assert_close(got, expected, atol=1e-6)  # linear schedule: the hooks read the scheduled rate; clipping never binds


def test_trainer_with_step_in_backward_refuses_clipping_that_binds(tiny_llama_dir, lm_data, tmp_path) -> None:
    with pytest.raises(ValueError, match="gradient clipping would scale it"):
        _trainer_run(tiny_llama_dir, lm_data, tmp_path, step_in_backward=True, max_grad_norm=1e-3)
