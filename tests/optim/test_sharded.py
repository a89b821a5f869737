"""ProjectedAdamW on FSDP2 (`fully_shard`) shards: the single-process trajectory, DCP checkpoints, bad placements."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict, set_state_dict

from hf_ext.optim.sharded import row_range

from ._fsdp2_runs import RESUME_AT, batches, full_params, mlp, optimizer, train


def _single(projection: str, seed: int = 0) -> dict[str, torch.Tensor]:
    model = mlp(seed)
    train(model, optimizer(model, projection), batches())
    return full_params(model)


def _assert_close(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)


def test_row_range_is_torch_chunk_with_empty_tail_shards() -> None:
    for rows, world_size in ((7, 2), (25, 2), (5, 4), (3, 4), (8, 8)):
        chunks = list(torch.arange(rows).chunk(world_size))
        chunks += [torch.arange(0)] * (world_size - len(chunks))
        for rank, chunk in enumerate(chunks):
            start, stop = row_range(rows, world_size, rank)
            assert torch.equal(torch.arange(rows)[start:stop], chunk)


@pytest.mark.parametrize("projection", ["random", "svd"])
def test_two_fully_sharded_processes_follow_the_single_process_trajectory_over_20_steps(
    fsdp2_runs: list[dict], projection: str
) -> None:
    expected = _single(projection)
    for result in fsdp2_runs:
        _assert_close(result[projection], expected, atol=1e-5)


def test_moments_and_bases_are_sharded_like_the_weight_or_replicated_when_rank_sized(fsdp2_runs: list[dict]) -> None:
    kinds = fsdp2_runs[0]["checkpoints"]["state_kinds"]
    # (25, 12): basis on the columns; (7, 25): basis on the sharded rows; rank 3
    moments = {"exp_avg": "sharded (25, 3)", "exp_avg_sq": "sharded (25, 3)"}
    assert kinds["0.weight"] == {**moments, "basis": "replicated (12, 3)"}
    moments = {"exp_avg": "replicated (3, 25)", "exp_avg_sq": "replicated (3, 25)"}
    assert kinds["2.weight"] == {**moments, "basis": "sharded (7, 3)"}
    assert kinds["2.bias"] == {"exp_avg": "sharded (7,)", "exp_avg_sq": "sharded (7,)"}


def test_a_sharded_dcp_checkpoint_resumes_the_uninterrupted_run(fsdp2_runs: list[dict]) -> None:
    for result in fsdp2_runs:  # svd bases: the stored basis, not a recomputed one, must come back
        _assert_close(result["checkpoints"]["resumed"], result["svd"], atol=1e-7)


def test_a_single_process_state_loads_into_sharded_weights_and_resumes(fsdp2_runs: list[dict]) -> None:
    expected = _single("svd")
    for result in fsdp2_runs:
        _assert_close(result["checkpoints"]["from_one_process"], expected, atol=1e-5)


def test_a_two_process_dcp_checkpoint_resumes_in_one_process(fsdp2_runs: list[dict]) -> None:
    model = mlp(seed=99)
    opt = optimizer(model, "svd")
    model_state, optim_state = get_state_dict(model, opt)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=str(Path(fsdp2_runs[0]["checkpoint_dir"]) / "svd"))
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert opt.state[model[2].weight]["basis"].shape == (7, 3)  # the full basis from both ranks' rows
    train(model, opt, batches()[RESUME_AT:])
    _assert_close(full_params(model), fsdp2_runs[0]["svd"], atol=1e-5)


def test_a_full_optimizer_state_gathered_from_two_processes_loads_in_one(fsdp2_runs: list[dict]) -> None:
    model = mlp()
    opt = optimizer(model, "svd")
    train(model, opt, batches()[:RESUME_AT])  # the same weights as the two processes at that step
    fresh = optimizer(model, "svd")
    set_optimizer_state_dict(model, fresh, fsdp2_runs[0]["checkpoints"]["full_optim_state"])
    for param in model.parameters():
        for key, value in opt.state[param].items():
            torch.testing.assert_close(fresh.state[param][key], value, rtol=0, atol=1e-5, msg=key)


# ------------------------------------------------------------------------------------------- bad input


def test_a_weight_sharded_on_its_columns_is_refused_naming_it(fsdp2_runs: list[dict]) -> None:
    message = fsdp2_runs[0]["bad_placement"]
    assert "`0.weight`" in message and "Shard(dim=1)" in message and "fully_shard" in message


def test_per_rank_state_pieces_loaded_at_another_world_size_are_refused_naming_the_weight(
    fsdp2_runs: list[dict],
) -> None:
    model = mlp()
    opt = optimizer(model, "svd")
    with pytest.raises(ValueError, match=r"`exp_avg` of `0.weight` has shape \(13, 3\).*torch.distributed.checkpoint"):
        opt.load_state_dict(fsdp2_runs[0]["checkpoints"]["pieces"])
    assert not opt.state  # nothing half-loaded


# ------------------------------------------------------------------------------------------- with Trainer


def _final_weights(folder: str, step: int = 6) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / f"checkpoint-{step}" / "model.safetensors"))


def test_the_fsdp2_trainer_recipe_resumes_on_the_uninterrupted_trajectory(fsdp2_runs: list[dict]) -> None:
    runs = fsdp2_runs[0]["trainer"]
    assert (Path(runs["uninterrupted"]) / "checkpoint-3" / "dcp").is_dir()
    _assert_close(_final_weights(runs["resumed"]), _final_weights(runs["uninterrupted"]), atol=1e-6)


def test_the_fsdp2_trainer_recipe_with_gradient_freeing_follows_the_normal_step(fsdp2_runs: list[dict]) -> None:
    runs = fsdp2_runs[0]["trainer"]  # tied embeddings: shared weights step after backward, the rest inside it
    _assert_close(_final_weights(runs["freeing"]), _final_weights(runs["uninterrupted"]), atol=1e-6)
