"""`import hf_ext` and the GPU suite's modules work where `datasets` and `evaluate` are not installed (the GPU
machine): nothing imported at package import time may need them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: sys.meta_path's PathFinder is replaced by one blind to the two packages, so that their
# modules are not found (`import datasets` raises ModuleNotFoundError, `importlib.util.find_spec` returns None) and
# their distributions are not listed (`importlib.metadata.version` raises PackageNotFoundError; sentence-transformers
# checks the metadata): the packages look uninstalled, as on the GPU machine.
SCRIPT = textwrap.dedent(
    """
    import importlib.machinery
    import importlib.metadata
    import importlib.util
    import re
    import sys

    BLOCKED = {"datasets", "evaluate"}


    def _blocked(name):
        return re.sub(r"[-_.]+", "-", name or "").lower() in BLOCKED


    class Uninstalled:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if _blocked(name.partition(".")[0]):
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)

        @staticmethod
        def find_distributions(*args, **kwargs):
            for dist in importlib.machinery.PathFinder.find_distributions(*args, **kwargs):
                if not _blocked(dist.metadata["Name"]):
                    yield dist

        @staticmethod
        def invalidate_caches():
            importlib.machinery.PathFinder.invalidate_caches()


    sys.meta_path[:] = [Uninstalled if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} is still importable: the check is void")
        assert importlib.util.find_spec(name) is None
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
        else:
            raise SystemExit(f"{name}'s metadata is still visible: the check is void")

    import torch

    import hf_ext
    from hf_ext.data import BucketPadCollator, bbc_lm_data, default_buckets
    from hf_ext.generation import NBCELogitsProcessor
    from hf_ext.optim import create_projected_optimizer
    from hf_ext.retrieval.knn import nearest_neighbours
    from hf_ext.trainers import RecompileCounter, compiled_graphs

    assert hf_ext.accelerate_config_path("bf16_compile").is_file()
    assert float(hf_ext.cosent_loss(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0]))) < 1.0
    logits, labels = torch.randn(6, 11), torch.randint(0, 11, (6,))
    assert torch.isclose(hf_ext.tvd_loss(logits, labels, gamma=0.0), torch.nn.functional.cross_entropy(logits, labels))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    assert isinstance(create_projected_optimizer(model, rank=2, lr=1e-3), hf_ext.ProjectedAdamW)
    assert nearest_neighbours(torch.randn(50, 8), k=3)[1].shape == (50, 3)
    assert default_buckets(128) == (32, 64, 128) and callable(bbc_lm_data)
    NBCELogitsProcessor(beta=0.25), RecompileCounter(), compiled_graphs(), BucketPadCollator
    try:
        hf_ext.load_stsb("test")
    except ImportError as error:
        assert "datasets" in str(error)
    else:
        raise SystemExit("load_stsb worked without datasets")

    sys.path.insert(0, "benchmarks")
    import gpu_suite, nbce_longcontext, projected_optimizer, throughput  # noqa: E401,F401

    leaked = sorted(m for m in sys.modules if _blocked(m.partition(".")[0]))
    assert not leaked, leaked
    print("OK")
    """
)


def test_import_hf_ext_works_with_datasets_and_evaluate_uninstalled() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]
