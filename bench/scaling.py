"""P8: how a run's cost grows with the number of models, with `-j 1` and `-j 2`.

    .venv/bin/python bench/scaling.py --models 5 20 50      # results: bench/scaling.{json,md}
    .venv/bin/python bench/scaling.py --models 20 --jobs 2 --commits a2bfa7e HEAD  # two commits

A generated project per N: N conf files (`gen_<i>`, each the digits_h5 example under its own
name: its own conversion, calibration and builds) × 4 variants (float, dynamic int8, static
int8, float16 by LiteRT Quantizer), tracking on (embedded store). For each N and job count,
a fresh clone runs `litert-pipeline run -j J` cold, then again (no-op). Side by side in one
run; per-build time is the cold time over the N × 4 builds; peak memory is the largest
single process's (the run, DVC or a stage).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VARIANTS = ("float", "dynamic_wi8_afp32", "static_wi8_ai8", "weight_only_wf16_afp32")
ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
       "GIT_COMMITTER_EMAIL": "bench@localhost", "MLFLOW_TRACKING_URI": ""}


def generated_project(folder: Path, count: int, commit: str = "HEAD") -> Path:
    """A clone of this checkout at `commit` with `count` generated models, committed."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(folder)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=folder, check=True)
    template = (ROOT / "conf" / "model" / "digits_h5.yaml").read_text()
    head = template.split("\n# `autoselect")[0].split("\nautoselect:")[0].split("\nbuild:")[0]
    for index in range(count):
        name = f"gen_{index}"
        text = head.replace("digits_h5:", f"{name}:", 1) + "\nbuild:\n" + "".join(
            f"  {name}-{variant}: {{model: {name}, variant: {variant}}}\n" for variant in VARIANTS)
        (folder / "conf" / "model" / f"{name}.yaml").write_text(text)
    git(folder, "add", "-A")
    git(folder, "commit", "-qm", f"{count} generated models")
    return folder


def git(folder: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True, env={**os.environ, **ENV})


def timed_run(project: Path, count: int, jobs: int) -> dict:
    models = ",".join(f"gen_{index}" for index in range(count))
    command = [sys.executable, "-m", "pipeline.cli", "run", "-j", str(jobs), f"model=[{models}]"]  # the clone's code
    env = {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    summary = next((line for line in done.stdout.splitlines() if line.startswith("builds:")), done.stderr[-300:])
    result = {"seconds": round(seconds, 1), "exit_code": done.returncode, "summary": summary}
    if done.returncode:  # what failed, kept: a rerun may not fail again
        output = (done.stdout + done.stderr).splitlines()
        result["errors"] = [line for line in output if "error" in line.lower() or "Traceback" in line][-20:]
    return result


def measure(count: int, jobs: int, work: Path, commit: str = "HEAD", keep: bool = False) -> dict:
    project = generated_project(work / f"n{count}-j{jobs}-{commit}", count, commit)
    cold = timed_run(project, count, jobs)
    noop = timed_run(project, count, jobs)
    if not keep:
        shutil.rmtree(project)
    builds = count * len(VARIANTS)
    return {"commit": commit, "models": count, "jobs": jobs, "builds": builds, "cold_seconds": cold["seconds"],
            "per_build_seconds": round(cold["seconds"] / builds, 2), "noop_seconds": noop["seconds"],
            "exit_code": cold["exit_code"], "summary": cold["summary"],
            **({"errors": cold["errors"]} if "errors" in cold else {})}


def to_markdown(rows: list[dict]) -> str:
    lines = ["| commit | models | builds | jobs | cold (s) | per build (s) | no-op (s) | speed-up vs -j 1 | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    serial = {(row["commit"], row["models"]): row["cold_seconds"] for row in rows if row["jobs"] == 1}
    for row in rows:
        one_job = serial.get((row["commit"], row["models"]))
        speedup = f"{one_job / row['cold_seconds']:.2f}×" if one_job and row["cold_seconds"] else "–"
        lines.append(f"| {row['commit']} | {row['models']} | {row['builds']} | {row['jobs']} | {row['cold_seconds']} | "
                     f"{row['per_build_seconds']} | {row['noop_seconds']} | {speedup} | {row['summary']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--commits", nargs="+", default=["HEAD"], help="revisions of this checkout to compare")
    parser.add_argument("--keep", type=Path, help="build the projects in this folder and keep them (to profile one)")
    args = parser.parse_args()
    commits = [subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() for commit in args.commits]
    rows = []
    with tempfile.TemporaryDirectory(prefix="litert-scaling-") as folder:
        for count in args.models:
            for jobs in args.jobs:
                for commit in commits:
                    rows.append(measure(count, jobs, args.keep or Path(folder), commit, keep=bool(args.keep)))
                    print(json.dumps(rows[-1]), flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "rows": rows, "peak_process_mb": round(peak_mb), "cores": os.cpu_count()}
    (ROOT / "bench" / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    text = (f"Checkout at {commit}, {time.strftime('%Y-%m-%d')}, side by side in one run:\n\n" + to_markdown(rows)
            + f"\nLargest single process: {round(peak_mb)} MB; {os.cpu_count()} cores.\n")
    earlier = (ROOT / "bench" / "scaling.md").read_text() if (ROOT / "bench" / "scaling.md").is_file() else ""
    (ROOT / "bench" / "scaling.md").write_text(text + ("\n" + earlier if earlier else ""))  # newest first
    print(text)


if __name__ == "__main__":
    main()
