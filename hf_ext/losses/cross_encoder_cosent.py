"""CoSENT for cross-encoders: rank a cross-encoder's logits by the gold labels, over the batch or per query."""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers import CrossEncoder
from sentence_transformers.sentence_transformer.losses import CoSENTLoss as _STCoSENTLoss
from sentence_transformers.util import batch_to_device, fullname
from torch import Tensor, nn

from hf_ext.distributed import all_gather_with_grad, get_rank, get_world_size
from hf_ext.losses.cosent import check_scale, cosent_loss

__all__ = ["CrossEncoderCoSENTLoss"]


class CrossEncoderCoSENTLoss(nn.Module):
    """CoSENT on a `CrossEncoder`'s logits: every pair whose label is higher should score higher.

    Two input forms, told apart by the labels:

    - **pair rows** (``sentence1``, ``sentence2``, ``score``), labels a tensor: all pairs of the batch are ranked
      together (what STS-style data needs; sentence-transformers' RankNet only ranks within one query's list);
    - **per-query lists** (``query``, ``[docs]``, ``[scores]``), labels a list of tensors: documents are ranked
      only against the other documents of their own query.

    Args:
        model (`CrossEncoder`): a cross-encoder with one output logit (``num_labels=1``).
        scale (`float`, *optional*, defaults to `20.0`): inverse temperature lambda, > 0. The method's author uses
            none (1.0) since logits are unbounded; 20.0 is what STS-B dev chose for MiniLM (1: 0.8386, 5: 0.8398,
            20: 0.8422, 50: 0.8415 dev Spearman; benchmarks/results/cosent_sts.json).
        activation_fn (`nn.Module`, *optional*, defaults to `nn.Identity()`): applied to the logits first.
        gather_across_devices (`bool`, *optional*, defaults to `False`): rank the pairs (or lists) of every
            process together, as in `CoSENTLoss`.

    References:
        Huang et al., CoSENT: Consistent Sentence Embedding via Similarity Ranking, IEEE/ACM TASLP 2024.
        Su Jianlin, "CoSENT (3)", kexue.fm/archives/9341, 2022 (CoSENT for interaction models).

    Inputs:
        | Inputs | Labels | Number of model output labels |
        |---|---|---|
        | (sentence_A, sentence_B) pairs | a score per pair (float; only the order matters) | 1 |
        | (query, [doc1, ..., docN]) | [score1, ..., scoreN] per query | 1 |

    Relations:
        `BinaryCrossEntropyLoss` fits each logit to its label on its own; this loss only asks for the right
        order, so labels need no calibration (0-5 scores, grades, or 0/1 all work unchanged).

    Example:

    ```python
    >>> from sentence_transformers import CrossEncoder, CrossEncoderTrainer
    >>> from hf_ext import load_stsb, minilm_path
    >>> from hf_ext.losses import CrossEncoderCoSENTLoss
    >>> model = CrossEncoder(str(minilm_path()), num_labels=1)  # a fresh head on MiniLM; or any Hub id
    >>> train = load_stsb("train").select_columns(["sentence1", "sentence2", "score"]).select(range(64))
    >>> trainer = CrossEncoderTrainer(model=model, train_dataset=train, loss=CrossEncoderCoSENTLoss(model))
    >>> trainer.train()  # skipped: minutes of CPU; docs/methods/cosent.md runs 2 steps  # doctest: +SKIP

    ```
    """

    def __init__(
        self,
        model: CrossEncoder,
        scale: float = 20.0,
        activation_fn: nn.Module | None = None,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__()
        check_scale(scale)
        if activation_fn is not None and not callable(activation_fn):
            raise ValueError(f"`activation_fn` must be an nn.Module or callable, got {activation_fn!r}.")
        if not isinstance(gather_across_devices, bool):
            raise ValueError(f"`gather_across_devices` must be a bool, got {gather_across_devices!r}.")
        num_labels = getattr(model, "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"`model` must output one logit per pair (num_labels=1), got num_labels={num_labels}.")
        self.model = model
        self.scale = float(scale)
        self.activation_fn = activation_fn if activation_fn is not None else nn.Identity()
        self.gather_across_devices = gather_across_devices

    def _scores(self, pairs: list[tuple[str, str]], prompt: str | None, task: str | None) -> Tensor:
        features = self.model.preprocess(pairs, prompt=prompt, task=task)
        features = batch_to_device(features, self.model.device)
        logits = self.model(features)["scores"].view(-1)  # (n_pairs,)
        return self.activation_fn(logits)

    def forward(
        self,
        inputs: list[list[str]] | list[list[str] | list[list[str]]],
        labels: Tensor | list[Tensor],
        prompt: str | None = None,
        task: str | None = None,
    ) -> Tensor:
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            n = len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__
            raise ValueError(
                "`inputs` must hold two columns, (sentence1, sentence2) pairs or (query, [docs]) lists, "
                f"got {n} columns."
            )
        first, second = inputs
        if len(first) != len(second):
            raise ValueError(f"`inputs` columns differ in length: {len(first)} vs {len(second)}.")
        if isinstance(labels, Tensor):
            if any(not isinstance(text, str) for text in second):
                raise ValueError(
                    "`inputs` holds lists of documents but `labels` is one tensor: per-query lists need a list "
                    "of label tensors, one per query."
                )
            if labels.numel() != len(first):
                raise ValueError(f"`labels` must hold one score per pair: got {labels.numel()} for {len(first)} pairs.")
            scores = self._scores(list(zip(first, second, strict=True)), prompt, task)
            flat_labels = labels.reshape(-1).to(scores.device)
            groups = None
        else:
            if len(labels) != len(first):
                raise ValueError(f"`labels` must hold one list per query: got {len(labels)} for {len(first)} queries.")
            pairs, label_parts, group_parts = [], [], []
            for index, (query, docs, doc_labels) in enumerate(zip(first, second, labels, strict=True)):
                doc_labels = torch.as_tensor(doc_labels).reshape(-1)
                if isinstance(docs, str) or len(docs) != doc_labels.numel():
                    raise ValueError(
                        f"`labels[{index}]` must hold one score per document of query {index}: got "
                        f"{doc_labels.numel()} scores for {1 if isinstance(docs, str) else len(docs)} documents."
                    )
                pairs.extend((query, doc) for doc in docs)
                label_parts.append(doc_labels.float())
                group_parts.append(torch.full((len(docs),), index, dtype=torch.long))
            scores = self._scores(pairs, prompt, task)
            flat_labels = torch.cat(label_parts).to(scores.device)
            # globally unique query ids across ranks: local index * world_size + rank
            groups = (torch.cat(group_parts) * get_world_size() + get_rank()).to(scores.device)
        if flat_labels.dtype == torch.bool:
            flat_labels = flat_labels.float()
        if self.gather_across_devices:
            scores = all_gather_with_grad(scores)
            flat_labels = all_gather_with_grad(flat_labels)
            groups = all_gather_with_grad(groups) if groups is not None else None
        return cosent_loss(scores, flat_labels, scale=self.scale, groups=groups)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "activation_fn": fullname(self.activation_fn),
            "gather_across_devices": self.gather_across_devices,
        }

    # The same paper as sentence-transformers' bi-encoder CoSENTLoss: reuse its BibTeX entry.
    citation = _STCoSENTLoss.citation
