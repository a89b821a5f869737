"""CrossEncoderCoSENTLoss: pair rows ranked over the batch, per-query lists ranked within their query."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers.util import batch_to_device

from hf_ext.losses import CrossEncoderCoSENTLoss, cosent_loss

S1 = ["A man plays a guitar.", "A dog runs.", "Stocks fell.", "A girl sings.", "It is raining."]
S2 = ["A man is playing guitar.", "A cat sleeps.", "Shares dropped.", "A woman sings a song.", "The sun shines."]
SCORES = torch.tensor([4.8, 0.5, 4.2, 3.6, 1.0])


def _logits(model, pairs: list[tuple[str, str]]) -> torch.Tensor:
    features = batch_to_device(model.preprocess(pairs), model.device)
    return model(features)["scores"].view(-1)


def _bruteforce(
    logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None, scale: float = 20.0
) -> torch.Tensor:
    """log(1 + sum over ordered pairs of exp(scale * (s_j - s_i))), pair by pair; 20.0 is the class default."""
    terms = [logits.new_zeros(())]
    for i in range(len(logits)):
        for j in range(len(logits)):
            if labels[i] > labels[j] and (groups is None or groups[i] == groups[j]):
                terms.append(scale * (logits[j] - logits[i]))
    return torch.logsumexp(torch.stack(terms), dim=0)


def test_pair_rows_are_ranked_over_the_whole_batch(tiny_cross_encoder) -> None:
    model = tiny_cross_encoder.eval()
    loss = CrossEncoderCoSENTLoss(model)([S1, S2], SCORES)
    reference = _bruteforce(_logits(model, list(zip(S1, S2, strict=True))), SCORES)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    loss.backward()
    head = model.model.classifier.weight
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_per_query_lists_are_ranked_within_each_query(tiny_cross_encoder) -> None:
    model = tiny_cross_encoder.eval()
    queries = ["A man plays a guitar.", "Stocks fell."]
    docs = [["A man is playing guitar.", "A dog runs.", "Music is played."], ["Shares dropped.", "A girl sings."]]
    labels = [torch.tensor([3.0, 0.0, 2.0]), torch.tensor([1.0, 0.0])]
    loss = CrossEncoderCoSENTLoss(model)([queries, docs], labels)
    pairs = [(q, d) for q, ds in zip(queries, docs, strict=True) for d in ds]
    logits = _logits(model, pairs)
    flat, groups = torch.cat(labels), torch.tensor([0, 0, 0, 1, 1])
    torch.testing.assert_close(loss, _bruteforce(logits, flat, groups), rtol=1e-5, atol=1e-5)
    # and it differs from ranking the same pairs over the whole batch (the grouping matters)
    assert abs(loss.item() - _bruteforce(logits, flat).item()) > 1e-4
    torch.testing.assert_close(loss, cosent_loss(logits, flat, scale=20.0, groups=groups), rtol=1e-5, atol=1e-5)


def test_scale_and_activation_are_applied(tiny_cross_encoder) -> None:
    model = tiny_cross_encoder.eval()
    loss = CrossEncoderCoSENTLoss(model, scale=5.0, activation_fn=torch.nn.Sigmoid())([S1, S2], SCORES)
    logits = torch.sigmoid(_logits(model, list(zip(S1, S2, strict=True))))
    torch.testing.assert_close(loss, _bruteforce(logits, SCORES, scale=5.0), rtol=1e-5, atol=1e-5)
    config = CrossEncoderCoSENTLoss(model, scale=5.0, activation_fn=torch.nn.Sigmoid()).get_config_dict()
    assert config["scale"] == 5.0 and config["activation_fn"].endswith("Sigmoid")
    assert "10.1109/TASLP.2024.3402087" in CrossEncoderCoSENTLoss(model).citation


def test_all_tied_scores_give_zero_loss_and_zero_gradients(tiny_cross_encoder) -> None:
    model = tiny_cross_encoder
    loss = CrossEncoderCoSENTLoss(model)([S1, S2], torch.full((5,), 2.0))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def test_bad_rows_and_labels_are_refused(tiny_cross_encoder) -> None:
    loss = CrossEncoderCoSENTLoss(tiny_cross_encoder)
    with pytest.raises(ValueError, match="`inputs` must hold two columns"):
        loss([S1, S2, S2], SCORES)
    with pytest.raises(ValueError, match="`inputs` must hold two columns"):
        loss([S1], SCORES)
    with pytest.raises(ValueError, match="`labels` must hold one score per pair"):
        loss([S1, S2], SCORES[:3])
    with pytest.raises(ValueError, match=r"`labels\[1\]` must hold one score per document"):
        loss([["q1", "q2"], [["a", "b"], ["c"]]], [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])])
    with pytest.raises(ValueError, match="per-query lists need a list of label tensors"):
        loss([["q1"], [["a", "b"]]], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="`labels` contains NaN"):
        loss([S1, S2], torch.tensor([1.0, float("nan"), 0.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="`scale` must be a finite number > 0"):
        CrossEncoderCoSENTLoss(tiny_cross_encoder, scale=-1.0)
