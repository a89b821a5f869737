"""NBCEContextCache: the cached rows give the uncached batch's next-token scores (checked against a full forward with no
cache), the same answers for several questions over one read, a new read only when the contexts change, kept tensors
never written, bytes counted from the tensors, and clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor

from hf_ext.generation import NBCEContextCache, NBCELogitsProcessor, nbce_batch, nbce_generate

CONTEXTS = [
    "The museum in Leeds opened a new wing for Roman coins last spring.",
    "Maria's favourite colour is teal, and she paints every room of her flat in it.",
    "The 2004 chess championship was won by a player from Kazan after nine rounds.",
]
QUESTIONS = ["What is Maria's favourite colour?", "Who won the 2004 chess championship?", "When did the wing open?"]


class _Record(LogitsProcessor):
    """Keeps the scores `generate` hands to the processors at each step."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.scores.append(scores.clone())
        return scores


def _first_step_without_cache(model, tokenizer, question, chat_template: bool) -> torch.Tensor:
    """The reference: one forward over `nbce_batch`'s left-padded rows, no cache; each row's last-position logits."""
    batch = nbce_batch(tokenizer, CONTEXTS, question, chat_template=chat_template)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(**batch, position_ids=positions, use_cache=False).logits
    return logits[:, -1]


@pytest.mark.parametrize("chat_template", [True, False])
def test_the_cached_first_step_scores_are_a_full_forwards_for_every_question(tiny_llama, chat_template: bool) -> None:
    model, tokenizer = tiny_llama
    model.double()  # float64: the split prefill and the full forward differ by rounding only (~1e-12)
    cache = NBCEContextCache(model, tokenizer, chat_template=chat_template)
    cache.read(CONTEXTS)
    for question in QUESTIONS:
        record = _Record()
        model.generate(**cache.inputs(question), logits_processor=[record], max_new_tokens=1, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        reference = _first_step_without_cache(model, tokenizer, question, chat_template)
        torch.testing.assert_close(record.scores[0].double(), reference, rtol=0, atol=1e-6)  # generate's float32
    assert cache.reads == 1


@pytest.mark.parametrize("pooling", ["entropy", "max"])
def test_answers_with_the_cache_are_the_uncached_answers_and_the_contexts_are_read_once(tiny_llama, pooling) -> None:
    model, tokenizer = tiny_llama
    model.double()
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)  # peaked distributions: pooling and the nucleus decide the tokens
    cache = NBCEContextCache(model, tokenizer)
    for question in QUESTIONS:
        cached, with_cache = nbce_generate(model, tokenizer, CONTEXTS, question, pooling=pooling, max_new_tokens=10,
                                           context_cache=cache, return_processor=True)  # fmt: skip
        plain, without = nbce_generate(model, tokenizer, CONTEXTS, question, pooling=pooling, max_new_tokens=10,
                                       return_processor=True)  # fmt: skip
        assert cached == plain
        assert with_cache.chosen_contexts == without.chosen_contexts
    assert cache.reads == 1
    other = [*CONTEXTS[:2], "Kazan is a city on the Volga."]
    assert nbce_generate(model, tokenizer, other, QUESTIONS[1], max_new_tokens=10, context_cache=cache) == (
        nbce_generate(model, tokenizer, other, QUESTIONS[1], max_new_tokens=10)
    )
    assert cache.reads == 2 and cache.contexts == tuple(other)


def test_the_processor_inside_plain_generate_with_the_cache_inputs_and_the_kept_tensors_stay_unwritten(
    tiny_llama,
) -> None:
    model, tokenizer = tiny_llama
    cache = NBCEContextCache(model, tokenizer)
    cache.read(CONTEXTS)
    kept = [(layer.keys.clone(), layer.values.clone()) for layer in cache._cache.layers]
    for question in QUESTIONS[:2]:
        inputs = cache.inputs(question)
        out = model.generate(**inputs, logits_processor=[NBCELogitsProcessor()], max_new_tokens=8,
                             pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        new = out[:, inputs["input_ids"].shape[1] :]
        assert (new == new[0]).all()
        assert tokenizer.decode(new[0], skip_special_tokens=True) == nbce_generate(
            model, tokenizer, CONTEXTS, question, max_new_tokens=8
        )
    for layer, (keys, values) in zip(cache._cache.layers, kept, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_the_bytes_are_the_key_and_value_tensors_of_every_layer_row_and_kept_position(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    cache = NBCEContextCache(model, tokenizer)
    assert cache.nbytes == 0
    cache.read(CONTEXTS)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4  # float32
    assert cache.nbytes == (len(CONTEXTS) + 1) * cache.num_tokens * per_position
    longest = max(len(ids) for ids in _unpadded(nbce_batch(tokenizer, CONTEXTS, QUESTIONS[0])))
    assert 0 < cache.num_tokens < longest  # the contexts are kept, the question's tokens are not


def _unpadded(batch: dict) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


def test_on_the_real_smollm2_two_questions_read_the_contexts_once_and_answer_as_without_the_cache(smollm2) -> None:
    model, tokenizer = smollm2
    cache = NBCEContextCache(model, tokenizer)
    for question in QUESTIONS[:2]:
        assert nbce_generate(model, tokenizer, CONTEXTS, question, max_new_tokens=12, context_cache=cache) == (
            nbce_generate(model, tokenizer, CONTEXTS, question, max_new_tokens=12)
        )
    assert cache.reads == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_template": "{context}"}, "prompt_template.*exactly once"),
        ({"prompt_template": "{question}\n\n{context}"}, "prompt_template.*before"),
        ({"question_template": "Q: {question} {question}"}, "question_template.*exactly once"),
    ],
)
def test_templates_the_cache_cannot_cut_are_refused(tiny_llama, kwargs: dict, match: str) -> None:
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match=match):
        NBCEContextCache(model, tokenizer, **kwargs)


def test_a_cache_of_another_model_or_other_templates_or_no_contexts_is_refused(tiny_llama, tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_llama
    cache = NBCEContextCache(model, tokenizer)
    with pytest.raises(ValueError, match="holds no contexts"):
        cache.inputs(QUESTIONS[0])
    with pytest.raises(ValueError, match="contexts\\[1\\]` is empty"):
        cache.read([CONTEXTS[0], " "])
    other = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with pytest.raises(ValueError, match="another model"):
        nbce_generate(other, tokenizer, CONTEXTS, QUESTIONS[0], context_cache=cache)
    with pytest.raises(ValueError, match="context_cache` was built with"):
        nbce_generate(model, tokenizer, CONTEXTS, QUESTIONS[0], context_cache=cache, chat_template=False)
