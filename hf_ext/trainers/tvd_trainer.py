"""`TVDTrainer`: a `Trainer` whose loss is TVD (TaiLr), and `tvd_compute_loss_func` for the stock `Trainer`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_ext.losses.tvd import tvd_loss
from hf_ext.losses.tvd_fused import linear_tvd_loss
from hf_ext.trainers.tvd_config import TVDConfig

__all__ = ["TVDTrainer", "tvd_compute_loss_func"]

TVD_TASKS = ("classification", "causal_lm", "seq2seq", "token_classification")


def _base_model(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP / DataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def _is_causal_lm(model: nn.Module) -> bool:
    return _base_model(model)._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _add_decoder_inputs(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> None:
    """Seq2seq: the model is called without labels, so build its decoder inputs from them as its own forward does
    with labels (shifted right after the decoder start token), unless the batch already has them
    (``DataCollatorForSeq2Seq(model=...)`` adds them)."""
    base = _base_model(model)
    if (
        getattr(base.config, "is_encoder_decoder", False)
        and inputs.get("decoder_input_ids") is None
        and inputs.get("decoder_inputs_embeds") is None
        and hasattr(base, "prepare_decoder_input_ids_from_labels")
    ):
        inputs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)


def _align(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM: the logit at position t predicts the label at t + 1. The labels move (padded with -100 at the
    end, as transformers' own causal-LM loss does), not the logits: slicing those would copy them."""
    if shift:
        return logits, torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return logits, labels


def tvd_compute_loss_func(
    gamma: float,
    *,
    task: str = "causal_lm",
    min_weight: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Callable[..., torch.Tensor]:
    """A ``compute_loss_func`` for the stock `Trainer` (or TRL's `SFTTrainer`) computing the TVD loss.

    The Trainer passes it the outputs, the labels and ``num_items_in_batch`` (its count of targets over the
    accumulated and, with ``average_tokens_across_devices``, multi-process batch), so gradient accumulation and
    several GPUs give the update of one big batch. A constant gamma only: for a schedule and weight logging use
    `TVDTrainer`.

    Args:
        gamma (`float`): in [0, 1]; 0 is cross-entropy, 1 (with ``min_weight=0``) DFT.
        task (`str`, *optional*, defaults to `"causal_lm"`): one of ``("classification", "causal_lm", "seq2seq",
            "token_classification")``; ``causal_lm`` shifts the labels by one position.
        min_weight (`float`, *optional*, defaults to `0.0`): floor of the weights, in [0, 1].
        label_smoothing (`float`, *optional*, defaults to `0.0`): un-reweighted smoothing term.
        ignore_index (`int`, *optional*, defaults to `-100`): label of targets to skip.

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    >>> from hf_ext import smollm2_path
    >>> from hf_ext.trainers import tvd_compute_loss_func
    >>> loss_func = tvd_compute_loss_func(0.5, task="causal_lm", min_weight=0.2)
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    >>> args = TrainingArguments(output_dir="outputs/tvd-lm", report_to="none")
    >>> trainer = Trainer(model=model, args=args, compute_loss_func=loss_func)  # + train_dataset=..., then train()
    >>> # what the Trainer calls it with: the outputs, the labels (shifted here, as the model's own loss does)
    >>> logits, labels = torch.randn(2, 8, 32), torch.randint(0, 32, (2, 8))
    >>> cross_entropy = tvd_compute_loss_func(0.0)({"logits": logits}, labels)  # gamma 0: cross-entropy
    >>> bool(torch.isclose(cross_entropy, torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
    ...                                                                      labels[:, 1:].flatten())))
    True

    ```
    """
    if task not in TVD_TASKS:
        raise ValueError(f"`task` must be one of {TVD_TASKS}, got {task!r}.")
    tvd_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), gamma=gamma, min_weight=min_weight,
             label_smoothing=label_smoothing)  # fmt: skip  # validates the settings now, not at the first step

    def compute_loss_func(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        logits, labels = _align(logits, labels, shift=task == "causal_lm")
        return tvd_loss(logits, labels, gamma=gamma, min_weight=min_weight, label_smoothing=label_smoothing,
                        ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)  # fmt: skip

    return compute_loss_func


# Config attributes that change the logits after the LM head; the fused path computes ``h W^T + b`` only.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "lm_head_multiplier")  # fmt: skip


def _check_fused_lm_head(model: nn.Module, causal_lm: bool) -> None:
    """Refuse, at construction, what `tvd_fused_lm_head` would compute wrongly."""
    base = _base_model(model)
    if not causal_lm:
        raise ValueError(f"`tvd_fused_lm_head` needs a causal LM (its logits are `lm_head(hidden_states)`), got "
                         f"{base._get_name()}.")  # fmt: skip
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"`tvd_fused_lm_head` needs the LM head to be a plain `nn.Linear`, got {type(head).__name__} "
                         "(an adapter or wrapper on the head would be skipped); train without it.")  # fmt: skip
    config = base.config.get_text_config()
    transforms = {name: getattr(config, name) for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in
                  (None, 1.0)}  # fmt: skip
    if transforms:
        raise ValueError(f"`tvd_fused_lm_head` computes `lm_head(hidden_states)` as the logits, but this model "
                         f"transforms them further ({transforms}); train without it.")  # fmt: skip


def _forward_to_hidden_states(model: nn.Module, inputs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
    """Run ``model`` (through its DDP / peft wrappers) with the LM head on the last position only, and return its
    outputs and the decoder's last hidden states (after the final norm), caught by a forward hook."""
    caught: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        caught.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = _base_model(model).get_decoder().register_forward_hook(hook)
    try:
        outputs = model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(f"`tvd_fused_lm_head`: the decoder ran {len(caught)} times in one forward, expected once.")
    return outputs, caught[0]


class TVDTrainer(Trainer):
    """A `Trainer` that trains with the TVD (TaiLr) loss instead of cross-entropy.

    Handles sequence classification (``(batch, classes)`` logits), causal LM (labels shifted by one, like the
    model's own loss) and seq2seq / token classification (labels aligned with the logits), with ``-100`` ignored.
    The loss is always normalised by the number of targets of the whole optimizer step (all gradient-accumulation
    micro-batches, and all processes when ``average_tokens_across_devices``), so accumulation and multi-GPU give
    the update of one big batch. Logs ``tvd_gamma`` (the scheduled value) and ``tvd_weight_mean``. With
    ``tvd_fused_lm_head`` (causal LM) the loss comes from the final hidden states and the LM head in chunks
    (`linear_tvd_loss`): the same update without the tokens x vocab logits in memory.

    Args:
        args (`TVDConfig`): the training arguments with the TVD settings (``tvd_gamma``, ``tvd_min_weight``,
            ``tvd_gamma_schedule``, ``tvd_gamma_start``, ``tvd_fused_lm_head``); ``label_smoothing_factor`` is
            honoured.
        **kwargs: everything `Trainer` takes. ``compute_loss_func`` is refused (the loss is this trainer's job).

    Example:

    ```python
    >>> from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
    >>> from hf_ext import minilm_path
    >>> from hf_ext.data import bbc_classification_data
    >>> from hf_ext.trainers import TVDConfig, TVDTrainer
    >>> tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    >>> model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5)
    >>> train, test = bbc_classification_data(tokenizer, max_length=64, max_train_samples=8, max_eval_samples=8)
    >>> args = TVDConfig(output_dir="outputs/tvd", tvd_gamma=0.5, tvd_min_weight=0.2, max_steps=1,  # one step here
    ...                  per_device_train_batch_size=8, logging_strategy="no", save_strategy="no", report_to="none")
    >>> collator = DataCollatorWithPadding(tokenizer)
    >>> trainer = TVDTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, data_collator=collator)
    >>> trainer.train().global_step  # it prints the run's summary
    {'train_runtime': ...}
    1

    ```
    """

    # The loss is normalised over the whole accumulated batch: the Trainer must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(self, model: nn.Module | None = None, args: TVDConfig | None = None, **kwargs: Any) -> None:
        if not isinstance(args, TVDConfig):
            raise ValueError(f"`args` must be a TVDConfig (TrainingArguments plus the TVD settings), got {type(args)}.")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("TVDTrainer computes its own loss: do not pass `compute_loss_func`.")
        super().__init__(model=model, args=args, **kwargs)
        # Make the Trainer count the targets of every step (num_items_in_batch) and skip its division by the
        # accumulation steps on transformers versions without `loss_is_scaled_for_ga`. The model itself never
        # receives loss kwargs: compute_loss calls it without labels.
        self.model_accepts_loss_kwargs = True
        self._tvd_shift = _is_causal_lm(self.model)
        if args.tvd_fused_lm_head:
            _check_fused_lm_head(self.model, self._tvd_shift)
        self._tvd_weight_sum = torch.zeros(())
        self._tvd_weight_count = 0

    @property
    def tvd_gamma(self) -> float:
        """The gamma of the current step under the configured schedule."""
        max_steps = max(self.state.max_steps or 0, 1)
        return self.args.tvd_gamma_at(self.state.global_step / max_steps)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Targets of the whole optimizer step, counted exactly as `compute_loss` counts them."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        count = sum(
            (batch["labels"][..., 1:] if self._tvd_shift else batch["labels"]).ne(-100).sum() for batch in batch_samples
        )
        count = torch.as_tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("TVDTrainer needs `labels` in every batch (class ids or token ids, -100 to ignore).")
        _add_decoder_inputs(model, inputs, labels)
        if self.args.tvd_fused_lm_head:
            outputs, hidden = _forward_to_hidden_states(model, inputs)
            head = _base_model(model).get_output_embeddings()
            if isinstance(head.weight, DTensor):
                raise ValueError("`tvd_fused_lm_head` does not run under FSDP2 yet (the LM head's weight is a sharded "
                                 "DTensor); train without it.")  # fmt: skip
            loss, weight_mean = linear_tvd_loss(
                hidden,
                head.weight,
                _align(hidden, labels, shift=True)[1],
                bias=head.bias,
                gamma=self.tvd_gamma,
                min_weight=self.args.tvd_min_weight,
                num_items_in_batch=num_items_in_batch,
                return_weight_mean=True,
            )
        else:
            outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            logits, targets = _align(logits, labels, self._tvd_shift and logits.dim() == 3)
            loss, weight_mean = tvd_loss(
                logits,
                targets,
                gamma=self.tvd_gamma,
                min_weight=self.args.tvd_min_weight,
                label_smoothing=self.args.label_smoothing_factor,
                num_items_in_batch=num_items_in_batch,
                return_weight_mean=True,
            )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts the targets of every process; DDP averages the gradients over processes.
            loss = loss * self.accelerator.num_processes
        if model.training:
            self._tvd_weight_sum = self._tvd_weight_sum.to(weight_mean.device) + weight_mean.detach()
            self._tvd_weight_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # training logs: add the schedule and the mean weight since the last log
            logs["tvd_gamma"] = self.tvd_gamma
            if self._tvd_weight_count:
                logs["tvd_weight_mean"] = round(float(self._tvd_weight_sum) / self._tvd_weight_count, 4)
                self._tvd_weight_sum = torch.zeros(())
                self._tvd_weight_count = 0
        super().log(logs, *args, **kwargs)
