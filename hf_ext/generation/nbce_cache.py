"""The contexts' KV states read once and reused for every question asked about them (NBCE's prefill, cached).

NBCE reads each context in its own batch row and appends the question after it. When many questions are asked about
the same contexts, every row's context part is the same each time: `NBCEContextCache` prefills it once and each
question prefills only its own tokens on top (the question and the chat template's closing tokens), so the time to
the first token no longer grows with the contexts' length.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hf_ext.generation.nbce_hub.custom_generate.generate import check_contexts, check_question, nbce_batch

__all__ = ["NBCEContextCache"]

_MARK = "\ue000question\ue000"  # a private-use mark where the question goes when the chat template is rendered


def _split_template(template: str, name: str) -> tuple[str, str]:
    """A row template cut where the question begins (the context must come before it)."""
    if template.count("{question}") != 1:
        raise ValueError(f"`{name}` must hold `{{question}}` exactly once, got {template!r}.")
    head, tail = template.split("{question}")
    if "{context}" in tail:
        raise ValueError(f"`{name}` must put `{{context}}` before `{{question}}` got {template!r}.")
    return head, tail


class NBCEContextCache:
    """The KV cache of NBCE's context rows, prefilled once and reused across questions.

    The rows are `nbce_batch`'s (row 0 ``question_template``, the question alone; row k ``prompt_template`` with
    context k), token for token. Each row's tokens before the question (the chat template's opening and the context,
    less the last token, which the question's first characters may tokenize differently) are prefilled once per
    context set, left-padded, and kept. For a question, only the rest of each row is new: it is appended after the
    kept part (padding between them where rows' rests differ in length), with the positions the uncached row has,
    so `generate` computes the answer of the uncached batch (up to floating-point rounding of the split prefill).

    The cache is read again only when the contexts change (`read`); ``reads`` counts the prefills. Each question
    continues from a shallow copy of the kept cache: the kept key / value tensors are shared, never written (a
    `DynamicCache` grows by concatenation), so a question adds only its own tokens' states.

    Args:
        model (`PreTrainedModel`): a causal LM (kept: the cache belongs to it).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (a missing pad token falls back to EOS).
        chat_template (`bool`, *optional*, defaults to `True`): render each row as a user message, as in
            `nbce_batch`.
        prompt_template (`str`, *optional*, defaults to `"{context}\\n\\n{question}"`): the text of rows 1..n;
            ``{context}`` must come before ``{question}``.
        question_template (`str`, *optional*, defaults to `"{question}"`): the text of row 0.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from hf_ext import smollm2_path
    >>> from hf_ext.generation import NBCEContextCache, nbce_generate
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    >>> tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    >>> contexts = ["Paris is the capital of France.", "Rome is the capital of Italy."]
    >>> cache = NBCEContextCache(model, tokenizer)
    >>> answers = [nbce_generate(model, tokenizer, contexts, question, context_cache=cache, max_new_tokens=2)
    ...            for question in ["What is the capital of France?", "What is the capital of Italy?"]]
    >>> ["Paris" in answers[0], "Rome" in answers[1]]
    [True, True]
    >>> cache.reads  # the contexts were prefilled once
    1

    ```
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        chat_template: bool = True,
        prompt_template: str = "{context}\n\n{question}",
        question_template: str = "{question}",
    ) -> None:
        self._head, self._tail = _split_template(prompt_template, "prompt_template")
        self._head0, self._tail0 = _split_template(question_template, "question_template")
        self.model, self.tokenizer = model, tokenizer
        self.templates = {"chat_template": chat_template, "prompt_template": prompt_template,
                          "question_template": question_template}  # fmt: skip
        self._chat = bool(chat_template and getattr(tokenizer, "chat_template", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token: set `tokenizer.pad_token`.")
        self.window = getattr(model.config, "max_position_embeddings", None)
        forward = inspect.signature(model.forward).parameters
        self._cache_key = "cache" if "cache" in forward else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in forward
        self.contexts: tuple[str, ...] | None = None
        self.reads = 0
        self._cache: Any = None
        self._prefixes: list[list[int]] = []  # each row's kept tokens
        self._ids: Tensor | None = None  # (rows, kept) the kept tokens, left-padded
        self._mask: Tensor | None = None  # (rows, kept)

    def _batch(self, contexts: Sequence[str], question: str) -> list[list[int]]:
        """`nbce_batch`'s rows for ``question``, unpadded."""
        batch = nbce_batch(self.tokenizer, contexts, question, allow_no_context=True, max_context_tokens=self.window,
                           **self.templates)  # fmt: skip
        return [
            ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]

    def _before_question(self, head: str, tail: str) -> list[int]:
        """The tokens of a row's text before the question, tokenized alone."""
        if not self._chat:
            return list(self.tokenizer(head)["input_ids"])
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": head + _MARK + tail}], add_generation_prompt=True, tokenize=False
        )
        if rendered.count(_MARK) != 1:
            raise ValueError("The tokenizer's chat template rewrites the message: pass `chat_template=False`.")
        return list(self.tokenizer(rendered.split(_MARK)[0], add_special_tokens=False)["input_ids"])

    def read(self, contexts: Sequence[str], *, allow_no_context: bool = False) -> bool:
        """Prefill the contexts' rows unless they are the ones already held; returns whether it read them.

        Args:
            contexts (`list[str]`): the contexts, one batch row each (every one must fit the model's window).
            allow_no_context (`bool`, *optional*, defaults to `False`): admit an empty list (row 0 only: a process
                whose share of sharded contexts is empty).
        """
        check_contexts(contexts, allow_no_context=allow_no_context)
        if self.contexts == tuple(contexts):
            return False
        probe = self._batch(contexts, "x")  # what a question's first characters leave of each row's beginning
        alone = [self._before_question(self._head0.format(), self._tail0.format())]
        alone += [
            self._before_question(self._head.format(context=context), self._tail.format()) for context in contexts
        ]
        prefixes = [_common_prefix(row, before)[:-1] for row, before in zip(probe, alone, strict=True)]
        longest = max(len(ids) for ids in prefixes)
        device = self.model.device
        ids = torch.tensor([[self.pad_id] * (longest - len(row)) + row for row in prefixes], device=device)
        mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in prefixes], device=device)
        cache = _new_cache(self.model)
        kwargs = {self._cache_key: cache, "use_cache": True, **({"logits_to_keep": 1} if self._logits_to_keep else {})}
        with torch.no_grad():
            self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kwargs)
        self._cache, self._prefixes, self._ids, self._mask = cache, prefixes, ids, mask
        self.contexts, self.reads = tuple(contexts), self.reads + 1
        return True

    def inputs(self, question: str, contexts: Sequence[str] | None = None) -> dict[str, Any]:
        """The `generate` inputs for one question: ``input_ids`` and ``attention_mask`` of the whole rows, and the
        cache of their kept part (under the name the model's `forward` takes: ``cache`` or ``past_key_values``).

        Args:
            question (`str`): the question.
            contexts (`list[str]`, *optional*): read these first (a no-op when they are the ones held).

        Example:

        ```python
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> from hf_ext import smollm2_path
        >>> from hf_ext.generation import NBCEContextCache, NBCELogitsProcessor
        >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())
        >>> tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
        >>> cache = NBCEContextCache(model, tokenizer)
        >>> inputs = cache.inputs("What is the capital of Italy?", ["Paris is the capital of France.",
        ...                                                         "Rome is the capital of Italy."])
        >>> inputs["input_ids"].shape[0], cache.num_tokens  # 1 + 2 rows; 30 positions per row kept
        (3, 30)
        >>> out = model.generate(**inputs, logits_processor=[NBCELogitsProcessor()], max_new_tokens=2)
        >>> "Rome" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        True

        ```
        """
        if contexts is not None:
            self.read(contexts)
        if self.contexts is None:
            raise ValueError("The cache holds no contexts yet: call `read(contexts)` or pass `contexts=`.")
        check_question(question)
        rests = []
        for index, (row, prefix) in enumerate(zip(self._batch(self.contexts, question), self._prefixes, strict=True)):
            if row[: len(prefix)] != prefix:
                raise ValueError(f"Row {index} tokenizes its context differently before this question: ask it "
                                 "without `context_cache`.")  # fmt: skip
            rests.append(row[len(prefix) :])
        width = max(len(rest) for rest in rests)
        device = self._ids.device
        new = torch.tensor([[self.pad_id] * (width - len(rest)) + rest for rest in rests], device=device)
        new_mask = torch.tensor([[0] * (width - len(rest)) + [1] * len(rest) for rest in rests], device=device)
        return {
            "input_ids": torch.cat([self._ids, new], dim=1),
            "attention_mask": torch.cat([self._mask, new_mask], dim=1),
            self._cache_key: _shared_copy(self._cache),
        }

    @property
    def nbytes(self) -> int:
        """Bytes of the kept key / value tensors (0 before the first `read`)."""
        return sum(tensor.numel() * tensor.element_size() for tensor in _cache_tensors(self._cache))

    @property
    def num_tokens(self) -> int:
        """Positions kept per row (the longest row's; shorter rows are left-padded)."""
        return 0 if self._ids is None else int(self._ids.shape[1])


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    size = 0
    while size < min(len(a), len(b)) and a[size] == b[size]:
        size += 1
    return a[:size]


def _new_cache(model) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _cache_tensors(cache: Any) -> list[Tensor]:
    if cache is None:
        return []
    tensors = []
    for layer in cache.layers:
        tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, Tensor)]
    return tensors


def _shared_copy(cache: Any) -> Any:
    """A copy of the cache's structure that shares its key / value tensors: `DynamicCache` layers grow by
    concatenation into new tensors, so generation never writes the shared ones."""
    return copy.deepcopy(cache, memo={id(tensor): tensor for tensor in _cache_tensors(cache)})
