"""Shared fixtures: tiny random models with the real tokenizers (fast), and the real embedded models (slow).

Tiny models are built once per session from configs and saved to a temporary folder; each test gets a fresh
instance loaded from that folder, so a test that trains one cannot leak into another.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_ext.assets import minilm_path, smollm2_path

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_LLAMA = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 2048,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- tiny random models


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT with the real MiniLM (uncased WordPiece) tokenizer."""
    out = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **TINY_BERT)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with a 1-logit sequence-classification head (a CrossEncoder's shape)."""
    out = tmp_path_factory.mktemp("tiny_cross_encoder")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=1, **TINY_BERT)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_sentence_transformer(tiny_bert_dir: Path):
    """A fresh SentenceTransformer: tiny BERT + mean pooling (32-d), on CPU."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(str(tiny_bert_dir), max_seq_length=64)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


@pytest.fixture
def tiny_cross_encoder(tiny_cross_encoder_dir: Path):
    """A fresh CrossEncoder (one logit per pair) on the tiny BERT, on CPU."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(tiny_cross_encoder_dir), num_labels=1, max_length=64, device="cpu")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2 folder (converted once per machine; ~30 s the first time, ~1 s after)."""
    return smollm2_path()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer, 32-wide random Llama with the real SmolLM2 tokenizer and chat template."""
    out = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **TINY_LLAMA,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_llama(tiny_llama_dir: Path):
    """A fresh (model, tokenizer) pair of the tiny Llama, eval mode, on CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


# ----------------------------------------------------------------------------- real embedded models


@pytest.fixture(scope="session")
def minilm():
    """The real embedded all-MiniLM-L6-v2 SentenceTransformer (session-wide: do not train it in place)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device="cpu")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    """The real embedded SmolLM2-135M-Instruct (model, tokenizer), eval mode, fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)
