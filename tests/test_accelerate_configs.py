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


def test_every_shipped_config_loads_with_accelerates_own_loader() -> None:
    from importlib import resources

    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(str(resources.files("hf_ext.accelerate_configs")))
    files = sorted(root.rglob("*.yaml"))
    assert {f.stem for f in files} >= {"cpu", "bf16", "bf16_compile", "multi_gpu_bf16_compile", "fsdp_bf16_compile"}
    for file in files:
        config = load_config_from_file(str(file))
        text = file.read_text()
        assert text.startswith(f"# hf_ext accelerate config: {file.stem}") and "# Launch:" in text, file
        assert hf_ext.accelerate_config_path(file.stem) == file
        if "compile" in file.stem:
            assert config.dynamo_config["dynamo_backend"] == "INDUCTOR"
            assert config.dynamo_config["dynamo_use_dynamic"] is False  # static shapes: the length buckets pay
        if file.stem != "cpu":
            assert config.mixed_precision == "bf16"
    fsdp = load_config_from_file(str(hf_ext.accelerate_config_path("fsdp_bf16_compile")))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2


def test_cli_prints_the_path_of_an_existing_config() -> None:
    name = "bf16_compile"  # every name resolves through the same function: test_every_shipped_config_loads...
    import shutil

    commands = [[sys.executable, "-m", "hf_ext.cli", "config", name]]
    script = Path(sys.executable).parent / "hf-ext"
    script = str(script) if script.is_file() else shutil.which("hf-ext")
    if script:  # the console script, when the package is installed (make install does)
        commands.append([script, "config", name])
    for command in commands:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
        path = Path(proc.stdout.strip().splitlines()[-1])
        assert path.is_file() and path == hf_ext.accelerate_config_path(name)


def test_cli_lists_valid_names_for_an_unknown_config(capsys) -> None:
    from hf_ext.cli import main

    assert main(["config", "gpu"]) == 2
    assert "must be one of" in capsys.readouterr().err
    assert main(["config", "--list"]) == 0
    assert "bf16_compile" in capsys.readouterr().out.split()
