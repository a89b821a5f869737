from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

import hf_ext

SCRIPT = Path(__file__).parent / "scripts" / "gather_under_accelerate.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def _results(stdout: str) -> list[dict]:
    # Two processes share stdout, so their lines may run together: decode each JSON object after a marker.
    decoder = json.JSONDecoder()
    found = [decoder.raw_decode(stdout, m.end())[0] for m in re.finditer(r"RESULT ", stdout)]
    return sorted(found, key=lambda r: r["rank"])


def test_cpu_config_is_shipped_and_valid() -> None:
    path = hf_ext.accelerate_config_path("cpu")
    assert path.is_file() and path.name == "cpu.yaml"
    assert hf_ext.accelerate_config_path("cpu.yaml") == path
    assert "cpu" in hf_ext.accelerate_config_names()
    raw = yaml.safe_load(path.read_text())
    assert raw["use_cpu"] is True and raw["mixed_precision"] == "no"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.use_cpu and config.num_processes == 1
    assert path.read_text().startswith("# hf_ext accelerate config: cpu")


@pytest.mark.parametrize("name", ["gpu", "", "cpu.yml", None, 3])
def test_unknown_config_name_lists_the_valid_names(name) -> None:
    with pytest.raises(ValueError, match=r"`name` must be"):
        hf_ext.accelerate_config_path(name)


def _launch(args: list[str], extra_env: dict[str, str] | None = None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    proc = subprocess.run(
        [*ACCELERATE, *args, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _results(proc.stdout)


def test_accelerate_launch_with_the_cpu_config_runs_one_process() -> None:
    (result,) = _launch(["--config_file", str(hf_ext.accelerate_config_path("cpu"))])
    assert result["world"] == 1 and result["gathered"] == [[0.0, 0.0], [0.0, 0.0]]


def test_two_cpu_processes_under_accelerate_gather_with_gradients() -> None:
    # The documented two-process CPU launch (cpu.yaml's header): torchrun through accelerate, gloo backend.
    results = _launch(["--multi_gpu", "--num_processes", "2"], {"ACCELERATE_USE_CPU": "true"})
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == 2 for r in results)
    expected_rows = [[0.0, 0.0]] * 2 + [[1.0, 1.0]] * 3  # rank 0 holds 2 rows, rank 1 holds 3
    assert all(r["gathered"] == expected_rows for r in results)
    # loss = sum_i (i + 1) * rowsum(gathered_i) on both ranks: each row receives 2 * (i + 1) per element
    assert results[0]["grad"] == [[2.0, 2.0], [4.0, 4.0]]
    assert results[1]["grad"] == [[6.0, 6.0], [8.0, 8.0], [10.0, 10.0]]
