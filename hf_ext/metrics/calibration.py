"""Expected calibration error (ECE): how far a classifier's confidence is from its accuracy.

Predictions are binned by confidence (the top probability) into ``n_bins`` equal-width bins on [0, 1]; ECE is
the average over bins of ``|accuracy - mean confidence|``, weighted by the share of predictions in each bin
(Guo et al., On Calibration of Modern Neural Networks, ICML 2017; 15 bins is their choice). The same numbers back
the reliability diagrams of the benchmarks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["calibration_bins", "confidence_calibration", "expected_calibration_error"]


def _validate(probabilities, references, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"`n_bins` must be an int >= 1, got {n_bins!r}.")
    probs = np.asarray(probabilities, dtype=np.float64)
    refs = np.asarray(references)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"`probabilities` must have shape (n, num_classes) with n >= 1, got {probs.shape}.")
    if refs.shape != (probs.shape[0],) or not np.issubdtype(refs.dtype, np.integer):
        raise ValueError(f"`references` must be {probs.shape[0]} integer class ids, got shape {refs.shape}.")
    if not np.isfinite(probs).all() or (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("`probabilities` must be finite, non-negative, and sum to 1 per row (apply softmax first).")
    if (refs < 0).any() or (refs >= probs.shape[1]).any():
        raise ValueError(f"`references` must be class ids in [0, {probs.shape[1]}).")
    return probs, refs


def _bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> dict[str, list[float]]:
    # bin i holds confidences in (i / n, (i + 1) / n]; a confidence of exactly 0 goes to the first bin
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    nonzero = np.maximum(count, 1.0)  # empty bins report 0, not 0 / 0
    return {
        "count": count.tolist(),
        "confidence": (conf_sum / nonzero).tolist(),
        "accuracy": (acc_sum / nonzero).tolist(),
    }


def _ece(bins: dict[str, list[float]]) -> float:
    count = np.asarray(bins["count"])
    gap = np.abs(np.asarray(bins["accuracy"]) - np.asarray(bins["confidence"]))
    return float(np.round((count * gap).sum() / count.sum(), 12))


def calibration_bins(probabilities, references, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin count, mean confidence and accuracy of ``probabilities`` ``(n, num_classes)`` vs ``references``."""
    probs, refs = _validate(probabilities, references, n_bins)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == refs).astype(np.float64)
    return _bins(confidence, correct, n_bins)


def expected_calibration_error(probabilities, references, n_bins: int = 15) -> float:
    """ECE of ``probabilities`` ``(n, num_classes)`` (rows sum to 1) against integer ``references`` ``(n,)``.

    Example:

    ```python
    >>> expected_calibration_error([[0.9, 0.1], [0.8, 0.2]], [0, 1])  # 90% sure and right, 80% sure and wrong
    0.45

    ```
    """
    return _ece(calibration_bins(probabilities, references, n_bins))


def confidence_calibration(confidences, correct, n_bins: int = 15) -> tuple[float, dict[str, list[float]]]:
    """ECE and bins from top-1 ``confidences`` in [0, 1] and 0/1 ``correct`` flags: for language models, where
    full ``(tokens, vocab)`` probability matrices are too large to keep.

    Example:

    ```python
    >>> confidence_calibration([0.9, 0.8], [1, 0])[0]
    0.45

    ```
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"`n_bins` must be an int >= 1, got {n_bins!r}.")
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    hits = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.size == 0 or conf.shape != hits.shape:
        raise ValueError(
            f"`confidences` and `correct` must be non-empty and of one length, got {conf.size}, {hits.size}."
        )
    if not np.isfinite(conf).all() or (conf < 0).any() or (conf > 1).any():
        raise ValueError("`confidences` must be finite probabilities in [0, 1].")
    if not np.isin(hits, (0.0, 1.0)).all():
        raise ValueError("`correct` must hold 0/1 (or bool) flags.")
    bins = _bins(conf, hits, n_bins)
    return _ece(bins), bins
