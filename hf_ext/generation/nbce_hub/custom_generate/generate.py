"""NBCE (Naive Bayes-based Context Extension) as a `custom_generate` method for transformers' `generate`.

A causal LM reads many contexts whose total exceeds its window: each context in its own batch row, row 0 the
question alone; each step the rows' next-token distributions are combined by Naive Bayes,
``(1 + beta) * Pool_k[log p(T | S_k)] - beta * log p(T)`` (entropy pooling: the most confident context, with a
stickiness bonus), and ONE token is appended to every row.

Use (from a Hub repo holding this folder, or a local copy of it):

    out = model.generate(custom_generate="<repo or folder>", trust_remote_code=True, tokenizer=tokenizer,
                         contexts=["...", "..."], question="...", max_new_tokens=64)
    answer = tokenizer.decode(out[0, -64:], skip_special_tokens=True)  # or pass a prebuilt batch (see `generate`)

This file is self-contained (torch + transformers only) so that it works from the Hub; the hf_ext package imports
its NBCE core from here (`hf_ext.generation.nbce`), so there is one implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList

POOLINGS = ("entropy", "mean", "max")


# The nucleus is searched among each row's top candidates (a top-k, far cheaper than sorting the whole vocabulary):
# NUCLEUS_CANDIDATES to start, and a row whose nucleus goes past them gets GROWTH times more, alone, until it fits.
NUCLEUS_CANDIDATES = 256
GROWTH = 4


def _top_p_mask_sorted(logp: Tensor, top_p: float) -> Tensor:
    """`_top_p_mask` by a full sort of every row (the compiled path: no data-dependent loop)."""
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    cumulative = sorted_logp.exp().cumsum(dim=-1)
    drop_sorted = (cumulative - sorted_logp.exp()) >= top_p  # keep a token while the mass before it is < top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logp.masked_fill(drop, -torch.inf)


def _in_nucleus(values: Tensor, top_p: float) -> Tensor:
    """Which of each row's best-first candidates lie in its nucleus: a token is kept while the mass before it is
    < ``top_p``."""
    probs = values.exp()
    return (probs.cumsum(dim=-1) - probs) < top_p


def _widen(values: Tensor, index: Tensor, keep: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Candidates ``(values, index)`` with the values past the nucleus set to -inf, padded to ``width``: -inf values
    at the row's last candidate's index (outside its nucleus, so a scatter there writes -inf over -inf)."""
    values = values.masked_fill(~keep, -torch.inf)
    extra = width - values.shape[-1]
    values = torch.cat([values, values.new_full((values.shape[0], extra), -torch.inf)], dim=-1)
    return values, torch.cat([index, index[:, -1:].expand(-1, extra)], dim=-1)


def _nucleus_candidates(logp: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """Each row's nucleus among its best tokens: ``(values, index)`` of shape ``(rows, width)``, best first, the
    values -inf past the row's nucleus (its index there repeats a token already outside it, so a scatter of the
    pair writes -inf only where the row has -inf).

    Every row starts with `NUCLEUS_CANDIDATES`; a row whose last candidate is still inside its nucleus gets
    `GROWTH` times more, alone (the other rows are not searched again), until it ends inside them: then the
    prefix sums are those of a full sort, and so is the set. ``width`` is the largest row's candidate count.
    """
    vocab = logp.shape[-1]
    k = min(NUCLEUS_CANDIDATES, vocab)
    values, index = logp.topk(k, dim=-1)  # (rows, k), best first
    keep = _in_nucleus(values, top_p)
    pending = keep[:, -1].nonzero().flatten() if k < vocab else keep.new_zeros(0, dtype=torch.long)
    grown: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # (rows, values, index, keep) of the regrown rows
    while pending.numel():
        k = min(GROWTH * k, vocab)
        more_values, more_index = logp.index_select(0, pending).topk(k, dim=-1)
        more_keep = _in_nucleus(more_values, top_p)
        done = ~more_keep[:, -1] if k < vocab else torch.ones_like(more_keep[:, -1])
        grown.append((pending[done], more_values[done], more_index[done], more_keep[done]))
        pending = pending[~done]
    if not grown:
        return values.masked_fill(~keep, -torch.inf), index
    width = grown[-1][1].shape[-1]
    values, index = _widen(values, index, keep, width)
    for rows, more_values, more_index, more_keep in grown:
        more_values, more_index = _widen(more_values, more_index, more_keep, width)
        values, index = values.index_copy(0, rows, more_values), index.index_copy(0, rows, more_index)
    return values, index


def _dense(values: Tensor, index: Tensor, vocab: int) -> Tensor:
    """The rows of `_nucleus_candidates` over the whole vocabulary (-inf outside each nucleus)."""
    return values.new_full((*values.shape[:-1], vocab), -torch.inf).scatter(-1, index, values)


def _top_p_mask(logp: Tensor, top_p: float) -> Tensor:
    """-inf outside each row's nucleus: the smallest set of tokens whose probability reaches ``top_p`` (eager: from
    `_nucleus_candidates`, without sorting the vocabulary; compiled: a full sort, no data-dependent loop)."""
    if top_p >= 1.0:
        return logp
    if torch.compiler.is_compiling():
        return _top_p_mask_sorted(logp, top_p)
    return _dense(*_nucleus_candidates(logp, top_p), logp.shape[-1])


def _entropies(conditionals: Tensor) -> Tensor:
    """Entropy of each row renormalised within its nucleus, in float64: rows a float32 sum could not tell apart
    (nearly flat distributions) keep the order of their exact entropies, however many -inf entries a row carries."""
    probs = torch.softmax(conditionals.double(), dim=-1)  # renormalised within each nucleus
    return -(probs * torch.where(probs > 0, probs.log(), torch.zeros_like(probs))).sum(dim=-1)


def _lowest_entropy(entropy: Tensor, eta: float, previous: Tensor | int | None) -> Tensor:
    """The context (1-based, a 0-d tensor) of lowest entropy, the previously chosen one with a bonus of ``eta``."""
    if previous is not None:  # stickiness: the previously chosen context gets an entropy bonus of eta
        rows = torch.arange(1, entropy.shape[0] + 1, device=entropy.device)
        entropy = entropy - eta * (rows == previous).to(entropy.dtype)
    return entropy.argmin() + 1


def _pool_local(
    conditionals: Tensor, pooling: str, eta: float, previous: Tensor | int | None
) -> tuple[Tensor, Tensor | None]:
    """Pool the context rows; entropy pooling also returns the chosen context (1-based, a 0-d tensor).

    Tensor-only (no ``.item()``, no data-dependent Python branch), so it traces into one `torch.compile` graph.
    """
    if pooling == "entropy":
        chosen = _lowest_entropy(_entropies(conditionals), eta, previous)
        return conditionals.index_select(0, chosen.view(1) - 1)[0], chosen
    if pooling == "mean":
        return conditionals.mean(dim=0), None
    if pooling == "max":
        return conditionals.max(dim=0).values, None
    raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}.")


def _pool_sharded(
    conditionals: Tensor,
    pooling: str,
    eta: float,
    previous: Tensor | int | None,
    offset: int,
    vocab: int,
    entropy: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Pool the context rows of every process; only per-row statistics and one vocabulary row cross processes.

    ``conditionals`` holds this process's rows, the contexts ``offset + 1 .. offset + n_local`` (global 1-based).
    """
    import torch.distributed as dist

    previous = None if previous is None else int(previous)

    n_local = conditionals.shape[0]
    device = conditionals.device
    if pooling == "entropy":
        if n_local:
            entropy = _entropies(conditionals) if entropy is None else entropy.clone()
            if previous is not None and offset < previous <= offset + n_local:
                entropy[previous - 1 - offset] -= eta
            local = torch.stack(
                [
                    entropy.min().double(),
                    torch.tensor(offset + int(entropy.argmin()) + 1.0, device=device, dtype=torch.float64),
                ]
            )
        else:
            local = torch.tensor([torch.inf, torch.inf], dtype=torch.float64, device=device)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        table = torch.stack(gathered)  # (ranks, 2): lowest entropy first, then lowest global index on ties
        best = min(range(len(gathered)), key=lambda r: (float(table[r, 0]), float(table[r, 1])))
        chosen = int(table[best, 1])
        row = (
            conditionals[chosen - 1 - offset].contiguous()
            if best == dist.get_rank()
            else torch.empty(vocab, dtype=conditionals.dtype, device=device)
        )
        dist.broadcast(row, src=best)
        return row, torch.tensor(chosen, device=device)
    if pooling == "mean":
        total = conditionals.sum(dim=0) if n_local else torch.zeros(vocab, dtype=conditionals.dtype, device=device)
        count = torch.tensor([float(n_local)], dtype=conditionals.dtype, device=device)
        dist.all_reduce(total)
        dist.all_reduce(count)
        return total / count, None
    if pooling == "max":
        local_max = conditionals.max(dim=0).values if n_local else torch.full((vocab,), -torch.inf, device=device)
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX)
        return local_max, None
    raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}.")


def nbce_combine(
    logits: Tensor,
    *,
    beta: float = 0.25,
    pooling: str = "entropy",
    eta: float = 0.1,
    top_p: float = 0.95,
    previous: Tensor | int | None = None,
    shard_offset: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Combine one step's next-token logits of the NBCE rows into one log-distribution.

    Args:
        logits (`torch.Tensor` of shape `(1 + n_contexts, vocab)`): row 0 without context, row k with context k.
        beta (`float`, *optional*, defaults to `0.25`): weight of the context-free prior, > -1.
        pooling (`str`, *optional*, defaults to `"entropy"`): ``entropy`` (lowest-entropy context; the entropy of
            each row's nucleus renormalised to sum to 1, where the author's script uses the raw truncated
            probabilities: the two can pick different contexts), ``mean`` (average log-probability: PCW-like) or
            ``max``.
        eta (`float`, *optional*, defaults to `0.1`): entropy bonus of the previously chosen context (entropy).
        top_p (`float`, *optional*, defaults to `0.95`): nucleus truncation of every row before combining.
        previous (`int` or 0-d `torch.Tensor`, *optional*): the context (1-based, global) chosen at the previous step.
        shard_offset (`int`, *optional*): set when the contexts are sharded across `torch.distributed` processes:
            this process's rows 1..n are the global contexts ``shard_offset + 1 ..``; every process must call.

    Returns:
        ``(combined, chosen)``: the combined log-scores ``(vocab,)`` (-inf outside the pooled nucleus) and the
        context chosen by entropy pooling (global, 1-based, a 0-d tensor; None for mean / max). Without sharding it
        is tensor-only, so it compiles into one graph.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (rows, vocab)
    vocab = logp.shape[-1]
    if top_p < 1.0 and not torch.compiler.is_compiling():  # the nucleus from a top-k, entropies over it alone
        values, index = _nucleus_candidates(logp, top_p)
        if pooling == "entropy" and shard_offset is None:  # only the prior and the chosen row over the vocabulary
            chosen = _lowest_entropy(_entropies(values[1:]), eta, previous)
            rows = torch.stack([torch.zeros_like(chosen), chosen])
            prior, pooled = _dense(values.index_select(0, rows), index.index_select(0, rows), vocab)
        else:
            entropy = _entropies(values[1:]) if pooling == "entropy" else None
            logp = _dense(values, index, vocab)
            prior = logp[0]
            if shard_offset is None:
                pooled, chosen = _pool_local(logp[1:], pooling, eta, previous)
            else:
                pooled, chosen = _pool_sharded(logp[1:], pooling, eta, previous, shard_offset, vocab, entropy)
    else:
        logp = _top_p_mask(logp, top_p)
        prior, conditionals = logp[0], logp[1:]
        if shard_offset is None:
            pooled, chosen = _pool_local(conditionals, pooling, eta, previous)
        else:
            pooled, chosen = _pool_sharded(conditionals, pooling, eta, previous, shard_offset, vocab)
    return _merge(prior, pooled, beta), chosen


def _merge(prior: Tensor, pooled: Tensor, beta: float) -> Tensor:
    """``(1 + beta) * pooled - beta * prior``; where the context-free prior excludes a token (outside its nucleus),
    the pooled term alone."""
    return torch.where(torch.isfinite(prior), (1.0 + beta) * pooled - beta * prior, pooled)


class NBCELogitsProcessor(LogitsProcessor):
    r"""Make every batch row of `generate` emit the NBCE token: the one picked from the combined distribution.

    Batch row 0 must hold the question without context, rows 1..n one context each (see `nbce_generate`, which
    builds that batch). Each step the rows' logits are combined by `nbce_combine`, ONE token is picked (greedy, or
    sampled with this processor's own seeded generator) and every row's scores become 0 for that token and -inf
    elsewhere, so greedy decoding and sampling in `generate` both append it to every row.

    Args:
        beta (`float`, *optional*, defaults to `0.25`): prior weight, > -1 (0 ignores the context-free row).
        pooling (`str`, *optional*, defaults to `"entropy"`): ``entropy``, ``mean`` or ``max``.
        eta (`float`, *optional*, defaults to `0.1`): stickiness bonus of the previously chosen context, >= 0.
        top_p (`float`, *optional*, defaults to `0.95`): nucleus truncation of each row before combining, in (0, 1].
        temperature (`float`, *optional*, defaults to `1.0`): sampling temperature, > 0 (with ``do_sample``).
        do_sample (`bool`, *optional*, defaults to `False`): sample the token instead of taking the argmax.
        generator (`torch.Generator`, *optional*): the sampling generator (seed it for reproducible sampling).
        shard_contexts (`bool`, *optional*, defaults to `False`): the contexts are split across the processes of a
            `torch.distributed` group (each process: row 0 plus its own contexts, in global order by rank); per
            step only per-row entropies and one vocabulary row (entropy), or one reduced row (mean / max), cross
            processes, and every process gets the same token.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from hf_ext import smollm2_path  # the embedded SmolLM2-135M-Instruct; any causal LM works
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    >>> tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    >>> contexts = ["Paris is the capital of France.", "Rome is the capital of Italy."]
    >>> processor = NBCELogitsProcessor(beta=0.25)
    >>> # row 0: the question alone; rows 1..n: one context each
    >>> batch = nbce_batch(tokenizer, contexts, "What is the capital of Italy?")
    >>> out = model.generate(**batch, logits_processor=[processor], max_new_tokens=2)
    >>> new = out[:, batch["input_ids"].shape[1]:]
    >>> bool((new == new[0]).all())  # every row got the same tokens
    True
    >>> "Rome" in tokenizer.decode(new[0], skip_special_tokens=True)
    True

    ```
    """

    def __init__(
        self,
        beta: float = 0.25,
        pooling: str = "entropy",
        eta: float = 0.1,
        top_p: float = 0.95,
        temperature: float = 1.0,
        do_sample: bool = False,
        generator: torch.Generator | None = None,
        shard_contexts: bool = False,
    ) -> None:
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > -1 or not math.isfinite(beta):
            raise ValueError(f"`beta` must be a finite number > -1, got {beta!r}.")
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}.")
        if not isinstance(eta, (int, float)) or not eta >= 0:
            raise ValueError(f"`eta` must be a number >= 0, got {eta!r}.")
        if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}.")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
        self.beta, self.pooling, self.eta, self.top_p = float(beta), pooling, float(eta), float(top_p)
        self.temperature, self.do_sample, self.generator = float(temperature), bool(do_sample), generator
        if shard_contexts:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("`shard_contexts=True` needs an initialised torch.distributed process group.")
        self.shard_contexts = bool(shard_contexts)
        self._chosen: list[Tensor | None] = []  # per generated token: the context entropy pooling used
        self._length: int | None = None
        self._offset: int | None = None  # sharded: global index of this process's first context, minus one

    @property
    def chosen_contexts(self) -> list[int | None]:
        """Per generated token, the context (1-based) entropy pooling took it from (None for mean / max)."""
        return [None if chosen is None else int(chosen) for chosen in self._chosen]

    def _pick(self, combined: Tensor) -> Tensor:
        if not self.do_sample:
            return combined.argmax()
        probs = torch.softmax(combined / self.temperature, dim=-1)
        device = self.generator.device if self.generator is not None else probs.device
        return torch.multinomial(probs.to(device), 1, generator=self.generator)[0].to(combined.device)

    def _shard_offset(self, n_local: int, device: torch.device) -> int:
        import torch.distributed as dist

        counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, torch.tensor([n_local], dtype=torch.long, device=device))
        return int(sum(int(c) for c in counts[: dist.get_rank()]))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] < (1 if self.shard_contexts else 2):
            raise ValueError(
                "NBCE needs a batch of 1 + n_contexts rows (row 0: the question alone; rows 1..n: one context each), "
                f"got {scores.shape[0]} row(s). Build it with `nbce_generate` or `nbce_batch`."
            )
        # The checks on the rows' contents need their values on the host; under torch.compile they are skipped, so
        # the step traces into one graph (validate once in eager mode).
        checking = not torch.compiler.is_compiling()
        if self._length is None or input_ids.shape[1] <= self._length:  # a new generation
            self._chosen = []
            if self.shard_contexts:
                self._offset = self._shard_offset(scores.shape[0] - 1, scores.device)
            if checking and torch.unique(input_ids, dim=0).shape[0] < input_ids.shape[0]:
                raise ValueError(
                    "Two NBCE rows are identical: beam search (num_beams > 1) copies every row, which NBCE does not "
                    "support (use greedy decoding or sampling), or the same context was passed twice."
                )
        elif checking and not bool((input_ids[:, -1] == input_ids[0, -1]).all()):
            raise ValueError(
                "The batch rows diverged: NBCE forces one token into every row, which beam search (num_beams > 1) "
                "and per-row stopping break. Use greedy decoding or sampling with num_beams=1."
            )
        self._length = input_ids.shape[1]
        previous = self._chosen[-1] if self._chosen else None
        combined, chosen = nbce_combine(
            scores, beta=self.beta, pooling=self.pooling, eta=self.eta, top_p=self.top_p, previous=previous,
            shard_offset=self._offset if self.shard_contexts else None,
        )  # fmt: skip
        self._chosen.append(chosen)
        token = self._pick(combined)  # 0-d long tensor
        if self.shard_contexts:  # every process appends the same token (sampling: rank 0's draw)
            import torch.distributed as dist

            picked = token.view(1).clone()
            dist.broadcast(picked, src=0)
            token = picked[0]
        return torch.full_like(scores, -torch.inf).index_fill_(1, token.view(1), 0.0)


def check_contexts(contexts: Sequence[str], *, allow_no_context: bool = False) -> None:
    """Refuse what NBCE cannot read: not a list of strings, an empty context, a context given twice."""
    if isinstance(contexts, str) or not isinstance(contexts, Sequence) or (len(contexts) == 0 and not allow_no_context):
        raise ValueError("`contexts` must be a non-empty list of strings.")
    for index, context in enumerate(contexts):
        if not isinstance(context, str) or not context.strip():
            raise ValueError(f"`contexts[{index}]` is empty: every context must be a non-empty string.")
    if len(set(contexts)) < len(contexts):
        raise ValueError("`contexts` holds the same context twice: pass each context once.")


def check_question(question: str) -> None:
    """Refuse a question that is not a non-empty string."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("`question` must be a non-empty string.")


def nbce_batch(
    tokenizer,
    contexts: Sequence[str],
    question: str,
    *,
    chat_template: bool = True,
    prompt_template: str = "{context}\n\n{question}",
    question_template: str = "{question}",
    max_context_tokens: int | None = None,
    allow_no_context: bool = False,
) -> dict[str, Tensor]:
    """The NBCE batch: row 0 the question alone, row k context k with the question; left-padded.

    With ``chat_template`` (and a tokenizer that has one), each row is one user message rendered with the
    tokenizer's chat template and the generation prompt; otherwise the plain templates are used as they are.
    ``allow_no_context`` admits an empty ``contexts`` (row 0 only: a process whose share of sharded contexts is
    empty).
    """
    check_contexts(contexts, allow_no_context=allow_no_context)
    check_question(question)
    messages = [question_template.format(question=question)] + [
        prompt_template.format(context=context, question=question) for context in contexts
    ]
    use_chat = chat_template and getattr(tokenizer, "chat_template", None)
    rows = []
    for text in messages:
        if use_chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        rows.append(list(ids))
    if max_context_tokens is not None:
        for index, ids in enumerate(rows[1:], start=1):
            if len(ids) > max_context_tokens:
                raise ValueError(
                    f"`contexts[{index - 1}]` makes a prompt of {len(ids)} tokens, more than the model's window "
                    f"({max_context_tokens}): split it first with `split_into_windows`."
                )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token: set `tokenizer.pad_token`.")
    longest = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[pad_id] * (longest - len(ids)) + ids for ids in rows])
    attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class FirstRowStreamer:
    """Pass row 0 of each step to a transformers streamer (they accept one sequence; all rows are equal)."""

    def __init__(self, streamer: Any) -> None:
        self.streamer = streamer

    def put(self, value: Tensor) -> None:
        self.streamer.put(value[:1])  # the prompt (rows, len) -> (1, len); a step's tokens (rows,) -> (1,)

    def end(self) -> None:
        self.streamer.end()


def generate(
    model,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    logits_processor: LogitsProcessorList | None = None,
    *,
    tokenizer=None,
    contexts: Sequence[str] | None = None,
    question: str | None = None,
    nbce_beta: float = 0.25,
    nbce_pooling: str = "entropy",
    nbce_eta: float = 0.1,
    nbce_top_p: float = 0.95,
    nbce_temperature: float = 1.0,
    nbce_do_sample: bool = False,
    nbce_generator: torch.Generator | None = None,
    streamer: Any = None,
    **kwargs: Any,
) -> Tensor:
    """NBCE decoding through `model.generate(custom_generate=..., trust_remote_code=True, ...)`.

    Either pass ``tokenizer``, ``contexts`` and ``question`` (the batch is built with the tokenizer's chat
    template), or a prebuilt batch (``input_ids``, ``attention_mask``: row 0 the question alone, rows 1..n one
    context each, left-padded). ``nbce_*`` set the `NBCELogitsProcessor`; everything else goes to `generate`
    (``num_beams`` must be 1). Returns the token ids of every row (all rows carry the same answer).
    """
    if kwargs.get("num_beams", 1) not in (None, 1):
        raise ValueError("NBCE picks one token for all rows: `num_beams` must be 1 (greedy or sampling).")
    for key in ("generation_config", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask"):  # fmt: skip
        if kwargs.get(key) is None:
            kwargs.pop(key, None)
    if input_ids is None and kwargs.get("inputs") is not None:
        input_ids = kwargs.pop("inputs")
    kwargs.pop("inputs", None)
    if contexts is not None or question is not None:
        if tokenizer is None:
            raise ValueError("Pass `tokenizer` along with `contexts` and `question` to build the NBCE batch.")
        window = getattr(model.config, "max_position_embeddings", None)
        batch = nbce_batch(tokenizer, contexts or [], question or "", max_context_tokens=window)
        input_ids, attention_mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
    if input_ids is None:
        raise ValueError("Pass `tokenizer`, `contexts` and `question`, or a prebuilt NBCE batch as `input_ids`.")
    processor = NBCELogitsProcessor(
        beta=nbce_beta, pooling=nbce_pooling, eta=nbce_eta, top_p=nbce_top_p, temperature=nbce_temperature,
        do_sample=nbce_do_sample, generator=nbce_generator,
    )  # fmt: skip
    processors = LogitsProcessorList([*(logits_processor or []), processor])
    kwargs["do_sample"] = False  # the processor already picked (or sampled) the token
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logits_processor=processors,
        streamer=FirstRowStreamer(streamer) if streamer is not None else None,
        **kwargs,
    )
