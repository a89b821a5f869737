"""Losses: pure tensor functions, and thin `nn.Module` glue for the sentence-transformers loss contract."""

from __future__ import annotations

from .cosent import CachedCoSENTLoss, CoSENTLoss, cosent_loss
from .cross_encoder_cosent import CrossEncoderCoSENTLoss
from .tvd import tvd_loss, tvd_weights
from .tvd_fused import linear_tvd_loss

__all__ = [
    "CachedCoSENTLoss",
    "CoSENTLoss",
    "CrossEncoderCoSENTLoss",
    "cosent_loss",
    "linear_tvd_loss",
    "tvd_loss",
    "tvd_weights",
]
