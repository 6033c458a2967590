"""Time a new user's first `make run`: a fresh clone of this checkout, after installation.

    .venv/bin/python bench/first_run.py            # 1 run; --runs N for a median
    .venv/bin/python bench/first_run.py --jobs 1 2 # `run -j 1` and `run -j 2`, side by side
    .venv/bin/python bench/first_run.py --jobs 2 --commits b26b12d HEAD --runs 3  # two commits

The clone reuses this interpreter's environment (the install is excluded, as the 5-minute
goal states) and runs `litert-pipeline run` with the embedded defaults: the default example
selection (digits: 7 builds and an auto-selection; P7), the local MLflow store. The clone's own
code runs (`python -m pipeline.cli`: the `litert-pipeline` script would import this checkout's
`pipeline`, installed in editable mode). Results go to bench/first_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def first_run(folder: Path, jobs: int, commit: str) -> dict:
    project = folder / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=project, check=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": ""}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-j", str(jobs)], cwd=project, env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    summary = next((line for line in result.stdout.splitlines() if line.startswith("builds:")), "")
    return {"commit": commit, "jobs": jobs, "seconds": round(seconds, 1), "exit_code": result.returncode,
            "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1])
    parser.add_argument("--commits", nargs="+", default=["HEAD"], help="revisions of this checkout to compare")
    args = parser.parse_args()
    commits = [subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() for commit in args.commits]
    runs = []
    for _ in range(args.runs):
        for commit in commits:
            for jobs in args.jobs:  # interleaved: each commit and job count sees the same machine
                with tempfile.TemporaryDirectory(prefix="litert-first-run-") as folder:
                    runs.append(first_run(Path(folder), jobs, commit))
                    print(runs[-1], flush=True)
    medians = {f"{commit} -j {jobs}": statistics.median(r["seconds"] for r in runs
                                                         if r["jobs"] == jobs and r["commit"] == commit)
               for commit in commits for jobs in args.jobs}
    result = {"commits": commits, "runs": runs, "median_seconds": medians, "cores": os.cpu_count(),
              "goal_seconds": {"first run": 300, "P7": 60}}
    (ROOT / "bench" / "first_run.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
