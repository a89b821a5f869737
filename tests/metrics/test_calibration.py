from __future__ import annotations

import numpy as np
import pytest

from hf_ext.metrics import calibration_bins, expected_calibration_error, load_ece


def bruteforce_ece(probs: np.ndarray, refs: np.ndarray, n_bins: int) -> float:
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs((pred[in_bin] == refs[in_bin]).mean() - conf[in_bin].mean())
    return total


def test_ece_matches_the_bin_by_bin_definition() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 5)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    refs = rng.integers(0, 5, size=500)
    for n_bins in (1, 10, 15):
        assert expected_calibration_error(probs, refs, n_bins) == pytest.approx(bruteforce_ece(probs, refs, n_bins))


def test_perfect_and_overconfident_predictions() -> None:
    assert expected_calibration_error([[1.0, 0.0], [0.0, 1.0]], [0, 1]) == 0.0
    assert expected_calibration_error([[0.9, 0.1], [0.8, 0.2]], [0, 1]) == pytest.approx(0.45)  # 0.5 * 0.1 + 0.5 * 0.8
    bins = calibration_bins([[0.9, 0.1], [0.8, 0.2]], [0, 1], n_bins=10)
    assert sum(bins["count"]) == 2 and bins["accuracy"][8] == 1.0 and bins["accuracy"][7] == 0.0


def test_the_evaluate_module_loads_offline_and_agrees() -> None:
    ece = load_ece()
    result = ece.compute(predictions=[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], references=[0, 1, 1])
    assert result["expected_calibration_error"] == pytest.approx(
        expected_calibration_error([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], [0, 1, 1])
    )
    assert len(result["bins"]["count"]) == 15


@pytest.mark.parametrize(
    ("probs", "refs", "kwargs", "match"),
    [
        ([[0.5, 0.4]], [0], {}, "sum to 1"),
        ([[1.5, -0.5]], [0], {}, "non-negative"),
        ([[0.5, 0.5]], [2], {}, r"class ids in \[0, 2\)"),
        ([[0.5, 0.5]], [0, 1], {}, "`references` must be 1 integer class ids"),
        ([0.5, 0.5], [0], {}, r"`probabilities` must have shape \(n, num_classes\)"),
        ([[0.5, 0.5]], [0], {"n_bins": 0}, "`n_bins` must be an int >= 1"),
    ],
)
def test_bad_input_is_refused(probs, refs, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probs, refs, **kwargs)


def test_confidence_form_equals_the_probability_form() -> None:
    from hf_ext.metrics import confidence_calibration

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    refs = rng.integers(0, 4, size=300)
    ece, bins = confidence_calibration(probs.max(axis=1), probs.argmax(axis=1) == refs)
    assert ece == pytest.approx(expected_calibration_error(probs, refs))
    assert bins == calibration_bins(probs, refs)
    with pytest.raises(ValueError, match="`confidences` must be finite probabilities"):
        confidence_calibration([1.5], [1])
    with pytest.raises(ValueError, match="`correct` must hold 0/1"):
        confidence_calibration([0.5], [2])
