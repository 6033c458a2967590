"""The no-op of built projects, side by side: what `run` costs when nothing is out of date.

    .venv/bin/python bench/noop_built.py --models 50 --rounds 3 PROJECT [PROJECT ...]
                                                        # results: bench/noop_built.{json,md}

Each PROJECT is a built generated project (`bench/scaling.py --keep`: gen_0 ... gen_{N-1}), each
run with its own checked-out code. In every round, in each project in turn: the whole
`run -j 2` (nothing to build), then its two largest parts alone, `compose` and `dvc status`.
Medians over the rounds; the machine's drift shows in the spread, not between the projects.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(command: list[str], project: Path) -> float:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": ""}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{project}: {' '.join(command)} exited {done.returncode}: {done.stderr[-500:]}")
    if command[-2:] == ["status", "--json"] and json.loads(done.stdout):
        raise SystemExit(f"{project}: not a no-op, dvc status: {done.stdout[:300]}")
    return seconds


def describe(project: Path) -> dict:
    commit = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=project, capture_output=True, text=True)
    lock = project / "dvc.lock"
    return {"project": str(project), "commit": commit.stdout.strip()[:80],
            "dvc_lock_mb": round(lock.stat().st_size / 1e6, 2), "stages": _stage_count(lock)}


def _stage_count(lock: Path) -> int:
    import yaml

    return len(yaml.load(lock.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["stages"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("projects", type=Path, nargs="+")
    parser.add_argument("--models", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    selection = "model=[" + ",".join(f"gen_{index}" for index in range(args.models)) + "]"
    commands = {"run -j 2": [sys.executable, "-m", "pipeline.cli", "run", "-j", "2", selection],
                "compose": [sys.executable, "-m", "pipeline.cli", "compose", selection],
                "dvc status": [str(BIN / "dvc"), "status", "--json"]}
    times: dict[str, dict[str, list[float]]] = {str(p): {name: [] for name in commands} for p in args.projects}
    for _ in range(args.rounds):
        for project in args.projects:
            for name, command in commands.items():
                times[str(project)][name].append(timed(command, project))
    rows = [{**describe(project), **{f"{name} (s)": round(statistics.median(values), 2)
                                      for name, values in times[str(project)].items()},
             "all": {name: [round(v, 2) for v in values] for name, values in times[str(project)].items()}}
            for project in args.projects]
    (ROOT / "bench" / "noop_built.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"N = {args.models}, medians of {args.rounds} rounds, the projects in turn within each round:", "",
             "| commit | stages | dvc.lock (MB) | run -j 2, no-op (s) | compose (s) | dvc status (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {row['commit']} | {row['stages']} | {row['dvc_lock_mb']} | {row['run -j 2 (s)']} | "
              f"{row['compose (s)']} | {row['dvc status (s)']} |" for row in rows]
    (ROOT / "bench" / "noop_built.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
