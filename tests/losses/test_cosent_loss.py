"""`cosent_loss`, the pure function: brute-force equivalence, sentence-transformers equivalence, edge cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sentence_transformers.sentence_transformer.losses import CoSENTLoss as STCoSENTLoss

from hf_ext.losses import cosent_loss


def bruteforce_cosent(scores, labels, scale: float = 20.0, groups=None) -> torch.Tensor:
    """The O(B^2) definition: log(1 + sum_{label_i > label_j, same group} exp(scale * (s_j - s_i)))."""
    s = scores.double() * scale
    y = labels.double()
    higher = y[:, None] > y[None, :]  # (i, j): label_i > label_j
    if groups is not None:
        higher &= groups[:, None] == groups[None, :]
    diffs = (s[None, :] - s[:, None])[higher]  # s_j - s_i
    return torch.logsumexp(torch.cat((s.new_zeros(1), diffs)), dim=0)


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),  # all distinct
        torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 2.0]),  # ties
        torch.tensor([1, 0, 1, 0, 1, 0]),  # binary ints
        torch.tensor([True, False, True, False, False, True]),  # bools
        torch.tensor([3.2, -1.0, 0.5, 3.2, 7.0, 0.5]),  # arbitrary floats with ties
    ],
)
def test_cosent_matches_bruteforce_with_ties(labels: torch.Tensor) -> None:
    scores = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(cosent_loss(scores, labels), bruteforce_cosent(scores, labels))


def test_cosent_gradients_match_bruteforce() -> None:
    scores = torch.randn(40, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (40,)).double()
    groups = torch.randint(0, 5, (40,))
    for g in (None, groups):
        (grad,) = torch.autograd.grad(cosent_loss(scores, labels, scale=5.0, groups=g), scores)
        (ref,) = torch.autograd.grad(bruteforce_cosent(scores, labels, 5.0, g), scores)
        torch.testing.assert_close(grad, ref)


def test_cosent_groups_only_compare_within_a_group() -> None:
    scores = torch.randn(30, dtype=torch.float64)
    labels = torch.randint(0, 4, (30,)).double()
    groups = torch.tensor([7, -2, 100] * 10)  # not contiguous, not sorted, negative ids allowed
    torch.testing.assert_close(
        cosent_loss(scores, labels, groups=groups), bruteforce_cosent(scores, labels, 20.0, groups)
    )
    # one group == no groups
    torch.testing.assert_close(
        cosent_loss(scores, labels, groups=torch.zeros(30, dtype=torch.long)), cosent_loss(scores, labels)
    )


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.floats(-1.0, 1.0, allow_nan=False),  # a cosine
            st.integers(0, 5),  # a label, with many ties
            st.integers(0, 3),  # a group
        ),
        min_size=1,
        max_size=40,
    ),
    scale=st.floats(0.5, 30.0),
    use_groups=st.booleans(),
)
def test_cosent_property_equals_bruteforce(data, scale: float, use_groups: bool) -> None:
    scores = torch.tensor([d[0] for d in data], dtype=torch.float64)
    labels = torch.tensor([float(d[1]) for d in data], dtype=torch.float64)
    groups = torch.tensor([d[2] for d in data]) if use_groups else None
    torch.testing.assert_close(
        cosent_loss(scores, labels, scale=scale, groups=groups),
        bruteforce_cosent(scores, labels, scale, groups),
        rtol=1e-9,
        atol=1e-9,
    )


@pytest.mark.parametrize("batch", [2, 17, 256])
def test_cosent_equals_sentence_transformers_cosent(batch: int) -> None:
    emb_a = torch.randn(batch, 8, requires_grad=True)
    emb_b = torch.randn(batch, 8)
    labels = torch.rand(batch).round(decimals=1)  # ties
    st_loss = STCoSENTLoss(model=torch.nn.Identity(), scale=20.0).compute_loss_from_embeddings([emb_a, emb_b], labels)
    cos = torch.nn.functional.cosine_similarity(emb_a, emb_b)
    ours = cosent_loss(cos, labels, scale=20.0)
    torch.testing.assert_close(ours, st_loss, rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours, emb_a)
    (g_st,) = torch.autograd.grad(st_loss, emb_a)
    torch.testing.assert_close(g_ours, g_st, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("labels", [torch.tensor([3.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])])
def test_one_pair_or_all_tied_gives_zero_loss_and_zero_gradients(labels: torch.Tensor) -> None:
    scores = torch.randn(labels.numel(), requires_grad=True)
    for groups in (None, torch.arange(labels.numel())):
        loss = cosent_loss(scores, labels, groups=groups)
        (grad,) = torch.autograd.grad(loss, scores)
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_give_the_fp32_loss(dtype: torch.dtype) -> None:
    scores = torch.rand(512) * 2 - 1
    labels = torch.randint(0, 6, (512,)).float()
    half = scores.to(dtype)
    loss = cosent_loss(half, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # exp(20 * 2) overflows fp16 (max 65504): computed in fp32 it does not
    torch.testing.assert_close(loss, cosent_loss(half.float(), labels), rtol=0, atol=1e-3)
    grouped = cosent_loss(half, labels, groups=torch.arange(512) % 7)
    torch.testing.assert_close(
        grouped, cosent_loss(half.float(), labels, groups=torch.arange(512) % 7), rtol=0, atol=1e-3
    )


def test_memory_is_linear_in_the_batch() -> None:
    # A B x B matrix would need 10^10 entries (40 GB) here; O(B) runs in well under a second.
    batch = 100_000
    scores = torch.rand(batch, requires_grad=True)
    loss = cosent_loss(scores, torch.randint(0, 50, (batch,)).float())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": torch.rand(4), "labels": torch.rand(5)}, "`labels` must hold one label per score"),
        ({"scores": torch.rand(4), "labels": torch.tensor([1.0, float("nan"), 0.0, 1.0])}, "`labels` contains NaN"),
        ({"scores": torch.rand(4), "labels": torch.tensor([1.0, float("inf"), 0.0, 1.0])}, "`labels` contains NaN"),
        ({"scores": torch.tensor([0.1, float("nan"), 0.2, 0.3]), "labels": torch.rand(4)}, "`scores` contains NaN"),
        ({"scores": torch.rand(4), "labels": torch.rand(4), "scale": 0.0}, "`scale` must be a finite number > 0"),
        ({"scores": torch.rand(4), "labels": torch.rand(4), "scale": -20.0}, "`scale` must be a finite number > 0"),
        ({"scores": torch.rand(4, 2), "labels": torch.rand(8)}, r"`scores` must have shape \(batch,\)"),
        ({"scores": torch.tensor([1, 2, 3]), "labels": torch.rand(3)}, "`scores` must be a floating-point tensor"),
        ({"scores": torch.rand(0), "labels": torch.rand(0)}, "`scores` is empty"),
        ({"scores": torch.rand(4), "labels": torch.rand(4), "groups": torch.rand(4)}, "`groups` must be an integer"),
        ({"scores": torch.rand(4), "labels": torch.rand(4), "groups": torch.zeros(3).long()}, "`groups` must hold"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cosent_loss(**kwargs)


def test_cosent_compiles_without_graph_breaks() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    scores = torch.randn(64)
    labels = torch.randint(0, 5, (64,)).float()
    explanation = torch._dynamo.explain(cosent_loss)(scores, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    grouped = torch._dynamo.explain(cosent_loss)(scores, labels, groups=torch.arange(64) % 4)
    assert grouped.graph_break_count == 0, grouped.break_reasons
