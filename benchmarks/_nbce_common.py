"""Helpers the NBCE benchmark parts share: whole-token answer matching, chat prompts, plain greedy answers with their
KV bytes, truncation to the window, and the shared prefill the NBCE settings continue from."""

from __future__ import annotations

import copy
import re
import time

import torch
from _common import tensor_bytes
from transformers import DynamicCache


def answer_correct(answer: str, number: str) -> bool:
    """Whether ``answer`` holds ``number`` as a whole token (not inside a longer number or word)."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(number)}(?![0-9A-Za-z])", answer) is not None


def answers_correct(answer: str, numbers: list[str]) -> bool:
    """Whether ``answer`` holds every one of ``numbers`` as a whole token."""
    return all(answer_correct(answer, number) for number in numbers)


def cut(tokenizer, text: str, tokens: int) -> str:
    """The first ``tokens`` tokens of ``text``, decoded."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def chat_ids(tokenizer, text: str) -> list[int]:
    """``text`` as one user message in the tokenizer's chat template, with the generation prompt."""
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def plain_generate(model, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[str, float, int]:
    """Greedy answer, seconds, and the bytes of the KV cache at the end (counted from its tensors)."""
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids], device=model.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            return_dict_in_generate=True,
        )
    seconds = time.perf_counter() - start
    answer = tokenizer.decode(out.sequences[0, len(ids) :], skip_special_tokens=True)
    return answer, seconds, tensor_bytes(out.past_key_values)


def truncated_prompt(tokenizer, contexts: list[str], question: str, budget: int) -> tuple[list[int], bool]:
    """The chat prompt of the concatenated contexts, cut (from the end) to ``budget`` tokens in all."""
    joined = "\n\n".join(contexts)
    ids = chat_ids(tokenizer, f"{joined}\n\n{question}")
    if len(ids) <= budget:
        return ids, True
    context_ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
    keep = len(context_ids) - (len(ids) - budget)
    while True:
        ids = chat_ids(tokenizer, f"{tokenizer.decode(context_ids[:keep])}\n\n{question}")
        if len(ids) <= budget:
            return ids, False
        keep -= len(ids) - budget


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch (what `generate` derives from the attention mask)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def prefill_all_but_last(model, batch: dict) -> DynamicCache:
    """The KV cache of every token but the last of a left-padded batch; `generate` continues from a copy of it."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(
            input_ids=batch["input_ids"][:, :-1],
            attention_mask=batch["attention_mask"][:, :-1],
            position_ids=positions(batch["attention_mask"][:, :-1]),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return cache


def continue_from(model, tokenizer, batch: dict, cache: DynamicCache, processor, max_new_tokens: int):
    """Greedy `generate` of the NBCE batch with ``processor``, from a copy of its shared prefill (`generate`'s output
    with ``sequences`` and the final ``past_key_values``)."""
    with torch.inference_mode():
        return model.generate(**batch, past_key_values=copy.deepcopy(cache), logits_processor=[processor],
                              do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                              return_dict_in_generate=True)  # fmt: skip
