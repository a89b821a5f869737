"""NBCE: the combine step against a reference written from the formula, equivalence with plain greedy decoding, the
processor inside `generate` vs the wrapper, and a naive step-by-step reference (no KV cache, the reference combine)."""

from __future__ import annotations

import numpy as np
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


def _reference_combine(logits, *, beta=0.25, pooling="entropy", eta=0.1, top_p=0.95, previous=None):
    """NBCE's combine step written from its formula (float64 numpy, nothing from hf_ext).

    Returns ``(combined, chosen, entropies)``: the combined scores (-inf outside the pooled nucleus), the chosen
    context (1-based) under entropy pooling (else None) and each context's entropy before the stickiness bonus.
    """
    rows = np.asarray(logits, dtype=np.float64)
    truncated = []
    for row in rows:
        logp = row - (row.max() + np.log(np.exp(row - row.max()).sum()))  # log-softmax
        order = np.argsort(-logp, kind="stable")  # most probable first
        mass = np.cumsum(np.exp(logp[order]))
        # the smallest set of most probable tokens whose mass reaches top_p (all of them for top_p = 1)
        size = len(logp) if top_p >= 1 else int(np.searchsorted(mass, top_p, side="left")) + 1
        kept = np.full_like(logp, -np.inf)
        kept[order[:size]] = logp[order[:size]]
        truncated.append(kept)
    prior, contexts = truncated[0], truncated[1:]
    entropies = []
    for kept in contexts:  # the entropy of the nucleus distribution (renormalised within the nucleus)
        p = np.exp(kept[np.isfinite(kept)])
        q = p / p.sum()
        entropies.append(float(-(q * np.log(q)).sum()))
    chosen = None
    if pooling == "entropy":
        best = None
        for k, entropy in enumerate(entropies, start=1):
            score = entropy - (eta if k == previous else 0.0)
            if best is None or score < best:  # strict: ties go to the lower context
                best, chosen = score, k
        pooled = contexts[chosen - 1]
    elif pooling == "mean":
        pooled = sum(contexts) / len(contexts)
    else:
        pooled = np.max(np.stack(contexts), axis=0)
    combined = np.empty_like(pooled)
    for t in range(len(pooled)):
        if np.isfinite(prior[t]):
            combined[t] = (1 + beta) * pooled[t] - beta * prior[t]
        else:  # the context-free prior excludes the token: the pooled term alone
            combined[t] = pooled[t]
    return combined, chosen, entropies


def _naive_nbce(model, tokenizer, contexts, question, steps: int, **kwargs) -> tuple[list[int], list[int | None]]:
    """The reference: every step, a full forward (no KV cache) over all rows, the reference combine, one greedy token
    appended to every row. Returns the tokens and the context entropy pooling took each from."""
    batch = nbce_batch(tokenizer, contexts, question)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tokens, chosen_contexts, previous = [], [], None
    for _ in range(steps):
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        combined, previous, _ = _reference_combine(logits[:, -1].numpy(), previous=previous, **kwargs)
        token = int(np.argmax(combined))
        tokens.append(token)
        chosen_contexts.append(previous)
        if token == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.full((ids.shape[0], 1), token)], dim=1)
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
    return tokens, chosen_contexts


def _peaked(model):
    """The tiny random Llama with its final norm scaled up: its next-token distributions become peaked (entropies
    ~3 nats, nuclei of ~1000 of the 49k tokens) instead of near-uniform, so entropy pooling, the stickiness bonus
    and the nucleus cut all decide the tokens."""
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    return model


def test_one_context_and_beta_zero_is_plain_greedy_generate(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    answer = nbce_generate(model, tokenizer, CONTEXTS[:1], QUESTION, beta=0.0, max_new_tokens=12)
    assert answer == _plain_greedy(model, tokenizer, f"{CONTEXTS[0]}\n\n{QUESTION}", 12)


@pytest.mark.parametrize(
    ("peaked", "settings"),
    [
        (False, {"pooling": "entropy", "beta": 0.25, "eta": 0.1, "top_p": 0.95}),
        (True, {"pooling": "entropy", "beta": 0.25, "eta": 0.1, "top_p": 0.95}),
        (True, {"pooling": "entropy", "beta": 0.5, "eta": 0.4, "top_p": 0.6}),
        (True, {"pooling": "mean", "beta": 0.25, "eta": 0.1, "top_p": 0.95}),
        (True, {"pooling": "max", "beta": 0.25, "eta": 0.1, "top_p": 0.95}),
        (True, {"pooling": "max", "beta": 0.5, "eta": 0.1, "top_p": 0.6}),
    ],
)
def test_wrapper_equals_the_naive_reference_without_kv_cache(tiny_llama, peaked: bool, settings: dict) -> None:
    model, tokenizer = tiny_llama
    if peaked:
        _peaked(model)
    answer, processor = nbce_generate(
        model, tokenizer, CONTEXTS, QUESTION, max_new_tokens=10, return_processor=True, **settings
    )
    tokens, chosen = _naive_nbce(model, tokenizer, CONTEXTS, QUESTION, 10, **settings)
    assert answer == tokenizer.decode(tokens, skip_special_tokens=True)
    assert processor.chosen_contexts == chosen


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


def _step_logits(seed: int, vocab: int = 40) -> torch.Tensor:
    """Row 0 (the prior) peaked, so its nucleus is small and many tokens fall outside it; contexts of varied
    sharpness, so their entropies differ."""
    scales = torch.tensor([3.0, 1.0, 2.0, 0.7, 1.5])[:, None]
    return torch.randn(5, vocab, generator=torch.Generator().manual_seed(seed)) * scales


@pytest.mark.parametrize("pooling", ["entropy", "mean", "max"])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.6])
@pytest.mark.parametrize(("beta", "previous"), [(0.25, None), (0.5, 2), (-0.5, 3), (0.0, 4)])
def test_combine_equals_the_reference_formula(pooling: str, top_p: float, beta: float, previous: int | None) -> None:
    for seed in range(3):
        logits = _step_logits(seed)
        combined, chosen = nbce_combine(logits, beta=beta, pooling=pooling, eta=0.3, top_p=top_p, previous=previous)
        expected, expected_chosen, _ = _reference_combine(
            logits.numpy(), beta=beta, pooling=pooling, eta=0.3, top_p=top_p, previous=previous
        )
        assert combined.shape == (40,) and (None if chosen is None else int(chosen)) == expected_chosen
        expected = torch.from_numpy(expected).float()
        assert torch.equal(torch.isfinite(combined), torch.isfinite(expected))  # the same tokens cut
        torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-5)


def test_the_nucleus_is_the_smallest_set_reaching_top_p_and_is_not_renormalised() -> None:
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # hand-checked nuclei: {1}, {1, 3}, {0, 1, 3}, everything
    logits = torch.stack([probs, probs]).log()  # row 0 (the prior) and one context, equal
    for top_p, kept in [(0.45, [1]), (0.7, [1, 3]), (0.85, [0, 1, 3]), (0.97, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])]:
        inside = [i in kept for i in range(4)]
        assert np.isfinite(_reference_combine(logits.numpy(), top_p=top_p)[0]).tolist() == inside
        for pooling in ("entropy", "mean", "max"):
            combined, _ = nbce_combine(logits, pooling=pooling, beta=0.5, top_p=top_p)
            assert torch.isfinite(combined).tolist() == inside
            torch.testing.assert_close(combined[kept], probs[kept].log())  # (1 + beta) log p - beta log p = log p


@pytest.mark.parametrize("pooling", ["entropy", "mean", "max"])
def test_a_token_outside_the_priors_nucleus_takes_the_pooled_score_alone(pooling: str) -> None:
    logits = _step_logits(0)
    prior = torch.log_softmax(logits[0].double(), dim=-1)
    top = prior.argsort(descending=True)
    size = int((prior[top].exp().cumsum(0) < 0.6).sum()) + 1  # the prior's nucleus at top_p = 0.6: top[:size]
    outside = torch.ones(40, dtype=torch.bool)
    outside[top[:size]] = False
    combined, _ = nbce_combine(logits, beta=0.5, pooling=pooling, top_p=0.6)
    pooled = torch.from_numpy(_reference_combine(logits.numpy(), beta=0.0, pooling=pooling, top_p=0.6)[0])
    assert torch.equal(torch.isfinite(combined), torch.isfinite(pooled))
    if pooling == "max":
        assert (outside & torch.isfinite(pooled)).sum() >= 3  # the branch is exercised
    torch.testing.assert_close(combined[outside].double(), pooled[outside], rtol=1e-5, atol=1e-5)
    inside = ~outside & torch.isfinite(pooled)
    torch.testing.assert_close(combined[inside].double(), 1.5 * pooled[inside] - 0.5 * prior[inside], rtol=1e-5,
                               atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_entropy_pooling_keeps_the_previous_context_only_within_eta(top_p: float) -> None:
    for seed in range(4):
        logits = _step_logits(seed)
        _, lowest, entropies = _reference_combine(logits.numpy(), top_p=top_p)
        runner_up = sorted(range(1, 5), key=lambda k: entropies[k - 1])[1]
        gap = entropies[runner_up - 1] - entropies[lowest - 1]
        assert gap > 1e-3
        assert int(nbce_combine(logits, top_p=top_p)[1]) == lowest
        assert int(nbce_combine(logits, top_p=top_p, previous=runner_up, eta=1.5 * gap)[1]) == runner_up  # sticks
        assert int(nbce_combine(logits, top_p=top_p, previous=runner_up, eta=0.5 * gap)[1]) == lowest  # moves on
        assert int(nbce_combine(logits, top_p=top_p, previous=lowest, eta=1.0)[1]) == lowest


@pytest.mark.parametrize("top_p", [0.3, 0.5])
def test_entropy_pooling_measures_the_renormalised_nucleus(top_p: float) -> None:
    # Contexts of similar sharpness, small nuclei: the entropy of the nucleus as a distribution (renormalised) and
    # -sum p log p over the nucleus' raw probabilities (the original NBCE script's) rank the contexts differently.
    disagree = 0
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(5, 40, generator=g) * (torch.rand(5, 1, generator=g) * 0.3 + 1.0)
        _, expected, _ = _reference_combine(logits.numpy(), top_p=top_p)
        assert int(nbce_combine(logits, top_p=top_p)[1]) == expected
        raw = []
        for row in torch.log_softmax(logits[1:].double(), dim=-1):
            p = row.exp().sort(descending=True).values
            p = p[: int((p.cumsum(0) < top_p).sum()) + 1]
            raw.append(float(-(p * p.log()).sum()))
        disagree += int(np.argmin(raw)) + 1 != expected
    assert disagree >= 3  # the cases where the two definitions part are there


def test_entropy_pooling_breaks_ties_by_the_lower_context() -> None:
    logits = _step_logits(1)
    logits[2] = logits[3] = logits[1] * 4  # contexts 2 and 3 identical, sharper than the rest
    assert _reference_combine(logits.numpy())[1] == 2 and int(nbce_combine(logits)[1]) == 2
    assert int(nbce_combine(logits, previous=3, eta=0.01)[1]) == 3


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


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])  # flat (the candidates double up to the vocabulary) to peaked
@pytest.mark.parametrize("top_p", [0.5, 0.95, 0.999])
def test_the_nucleus_from_top_candidates_is_the_full_sorts(scale: float, top_p: float) -> None:
    from hf_ext.generation.nbce_hub.custom_generate import generate as nbce_module

    logp = (scale * torch.randn(7, 5000, generator=torch.Generator().manual_seed(1))).log_softmax(dim=-1)
    fast = nbce_module._top_p_mask(logp, top_p)
    assert torch.equal(fast, nbce_module._top_p_mask_sorted(logp, top_p))
    # and the sizes are the reference's: the smallest prefix of the sorted row whose mass reaches top_p
    sorted_probs = logp.exp().sort(dim=-1, descending=True).values.double()
    expected = (sorted_probs.cumsum(dim=-1) - sorted_probs < top_p).sum(dim=-1)
    assert torch.equal(torch.isfinite(fast).sum(dim=-1), expected)


@pytest.mark.parametrize("pooling", ["entropy", "mean", "max"])
def test_rows_whose_nucleus_outgrows_the_candidates_are_searched_again_alone(pooling: str) -> None:
    """Peaked rows fit in the first candidates, flat ones (the prior among them) need several growths: the
    combined step still equals the reference formula's, and every row's nucleus the full sort's."""
    from hf_ext.generation.nbce_hub.custom_generate import generate as nbce_module

    scales = torch.tensor([0.2, 8.0, 0.05, 6.0, 1.0, 12.0, 0.5])[:, None]  # flat prior, mixed contexts
    for seed in range(3):
        logits = torch.randn(7, 5000, generator=torch.Generator().manual_seed(seed)) * scales
        logits[:, seed] = logits.max(dim=-1).values + 1.0  # a low index in every nucleus (a padding slot's write)
        logp = logits.log_softmax(dim=-1)
        assert torch.equal(nbce_module._top_p_mask(logp, 0.95), nbce_module._top_p_mask_sorted(logp, 0.95))
        combined, chosen = nbce_combine(logits, beta=0.25, pooling=pooling, eta=0.3, top_p=0.95, previous=2)
        expected, expected_chosen, _ = _reference_combine(
            logits.numpy(), beta=0.25, pooling=pooling, eta=0.3, top_p=0.95, previous=2
        )
        assert (None if chosen is None else int(chosen)) == expected_chosen
        expected = torch.from_numpy(expected).float()
        assert torch.equal(torch.isfinite(combined), torch.isfinite(expected))
        torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-5)
