"""Why a no-op run grows with the number of models: DVC reads params.yaml once per stage.

    .venv/bin/python bench/noop.py --models 1 5 20 50      # results: bench/noop.{json,md}

For each N, a generated project (bench/scaling.py's: N conf files × 4 variants; composed only,
nothing built) and, through DVC's own code: the stages and their params dependencies; how long
DVC takes to load params.yaml (`dvc.utils.serialize.load_yaml`, what `dvc status` calls for
every stage with params) and to look up one key in it (`dpath.get`, once per listed key). Their
product is what a no-op `dvc status` spends on params alone; it grows with N × N (more stages,
each reading a larger file). And what one stage process of ours pays to load its config: the
whole file (`config.load()`), and the part a build stage loads (`config.load(build=...)`),
which a build pays about four times. Medians of 5.
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
sys.path.insert(0, str(ROOT / "bench"))
BIN = Path(sys.executable).parent


def median_seconds(function, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(count: int, work: Path) -> dict:
    import dpath
    from dvc.dependency.param import ParamsDependency
    from dvc.fs import LocalFileSystem
    from dvc.repo import Repo
    from dvc.utils.serialize import load_yaml

    import scaling

    project = scaling.generated_project(work / f"n{count}", count)
    models = ",".join(f"gen_{index}" for index in range(count))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-m", "pipeline.cli", "compose", f"model=[{models}]"], cwd=project, env=env, check=True,
                   capture_output=True)
    params = project / "params.yaml"
    with Repo(str(project)) as repo:
        stages = list(repo.index.stages)
        reads = [dep for stage in stages for dep in stage.deps if isinstance(dep, ParamsDependency)]
    keys = sum(len(dep.params) for dep in reads)
    data = load_yaml(str(params), fs=LocalFileSystem())
    parse = median_seconds(lambda: load_yaml(str(params), fs=LocalFileSystem()))
    lookup = median_seconds(lambda: dpath.get(data, "quantization.float", separator="."))
    from pipeline import config

    here = os.getcwd()
    os.chdir(project)  # paths in the config are the project's
    try:
        whole = median_seconds(lambda: config.load(params))
        part = median_seconds(lambda: config.load(params, build="gen_0-float"))
    finally:
        os.chdir(here)
    return {"stage_whole_ms": round(whole * 1000), "stage_part_ms": round(part * 1000),
            "models": count, "stages": len(stages), "params_reads": len(reads), "keys_looked_up": keys,
            "params_kb": round(params.stat().st_size / 1024, 1), "parse_ms": round(parse * 1000, 1),
            "lookup_ms": round(lookup * 1000, 2), "params_seconds": round(len(reads) * parse + keys * lookup, 1)}


def to_markdown(rows: list[dict]) -> str:
    lines = ["| models | stages | params.yaml reads | keys looked up | params.yaml (KB) | one read (ms) | "
             "one lookup (ms) | params per no-op (s) | stage config, whole (ms) | stage config, its part (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['models']} | {row['stages']} | {row['params_reads']} | {row['keys_looked_up']} | "
                     f"{row['params_kb']} | {row['parse_ms']} | {row['lookup_ms']} | {row['params_seconds']} | "
                     f"{row.get('stage_whole_ms', '')} | {row.get('stage_part_ms', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, nargs="+", default=[1, 5, 20, 50])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="litert-noop-") as folder:
        rows = []
        for count in args.models:
            rows.append(measure(count, Path(folder)))
            print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    (ROOT / "bench" / "noop.json").write_text(json.dumps({"commit": commit, "rows": rows}, indent=2) + "\n")
    text = f"Commit {commit}:\n\n" + to_markdown(rows)
    (ROOT / "bench" / "noop.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
