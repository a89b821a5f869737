"""The wheel and the sdist, as a user gets them: built from the tracked files alone, `twine check --strict` clean,
installed non-editable into a fresh virtualenv outside the checkout with only the declared dependencies, and used
from another directory.

It proves that the package works without the repository: the sdist holds every tracked file of `hf_ext/` and the
wheel (built from that sdist) ships all of them, package data included (the accelerate configs, the `evaluate` ECE
module, the NBCE `custom_generate` folder, `py.typed`); an untracked or ignored file of the checkout cannot leak in,
since the build starts from a copy of the tracked files. In the fresh venv, from a temporary directory and with no
path of the checkout on `sys.path`: `import hf_ext` and every submodule import from the venv, `hf-ext config --list`
and `hf-ext config cpu` work, the README's quick example runs, transformers runs the installed `custom_generate`
folder through `model.generate(custom_generate=..., trust_remote_code=True)` on a tiny random Llama, and
`load_ece()` gives the ECE computed here by hand. Cost: ~2-3 minutes (the build fetches setuptools, the install
resolves every dependency through pip; torch is the local CPU wheel, never downloaded).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The Makefile's default torch: a local CPU wheel (pip's find-links) on the development and CI machines. It is
# installed with --no-index so that a missing local wheel can never turn into a multi-GB CUDA download.
TORCH_SPEC = "torch==2.13.0"
# The package data the library reads at run time (the list), on top of "every tracked file of hf_ext/ ships".
PACKAGE_DATA = (
    "hf_ext/py.typed",
    "hf_ext/accelerate_configs/*.yaml",
    "hf_ext/metrics/expected_calibration_error/*.py",
    "hf_ext/generation/nbce_hub/README.md",
    "hf_ext/generation/nbce_hub/custom_generate/generate.py",
)

# Hand-made predictions for the ECE (15 equal-width bins, bin i holds confidences in (i/15, (i+1)/15]):
#   confidences 0.95, 0.97 -> bin 14 (14/15 = 0.933..): 2 predictions, 1 right, mean confidence 0.96
#   confidences 0.70, 0.72 -> bin 10 (10/15 = 0.666.. to 11/15 = 0.733..): 2 predictions, 2 right, mean 0.71
#   confidence  0.55       -> bin 8 (8/15 = 0.533.. to 9/15 = 0.6): 1 prediction, wrong
PREDICTIONS = [
    [0.95, 0.03, 0.02],  # class 0, right
    [0.01, 0.97, 0.02],  # class 1, wrong (2)
    [0.70, 0.20, 0.10],  # class 0, right
    [0.10, 0.18, 0.72],  # class 2, right
    [0.25, 0.55, 0.20],  # class 1, wrong (0)
]
REFERENCES = [0, 2, 0, 2, 0]
ECE_BY_HAND = (2 * abs(0.5 - 0.96) + 2 * abs(1.0 - 0.71) + 1 * abs(0.0 - 0.55)) / 5  # = 0.41
ECE_COUNTS = [0.0] * 8 + [1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 2.0]

# Run by the fresh venv's interpreter from the work directory; prints one JSON line of facts for the tests.
CHECK_SCRIPT = textwrap.dedent(
    """
    import importlib
    import importlib.metadata
    import json
    import pkgutil
    import sys

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

    import hf_ext
    from hf_ext.generation import NBCELogitsProcessor, nbce_custom_generate_path
    from hf_ext.metrics import ece_module_path, load_ece

    predictions, references = json.loads(sys.argv[1])
    modules = [info.name for info in pkgutil.walk_packages(hf_ext.__path__, "hf_ext.")]
    for name in modules:  # every submodule imports with the declared dependencies alone
        importlib.import_module(name)

    # A prebuilt NBCE batch on a tiny random Llama: row 0 the "question", rows 1-2 one "context" each.
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(1, 64, (3, 6))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    settings = {"max_new_tokens": 4, "pad_token_id": 0}
    folder = nbce_custom_generate_path()
    hub_way = model.generate(**batch, custom_generate=str(folder), trust_remote_code=True, **settings)
    processor = LogitsProcessorList([NBCELogitsProcessor()])
    package_way = model.generate(**batch, logits_processor=processor, do_sample=False, **settings)

    ece = load_ece().compute(predictions=predictions, references=references)
    url = importlib.metadata.distribution("hf-ext").read_text("direct_url.json")
    print(json.dumps({
        "hf_ext_file": hf_ext.__file__,
        "sys_path": sys.path,
        "modules": modules,
        "direct_url": json.loads(url) if url else None,
        "custom_generate": str(folder),
        "hub_way_new_tokens": hub_way[:, input_ids.shape[1]:].tolist(),
        "package_way_new_tokens": package_way[:, input_ids.shape[1]:].tolist(),
        "ece_module": str(ece_module_path()),
        "ece": ece["expected_calibration_error"],
        "ece_counts": ece["bins"]["count"],
    }))
    """
)


@dataclass(frozen=True)
class Artifacts:
    wheel: Path
    sdist: Path
    tracked: frozenset[str]  # the checkout's tracked files (relative POSIX paths) the build started from


@dataclass(frozen=True)
class Venv:
    root: Path
    python: Path
    workdir: Path  # neither the checkout nor the venv: every command of the venv runs here
    env: dict[str, str]

    def run(self, *args: str | Path, timeout: float = 600) -> str:
        """Run a command of the venv in the work directory; its stdout (fails with both streams shown)."""
        return _run(list(args), cwd=self.workdir, env=self.env, timeout=timeout).stdout


def _run(
    args: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    command = [str(arg) for arg in args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, (
        f"`{' '.join(command)}` exited {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}\n"
        f"--- stderr ---\n{result.stderr[-6000:]}"
    )
    return result


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("the wheel test builds from the tracked files: it needs a git checkout")
    listing = _run(["git", "ls-files", "-z"], cwd=ROOT).stdout
    return [name for name in listing.split("\0") if name and (ROOT / name).is_file()]  # deleted files are skipped


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """The sdist, and the wheel `python -m build` makes from it, of a copy of the checkout's tracked files."""
    tracked = _tracked_files()
    source = tmp_path_factory.mktemp("source")
    assert not _inside(source, ROOT)
    for name in tracked:  # the working-tree contents of the tracked files: uncommitted edits are built too
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name, follow_symlinks=False)
    dist = tmp_path_factory.mktemp("dist")
    # Isolated: the build backend comes from [build-system] requires, as on any user's machine (PyPI, pip's cache).
    _run([sys.executable, "-m", "build", "--outdir", dist, source], cwd=source, timeout=900)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    return Artifacts(wheel=wheels[0], sdist=sdists[0], tracked=frozenset(tracked))


@pytest.fixture(scope="module")
def venv(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    """A fresh venv outside the checkout: the local CPU torch, then the wheel and the dependencies pip resolves."""
    root = tmp_path_factory.mktemp("venv")
    workdir = tmp_path_factory.mktemp("work")
    assert not _inside(root, ROOT) and not _inside(workdir, ROOT)
    _run([sys.executable, "-m", "venv", root], cwd=workdir)  # from the base interpreter, without .venv's packages
    python = root / "bin" / "python"
    # No PYTHON* variable (PYTHONPATH could point at the checkout; without PYTHONDONTWRITEBYTECODE the first import
    # writes the bytecode the later commands reuse), the venv first on PATH, offline, caches in the temp folder.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(
        PATH=f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        VIRTUAL_ENV=str(root),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HOME=str(workdir / "hf_home"),
        HF_EXT_CACHE=str(workdir / "hf_ext_cache"),
    )
    pip = [python, "-m", "pip", "--disable-pip-version-check", "install", "--no-compile"]
    torch = subprocess.run(
        [str(arg) for arg in [*pip, "--no-index", "--no-deps", TORCH_SPEC]],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if torch.returncode != 0 and "No matching distribution" in torch.stderr:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no local {TORCH_SPEC} wheel for pip (its find-links): a download is never attempted")
    assert torch.returncode == 0, torch.stderr[-6000:]
    # Non-editable, from the wheel file; torch's own dependencies are resolved here too.
    _run([*pip, artifacts.wheel], cwd=workdir, env=env, timeout=1200)
    _run([python, "-m", "pip", "--disable-pip-version-check", "check"], cwd=workdir, env=env)
    yield Venv(root=root, python=python, workdir=workdir, env=env)
    # ~1.5 GB in ~40k files (pytest would keep its last three temp folders): removed by a detached `rm -rf`, since
    # deleting it in place took ~2 minutes on a loaded 2-core machine.
    subprocess.Popen(
        ["rm", "-rf", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


@pytest.fixture(scope="module")
def facts(venv: Venv) -> dict[str, Any]:
    """What `CHECK_SCRIPT` found, run once by the venv's interpreter (it writes the bytecode the later runs use)."""
    script = venv.workdir / "check_installed.py"
    script.write_text(CHECK_SCRIPT)
    stdout = venv.run(venv.python, script, json.dumps([PREDICTIONS, REFERENCES]))
    return json.loads(stdout.strip().splitlines()[-1])


def _members_under(names: list[str], prefix: str) -> set[str]:
    return {name.removeprefix(prefix) for name in names if name.startswith(prefix) and not name.endswith("/")}


def test_the_sdist_and_the_wheel_hold_every_tracked_file_of_the_package(artifacts: Artifacts) -> None:
    package = {name for name in artifacts.tracked if name.startswith("hf_ext/")}
    with zipfile.ZipFile(artifacts.wheel) as wheel:
        wheel_names = [name for name in wheel.namelist() if not name.endswith("/")]
    shipped = {name for name in wheel_names if name.startswith("hf_ext/")}
    assert not package - shipped, f"tracked files of hf_ext/ missing from the wheel: {sorted(package - shipped)}"
    assert not shipped - package, f"files in the wheel the checkout does not track: {sorted(shipped - package)}"
    for pattern in PACKAGE_DATA:
        assert any(Path(name).match(pattern) for name in shipped), f"no {pattern} in {artifacts.wheel.name}"
    tops = {name.split("/", 1)[0] for name in wheel_names}
    dist_info = artifacts.wheel.name.split("-py3")[0] + ".dist-info"
    assert tops == {"hf_ext", dist_info}, f"the wheel installs more than the package: {sorted(tops)}"

    with tarfile.open(artifacts.sdist) as sdist:
        sdist_names = sdist.getnames()
    top = artifacts.sdist.name.removesuffix(".tar.gz") + "/"
    in_sdist = _members_under(sdist_names, top)
    needed = package | {"pyproject.toml", "README.md", "PKG-INFO"}
    assert not needed - in_sdist, f"missing from the sdist (the wheel is built from it): {sorted(needed - in_sdist)}"


def test_twine_check_strict_passes_on_both(artifacts: Artifacts) -> None:
    result = _run([sys.executable, "-m", "twine", "check", "--strict", artifacts.wheel, artifacts.sdist], cwd=ROOT)
    assert result.stdout.count("PASSED") == 2, result.stdout + result.stderr


def test_hf_ext_and_every_submodule_import_from_the_fresh_venv_not_the_checkout(
    venv: Venv, facts: dict[str, Any]
) -> None:
    assert _inside(facts["hf_ext_file"], venv.root), facts["hf_ext_file"]
    on_path = [entry for entry in facts["sys_path"] if _inside(entry or venv.workdir, ROOT)]
    assert not on_path, f"the checkout is on the venv's sys.path: {on_path}"
    assert facts["direct_url"] is not None and "dir_info" not in facts["direct_url"], facts["direct_url"]  # no -e
    assert {"hf_ext.cli", "hf_ext.generation.nbce_hub.custom_generate.generate"} <= set(facts["modules"])


def test_transformers_runs_the_installed_custom_generate_folder(venv: Venv, facts: dict[str, Any]) -> None:
    folder = Path(facts["custom_generate"])
    assert _inside(folder, venv.root), folder
    assert (folder / "custom_generate" / "generate.py").is_file() and (folder / "README.md").is_file()
    new_tokens = facts["hub_way_new_tokens"]
    assert len(new_tokens) == 3 and len(new_tokens[0]) == 4
    assert all(row == new_tokens[0] for row in new_tokens), new_tokens  # NBCE: one token for every row
    assert new_tokens == facts["package_way_new_tokens"]  # the folder's generate == the package's processor


def test_the_installed_ece_module_gives_the_hand_computed_ece(venv: Venv, facts: dict[str, Any]) -> None:
    assert _inside(facts["ece_module"], venv.root), facts["ece_module"]
    assert abs(ECE_BY_HAND - 0.41) < 1e-12  # the arithmetic above
    assert facts["ece"] == pytest.approx(ECE_BY_HAND, abs=1e-9)
    assert facts["ece_counts"] == ECE_COUNTS


def test_the_console_script_lists_and_finds_the_shipped_configs(venv: Venv, artifacts: Artifacts) -> None:
    shipped = sorted(
        Path(name).stem for name in artifacts.tracked if Path(name).match("hf_ext/accelerate_configs/*.yaml")
    )
    cli = venv.root / "bin" / "hf-ext"
    assert venv.run(cli, "config", "--list").split() == shipped
    path = Path(venv.run(cli, "config", "cpu").strip())
    assert path.is_file() and path.name == "cpu.yaml" and _inside(path, venv.root), path
    assert path.read_bytes() == (ROOT / "hf_ext" / "accelerate_configs" / "cpu.yaml").read_bytes()


def _readme_quick_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Quick example[ \t]*\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section, "README.md has no `## Quick example` section"
    block = re.search(r"^```python[ \t]*\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, "the README's `## Quick example` section has no ```python block"
    return block.group(1)


def test_the_readme_quick_example_runs_on_the_installed_wheel(venv: Venv) -> None:
    code = _readme_quick_example()
    assert "hf_ext" in code
    script = venv.workdir / "readme_quick_example.py"
    script.write_text(code)
    venv.run(venv.python, script)
