"""TensorBytes counts operator outputs from creation until freed, against byte counts worked out by hand."""

from __future__ import annotations

import pytest
import torch

from hf_ext.tensor_memory import TensorBytes


def test_peak_and_live_follow_creation_and_freeing() -> None:
    x = torch.ones(1024)  # float32: 4,096 bytes, made before the block
    with TensorBytes() as probe:
        y = x * 2  # +4,096, kept
        z = (y + 1).sum()  # +4,096 temporary, +4 for z, then the temporary is freed
    assert probe.peak == 4096 + 4096 + 4
    assert probe.live == 4096 + 4
    del y, z
    assert probe.live == 0


def test_in_place_resize_and_other_devices() -> None:
    out = torch.empty(0)
    with TensorBytes() as probe:
        buffer = torch.zeros(10, dtype=torch.float64)  # 80 bytes
        torch.add(buffer, 1.0, out=out)  # `out` (float32, made before the block) resized to 40 bytes: counted
    assert probe.peak == 80 + 40
    with TensorBytes("meta") as meta:
        torch.ones(1000)  # a CPU tensor is not counted when counting "meta"
    assert meta.peak == 0


def test_bad_device_type_is_refused() -> None:
    with pytest.raises(ValueError, match="`device_type` must be a device type string"):
        TensorBytes(torch.device("cpu"))  # type: ignore[arg-type]
