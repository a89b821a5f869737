from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import evaluate_sts


@pytest.mark.slow
def test_evaluate_sts_reproduces_minilm_spearman_on_the_real_test_split(tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    metrics = evaluate_sts.main(evaluate_sts.EvaluateSTSArguments(output_json=str(out)))
    assert metrics["pairs"] == 1379
    assert 0.81 <= metrics["spearman"] <= 0.83
    assert out.is_file()


def test_evaluate_sts_runs_any_model_folder(tiny_bert_dir: Path) -> None:
    metrics = evaluate_sts.main(
        evaluate_sts.EvaluateSTSArguments(model_name_or_path=str(tiny_bert_dir), split="validation")
    )
    assert metrics["pairs"] == 1500 and -1.0 <= metrics["spearman"] <= 1.0


def test_evaluate_sts_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="`split` must be one of"):
        evaluate_sts.EvaluateSTSArguments(split="dev")
