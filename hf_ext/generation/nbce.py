"""NBCE: Naive Bayes-based Context Extension. A causal LM reads many contexts whose total exceeds its window.

Each context S_k is read in its own batch row; row 0 holds the question alone. Naive Bayes combines the rows'
next-token distributions: ``log p(T | S_1..S_n) ~ (1 + beta) * Pool_k[log p(T | S_k)] - beta * log p(T)``. Pooling
that works (the method's author's final choice): per step, the context whose distribution has the lowest entropy,
with a stickiness bonus ``eta`` for the context chosen at the previous step. ONE token is picked and appended to
every row, so all rows share the generated continuation.

The core (`nbce_combine`, `NBCELogitsProcessor`, `nbce_batch`) lives in the self-contained `custom_generate`
folder this package ships (`nbce_custom_generate_path()`), so that the same code runs from the Hub; this module
adds the `nbce_generate` wrapper and `split_into_windows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_ext.generation.nbce_cache import NBCEContextCache
from hf_ext.generation.nbce_hub.custom_generate.generate import (
    POOLINGS,
    FirstRowStreamer,
    NBCELogitsProcessor,
    nbce_batch,
    nbce_combine,
)

__all__ = [
    "POOLINGS",
    "NBCEContextCache",
    "NBCELogitsProcessor",
    "nbce_batch",
    "nbce_combine",
    "nbce_custom_generate_path",
    "nbce_generate",
    "split_into_windows",
]


def nbce_custom_generate_path() -> Path:
    """The folder to pass as ``custom_generate=`` (or to upload to a Hub repo as is): it holds
    ``custom_generate/generate.py``.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from hf_ext import smollm2_path
    >>> from hf_ext.generation import nbce_custom_generate_path
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    >>> tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    >>> contexts = ["Paris is the capital of France.", "Rome is the capital of Italy."]
    >>> out = model.generate(custom_generate=str(nbce_custom_generate_path()), trust_remote_code=True,
    ...                      tokenizer=tokenizer, contexts=contexts, question="What is the capital of Italy?",
    ...                      max_new_tokens=2)
    >>> "Rome" in tokenizer.decode(out[0, -2:], skip_special_tokens=True)  # every row carries the answer
    True

    ```
    """
    return Path(__file__).resolve().parent / "nbce_hub"


def nbce_generate(
    model,
    tokenizer,
    contexts: Sequence[str],
    question: str,
    *,
    beta: float = 0.25,
    pooling: str = "entropy",
    eta: float = 0.1,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    streamer: Any = None,
    chat_template: bool = True,
    prompt_template: str = "{context}\n\n{question}",
    question_template: str = "{question}",
    return_processor: bool = False,
    shard_contexts: bool = False,
    context_cache: NBCEContextCache | None = None,
    **generate_kwargs: Any,
) -> str | tuple[str, NBCELogitsProcessor]:
    """Answer ``question`` from ``contexts`` whose total length may exceed the model's window.

    Builds the NBCE batch (`nbce_batch`: left padding; `generate` derives position ids from the attention mask,
    so absolute-position models work too), then runs `model.generate` with the KV cache and an
    `NBCELogitsProcessor`; stops at EOS or ``max_new_tokens``. Every context must fit the window on its own (split
    a long document with `split_into_windows`).

    Args:
        model (`PreTrainedModel`): a causal LM.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (a missing pad token falls back to EOS).
        contexts (`list[str]`): the contexts, one batch row each.
        question (`str`): the question (or instruction).
        beta (`float`, *optional*, defaults to `0.25`): weight of the context-free prior (`NBCELogitsProcessor`).
        pooling (`str`, *optional*, defaults to `"entropy"`): ``entropy``, ``max`` or ``mean``.
        eta (`float`, *optional*, defaults to `0.1`): entropy bonus of the previously chosen context.
        top_p (`float`, *optional*, defaults to `0.95`): nucleus truncation of every row before combining.
        do_sample (`bool`, *optional*, defaults to `False`): sample from the combined distribution.
        temperature (`float`, *optional*, defaults to `1.0`): sampling temperature.
        generator (`torch.Generator`, *optional*): the sampling generator.
        max_new_tokens (`int`, *optional*, defaults to `128`): the answer's length limit.
        streamer (*optional*): a transformers streamer (e.g. `TextStreamer(tokenizer, skip_prompt=True)`).
        chat_template (`bool`, *optional*, defaults to `True`): render each row as a user message.
        prompt_template (`str`, *optional*, defaults to `"{context}\\n\\n{question}"`): the text of rows 1..n.
        question_template (`str`, *optional*, defaults to `"{question}"`): the text of row 0.
        return_processor (`bool`, *optional*, defaults to `False`): also return the processor (its
            ``chosen_contexts`` tells which context each token came from).
        shard_contexts (`bool`, *optional*, defaults to `False`): under `accelerate launch` / `torchrun`, every
            process passes the same ``contexts`` and keeps only its contiguous share (memory grows with the number
            of contexts, so each process holds 1 / world_size of the rows); all processes return the same answer,
            the one a single process would give.
        context_cache (`NBCEContextCache`, *optional*): the contexts' KV states kept across calls: they are
            prefilled when the cache does not hold these ``contexts`` yet (or holds others), and reused otherwise, so
            a second question over the same contexts prefills only its own tokens. Its templates are used (pass the
            same ``chat_template`` / ``prompt_template`` / ``question_template``, or leave them at their defaults).
        **generate_kwargs: passed to `generate` (``num_beams`` > 1 is refused).

    Returns:
        `str`: the decoded answer (special tokens skipped).

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from hf_ext import smollm2_path
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    >>> tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    >>> from hf_ext.generation import nbce_generate
    >>> answer, processor = nbce_generate(model, tokenizer, ["Paris is the capital of France.", "Rome is in Italy."],
    ...                                   "What is the capital of France?", max_new_tokens=2, return_processor=True)
    >>> answer
    'Paris...'
    >>> processor.chosen_contexts  # the context each token came from (1-based)
    [1, 1]

    ```
    """
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError("NBCE picks one token for all rows: `num_beams` must be 1 (greedy or sampling).")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be an int >= 1, got {max_new_tokens!r}.")
    window = getattr(model.config, "max_position_embeddings", None)
    if shard_contexts:
        contexts = _local_share(contexts)
    if context_cache is not None:
        if context_cache.model is not model:
            raise ValueError("`context_cache` was built for another model: build one with this model.")
        templates = {"chat_template": chat_template, "prompt_template": prompt_template,
                     "question_template": question_template}  # fmt: skip
        if templates != context_cache.templates:
            raise ValueError(f"`context_cache` was built with {context_cache.templates}, not {templates}: pass the "
                             "cache's templates or build another cache.")  # fmt: skip
        context_cache.read(contexts, allow_no_context=shard_contexts)
        batch = context_cache.inputs(question)
    else:
        batch = nbce_batch(
            tokenizer, contexts, question, allow_no_context=shard_contexts, chat_template=chat_template,
            prompt_template=prompt_template, question_template=question_template, max_context_tokens=window,
        )  # fmt: skip
        batch = {key: value.to(model.device) for key, value in batch.items()}
    processor = NBCELogitsProcessor(
        beta=beta, pooling=pooling, eta=eta, top_p=top_p, temperature=temperature, do_sample=do_sample,
        generator=generator, shard_contexts=shard_contexts,
    )  # fmt: skip
    eos = generate_kwargs.pop("eos_token_id", None) or model.generation_config.eos_token_id or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        **batch,
        logits_processor=[processor],
        do_sample=False,  # the processor already picked (and, with do_sample, sampled) the token
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        streamer=FirstRowStreamer(streamer) if streamer is not None else None,
        **generate_kwargs,
    )
    answer = tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return (answer, processor) if return_processor else answer


def _local_share(contexts: Sequence[str]) -> list[str]:
    """This process's contiguous share of ``contexts`` (the first processes take one more when it does not divide)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("`shard_contexts=True` needs an initialised torch.distributed process group.")
    if isinstance(contexts, str) or not isinstance(contexts, Sequence) or len(contexts) == 0:
        raise ValueError("`contexts` must be a non-empty list of strings.")
    rank, world = dist.get_rank(), dist.get_world_size()
    size, extra = divmod(len(contexts), world)
    start = rank * size + min(rank, extra)
    return list(contexts[start : start + size + (rank < extra)])


def split_into_windows(text: str, tokenizer, window: int, overlap: int = 0) -> list[str]:
    """Split one long document into overlapping pieces of at most ``window`` tokens (NBCE contexts).

    The pieces are cut on the tokenizer's tokens and decoded back to text. Re-tokenising a piece normally gives the
    same tokens (all 4,183 pieces of 200 BBC articles at windows 32 and 192 did), but a byte-level tokenizer may merge
    differently at a cut (seen on a text ending in a space), so a piece can come back a token longer: leave a token
    of margin below the model's window (`nbce_generate` refuses a context past it, never truncates it).

    Args:
        text (`str`): the document.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer (pieces are cut on its tokens and decoded back
            to text).
        window (`int`): tokens per piece, >= 1.
        overlap (`int`, *optional*, defaults to `0`): tokens shared by consecutive pieces, in [0, window).

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> from hf_ext import smollm2_path
    >>> from hf_ext.generation import split_into_windows
    >>> tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    >>> long_report = " ".join(["Paris is the capital of France. Rome is the capital of Italy."] * 10)  # 140 tokens
    >>> pieces = split_into_windows(long_report, tokenizer, window=32, overlap=8)  # e.g. window=1024, overlap=128
    >>> [len(tokenizer(piece, add_special_tokens=False)["input_ids"]) for piece in pieces]
    [32, 32, 32, 32, 32, 20]

    ```
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("`text` must be a non-empty string.")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"`window` must be an int >= 1, got {window!r}.")
    if not isinstance(overlap, int) or not 0 <= overlap < window:
        raise ValueError(f"`overlap` must be an int in [0, window), got {overlap!r}.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = window - overlap
    starts = range(0, max(len(ids) - overlap, 1), step)
    return [tokenizer.decode(ids[start : start + window]) for start in starts]
