"""NBCE: equivalence with plain greedy decoding, the processor inside `generate` vs the wrapper, and a naive
step-by-step reference without KV cache."""

from __future__ import annotations

import pytest
import torch

from hf_ext.generation import NBCELogitsProcessor, nbce_batch, nbce_combine, nbce_generate, split_into_windows

CONTEXTS = [
    "The museum in Leeds opened a new wing for Roman coins last spring.",
    "Maria's favourite colour is teal, and she paints every room of her flat in it.",
    "The 2004 chess championship was won by a player from Kazan after nine rounds.",
]
QUESTION = "What is Maria's favourite colour?"


def _plain_greedy(model, tokenizer, text: str, max_new_tokens: int) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _naive_nbce(model, tokenizer, contexts, question, steps: int, **kwargs) -> list[int]:
    """The reference: every step, a full forward (no KV cache) over all rows, combine, append one token."""
    batch = nbce_batch(tokenizer, contexts, question)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tokens, previous = [], None
    for _ in range(steps):
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        combined, chosen = nbce_combine(logits[:, -1], previous=previous, **kwargs)
        previous = chosen
        token = int(combined.argmax())
        tokens.append(token)
        if token == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.full((ids.shape[0], 1), token)], dim=1)
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
    return tokens


def test_one_context_and_beta_zero_is_plain_greedy_generate(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    answer = nbce_generate(model, tokenizer, CONTEXTS[:1], QUESTION, beta=0.0, max_new_tokens=12)
    assert answer == _plain_greedy(model, tokenizer, f"{CONTEXTS[0]}\n\n{QUESTION}", 12)


@pytest.mark.parametrize("pooling", ["entropy", "mean", "max"])
def test_wrapper_equals_the_naive_reference_without_kv_cache(tiny_llama, pooling: str) -> None:
    model, tokenizer = tiny_llama
    answer, processor = nbce_generate(
        model, tokenizer, CONTEXTS, QUESTION, pooling=pooling, max_new_tokens=10, return_processor=True
    )
    reference = _naive_nbce(model, tokenizer, CONTEXTS, QUESTION, 10, pooling=pooling, beta=0.25, eta=0.1, top_p=0.95)
    assert answer == tokenizer.decode(reference, skip_special_tokens=True)
    assert len(processor.chosen_contexts) == len(reference)
    if pooling == "entropy":
        assert all(1 <= c <= len(CONTEXTS) for c in processor.chosen_contexts)


def test_processor_inside_plain_generate_equals_the_wrapper(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    batch = nbce_batch(tokenizer, CONTEXTS, QUESTION)
    out = model.generate(
        **batch, logits_processor=[NBCELogitsProcessor()], max_new_tokens=10, pad_token_id=tokenizer.eos_token_id
    )
    new = out[:, batch["input_ids"].shape[1] :]
    assert (new == new[0]).all()  # every row got the same tokens
    assert tokenizer.decode(new[0], skip_special_tokens=True) == nbce_generate(
        model, tokenizer, CONTEXTS, QUESTION, max_new_tokens=10
    )


def test_sampling_is_reproducible_with_a_seeded_generator_and_works_under_generate_sampling(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    answers = [
        nbce_generate(
            model,
            tokenizer,
            CONTEXTS,
            QUESTION,
            do_sample=True,
            temperature=1.5,
            max_new_tokens=8,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert answers[0] == answers[1]
    batch = nbce_batch(tokenizer, CONTEXTS, QUESTION)
    processor = NBCELogitsProcessor(do_sample=True, generator=torch.Generator().manual_seed(7), temperature=1.5)
    out = model.generate(**batch, logits_processor=[processor], do_sample=True, top_k=0, max_new_tokens=8,
                         pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    new = out[:, batch["input_ids"].shape[1] :]
    assert (new == new[0]).all()
    assert tokenizer.decode(new[0], skip_special_tokens=True) == answers[0]


def test_beam_search_is_refused(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="`num_beams` must be 1"):
        nbce_generate(model, tokenizer, CONTEXTS, QUESTION, num_beams=2)
    batch = nbce_batch(tokenizer, CONTEXTS, QUESTION)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(**batch, logits_processor=[NBCELogitsProcessor()], num_beams=2, max_new_tokens=4,
                       pad_token_id=tokenizer.eos_token_id)  # fmt: skip


def test_a_tokenizer_without_pad_token_is_handled(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    expected = nbce_generate(model, tokenizer, CONTEXTS, QUESTION, max_new_tokens=5)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    assert nbce_generate(model, tokenizer, CONTEXTS, QUESTION, max_new_tokens=5) == expected


@pytest.mark.parametrize(
    ("contexts", "question", "kwargs", "match"),
    [
        ([], QUESTION, {}, "`contexts` must be a non-empty list"),
        ("just a string", QUESTION, {}, "`contexts` must be a non-empty list"),
        (["fine", "  "], QUESTION, {}, r"`contexts\[1\]` is empty"),
        (["same", "same"], QUESTION, {}, "the same context twice"),
        (CONTEXTS, "", {}, "`question` must be a non-empty string"),
        (CONTEXTS, QUESTION, {"beta": -1.0}, "`beta` must be a finite number > -1"),
        (CONTEXTS, QUESTION, {"pooling": "sum"}, "`pooling` must be one of"),
        (CONTEXTS, QUESTION, {"top_p": 0.0}, r"`top_p` must be in \(0, 1\]"),
        (CONTEXTS, QUESTION, {"max_new_tokens": 0}, "`max_new_tokens` must be an int >= 1"),
        (["word " * 3000], QUESTION, {}, "more than the model's window"),
    ],
)
def test_bad_input_is_refused_with_the_argument_named(tiny_llama, contexts, question, kwargs, match) -> None:
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match=match):
        nbce_generate(model, tokenizer, contexts, question, max_new_tokens=kwargs.pop("max_new_tokens", 2), **kwargs)


def test_combine_follows_the_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    combined, chosen = nbce_combine(logits, beta=0.5, pooling="max", top_p=1.0)
    logp = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(combined, 1.5 * logp[1:].max(dim=0).values - 0.5 * logp[0])
    assert chosen is None
    # entropy pooling picks the most confident context; the stickiness bonus can keep the previous one
    peaked = torch.zeros(3, 10)
    peaked[1, 3] = 5.0  # context 1: confident
    peaked[2, 4] = 4.9  # context 2: almost as confident
    assert nbce_combine(peaked, top_p=1.0)[1] == 1
    assert nbce_combine(peaked, top_p=1.0, previous=2, eta=1.0)[1] == 2


def test_split_into_windows_covers_the_text_with_overlap(tiny_llama) -> None:
    _, tokenizer = tiny_llama
    text = " ".join(f"word{i}" for i in range(300))
    pieces = split_into_windows(text, tokenizer, window=64, overlap=16)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pieces]
    assert len(pieces) > 3 and max(lengths) <= 64 + 2  # re-tokenising decoded text may merge or split a token
    assert "word0" in pieces[0] and "word299" in pieces[-1]
    with pytest.raises(ValueError, match=r"`overlap` must be an int in \[0, window\)"):
        split_into_windows(text, tokenizer, window=8, overlap=8)


@pytest.mark.slow
def test_one_context_and_beta_zero_is_plain_greedy_on_the_real_smollm2(smollm2) -> None:
    model, tokenizer = smollm2
    context = "Maria's favourite colour is teal. She paints every room of her flat in it."
    answer = nbce_generate(model, tokenizer, [context], QUESTION, beta=0.0, max_new_tokens=16)
    assert answer == _plain_greedy(model, tokenizer, f"{context}\n\n{QUESTION}", 16)
    assert len(answer.split()) >= 3  # a real answer (the 135M model does not always get this one right)


def test_the_custom_generate_folder_works_from_a_local_path(tiny_llama, tmp_path) -> None:
    import shutil

    from hf_ext.generation import nbce_custom_generate_path

    model, tokenizer = tiny_llama
    folder = tmp_path / "nbce-repo"  # a copy, as a user would upload it to a Hub repo
    shutil.copytree(nbce_custom_generate_path(), folder, ignore=shutil.ignore_patterns("__pycache__"))
    assert (folder / "custom_generate" / "generate.py").is_file() and (folder / "README.md").is_file()
    out = model.generate(custom_generate=str(folder), trust_remote_code=True, tokenizer=tokenizer,
                         contexts=CONTEXTS, question=QUESTION, max_new_tokens=10)  # fmt: skip
    prompt_length = nbce_batch(tokenizer, CONTEXTS, QUESTION)["input_ids"].shape[1]
    answer = tokenizer.decode(out[0, prompt_length:], skip_special_tokens=True)
    assert answer == nbce_generate(model, tokenizer, CONTEXTS, QUESTION, max_new_tokens=10)
    batch = nbce_batch(tokenizer, CONTEXTS, QUESTION)  # a prebuilt batch works too
    out2 = model.generate(**batch, custom_generate=str(folder), trust_remote_code=True, max_new_tokens=10,
                          pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    assert torch.equal(out2, out)


# ---------------------------------------------------------------------------- contexts sharded across processes

FIVE_CONTEXTS = [*CONTEXTS, "Teal is a blue-green colour named after a duck.", "Kazan lies on the Volga river."]


def _sharded_answer(rank: int, world_size: int, model_dir: str, pooling: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answer, processor = nbce_generate(model, tokenizer, FIVE_CONTEXTS, QUESTION, pooling=pooling, max_new_tokens=10,
                                      shard_contexts=True, return_processor=True)  # fmt: skip
    return {"answer": answer, "chosen": processor.chosen_contexts}


@pytest.mark.parametrize("pooling", ["entropy", "mean", "max"])
def test_two_gloo_processes_sharing_the_contexts_give_the_tokens_of_one_process(tiny_llama_dir, pooling) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ext.testing import run_distributed

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    single, processor = nbce_generate(model, tokenizer, FIVE_CONTEXTS, QUESTION, pooling=pooling, max_new_tokens=10,
                                      return_processor=True)  # fmt: skip
    results = run_distributed(_sharded_answer, world_size=2, args=(str(tiny_llama_dir), pooling))
    for result in results:  # rank 0 holds contexts 1-3, rank 1 contexts 4-5
        assert result["answer"] == single
        assert result["chosen"] == processor.chosen_contexts


def test_sharding_needs_a_process_group(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match=r"`shard_contexts=True` needs an initialised torch\.distributed"):
        nbce_generate(model, tokenizer, CONTEXTS, QUESTION, shard_contexts=True)
