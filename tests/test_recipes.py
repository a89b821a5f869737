from __future__ import annotations

import math
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


# ------------------------------------------------------------------------------------------- train_cosent

TRAIN_COSENT = Path(__file__).resolve().parents[1] / "recipes" / "train_cosent.py"


def _launch_train_cosent(model_type: str, model_dir: str, output_dir: Path, *extra: str) -> dict:
    import json
    import os
    import subprocess

    import hf_ext

    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(hf_ext.accelerate_config_path("cpu")),
        str(TRAIN_COSENT), "--model_type", model_type, "--model_name_or_path", model_dir,
        "--max_train_samples", "48", "--max_eval_samples", "40", "--per_device_train_batch_size", "16",
        "--eval_steps", "2", "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((output_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def tiny_st_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> str:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(str(tiny_bert_dir), max_seq_length=64)
    out = tmp_path_factory.mktemp("tiny_st_recipe")
    SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean")], device="cpu").save(str(out))
    return str(out)


def test_train_cosent_bi_under_accelerate_writes_a_loadable_model_and_card(tiny_st_dir: str, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    results = _launch_train_cosent("bi", tiny_st_dir, tmp_path / "bi")
    assert results["train_pairs"] == 48 and -1 <= results["test_spearman"] <= 1
    model = SentenceTransformer(str(tmp_path / "bi"), device="cpu")
    assert model.encode(["a sentence"]).shape == (1, 32)
    card = (tmp_path / "bi" / "README.md").read_text()
    assert card.startswith("---\n")  # sentence-transformers' Hub metadata stays first
    assert "trained with CoSENT (hf_ext)" in card and f"{results['test_spearman']:.4f}" in card
    assert "CoSENTLoss" in card and "TASLP" in card


def test_train_cosent_cross_under_accelerate_writes_a_loadable_model_and_card(
    tiny_cross_encoder_dir: Path, tmp_path: Path
) -> None:
    from sentence_transformers import CrossEncoder

    results = _launch_train_cosent("cross", str(tiny_cross_encoder_dir), tmp_path / "cross")
    model = CrossEncoder(str(tmp_path / "cross"), device="cpu")
    assert model.predict([("a", "b")]).shape == (1,)
    card = (tmp_path / "cross" / "README.md").read_text()
    assert "cross-encoder (CrossEncoder) trained with CoSENT" in card and f"{results['test_spearman']:.4f}" in card
    assert "CrossEncoderCoSENTLoss" in card


@pytest.mark.slow
def test_train_cosent_on_the_real_minilm_learns(tmp_path: Path) -> None:
    sys.path.insert(0, str(TRAIN_COSENT.parent))
    import train_cosent

    args, training_args = train_cosent.parse_args(
        ["--model_type", "bi", "--max_train_samples", "96", "--max_eval_samples", "200",
         "--output_dir", str(tmp_path / "real"), "--eval_strategy", "no", "--disable_tqdm", "true"]
    )  # fmt: skip
    results = train_cosent.main(args, training_args)
    # a real pretrained model, not a random one: strong before, still strong after a few steps
    assert results["test_spearman_before"] > 0.75 and results["test_spearman"] > 0.75


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--model_type", "tri"], "`model_type` must be 'bi' or 'cross'"),
        (["--model_type", "bi", "--loss", "st_bce"], "`loss` must be one of"),
        (["--model_type", "cross", "--loss", "cached_cosent"], "`loss` must be one of"),
        (["--model_type", "bi", "--scale", "0"], "`scale` must be > 0"),
        (["--model_type", "bi", "--max_train_samples", "1"], "`max_train_samples` must be >= 2"),
    ],
)
def test_train_cosent_rejects_bad_arguments(argv: list[str], match: str) -> None:
    sys.path.insert(0, str(TRAIN_COSENT.parent))
    import train_cosent

    with pytest.raises(ValueError, match=match):
        train_cosent.parse_args(argv)


# ------------------------------------------------------------------------------------------- train_tvd

TRAIN_TVD = Path(__file__).resolve().parents[1] / "recipes" / "train_tvd.py"


def _launch_train_tvd(model_dir: str, output_dir: Path, *extra: str) -> dict:
    import json
    import os
    import subprocess

    import hf_ext

    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(hf_ext.accelerate_config_path("cpu")),
        str(TRAIN_TVD), "--model_name_or_path", model_dir, "--max_train_samples", "32", "--max_eval_samples", "16",
        "--max_steps", "3", "--per_device_train_batch_size", "8", "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((output_dir / "results.json").read_text())


def test_train_tvd_classification_with_label_noise_writes_a_loadable_model_and_card(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    results = _launch_train_tvd(
        str(tiny_bert_dir), tmp_path / "cls", "--task", "classification", "--label_noise", "0.4",
        "--tvd_gamma", "0.5", "--tvd_min_weight", "0.2",
    )  # fmt: skip
    assert results["train_examples"] == 32 and 0 <= results["test"]["accuracy"] <= 1 and results["test"]["ece"] >= 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")
    assert model.config.id2label[0] == "business"
    card = (tmp_path / "cls" / "README.md").read_text()
    assert "TVDTrainer" in card and "gamma 0.5" in card and f"{results['test']['accuracy']:.4f}" in card


def test_train_tvd_causal_lm_writes_a_loadable_model_and_card(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    results = _launch_train_tvd(str(tiny_llama_dir), tmp_path / "lm", "--task", "causal_lm", "--block_size", "32")
    assert results["test"]["perplexity"] > 1 and 0 <= results["test"]["token_ece"] <= 1
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lm").num_parameters() > 0
    assert "causal_lm model fine-tuned with TVD" in (tmp_path / "lm" / "README.md").read_text()


def test_flip_labels_is_symmetric_noise_at_the_requested_rate() -> None:
    sys.path.insert(0, str(TRAIN_TVD.parent))
    import train_tvd

    labels = [i % 5 for i in range(5000)]
    noisy = train_tvd.flip_labels(labels, 0.4, 5, seed=0)
    flipped = [a != b for a, b in zip(labels, noisy, strict=True)]
    assert abs(sum(flipped) / len(labels) - 0.4) < 0.03
    assert noisy == train_tvd.flip_labels(labels, 0.4, 5, seed=0)
    targets = [b for a, b, f in zip(labels, noisy, flipped, strict=True) if f and a == 0]
    assert set(targets) == {1, 2, 3, 4}  # a flipped label goes to every other class


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--task", "summarise"], "`task` must be one of"),
        (["--task", "classification", "--label_noise", "1.0"], r"`label_noise` must be in \[0, 1\)"),
        (["--task", "causal_lm", "--label_noise", "0.2"], "`label_noise` applies to --task classification only"),
        (["--task", "classification", "--trainer", "sft"], "`trainer` must be 'tvd' or 'plain'"),
        (["--task", "classification", "--tvd_gamma", "1.2"], r"`tvd_gamma` must be a number in \[0, 1\)"),
    ],
)
def test_train_tvd_rejects_bad_arguments(argv: list[str], match: str) -> None:
    sys.path.insert(0, str(TRAIN_TVD.parent))
    import train_tvd

    with pytest.raises(ValueError, match=match):
        train_tvd.parse_args(argv)


# ------------------------------------------------------------------------------------------- nbce_generate

NBCE_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "nbce_generate.py"


def test_nbce_recipe_streams_the_answer_from_a_folder_of_contexts(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(NBCE_RECIPE.parent))
    import nbce_generate

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("The museum in Leeds opened a new wing for Roman coins.")
    diary = " ".join(f"On day {i} Maria painted room {i} teal, her favourite colour." for i in range(30))
    (folder / "b.txt").write_text(diary)  # split into windows of 64 tokens
    args = nbce_generate.NBCERecipeArguments(
        model=str(tiny_llama_dir), contexts=str(folder), question="What is Maria's favourite colour?",
        max_new_tokens=8, window=64, overlap=8,
    )  # fmt: skip
    answer = nbce_generate.main(args)
    header, _, streamed = capsys.readouterr().out.partition("\n\n")
    assert header.startswith("2 context(s) -> ") and int(header.split("-> ")[1].split()[0]) > 2
    assert streamed.strip() == answer.strip()  # what was streamed is the answer


@pytest.mark.slow
def test_nbce_recipe_demo_runs_on_the_embedded_smollm2() -> None:
    sys.path.insert(0, str(NBCE_RECIPE.parent))
    import nbce_generate

    answer = nbce_generate.main(nbce_generate.NBCERecipeArguments(num_demo_contexts=3, max_new_tokens=12))
    assert isinstance(answer, str) and answer.strip()


def test_nbce_recipe_rejects_bad_arguments(tmp_path: Path) -> None:
    sys.path.insert(0, str(NBCE_RECIPE.parent))
    import nbce_generate

    with pytest.raises(ValueError, match="`question` is required with `contexts`"):
        nbce_generate.NBCERecipeArguments(contexts="docs/")
    with pytest.raises(ValueError, match=r"`contexts` must be a folder of \.txt files or a \.jsonl file"):
        nbce_generate.read_contexts(str(tmp_path / "missing.csv"))


# ------------------------------------------------------------------------------------------- train_projected

TRAIN_PROJECTED = Path(__file__).resolve().parents[1] / "recipes" / "train_projected.py"


def _launch_train_projected(model_dir: str, output_dir: Path, *extra: str) -> dict:
    import json
    import os
    import subprocess

    import hf_ext

    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(hf_ext.accelerate_config_path("cpu")),
        str(TRAIN_PROJECTED), "--model_name_or_path", model_dir, "--max_train_samples", "32",
        "--max_eval_samples", "16", "--max_steps", "4", "--per_device_train_batch_size", "8",
        "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((output_dir / "results.json").read_text())


def test_train_projected_causal_lm_under_accelerate_writes_a_loadable_model_and_card(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    results = _launch_train_projected(str(tiny_llama_dir), tmp_path / "lm", "--task", "causal_lm", "--rank", "4",
                                      "--block_size", "32", "--update_interval", "2")  # fmt: skip
    assert results["projected_weights"] == 14 and results["test"]["perplexity"] > 1
    assert results["optimizer_state_bytes"] < results["adamw_state_bytes_estimate"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lm").num_parameters() > 0
    card = (tmp_path / "lm" / "README.md").read_text()
    assert "ProjectedAdamW" in card and "rank-4" in card and f"{results['test']['eval_loss']:.4f}" in card


def test_train_projected_classification_writes_a_loadable_model(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    results = _launch_train_projected(str(tiny_bert_dir), tmp_path / "cls", "--task", "classification", "--rank", "4",
                                      "--projection", "svd")  # fmt: skip
    assert 0 <= results["test"]["accuracy"] <= 1 and results["projected_weights"] > 0
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").config.id2label[4] == "tech"


@pytest.mark.slow
def test_train_projected_trains_the_real_smollm2_with_a_third_of_adamws_state(tmp_path: Path) -> None:
    sys.path.insert(0, str(TRAIN_PROJECTED.parent))
    import train_projected

    argv = ["--task", "causal_lm", "--rank", "64", "--max_steps", "3", "--per_device_train_batch_size", "4",
            "--block_size", "64", "--max_eval_samples", "16", "--learning_rate", "1e-4", "--update_interval", "3",
            "--output_dir", str(tmp_path / "real"), "--use_cpu", "true", "--eval_on_start", "false"]  # fmt: skip
    results = train_projected.main(*train_projected.parse_args(argv))
    ratio = results["optimizer_state_bytes"] / results["adamw_state_bytes_estimate"]
    assert results["projected_weights"] == 30 * 7 and ratio < 0.35
    assert math.isfinite(results["test"]["eval_loss"]) and results["test"]["perplexity"] < 100


@pytest.mark.parametrize(
    ("argv", "match"),
    [(["--task", "seq2seq"], "`task`"), (["--optimizer", "sgd"], "`optimizer`"), (["--rank", "0"], "`rank`")],
)
def test_train_projected_rejects_bad_arguments(argv: list[str], match: str) -> None:
    sys.path.insert(0, str(TRAIN_PROJECTED.parent))
    import train_projected

    with pytest.raises(ValueError, match=match):
        train_projected.parse_args(argv)


def test_train_tvd_with_compile_on_pads_to_buckets_without_warnings(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import warnings

    import train_tvd

    argv = ["--task", "classification", "--model_name_or_path", str(tiny_bert_dir), "--max_train_samples", "32",
            "--max_eval_samples", "16", "--max_steps", "4", "--per_device_train_batch_size", "8", "--use_cpu", "true",
            "--torch_compile", "true", "--torch_compile_backend", "eager", "--output_dir", str(tmp_path)]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = train_tvd.main(*train_tvd.parse_args(argv))
    assert not [w for w in caught if "length buckets" in str(w.message) or "graphs, more than" in str(w.message)]
    assert 1 <= results["compiled_graphs"] <= 3 and 0 <= results["test"]["accuracy"] <= 1


# ------------------------------------------------------------------------------------------- build_cur_index


def test_build_cur_index_builds_saves_and_queries_with_a_progress_bar(tiny_bert_dir: Path, tmp_path: Path, capsys):
    import build_cur_index

    from hf_ext.retrieval import CURIndex

    args = build_cur_index.CURRecipeArguments(
        cross_encoder=str(tiny_bert_dir), max_items=40, n_anchor_queries=8, n_anchor_items=6, rerank_k=10,
        output_dir=str(tmp_path / "index"), queries=["A man is playing a guitar."],
    )  # fmt: skip
    result = build_cur_index.main(args)
    assert result["n_items"] == 40 and result["queries"][0]["calls"] <= 16
    assert len(result["queries"][0]["hits"]) == 5
    assert "CUR: anchor queries x items" in capsys.readouterr().err  # the tqdm bar
    loaded = CURIndex.from_pretrained(str(tmp_path / "index"))
    assert len(loaded.items) == 40 and len(list((tmp_path / "index" / "anchor_rows").glob("*.npy"))) == 8
