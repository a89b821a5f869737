"""The sentence-transformers glue: CoSENTLoss (gather across ranks), CachedCoSENTLoss, on real model objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import CoSENTLoss as STCoSENTLoss

from hf_ext.losses import CachedCoSENTLoss, CoSENTLoss
from hf_ext.testing import run_distributed

SENTENCES_A = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "Two dogs run in the snow.",
    "The stock market fell sharply today.",
    "A child is riding a bike.",
    "Someone is cooking pasta.",
    "A cat sleeps on the sofa.",
    "The president gave a speech.",
    "People are dancing at a party.",
    "A plane takes off from the airport.",
]
SENTENCES_B = [
    "A man plays the guitar.",
    "A woman cuts an onion.",
    "A dog is swimming.",
    "Shares dropped on Wall Street.",
    "A kid rides a bicycle.",
    "A man is reading a book.",
    "A kitten naps on a couch.",
    "It is raining in London.",
    "A crowd dances.",
    "The airplane is landing.",
]
LABELS = torch.tensor([4.8, 4.5, 1.0, 3.9, 4.5, 0.2, 4.1, 0.0, 3.0, 2.5])


def _features(model: SentenceTransformer, a: list[str], b: list[str]) -> list[dict]:
    return [model.preprocess(a), model.preprocess(b)]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cosent_loss_equals_sentence_transformers_on_a_model(tiny_sentence_transformer) -> None:
    # No dropout, and float64: sentence-transformers < 6.2 computes CoSENT as a B x B matrix, a different float32
    # rounding from our sorted scan (the token-type gradient, summed over every token, drifts ~2e-6).
    model = tiny_sentence_transformer.double().eval()
    features = _features(model, SENTENCES_A, SENTENCES_B)
    ours = CoSENTLoss(model)(features, LABELS)
    ours.backward()
    ours_grads = _grads(model)
    model.zero_grad()
    theirs = STCoSENTLoss(model)(_features(model, SENTENCES_A, SENTENCES_B), LABELS)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cached_cosent_gradients_equal_the_plain_loss(tiny_sentence_transformer) -> None:
    model = tiny_sentence_transformer.eval()
    plain = CoSENTLoss(model)(_features(model, SENTENCES_A, SENTENCES_B), LABELS)
    plain.backward()
    plain_grads = _grads(model)
    model.zero_grad()
    cached = CachedCoSENTLoss(model, mini_batch_size=3)(_features(model, SENTENCES_A, SENTENCES_B), LABELS)
    cached.backward()
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == _grads(model).keys()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-4, msg=name)


def _seeded_step(model: SentenceTransformer, loss_fn, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    features = _features(model, SENTENCES_A, SENTENCES_B)
    torch.manual_seed(seed)
    loss = loss_fn(features, LABELS)
    loss.backward()
    return loss.detach(), _grads(model)


def test_cached_cosent_with_one_mini_batch_equals_the_plain_loss_in_train_mode(tiny_sentence_transformer) -> None:
    model = tiny_sentence_transformer.train()  # dropout 0.1 on
    plain_loss, plain_grads = _seeded_step(model, CoSENTLoss(model), seed=7)
    other_seed, _ = _seeded_step(model, CoSENTLoss(model), seed=8)
    assert abs(float(other_seed - plain_loss)) > 1e-3  # dropout is really on: another seed, another loss
    cached_loss, cached_grads = _seeded_step(model, CachedCoSENTLoss(model, mini_batch_size=2 * len(LABELS)), seed=7)
    torch.testing.assert_close(cached_loss, plain_loss, rtol=0, atol=1e-4)
    assert cached_grads.keys() == plain_grads.keys()
    for name, grad in cached_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-4, msg=name)


def _bruteforce_cosent(scores: torch.Tensor, labels: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    terms = [scale * (scores[j] - scores[i]) for i in range(len(labels)) for j in range(len(labels))
             if labels[i] > labels[j]]  # fmt: skip
    return torch.logsumexp(torch.stack([scores.new_zeros(()), *terms]), dim=0)


def test_cached_cosent_gradients_are_those_of_its_mini_batch_forwards_in_train_mode(tiny_sentence_transformer) -> None:
    # Independent reference: both columns tokenised as one batch (column 1's rows, then column 2's), embedded with
    # gradients mini-batch by mini-batch from the same seed (each slice trimmed of the padding all its rows share,
    # as GradCache does), the brute-force pairwise CoSENT on the cosines, one backward.
    model = tiny_sentence_transformer.train()
    size = 6
    model.zero_grad(set_to_none=True)
    merged = model.preprocess(SENTENCES_A + SENTENCES_B)
    torch.manual_seed(3)
    parts = []
    for begin in range(0, 2 * len(LABELS), size):
        rows = {k: v[begin : begin + size] for k, v in merged.items() if isinstance(v, torch.Tensor)}
        width = int(rows["attention_mask"].sum(dim=1).max())
        parts.append(model({k: v[:, :width] for k, v in rows.items()})["sentence_embedding"])
    a, b = torch.cat(parts).split(len(LABELS))
    expected = _bruteforce_cosent(torch.nn.functional.cosine_similarity(a, b), LABELS)
    expected.backward()
    expected_grads = _grads(model)
    loss, grads = _seeded_step(model, CachedCoSENTLoss(model, mini_batch_size=size), seed=3)
    torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=1e-4)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-4, msg=name)


def test_config_and_citation_feed_the_model_card(tiny_sentence_transformer) -> None:
    assert CoSENTLoss(tiny_sentence_transformer).get_config_dict() == {
        "scale": 20.0,
        "similarity_fct": "pairwise_cos_sim",
        "gather_across_devices": False,
    }
    cached = CachedCoSENTLoss(tiny_sentence_transformer, mini_batch_size=8)
    assert cached.get_config_dict()["mini_batch_size"] == 8
    assert "10.1109/TASLP.2024.3402087" in cached.citation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": 0.0}, "`scale` must be a finite number > 0"),
        ({"scale": float("nan")}, "`scale` must be a finite number > 0"),
        ({"gather_across_devices": "yes"}, "`gather_across_devices` must be a bool"),
        ({"similarity_fct": "cosine"}, "`similarity_fct` must be callable"),
    ],
)
def test_bad_constructor_arguments_are_refused(tiny_sentence_transformer, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CoSENTLoss(tiny_sentence_transformer, **kwargs)


def test_bad_batches_are_refused(tiny_sentence_transformer) -> None:
    model = tiny_sentence_transformer
    with pytest.raises(ValueError, match="`labels` must hold one label per pair"):
        CoSENTLoss(model)(_features(model, SENTENCES_A, SENTENCES_B), LABELS[:5])
    with pytest.raises(ValueError, match="expects two input columns"):
        CoSENTLoss(model)([model.preprocess(SENTENCES_A)], LABELS)
    with pytest.raises(ValueError, match="`mini_batch_size` must be an int >= 1"):
        CachedCoSENTLoss(model, mini_batch_size=0)
    nan_labels = LABELS.clone()
    nan_labels[3] = float("nan")
    with pytest.raises(ValueError, match="`labels` contains NaN"):
        CoSENTLoss(model)(_features(model, SENTENCES_A, SENTENCES_B), nan_labels)


# ---------------------------------------------------------------------------- two processes (gloo) vs one

# Rank 0 holds 6 pairs, rank 1 holds 4: unequal, like the last batch of an epoch.
SPLIT = 6


def _ddp_loss(rank: int, world_size: int, model_dir: str, cached: bool) -> dict:
    from sentence_transformers import SentenceTransformer as ST

    model = ST(model_dir, device="cpu").eval()
    # find_unused_parameters=True is the Trainer's default for SentenceTransformer models (the BERT pooler is
    # unused by mean pooling, so without it DDP would not reduce the first step's gradients at all).
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    loss_cls = CachedCoSENTLoss if cached else CoSENTLoss
    kwargs = {"mini_batch_size": 2} if cached else {}
    loss_fn = loss_cls(model, gather_across_devices=True, **kwargs)
    loss_fn.model = ddp  # what the trainer does: the loss runs the wrapped model
    part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    loss = loss_fn(_features(model, SENTENCES_A[part], SENTENCES_B[part]), LABELS[part])
    loss.backward()
    return {"loss": loss.item(), "grads": _grads(model)}


@pytest.fixture(scope="module")
def saved_tiny_st(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> str:
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(str(tiny_bert_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean")], device="cpu")
    out = tmp_path_factory.mktemp("tiny_st")
    model.save(str(out))
    return str(out)


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_gather_across_two_processes_equals_one_process_on_the_whole_batch(saved_tiny_st: str, cached: bool) -> None:
    model = SentenceTransformer(saved_tiny_st, device="cpu").eval()
    reference = CoSENTLoss(model)(_features(model, SENTENCES_A, SENTENCES_B), LABELS)
    reference.backward()
    reference_grads = _grads(model)
    results = run_distributed(_ddp_loss, world_size=2, args=(saved_tiny_st, cached))
    for rank, result in enumerate(results):
        assert result["loss"] == pytest.approx(reference.item(), abs=1e-5), rank
        assert result["grads"].keys() == reference_grads.keys()
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")


def test_without_gather_each_rank_sees_only_its_local_batch(saved_tiny_st: str) -> None:
    # The check above can fail: ranking only local pairs gives a different loss.
    model = SentenceTransformer(saved_tiny_st, device="cpu").eval()
    full = CoSENTLoss(model)(_features(model, SENTENCES_A, SENTENCES_B), LABELS).item()
    local = CoSENTLoss(model)(_features(model, SENTENCES_A[:SPLIT], SENTENCES_B[:SPLIT]), LABELS[:SPLIT]).item()
    assert abs(full - local) > 1e-3
