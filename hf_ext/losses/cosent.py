"""CoSENT: a ranking loss over every pair of scored pairs in a batch, in O(B log B) time and O(B) memory.

``loss = log(1 + sum over (i, j) with label_i > label_j of exp(scale * (s_j - s_i)))``, optionally restricted to
pairs (i, j) that share a group id. Only the order of the labels matters: 0/1 labels, 0-5 similarity scores
and NLI classes ordered contradiction < neutral < entailment all work.

Instead of the B x B matrix of differences, the scores are sorted by (group, label); for every i, the pairs with
a strictly higher label in its group form one contiguous run, whose ``logsumexp(-scale * s)`` is read off a
suffix ``logcumsumexp``. Ties (equal labels) contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses import gradcache as _gradcache
from sentence_transformers.base.losses.gradcache import CachedLossMixin
from sentence_transformers.base.losses.merged_forward import embed_columns, merge_feature_batches
from sentence_transformers.sentence_transformer.losses import CoSENTLoss as _STCoSENTLoss
from sentence_transformers.util import pairwise_cos_sim, similarity_fct_name
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from hf_ext.distributed import all_gather_with_grad

__all__ = ["CachedCoSENTLoss", "CoSENTLoss", "cosent_loss"]

# sentence-transformers >= 6.2 replays GradCache mini-batches under DDP's no_sync() except the last one (one
# gradient all-reduce per step). 6.0/6.1 synchronise after every replay: ranks with different numbers of
# mini-batches then issue different numbers of collectives and deadlock or crash. CachedCoSENTLoss backports it.
_ST_REPLAYS_UNDER_NO_SYNC = hasattr(_gradcache, "_ddp_replay_context")

# How far apart (in log space, beyond the spread of the scores) consecutive groups are pushed in the shared
# suffix scan: a later group then adds at most exp(-64) (~1.6e-28) relative to a group's own terms, far below
# float64 resolution, so each group's suffix sums are exact to machine precision.
_GROUP_SEPARATION = 64.0


def check_scale(scale: float) -> None:
    """Refuse a CoSENT ``scale`` that is not a finite number > 0 (the inverse temperature)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0.0 < float(scale) < float("inf")):
        raise ValueError(f"`scale` must be a finite number > 0, got {scale!r}.")


def _check_finite(name: str, tensor: Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}` contains NaN or inf; CoSENT needs finite {name}.")


def _validate(scores: Tensor, labels: Tensor, scale: float, groups: Tensor | None) -> None:
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise ValueError(f"`scores` must be a floating-point tensor of shape (batch,), got {scores!r:.80}.")
    if scores.dim() != 1:
        raise ValueError(f"`scores` must have shape (batch,), got {tuple(scores.shape)}.")
    if not isinstance(labels, Tensor):
        raise ValueError(f"`labels` must be a tensor with one label per score, got {type(labels).__name__}.")
    if labels.numel() != scores.numel():
        raise ValueError(
            f"`labels` must hold one label per score: got {labels.numel()} labels for {scores.numel()} scores."
        )
    check_scale(scale)
    if groups is not None:
        if not isinstance(groups, Tensor) or groups.is_floating_point() or groups.is_complex():
            raise ValueError("`groups` must be an integer tensor with one group id per score.")
        if groups.numel() != scores.numel():
            raise ValueError(f"`groups` must hold one id per score: got {groups.numel()} for {scores.numel()} scores.")
    if scores.numel() == 0:
        raise ValueError("`scores` is empty: CoSENT needs at least one scored pair.")


def _runs(sorted_keys: list[Tensor]) -> Tensor:
    """Run ids (0, 0, 1, 1, 1, 2, ...) of consecutive equal tuples in already-sorted key columns."""
    change = torch.zeros_like(sorted_keys[0], dtype=torch.bool)
    for key in sorted_keys:
        change[1:] |= key[1:] != key[:-1]
    return torch.cumsum(change.long(), dim=0)


def cosent_loss(scores: Tensor, labels: Tensor, *, scale: float = 20.0, groups: Tensor | None = None) -> Tensor:
    """The CoSENT loss of a batch of scored pairs.

    Args:
        scores (`torch.Tensor` of shape `(batch,)`):
            One similarity per pair: a cosine for a bi-encoder, a logit for a cross-encoder. Any floating dtype;
            the loss is computed in float32 (float64 when ``groups`` is given, or for float64 input).
        labels (`torch.Tensor` with `batch` elements):
            Gold labels; only their order is used (floats, ints or bools).
        scale (`float`, *optional*, defaults to `20.0`):
            Inverse temperature lambda multiplying the scores: 20 for cosines, 1 for cross-encoder logits.
        groups (`torch.Tensor` with `batch` integer elements, *optional*):
            Group ids: when given, only pairs of the same group are compared (one group per query of a ranking
            list, or per source data set). Ids need not be contiguous or sorted.

    Returns:
        `torch.Tensor`: a scalar, ``log(1 + sum exp(scale * (s_low - s_high)))`` over every pair of scored
        pairs whose labels differ (within a group). 0 with zero gradients when no such pair exists.

    Example:

    ```python
    >>> import torch
    >>> scores = torch.tensor([0.9, 0.2, 0.5], requires_grad=True)
    >>> cosent_loss(scores, torch.tensor([5.0, 0.0, 3.0]))  # ordered correctly: small loss
    tensor(0.0028, grad_fn=<LogsumexpBackward0>)

    ```
    """
    _validate(scores, labels, scale, groups)
    labels = labels.reshape(-1)
    if labels.dtype == torch.bool:
        labels = labels.int()
    batch = scores.numel()
    compute_dtype = torch.float64 if groups is not None else torch.promote_types(scores.dtype, torch.float32)
    scaled = scores.to(compute_dtype) * scale

    if groups is None:
        # Sorted by label, a run of ties ends where searchsorted(right=True) points: the first strictly higher.
        sorted_labels, order = labels.sort()
        scaled = scaled[order]
        higher_start = torch.searchsorted(sorted_labels, sorted_labels, right=True)
        suffix = torch.logcumsumexp(-scaled.flip(0), dim=0).flip(0)
    else:
        # Sort by (group, label): a stable sort by label, then a stable sort by group.
        groups = groups.reshape(-1)
        order = torch.argsort(labels, stable=True)
        order = order[torch.argsort(groups[order], stable=True)]
        sorted_groups, sorted_labels, scaled = groups[order], labels[order], scaled[order]
        group_id = _runs([sorted_groups])
        tie_run = _runs([sorted_groups, sorted_labels])
        higher_start = torch.searchsorted(tie_run, tie_run, right=True)
        group_end = torch.searchsorted(group_id, group_id, right=True)
        # A strictly higher label in the next group does not count: point past the end (the -inf slot below).
        higher_start = torch.where(higher_start < group_end, higher_start, torch.full_like(higher_start, batch))
        # One shared suffix scan for all groups, pushed apart in log space so that the later groups (already
        # summed into a group's suffix) are negligible next to its own terms; the offset is removed after.
        negated = -scaled
        spread = (negated.max() - negated.min()).detach() + _GROUP_SEPARATION
        offset = -group_id.to(compute_dtype) * spread
        suffix = torch.logcumsumexp((negated + offset).flip(0), dim=0).flip(0) - offset
    # Slot `batch` (-inf) stands for "no strictly higher label": that term vanishes.
    suffix = torch.cat((suffix, suffix.new_full((1,), -torch.inf)))
    terms = scaled + suffix[higher_start]
    # log(1 + sum exp(terms)): the leading 0 is the "1 +", and keeps the loss 0 with zero (not NaN) gradients
    # when every term is -inf (one pair, or every label tied).
    loss = torch.logsumexp(torch.cat((terms.new_zeros(1), terms)), dim=0)
    # One cheap host sync (eager only: it is data-dependent): a NaN/inf score makes the loss non-finite, a NaN/inf
    # label the label sum. Only then are the inputs inspected (an overflowing sum of finite labels raises nothing).
    if not torch.compiler.is_compiling() and not torch.isfinite(loss.detach() + labels.sum()):
        _check_finite("labels", labels)
        _check_finite("scores", scores)
    return loss.to(torch.promote_types(scores.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------------------
# sentence-transformers glue: bi-encoder losses
# ---------------------------------------------------------------------------------------------------------


class CoSENTLoss(_STCoSENTLoss):
    """CoSENT for `SentenceTransformer`, optionally ranking the *global* batch across DDP ranks.

    Equal to sentence-transformers' `CoSENTLoss` on one process (same formula, same defaults; a subclass, so
    code that checks for it keeps working). With ``gather_across_devices=True`` the scores and labels of every
    rank are ranked together: each pair is compared with the pairs of all ranks, gradients flow back to each
    rank's own embeddings, and after DDP's gradient averaging the update is the one of a single process on the
    concatenated batch. Computed by `cosent_loss` (O(B log B), float32 whatever the model's dtype).

    Args:
        model (`SentenceTransformer`): the model to train; kept in ``self.model`` (the trainer swaps in the
            wrapped model by that name).
        scale (`float`, *optional*, defaults to `20.0`): inverse temperature lambda, > 0.
        similarity_fct (`Callable`, *optional*, defaults to `util.pairwise_cos_sim`): pairwise similarity of the
            two columns' embeddings, ``(batch, dim), (batch, dim) -> (batch,)``.
        gather_across_devices (`bool`, *optional*, defaults to `False`): rank the pairs of every process
            together. Needs an initialised process group (``accelerate launch`` / ``torchrun``); a no-op on one.

    References:
        Huang et al., CoSENT: Consistent Sentence Embedding via Similarity Ranking, IEEE/ACM TASLP 2024.
        Su Jianlin, "CoSENT (1)", kexue.fm/archives/8847, 2022.

    Inputs:
        | Inputs | Labels |
        |---|---|
        | (sentence_A, sentence_B) pairs | a similarity score (float; only the order matters) |

    Relations:
        `CachedCoSENTLoss` is the same loss with gradient caching, for batches larger than memory.
        `CrossEncoderCoSENTLoss` is the same ranking objective on a cross-encoder's logits.

    Example:

    ```python
    >>> from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    >>> from hf_ext import load_stsb, minilm_path
    >>> from hf_ext.losses import CoSENTLoss
    >>> model = SentenceTransformer(str(minilm_path()))  # or any Hub id
    >>> train = load_stsb("train").select_columns(["sentence1", "sentence2", "score"]).select(range(64))
    >>> trainer = SentenceTransformerTrainer(model=model, train_dataset=train, loss=CoSENTLoss(model))
    >>> trainer.train()  # skipped: minutes of CPU; docs/methods/cosent.md runs 2 steps  # doctest: +SKIP

    ```
    """

    def __init__(
        self,
        model: SentenceTransformer,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = pairwise_cos_sim,
        gather_across_devices: bool = False,
    ) -> None:
        check_scale(scale)
        if not callable(similarity_fct):
            raise ValueError(f"`similarity_fct` must be callable (a, b) -> (batch,), got {similarity_fct!r}.")
        if not isinstance(gather_across_devices, bool):
            raise ValueError(f"`gather_across_devices` must be a bool, got {gather_across_devices!r}.")
        super().__init__(model, scale=float(scale), similarity_fct=similarity_fct)
        self.gather_across_devices = gather_across_devices

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        # Both columns are sentences of one kind: embed them in ONE forward pass where their features can be
        # merged. Besides being faster, a single forward per step is what DDP's gradient hooks assume: two
        # forwards through a DDP-wrapped model before one backward average some gradients twice (or raise
        # "marked ready twice" with find_unused_parameters=True, the Trainer's default for these models).
        return self.compute_loss_from_embeddings(
            embed_columns(self.model, sentence_features, separate_first=False), labels
        )

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        """The loss from the two columns' embeddings ``[(batch, dim), (batch, dim)]`` and ``labels`` ``(batch,)``."""
        if len(embeddings) != 2:
            raise ValueError(
                f"{type(self).__name__} expects two input columns (sentence pairs), got {len(embeddings)} columns."
            )
        scores = self.similarity_fct(embeddings[0], embeddings[1])  # (batch,)
        if labels.numel() != scores.numel():
            raise ValueError(
                f"`labels` must hold one label per pair: got {labels.numel()} labels for a batch of {scores.numel()}."
            )
        labels = labels.reshape(-1)
        if labels.dtype == torch.bool:
            labels = labels.float()
        if self.gather_across_devices:
            scores = all_gather_with_grad(scores)
            labels = all_gather_with_grad(labels.detach())
        return cosent_loss(scores, labels, scale=self.scale)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": similarity_fct_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
        }


class CachedCoSENTLoss(CachedLossMixin, CoSENTLoss):
    """`CoSENTLoss` with gradient caching (GradCache): a batch of thousands of pairs in a mini-batch's memory.

    Built on sentence-transformers' own `CachedLossMixin`: (1) embed every mini-batch without gradients,
    (2) compute the loss over the whole batch and back-propagate it to the embeddings only, (3) re-embed each
    mini-batch with gradients and feed it the cached embedding gradients; the price is a second forward pass.
    Peak activation memory scales with ``mini_batch_size``, not with the batch size.

    The two columns are merged into one batch of ``2 * batch`` rows (column 1, then column 2), exactly as
    `CoSENTLoss` embeds them, and that batch is cut into mini-batches. What holds:

    - without dropout (``model.eval()``, or a model without dropout) the loss and gradients equal `CoSENTLoss`'s
      on the same batch, to float32 rounding;
    - in train mode with ``mini_batch_size >= 2 * batch`` (one mini-batch) they equal `CoSENTLoss`'s from the
      same random state: the same forward with the same dropout masks;
    - in train mode with smaller mini-batches each mini-batch draws its own dropout masks, so a step's loss is
      another sample of the same stochastic objective, not `CoSENTLoss`'s number: on 512 STS-B pairs the two
      differ by about as much as `CoSENTLoss` differs from itself across seeds
      (benchmarks/results/cosent_sts.json, ``cached``). The gradients are exactly those of the loss of the
      embeddings the mini-batches produced (their random state is replayed in step 3).

    Args:
        model (`SentenceTransformer`): the model to train.
        scale (`float`, *optional*, defaults to `20.0`): inverse temperature lambda, > 0.
        similarity_fct (`Callable`, *optional*, defaults to `util.pairwise_cos_sim`): pairwise similarity.
        gather_across_devices (`bool`, *optional*, defaults to `False`): rank the pairs of every process together.
        mini_batch_size (`int`, *optional*, defaults to `32`): pairs embedded at once, >= 1.
        show_progress_bar (`bool`, *optional*, defaults to `False`): a progress bar over mini-batches.

    References:
        Gao et al., Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup, RepL4NLP 2021.

    Inputs:
        | Inputs | Labels |
        |---|---|
        | (sentence_A, sentence_B) pairs | a similarity score (float; only the order matters) |

    Example:

    ```python
    >>> from sentence_transformers import SentenceTransformer
    >>> from hf_ext import minilm_path
    >>> from hf_ext.losses import CachedCoSENTLoss
    >>> model = SentenceTransformer(str(minilm_path()))
    >>> loss = CachedCoSENTLoss(model, mini_batch_size=32)  # then SentenceTransformerTrainer(..., loss=loss)

    ```
    """

    def __init__(
        self,
        model: SentenceTransformer,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = pairwise_cos_sim,
        gather_across_devices: bool = False,
        mini_batch_size: int = 32,
        show_progress_bar: bool = False,
    ) -> None:
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"`mini_batch_size` must be an int >= 1, got {mini_batch_size!r}.")
        super().__init__(model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices)
        self.mini_batch_size = mini_batch_size
        self.show_progress_bar = show_progress_bar

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        self._replays_left = 0  # counted by the no-grad pass, spent by the replays (old sentence-transformers)
        features = list(sentence_features)
        # CoSENTLoss's layout: both columns in one batch (column 1's rows, then column 2's), cut into mini-batches.
        merged = merge_feature_batches(features) if len(features) == 2 else None
        self._merged_columns = 0 if merged is None else len(features)
        return self.forward_cached([merged] if merged is not None else features, labels)

    def embed_minibatch_iter(
        self,
        sentence_feature: dict[str, Tensor],
        with_grad: bool,
        copy_random_state: bool,
        random_states: list | None = None,
        ranges: list[tuple[int, int]] | None = None,
    ) -> Iterator[tuple[Tensor, Any]]:
        minibatches = super().embed_minibatch_iter(
            sentence_feature, with_grad, copy_random_state, random_states, ranges
        )
        if _ST_REPLAYS_UNDER_NO_SYNC or not isinstance(self.model, DistributedDataParallel):
            yield from minibatches
            return
        if not with_grad:  # step (1); copy_random_state is set exactly when step (3) will replay these
            if copy_random_state and ranges is not None:
                self._replays_left += len(ranges)
            yield from minibatches
            return
        while True:  # step (3): only the step's very last replay lets DDP all-reduce the gradients
            with nullcontext() if self._replays_left <= 1 else self.model.no_sync():
                try:
                    item = next(minibatches)  # the forward runs inside the context
                except StopIteration:
                    return
                self._replays_left -= 1
                yield item  # the hook runs this mini-batch's backward here, still inside the context

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs `labels` (one similarity score per pair).")
        columns = [torch.cat(column) for column in reps]
        if getattr(self, "_merged_columns", 0):
            columns = list(columns[0].reshape(self._merged_columns, -1, *columns[0].shape[1:]).unbind(0))
        loss = self.compute_loss_from_embeddings(columns, labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size}
