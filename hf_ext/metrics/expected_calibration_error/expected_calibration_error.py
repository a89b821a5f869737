"""`evaluate` module for the expected calibration error; load it offline with `hf_ext.metrics.load_ece()`."""

from __future__ import annotations

import datasets
import evaluate

from hf_ext.metrics.calibration import calibration_bins, expected_calibration_error

_DESCRIPTION = """Expected calibration error: predictions binned by confidence into equal-width bins; the
count-weighted mean of |accuracy - confidence| over bins (Guo et al., ICML 2017)."""
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): class probabilities per example (rows sum to 1).
    references (`list` of `int`): the true class ids.
    n_bins (`int`, *optional*, defaults to 15): number of equal-width confidence bins.
Returns:
    expected_calibration_error (`float`), and `bins` (count, confidence, accuracy per bin) for reliability diagrams.
Example:
    >>> ece = hf_ext.metrics.load_ece()
    >>> ece.compute(predictions=[[0.9, 0.1], [0.8, 0.2]], references=[0, 1])["expected_calibration_error"]
    0.45
"""
_CITATION = """@inproceedings{guo2017calibration, title={On Calibration of Modern Neural Networks},
author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.}, booktitle={ICML}, year={2017}}"""


class ExpectedCalibrationError(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, n_bins: int = 15) -> dict:
        return {
            "expected_calibration_error": expected_calibration_error(predictions, references, n_bins),
            "bins": calibration_bins(predictions, references, n_bins),
        }
