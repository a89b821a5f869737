from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import evaluate_sts

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _sts_spearman(model, data) -> float:
    """Spearman of a model's similarities against the gold labels of STS pairs, computed here (not by a recipe):
    cosine of the embeddings for a SentenceTransformer, the score for a CrossEncoder."""
    import numpy as np
    from scipy.stats import spearmanr

    first, second = list(data["sentence1"]), list(data["sentence2"])
    if hasattr(model, "predict"):
        similarity = np.asarray(model.predict(list(zip(first, second, strict=True)), batch_size=64))
    else:
        embeddings = model.encode(first + second, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        similarity = (embeddings[: len(first)] * embeddings[len(first) :]).sum(axis=1)
    return float(spearmanr(similarity, data["label"] if "label" in data.column_names else data["score"]).statistic)


def _card_metadata(readme: Path) -> dict:
    """The YAML block at the top of a model card."""
    import yaml

    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])


def _model_index(metadata: dict) -> list[tuple[str, str, float]]:
    """(dataset type, metric type, value) of every result in a card's model-index."""
    return [
        (result["dataset"]["type"], metric["type"], metric["value"])
        for entry in metadata["model-index"]
        for result in entry["results"]
        for metric in result["metrics"]
    ]


COSENT_TITLE = "CoSENT: Consistent Sentence Embedding via Similarity Ranking"
TAILR_TITLE = "Tailoring Language Generation Models under Total Variation Distance"


def _shown(text: str, value: float) -> int:
    """How many times ``value`` is shown in ``text`` to 4 decimals: ``0.7770`` or, as sentence-transformers rounds
    it, ``0.777`` (a number inside a longer one, or the unsigned part of a signed one, does not count)."""
    digits = f"{value:.4f}".rstrip("0").rstrip(".")
    return len(re.findall(rf"(?<![\d.+-]){re.escape(digits)}0*(?![\d])", text))


def _check_card(readme: Path, base_model: str, citation: tuple[str, str] | None = None) -> dict[str, float]:
    """The three things every card must get right, checked on the written file; returns the model-index metrics.

    - the base model's Hub id is the metadata's ``base_model`` and the text's every "Base model" entry (none Unknown);
    - each metric of the model-index is listed there once, and shown once in the text: sentence-transformers' Metrics
      table or the recipe's own table, not again in the recipe's summary (the per-step Training Logs are a log);
    - ``citation`` (heading, title): the Citation section has a BibTeX entry under that heading with that title.
    """
    text = readme.read_text()
    metadata = _card_metadata(readme)
    assert metadata.get("base_model") == base_model
    body = text[text.index("\n---\n", 4) + 5 :]
    entries = [line for line in body.splitlines() if "Base model" in line]
    assert entries and all(base_model in line and "Unknown" not in line for line in entries), entries
    metrics = _model_index(metadata)
    pairs = [(dataset, metric) for dataset, metric, _ in metrics]
    assert metrics and len(pairs) == len(set(pairs)), pairs
    logs = re.search(r"\n### Training Logs\n.*?(?=\n### )", body, flags=re.DOTALL)
    listed = body.replace(logs.group(0), "") if logs else body
    for dataset, metric, value in metrics:
        assert _shown(listed, value) == 1, (dataset, metric, value)
    if citation is not None:
        heading, title = citation
        assert "\n## Citation\n" in body, "the card has no Citation section"
        section = body[body.index("\n## Citation\n") :]
        entry = re.search(rf"\n#### {re.escape(heading)}\n```bibtex\n(.*?)```", section, flags=re.DOTALL)
        assert entry and title in entry.group(1), section[:2000]
    return {f"{dataset}/{metric}": value for dataset, metric, value in metrics}


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face Hub cache (``HF_HUB_CACHE``) to publish tiny models in under Hub ids with `_publish`: with
    ``HF_HUB_OFFLINE=1`` a recipe loads such an id as it would a downloaded Hub model, and its card records the id."""
    return tmp_path_factory.mktemp("hub_cache")


def _publish(cache: Path, folder: str | Path, repo_id: str) -> str:
    """Put ``folder`` in ``cache`` as the ``main`` revision of the Hub model ``repo_id``; returns ``repo_id``."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    if not repo.exists():
        commit = "0" * 40
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    return repo_id


def _launch(recipe: Path, argv: list[str], output_dir: Path, hub_cache: Path | None) -> dict:
    """Run ``recipe`` under ``accelerate launch`` (CPU config) with ``argv``; returns its results.json."""
    import json
    import os
    import subprocess

    import hf_ext

    config = str(hf_ext.accelerate_config_path("cpu"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, str(recipe), *argv,
               "--output_dir", str(output_dir)]  # fmt: skip
    env = dict(os.environ, **({"HF_HUB_CACHE": str(hub_cache)} if hub_cache is not None else {}))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((output_dir / "results.json").read_text())


@torch.no_grad()
def _classification_metrics(model_dir: Path, max_eval_samples: int) -> dict[str, float]:
    """Accuracy, NLL and 15-bin ECE of a saved classifier on the recipes' BBC test examples, computed here."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_ext.data import bbc_classification_data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    _, test = bbc_classification_data(tokenizer, 128, max_train_samples=1, max_eval_samples=max_eval_samples)
    probs = torch.cat([torch.softmax(model(input_ids=torch.tensor([row["input_ids"]]),
                                           attention_mask=torch.tensor([row["attention_mask"]])).logits.double(), -1)
                       for row in test])  # fmt: skip
    labels = torch.tensor(test["label"])
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    ece = 0.0
    for b in range(15):  # bin b: confidences in (b / 15, (b + 1) / 15]
        members = (confidence > b / 15) & (confidence <= (b + 1) / 15)
        if members.any():
            ece += float(members.double().mean() * (correct[members].mean() - confidence[members].mean()).abs())
    return {
        "accuracy": float(correct.mean()),
        "nll": float(-probs[torch.arange(len(labels)), labels].log().mean()),
        "ece": ece,
    }


@torch.no_grad()
def _lm_metrics(model_dir, block_size: int, max_eval_samples: int) -> dict[str, float]:
    """Mean token NLL, perplexity and 15-bin top-1 token ECE of a causal LM on the recipes' held-out BBC blocks,
    one block at a time (no padding), computed here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ext.data import bbc_lm_data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    _, test = bbc_lm_data(tokenizer, block_size, max_eval_blocks=max_eval_samples)
    nll, confidences, correct = [], [], []
    for row in test["input_ids"]:
        ids = torch.tensor([row])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        nll.append(-logp.gather(1, ids[0, 1:, None])[:, 0])
        top, token = logp.max(dim=-1)
        confidences.append(top.exp())
        correct.append((token == ids[0, 1:]).double())
    nll, confidence, correct = torch.cat(nll), torch.cat(confidences), torch.cat(correct)
    ece = 0.0
    for b in range(15):
        members = (confidence > b / 15) & (confidence <= (b + 1) / 15)
        if members.any():
            ece += float(members.double().mean() * (correct[members].mean() - confidence[members].mean()).abs())
    return {"eval_loss": float(nll.mean()), "perplexity": math.exp(float(nll.mean())), "token_ece": ece}


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
    from sentence_transformers import SentenceTransformer

    from hf_ext import load_stsb

    expected = _sts_spearman(SentenceTransformer(str(tiny_bert_dir), device="cpu"), load_stsb("validation"))
    assert metrics["pairs"] == 1500 and metrics["spearman"] == pytest.approx(expected, abs=1e-6)


def test_evaluate_sts_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="`split` must be one of"):
        evaluate_sts.EvaluateSTSArguments(split="dev")


# ------------------------------------------------------------------------------------------- train_cosent

TRAIN_COSENT = Path(__file__).resolve().parents[1] / "recipes" / "train_cosent.py"


def _launch_train_cosent(model_type: str, model: str, output_dir: Path, hub_cache: Path | None = None) -> dict:
    argv = ["--model_type", model_type, "--model_name_or_path", model, "--max_train_samples", "48",
            "--max_eval_samples", "40", "--per_device_train_batch_size", "16", "--eval_steps", "1",
            "--learning_rate", "1e-3", "--warmup_steps", "0"]  # fmt: skip
    return _launch(TRAIN_COSENT, argv, output_dir, hub_cache)


@pytest.fixture(scope="module")
def tiny_st_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> str:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(str(tiny_bert_dir), max_seq_length=64)
    out = tmp_path_factory.mktemp("tiny_st_recipe")
    SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean")], device="cpu").save(str(out))
    return str(out)


def _check_train_cosent_run(results: dict, before_model, output_dir: Path, after_model) -> None:
    """What a run of 3 steps (48 pairs, batch 16), evaluated on 40 dev pairs after every step, must report: each
    number recomputed here from the models, and the kept weights the best-on-dev checkpoint's."""
    from hf_ext import load_stsb

    dev, test = load_stsb("validation").select(range(40)), load_stsb("test").select(range(40))
    assert results["train_pairs"] == 48
    assert [point["step"] for point in results["dev_curve"]] == [1, 2, 3]
    dev_values = [point["dev_spearman"] for point in results["dev_curve"]]
    best = max(range(3), key=lambda i: (dev_values[i], -i))  # the first best (the Trainer keeps a strict improvement)
    assert results["checkpoint"] == f"best on dev (checkpoint-{best + 1})"
    assert not list(output_dir.glob("checkpoint-*"))  # the chosen weights are the saved model; checkpoints removed
    assert results["test_spearman_before"] == pytest.approx(_sts_spearman(before_model, test), abs=1e-5)
    assert results["dev_spearman"] == pytest.approx(dev_values[best], abs=1e-6)
    assert _sts_spearman(after_model, dev) == pytest.approx(dev_values[best], abs=1e-5)  # the kept model is the best
    assert results["test_spearman"] == pytest.approx(_sts_spearman(after_model, test), abs=1e-5)
    assert results["test_spearman"] != results["test_spearman_before"]  # the weights moved
    card = (output_dir / "README.md").read_text()
    gain = results["test_spearman"] - results["test_spearman_before"]
    assert f"{results['test_spearman_before']:.4f} before training, {gain:+.4f} from training" in card
    assert f"checkpoint kept: {results['checkpoint']}" in card


def test_train_cosent_bi_under_accelerate_keeps_the_best_dev_checkpoint_and_reports_it(
    tiny_st_dir: str, offline_hub: Path, tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    model_id = _publish(offline_hub, tiny_st_dir, "hf-ext-test/tiny-st")
    results = _launch_train_cosent("bi", model_id, tmp_path / "bi", offline_hub)
    model = SentenceTransformer(str(tmp_path / "bi"), device="cpu")
    assert model.encode(["a sentence"]).shape == (1, 32)
    _check_train_cosent_run(results, SentenceTransformer(tiny_st_dir, device="cpu"), tmp_path / "bi", model)
    card = (tmp_path / "bi" / "README.md").read_text()
    assert card.startswith("---\n")  # sentence-transformers' Hub metadata stays first
    assert "trained with CoSENT (hf_ext)" in card and "CoSENTLoss" in card and "TASLP" in card
    # the Hub id given is the base model; each metric is listed once; the loss's BibTeX is in the Citation section
    metrics = _check_card(tmp_path / "bi" / "README.md", model_id, ("CoSENTLoss", COSENT_TITLE))
    assert metrics["sts-test/spearman_cosine"] == pytest.approx(results["test_spearman"], abs=1e-9)
    assert metrics["sts-dev/spearman_cosine"] == pytest.approx(results["dev_spearman"], abs=1e-9)


def test_train_cosent_cross_under_accelerate_keeps_the_best_dev_checkpoint_and_reports_it(
    tiny_cross_encoder_dir: Path, offline_hub: Path, tmp_path: Path
) -> None:
    from sentence_transformers import CrossEncoder

    model_id = _publish(offline_hub, tiny_cross_encoder_dir, "hf-ext-test/tiny-cross-encoder")
    results = _launch_train_cosent("cross", model_id, tmp_path / "cross", offline_hub)
    model = CrossEncoder(str(tmp_path / "cross"), device="cpu")
    assert model.predict([("a", "b")]).shape == (1,)
    before = CrossEncoder(str(tiny_cross_encoder_dir), num_labels=1, device="cpu")
    dev_values = [point["dev_spearman"] for point in results["dev_curve"]]
    assert dev_values[-1] < max(dev_values)  # this run peaks before its last step: the kept model is not the last
    _check_train_cosent_run(results, before, tmp_path / "cross", model)
    card = (tmp_path / "cross" / "README.md").read_text()
    assert "cross-encoder (CrossEncoder) trained with CoSENT" in card and "CrossEncoderCoSENTLoss" in card
    metrics = _check_card(tmp_path / "cross" / "README.md", model_id, ("CrossEncoderCoSENTLoss", COSENT_TITLE))
    assert metrics["sts-test/spearman"] == pytest.approx(results["test_spearman"], abs=1e-9)
    assert metrics["sts-dev/spearman"] == pytest.approx(results["dev_spearman"], abs=1e-9)


@pytest.mark.slow
def test_train_cosent_on_the_real_minilm_learns_and_cards_the_embedded_base_model(minilm, tmp_path: Path) -> None:
    sys.path.insert(0, str(TRAIN_COSENT.parent))
    import train_cosent
    from sentence_transformers import SentenceTransformer

    from hf_ext import load_stsb

    args, training_args = train_cosent.parse_args(
        ["--model_type", "bi", "--max_train_samples", "128", "--max_eval_samples", "100", "--num_train_epochs", "2",
         "--per_device_train_batch_size", "16", "--learning_rate", "5e-5", "--eval_steps", "8",
         "--output_dir", str(tmp_path / "real"), "--disable_tqdm", "true"]
    )  # fmt: skip
    results = train_cosent.main(args, training_args)
    trained = SentenceTransformer(str(tmp_path / "real"), device="cpu")
    # Learning, measured here against the untrained model: the Spearman on the 128 pairs it trained on rises (a
    # pretrained MiniLM is already at ~0.91 there; 16 steps of CoSENT reach ~0.94; lr 0 or a detached loss: +0).
    train = load_stsb("train").select(range(128))
    before, after = _sts_spearman(minilm, train), _sts_spearman(trained, train)
    assert after > before + 0.015
    # ... without losing the held-out test Spearman of the pretrained start (CoSENT on STS-B keeps MiniLM's ~0.82 on
    # the full test split, benchmarks/results/cosent_sts.json; these are its first 100 pairs)
    assert results["test_spearman_before"] == pytest.approx(_sts_spearman(minilm, load_stsb("test").select(range(100))),
                                                            abs=1e-5)  # fmt: skip
    assert results["test_spearman"] > results["test_spearman_before"] - 0.02
    assert results["checkpoint"].startswith("best on dev (checkpoint-")  # evaluated at steps 8 and 16
    # The card of the embedded default names its base model, and its model-index lists each metric once, with the
    # numbers of results.json (the best-on-dev model's).
    values = _check_card(tmp_path / "real" / "README.md", MINILM_HUB_ID, ("CoSENTLoss", COSENT_TITLE))
    assert values["sts-test/spearman_cosine"] == pytest.approx(results["test_spearman"], abs=1e-9)
    assert values["sts-dev/spearman_cosine"] == pytest.approx(results["dev_spearman"], abs=1e-9)


@pytest.mark.parametrize(
    ("model_type", "loss", "heading"),
    [("bi", "cached_cosent", "CachedCoSENTLoss"), ("cross", "cosent", "CrossEncoderCoSENTLoss")],
)
def test_train_cosent_card_of_the_embedded_default_records_its_hub_id_and_the_loss_citation(
    model_type: str, loss: str, heading: str, tiny_st_dir: str, tiny_cross_encoder_dir: Path, monkeypatch, tmp_path
) -> None:
    """The recipe's card steps without training (a tiny model stands in for the embedded MiniLM folder): the model
    built from the embedded default, a trainer (whose card callback records the loss), one dev evaluation, the save
    and the recipe's summary on top."""
    import train_cosent
    from sentence_transformers import CrossEncoderTrainer, SentenceTransformerTrainer

    folder = Path(tiny_st_dir if model_type == "bi" else tiny_cross_encoder_dir)
    monkeypatch.setattr(train_cosent, "minilm_path", lambda: folder)
    argv = ["--model_type", model_type, "--loss", loss, "--max_train_samples", "8", "--max_eval_samples", "8",
            "--use_cpu", "true", "--output_dir", str(tmp_path)]  # fmt: skip
    args, training_args = train_cosent.parse_args(argv)
    splits = train_cosent.load_splits(args)
    model = train_cosent.build_model(args)
    loss_module = train_cosent.build_loss(args, model)
    dev = train_cosent.build_evaluator(args, splits["validation"], "sts-dev")
    trainer_cls = SentenceTransformerTrainer if model_type == "bi" else CrossEncoderTrainer
    trainer_cls(model=model, args=training_args, train_dataset=splits["train"], loss=loss_module, evaluator=dev)
    dev(model)
    model.save_pretrained(str(tmp_path))
    results = {"test_spearman_before": None, "test_spearman": None, "train_pairs": 8, "checkpoint": "last",
               "train_seconds": 0.0, "command": "recipes/train_cosent.py"}  # fmt: skip
    train_cosent.render_card(args, training_args, loss_module, results, tmp_path)
    metrics = _check_card(tmp_path / "README.md", MINILM_HUB_ID, (heading, COSENT_TITLE))
    assert {name.split("/")[0] for name in metrics} == {"sts-dev"}
    assert "- Base model: [sentence-transformers/all-MiniLM-L6-v2](" in (tmp_path / "README.md").read_text()


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


def _launch_train_tvd(model: str, output_dir: Path, *extra: str, hub_cache: Path | None = None) -> dict:
    argv = ["--model_name_or_path", model, "--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps", "3",
            "--per_device_train_batch_size", "8", *extra]  # fmt: skip
    return _launch(TRAIN_TVD, argv, output_dir, hub_cache)


def test_train_tvd_classification_with_label_noise_writes_a_loadable_model_and_card(
    tiny_bert_dir: Path, offline_hub: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    model_id = _publish(offline_hub, tiny_bert_dir, "hf-ext-test/tiny-bert")
    results = _launch_train_tvd(
        model_id, tmp_path / "cls", "--task", "classification", "--label_noise", "0.4",
        "--tvd_gamma", "0.5", "--tvd_min_weight", "0.2", "--validation_share", "0.25", hub_cache=offline_hub,
    )  # fmt: skip
    assert results["train_examples"] == 24 and results["validation_examples"] == 8
    assert set(results["validation"]) == {"accuracy", "nll", "ece", "reliability"}
    expected = _classification_metrics(tmp_path / "cls", 16)  # recomputed here from the saved model
    for name in ("accuracy", "nll", "ece"):
        assert results["test"][name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")
    assert model.config.id2label[0] == "business"
    card = (tmp_path / "cls" / "README.md").read_text()
    assert "TVDTrainer" in card and "gamma 0.5" in card and f"{results['test']['accuracy']:.4f}" in card
    metrics = _check_card(tmp_path / "cls" / "README.md", model_id, ("TVD (TaiLr)", TAILR_TITLE))
    assert metrics == {f"bbc_news/{name}": results["test"][name] for name in ("accuracy", "nll", "ece")}


def test_train_tvd_causal_lm_writes_a_loadable_model_and_card(
    tiny_llama_dir: Path, offline_hub: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model_id = _publish(offline_hub, tiny_llama_dir, "hf-ext-test/tiny-llama")
    results = _launch_train_tvd(model_id, tmp_path / "lm", "--task", "causal_lm", "--block_size", "32",
                                hub_cache=offline_hub)  # fmt: skip
    expected = _lm_metrics(tmp_path / "lm", 32, 16)  # recomputed here from the saved model
    assert results["test"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    assert results["test"]["token_ece"] == pytest.approx(expected["token_ece"], rel=1e-4, abs=1e-6)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lm").num_parameters() > 0
    assert "causal_lm model fine-tuned with TVD" in (tmp_path / "lm" / "README.md").read_text()
    metrics = _check_card(tmp_path / "lm" / "README.md", model_id, ("TVD (TaiLr)", TAILR_TITLE))
    assert metrics == {f"bbc_news/{name}": results["test"][name] for name in ("perplexity", "token_ece")}


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


def test_the_validation_slice_is_cut_from_the_noisy_training_examples_by_topic_and_the_same_for_every_seed(
    tiny_bert_dir: Path,
) -> None:
    sys.path.insert(0, str(TRAIN_TVD.parent))
    import train_tvd
    from transformers import AutoTokenizer

    from hf_ext import bbc_news_train_test_split

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    clean = list(bbc_news_train_test_split(test_size=0.2, seed=0)["train"]["label"])[:200]
    args, _ = train_tvd.parse_args(["--task", "classification", "--max_train_samples", "200"])
    full, _ = train_tvd.classification_data(args, tokenizer, seed=0)
    row_of = {tuple(ids): i for i, ids in enumerate(full["input_ids"])}
    assert len(row_of) == 200  # every article tells itself apart
    held_rows = {}
    for seed in (0, 1):
        args, _ = train_tvd.parse_args(["--task", "classification", "--max_train_samples", "200", "--label_noise",
                                        "0.4", "--validation_share", "0.25"])  # fmt: skip
        train, _, validation = train_tvd.classification_data(args, tokenizer, seed=seed)
        noisy = train_tvd.flip_labels(clean, 0.4, 5, seed=seed)
        kept = [row_of[tuple(ids)] for ids in train["input_ids"]]
        held = [row_of[tuple(ids)] for ids in validation["input_ids"]]
        assert sorted(kept + held) == list(range(200))  # disjoint, nothing dropped
        for topic in range(5):  # a quarter of each topic held out
            members = [i for i in range(200) if clean[i] == topic]
            assert sum(clean[i] == topic for i in held) == round(0.25 * len(members))
        assert list(validation["label"]) == [noisy[i] for i in held]  # as noisy as the training labels
        assert list(train["label"]) == [noisy[i] for i in kept]
        held_rows[seed] = held
    assert held_rows[0] == held_rows[1]  # the noise changes with the seed, the held-out articles do not


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (
            ["--task", "classification", "--validation_share", "0.6"],
            r"`validation_share` must be a share in \[0, 0.5\]",
        ),
        (["--task", "causal_lm", "--validation_share", "0.2"], "`validation_share` applies to --task classification"),
        (["--task", "classification", "--evaluate_test", "false"], "`evaluate_test=False` needs a `validation_share`"),
        (["--task", "summarise"], "`task` must be one of"),
        (["--task", "classification", "--label_noise", "1.0"], r"`label_noise` must be in \[0, 1\)"),
        (["--task", "causal_lm", "--label_noise", "0.2"], "`label_noise` applies to --task classification only"),
        (["--task", "classification", "--trainer", "sft"], "`trainer` must be 'tvd' or 'plain'"),
        (["--task", "classification", "--tvd_gamma", "1.2"], r"`tvd_gamma` must be a number in \[0, 1\]"),
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


def test_nbce_recipe_answers_many_questions_reading_the_contexts_once(tiny_llama_dir: Path, tmp_path: Path,
                                                                      capsys) -> None:  # fmt: skip
    sys.path.insert(0, str(NBCE_RECIPE.parent))
    import nbce_generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ext.generation import nbce_generate as generate

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("The museum in Leeds opened a new wing for Roman coins.")
    (folder / "b.txt").write_text("Maria's favourite colour is teal.")
    questions = ["What is Maria's favourite colour?", "What did the museum open?"]
    (tmp_path / "questions.txt").write_text("\n".join(questions) + "\n\n")
    args = nbce_generate.NBCERecipeArguments(model=str(tiny_llama_dir), contexts=str(folder),
                                             questions=str(tmp_path / "questions.txt"), max_new_tokens=8)  # fmt: skip
    answers = nbce_generate.main(args)
    assert "contexts read 1 time(s) for 2 questions" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    contexts = nbce_generate.read_contexts(str(folder))
    assert answers == [generate(model, tokenizer, contexts, q, max_new_tokens=8) for q in questions]


@pytest.mark.slow
def test_nbce_recipe_demo_runs_on_the_embedded_smollm2() -> None:
    sys.path.insert(0, str(NBCE_RECIPE.parent))
    import nbce_generate

    answer = nbce_generate.main(nbce_generate.NBCERecipeArguments(num_demo_contexts=3, max_new_tokens=12))
    assert isinstance(answer, str) and answer.strip()


def test_nbce_recipe_rejects_bad_arguments(tmp_path: Path) -> None:
    sys.path.insert(0, str(NBCE_RECIPE.parent))
    import nbce_generate

    with pytest.raises(ValueError, match=r"`question` \(or `questions`\) is required with `contexts`"):
        nbce_generate.NBCERecipeArguments(contexts="docs/")
    with pytest.raises(ValueError, match="`questions` must be a text file"):
        nbce_generate.read_questions(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"`contexts` must be a folder of \.txt files or a \.jsonl file"):
        nbce_generate.read_contexts(str(tmp_path / "missing.csv"))


# ------------------------------------------------------------------------------------------- train_projected

TRAIN_PROJECTED = Path(__file__).resolve().parents[1] / "recipes" / "train_projected.py"


def _launch_train_projected(model: str, output_dir: Path, *extra: str, hub_cache: Path | None = None) -> dict:
    argv = ["--model_name_or_path", model, "--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps", "4",
            "--per_device_train_batch_size", "8", *extra]  # fmt: skip
    return _launch(TRAIN_PROJECTED, argv, output_dir, hub_cache)


def test_train_projected_causal_lm_under_accelerate_writes_a_loadable_model_and_card(
    tiny_llama_dir: Path, offline_hub: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model_id = _publish(offline_hub, tiny_llama_dir, "hf-ext-test/tiny-llama")
    results = _launch_train_projected(model_id, tmp_path / "lm", "--task", "causal_lm", "--rank", "4", "--block_size",
                                      "32", "--update_interval", "2", hub_cache=offline_hub)  # fmt: skip
    expected = _lm_metrics(tmp_path / "lm", 32, 16)  # recomputed here from the saved model
    assert results["projected_weights"] == 14
    assert results["test"]["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)
    assert results["test"]["perplexity"] == pytest.approx(math.exp(results["test"]["eval_loss"]), rel=1e-9)
    assert results["optimizer_state_bytes"] < results["adamw_state_bytes_estimate"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lm").num_parameters() > 0
    card = (tmp_path / "lm" / "README.md").read_text()
    assert "ProjectedAdamW" in card and "rank-4" in card and f"{results['test']['eval_loss']:.4f}" in card
    metrics = _check_card(tmp_path / "lm" / "README.md", model_id)
    assert metrics == {f"bbc_news/{name}": results["test"][name] for name in ("eval_loss", "perplexity")}


def test_train_projected_classification_writes_a_loadable_model_and_card(
    tiny_bert_dir: Path, offline_hub: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    model_id = _publish(offline_hub, tiny_bert_dir, "hf-ext-test/tiny-bert")
    results = _launch_train_projected(model_id, tmp_path / "cls", "--task", "classification", "--rank", "4",
                                      "--projection", "svd", hub_cache=offline_hub)  # fmt: skip
    assert results["projected_weights"] > 0
    assert results["test"]["accuracy"] == pytest.approx(_classification_metrics(tmp_path / "cls", 16)["accuracy"])
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").config.id2label[4] == "tech"
    assert _check_card(tmp_path / "cls" / "README.md", model_id) == {"bbc_news/accuracy": results["test"]["accuracy"]}


@pytest.mark.slow
def test_train_projected_trains_the_real_smollm2_with_a_third_of_adamws_state(smollm2_dir, tmp_path: Path) -> None:
    sys.path.insert(0, str(TRAIN_PROJECTED.parent))
    import train_projected

    before = _lm_metrics(smollm2_dir, 64, 16)  # the untrained SmolLM2 on the same 16 held-out blocks: ppl ~54
    argv = ["--task", "causal_lm", "--rank", "64", "--max_steps", "3", "--per_device_train_batch_size", "4",
            "--block_size", "64", "--max_eval_samples", "16", "--learning_rate", "3e-4", "--update_interval", "3",
            "--output_dir", str(tmp_path / "real"), "--use_cpu", "true", "--eval_on_start", "false"]  # fmt: skip
    results = train_projected.main(*train_projected.parse_args(argv))
    ratio = results["optimizer_state_bytes"] / results["adamw_state_bytes_estimate"]
    assert results["projected_weights"] == 30 * 7 and ratio < 0.35
    after = _lm_metrics(tmp_path / "real", 64, 16)
    # the reported number is the saved model's (Trainer.evaluate batches the blocks: float32 sums differ slightly)
    assert results["test"]["perplexity"] == pytest.approx(after["perplexity"], rel=2e-3)
    # three steps of BBC text lower the held-out perplexity by ~6% (54 -> 50); lr 0 or a detached loss: 0%
    assert after["perplexity"] < 0.97 * before["perplexity"]


_FAKE_TEST_METRICS = {  # what render_card is given in place of a run's results["test"]
    ("train_tvd", "classification"): {"accuracy": 0.8125, "nll": 0.5934, "ece": 0.0417, "reliability": []},
    ("train_tvd", "causal_lm"): {"perplexity": 21.5371, "token_ece": 0.0352, "tokens": 1984, "reliability": []},
    ("train_projected", "classification"): {"accuracy": 0.8125},
    ("train_projected", "causal_lm"): {"eval_loss": 3.0698, "perplexity": 21.5371},
}


@pytest.mark.parametrize(("recipe", "task"), list(_FAKE_TEST_METRICS))
def test_transformers_cards_record_the_embedded_defaults_hub_id_and_no_id_for_a_local_folder(
    recipe: str, task: str, tmp_path: Path
) -> None:
    import importlib

    module = importlib.import_module(recipe)
    test = _FAKE_TEST_METRICS[(recipe, task)]
    results = {"test": test, "command": f"recipes/{recipe}.py", "optimizer_state_bytes": 2**20,
               "adamw_state_bytes_estimate": 2**22}  # fmt: skip
    args, config = module.parse_args(["--task", task, "--output_dir", str(tmp_path / "out")])
    (tmp_path / "out").mkdir()
    module.render_card(*((args, config) if recipe == "train_tvd" else (args,)), results, tmp_path / "out")
    hub_id = MINILM_HUB_ID if task == "classification" else SMOLLM2_HUB_ID
    citation = ("TVD (TaiLr)", TAILR_TITLE) if recipe == "train_tvd" else None
    metrics = _check_card(tmp_path / "out" / "README.md", hub_id, citation)
    assert metrics == {f"bbc_news/{k}": v for k, v in test.items() if k not in ("reliability", "tokens")}
    args.model_name_or_path = str(tmp_path)  # a local folder: no Hub id to record, and the card says so
    module.render_card(*((args, config) if recipe == "train_tvd" else (args,)), results, tmp_path / "out")
    assert "base_model" not in _card_metadata(tmp_path / "out" / "README.md")
    assert f"- Base model: `{tmp_path}` (a local folder" in (tmp_path / "out" / "README.md").read_text()


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
    assert 1 <= results["compiled_graphs"] <= 3
    assert results["test"]["accuracy"] == pytest.approx(_classification_metrics(tmp_path, 16)["accuracy"])


def test_train_tvd_can_leave_the_test_split_alone_while_a_setting_is_chosen(tiny_bert_dir: Path, tmp_path: Path):
    sys.path.insert(0, str(TRAIN_TVD.parent))
    import train_tvd

    argv = ["--task", "classification", "--model_name_or_path", str(tiny_bert_dir), "--max_train_samples", "40",
            "--max_steps", "1", "--per_device_train_batch_size", "8", "--use_cpu", "true", "--validation_share", "0.2",
            "--evaluate_test", "false", "--output_dir", str(tmp_path)]  # fmt: skip
    calls = []
    original = train_tvd.evaluate_classification
    train_tvd.evaluate_classification = lambda model, data, collator: calls.append(len(data)) or original(
        model, data, collator)  # fmt: skip
    try:
        results = train_tvd.main(*train_tvd.parse_args(argv))
    finally:
        train_tvd.evaluate_classification = original
    held = results["validation_examples"]  # a fifth of each topic's examples, rounded per topic
    assert results["test"] == {} and calls == [held]  # the validation examples only, never the test split
    assert 6 <= held <= 10 and results["train_examples"] == 40 - held and 0 <= results["validation"]["accuracy"] <= 1


# ------------------------------------------------------------------------------------------- build_cur_index

CUR_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "build_cur_index.py"


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


def test_build_cur_index_under_accelerate_on_two_processes_saves_the_one_process_index(
    tiny_cross_encoder_dir: Path, tmp_path: Path
) -> None:
    import os
    import subprocess

    import build_cur_index
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import HfArgumentParser

    options = {"--cross_encoder": str(tiny_cross_encoder_dir), "--max_items": "40", "--n_anchor_queries": "6",
               "--n_anchor_items": "6", "--rerank_k": "10", "--block_size": "8"}  # fmt: skip
    argv = [part for pair in options.items() for part in pair]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched rank runs (OMP_NUM_THREADS=1)
    try:
        build_cur_index.main(*HfArgumentParser(build_cur_index.CURRecipeArguments).parse_args_into_dataclasses(
            [*argv, "--output_dir", str(tmp_path / "one")]))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    proc = subprocess.run([*launch, str(CUR_RECIPE), *argv, "--output_dir", str(tmp_path / "two")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "by 2 processes" in proc.stdout and proc.stdout.count("cross-encoder calls instead of 40") == 3  # rank 0
    one, two = (load_file(str(tmp_path / name / "cur_index.safetensors")) for name in ("one", "two"))
    np.testing.assert_array_equal(one["anchor_item_ids"], two["anchor_item_ids"])
    for name in ("item_matrix", "anchor_scores"):
        np.testing.assert_allclose(two[name].astype(np.float64), one[name].astype(np.float64), rtol=0, atol=1e-6)
    assert (tmp_path / "one" / "items.json").read_text() == (tmp_path / "two" / "items.json").read_text()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_anchor_items": 41}, "`n_anchor_items` \\(41\\) exceeds the number of items \\(40\\)"),
        ({"n_anchor_queries": 41}, "`n_anchor_queries` must be in \\[1, 40\\]"),
        ({"rerank_k": 35}, "`rerank_k` \\(35\\) exceeds the 34 items that are not anchor items"),
    ],
)
def test_build_cur_index_refuses_counts_past_the_corpus_instead_of_clamping(
    tiny_bert_dir: Path, tmp_path: Path, overrides: dict, match: str
) -> None:
    import build_cur_index

    args = build_cur_index.CURRecipeArguments(**{
        "cross_encoder": str(tiny_bert_dir), "max_items": 40, "n_anchor_queries": 8, "n_anchor_items": 6,
        "rerank_k": 10, "output_dir": str(tmp_path / "index"), **overrides,
    })  # fmt: skip
    with pytest.raises(ValueError, match=match):
        build_cur_index.main(args)
