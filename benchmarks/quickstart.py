"""The main job as a newcomer meets it: `make quickstart` on a fresh clone, timed, and its printed gain recorded.

    python benchmarks/quickstart.py           # about 10 minutes on 2 CPU cores (install + the job)
    python benchmarks/quickstart.py --table   # the README line from the results file

Clones the committed tree (``git clone`` of this checkout's HEAD) into a temporary folder, times ``make install``
(creates ``.venv`` and installs hf_ext with the embedded assets) and then ``make quickstart`` (one epoch of CoSENT on
STS-B train at the recipe's defaults), and records the printed ``STS test Spearman before -> after`` line with the
recipe's own ``results.json``. Nothing is chosen here: the recipe's defaults were chosen on STS-B dev by
``benchmarks/cosent_sts.py``; the test split is scored once before and once after training.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import load_results, protocol, save_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUDGET_SECONDS = 8 * 60  # the main job's budget on 2 cores (issue 15)
LINE = re.compile(r"STS test Spearman .*?: (?P<before>[0-9.]+) -> (?P<after>[0-9.]+) \((?P<gain>[+-][0-9.]+)\)")


def _timed(argv: list[str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run(argv, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}); the end of its log:\n"
                           f"{log.read_text()[-4000:]}")  # fmt: skip
    return seconds


def run(data: dict) -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="hf_ext_quickstart_") as tmp:
        clone = Path(tmp) / "hf_ext"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        install = _timed(["make", "install"], clone, Path(tmp) / "install.log")
        job = _timed(["make", "quickstart"], clone, Path(tmp) / "quickstart.log")
        text = (Path(tmp) / "quickstart.log").read_text()
        match = LINE.search(text)
        if match is None:
            raise RuntimeError(f"`make quickstart` printed no 'STS test Spearman' line:\n{text[-4000:]}")
        results = json.loads((clone / "outputs" / "cosent-bi" / "results.json").read_text())
    data["run"] = {
        "commit": commit.stdout.strip(),
        "install_seconds": install,
        "job_seconds": job,
        "printed": match.group(0),
        "results": {k: results[k] for k in ("test_spearman_before", "test_spearman", "dev_spearman", "dev_curve")},
    }


def summarize(data: dict) -> dict:
    if "run" not in data:
        return {}
    run_ = data["run"]
    before, after = run_["results"]["test_spearman_before"], run_["results"]["test_spearman"]
    return {
        "test_spearman_before": before,
        "test_spearman_after": after,
        "test_gain": after - before,
        "job_seconds": run_["job_seconds"],
        "install_seconds": run_["install_seconds"],
        "job_within_budget": run_["job_seconds"] <= BUDGET_SECONDS,
        # `make quickstart` on a fresh clone creates .venv first: the budget holds for both together
        "install_and_job_seconds": run_["install_seconds"] + run_["job_seconds"],
        "install_and_job_within_budget": run_["install_seconds"] + run_["job_seconds"] <= BUDGET_SECONDS,
        "budget_seconds": BUDGET_SECONDS,
    }


def table(data: dict) -> str:
    s = data["summary"]
    return (f"`make quickstart`: STS-B test Spearman {s['test_spearman_before']:.4f} -> {s['test_spearman_after']:.4f} "
            f"({s['test_gain']:+.4f}) in {s['job_seconds']:.0f} s after {s['install_seconds']:.0f} s of first install: "
            f"{s['install_and_job_seconds']:.0f} s in all (budget {s['budget_seconds']} s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=RESULTS / "quickstart.json")
    parser.add_argument("--table", action="store_true", help="print the README line from --output and exit")
    parser.add_argument("--summarize", action="store_true", help="rewrite --output's summary from its run and exit")
    args = parser.parse_args()
    if args.summarize:
        data = json.loads(args.output.read_text())
        save_results(args.output, data, summarize)
        return
    if args.table:
        print(table(json.loads(args.output.read_text())))
        return
    sys.path.insert(0, str(ROOT / "recipes"))
    from train_cosent import BI_DEFAULTS

    data = load_results(args.output, protocol(
        selection_split="STS-B dev (the recipe's defaults, chosen by benchmarks/cosent_sts.py)",
        test_split="STS-B test, scored once before and once after training",
        chosen=dict(BI_DEFAULTS), seeds=[42],  # the recipe's seed
    ))  # fmt: skip
    run(data)
    save_results(args.output, data, summarize)
    print(table(data))


if __name__ == "__main__":
    main()
