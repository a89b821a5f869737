"""`TVDConfig`: `TrainingArguments` plus the TaiLr (TVD) loss settings and the gamma schedule."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

__all__ = ["TVDConfig"]

TVD_GAMMA_SCHEDULES = ("constant", "linear")


@dataclass
class TVDConfig(TrainingArguments):
    """Training arguments for `TVDTrainer`: every `TrainingArguments` field, plus the TVD (TaiLr) settings.

    The loss is ``-w log p`` with ``w = p / (gamma + (1 - gamma) p)`` (no gradient), clamped to
    ``[tvd_min_weight, 1]``. ``tvd_gamma = 0`` is plain cross-entropy. ``label_smoothing_factor`` adds the usual
    smoothing term, not re-weighted. Every field is also a command-line flag through `HfArgumentParser`.

    Example:

    ```python
    >>> from hf_ext.trainers import TVDConfig
    >>> config = TVDConfig(output_dir="out", tvd_gamma=0.5, tvd_min_weight=0.2, tvd_gamma_schedule="linear")
    >>> config.tvd_gamma_at(0.5)  # halfway through training, from tvd_gamma_start=0.0
    0.25

    ```
    """

    tvd_gamma: float = field(
        default=0.1,
        metadata={
            "help": "TVD gamma in [0, 1]: 0 is cross-entropy, 1 the total variation distance (DFT with "
            "tvd_min_weight=0). The TaiLr paper uses 0.1 (translation) and 0.8 (summarisation); the method's author: "
            "small from scratch, larger when fine-tuning."
        },
    )
    tvd_min_weight: float = field(
        default=0.2,
        metadata={"help": "Floor b of the per-target weights, in [0, 1] (the paper uses 0.2-0.3)."},
    )
    tvd_gamma_schedule: str = field(
        default="constant",
        metadata={"help": f"One of {TVD_GAMMA_SCHEDULES}: `linear` moves gamma from tvd_gamma_start to tvd_gamma."},
    )
    tvd_gamma_start: float = field(
        default=0.0, metadata={"help": "Gamma at step 0 under the `linear` schedule, in [0, 1]."}
    )
    tvd_fused_lm_head: bool = field(
        default=False,
        metadata={
            "help": "Causal LM only: compute the loss from the last hidden states and the LM head in chunks "
            "(`linear_tvd_loss`) instead of from the full logits, whose tokens x vocab floats and their gradient "
            "then never exist. The model's outputs keep only the last position's logits."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("tvd_gamma", "tvd_gamma_start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")
        if not isinstance(self.tvd_min_weight, (int, float)) or not 0.0 <= self.tvd_min_weight <= 1.0:
            raise ValueError(f"`tvd_min_weight` must be a number in [0, 1], got {self.tvd_min_weight!r}.")
        if self.tvd_fused_lm_head and self.label_smoothing_factor > 0:
            raise ValueError("`tvd_fused_lm_head` does not support `label_smoothing_factor` > 0 (the smoothing term "
                             "needs every logit); set one of them off.")  # fmt: skip
        if self.tvd_gamma_schedule not in TVD_GAMMA_SCHEDULES:
            raise ValueError(
                f"`tvd_gamma_schedule` must be one of {TVD_GAMMA_SCHEDULES}, got {self.tvd_gamma_schedule!r}."
            )

    def tvd_gamma_at(self, progress: float) -> float:
        """Gamma at ``progress`` (fraction of training done, clipped to [0, 1]) under the configured schedule."""
        if self.tvd_gamma_schedule == "constant":
            return float(self.tvd_gamma)
        progress = min(max(float(progress), 0.0), 1.0)
        return float(self.tvd_gamma_start + (self.tvd_gamma - self.tvd_gamma_start) * progress)
