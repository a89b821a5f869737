"""The shared tiny models are real transformers/sentence-transformers objects with the real tokenizers."""

from __future__ import annotations

import torch


def test_tiny_sentence_transformer_encodes_with_the_minilm_tokenizer(tiny_sentence_transformer) -> None:
    embeddings = tiny_sentence_transformer.encode(["a girl is styling her hair", "a man plays"], convert_to_tensor=True)
    assert embeddings.shape == (2, 32) and torch.isfinite(embeddings).all()
    assert tiny_sentence_transformer.tokenizer.vocab_size == 30522


def test_tiny_cross_encoder_scores_pairs(tiny_cross_encoder) -> None:
    scores = tiny_cross_encoder.predict([("a girl", "a woman"), ("a cat", "a stock market report")])
    assert scores.shape == (2,) and scores[0] != scores[1]


def test_tiny_llama_generates_with_the_smollm2_chat_template(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert "<|im_start|>assistant" in tokenizer.decode(inputs["input_ids"][0])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4 or tokenizer.eos_token_id in out[0].tolist()
