"""Why a no-op run grows with the number of models: DVC reads a params file once per stage.

    .venv/bin/python bench/noop.py --models 1 5 20 50      # results: bench/noop.{json,md}

For each N, a generated project (bench/scaling.py's: N conf files × 4 variants; composed and
its `params` stage run, nothing built) and, through DVC's own code: the stages and their params
dependencies, and what reading them all costs, as a no-op `dvc status` reads them
(`ParamsDependency.read_params`: load the file, look up each listed key), side by side: from
each model's part of params.yaml (what the stages name now) and from params.yaml itself (what
they named before: the same keys, the whole file, which grows with N, read by every stage).
And what one stage process of ours pays to load its config: the whole file (`config.load()`),
and the part a build stage loads (`config.load(build=...)`), which a build pays about four
times: from its model's part, and cut from params.yaml (no part beside it). Medians of 5, but the params totals: one pass each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(count: int, work: Path) -> dict:
    from dvc.dependency.param import ParamsDependency, read_param_file
    from dvc.repo import Repo

    import scaling

    project = scaling.generated_project(work / f"n{count}", count)
    models = ",".join(f"gen_{index}" for index in range(count))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for command in (["-m", "pipeline.cli", "compose", f"model=[{models}]"], ["-m", "stages.params"]):
        subprocess.run([sys.executable, *command], cwd=project, env=env, check=True, capture_output=True)
    params = project / "params.yaml"
    with Repo(str(project)) as repo:
        stages = list(repo.index.stages)
        reads = [dep for stage in stages for dep in stage.deps if isinstance(dep, ParamsDependency)]
        parts = _seconds(lambda: [dep.read_params() for dep in reads])
        whole = _seconds(lambda: [read_param_file(repo.fs, str(params), list(dep.params), flatten=True)
                                  for dep in reads])
    from pipeline import config, layout

    here = os.getcwd()
    os.chdir(project)  # paths in the config are the project's
    try:
        stage_whole = median_seconds(lambda: config.load(params))
        stage_part = median_seconds(lambda: config.load(params, build="gen_0-float"))
        alone = Path(tempfile.mkdtemp(dir=work)) / "params.yaml"  # no part beside it: cut from the whole file
        shutil.copy(params, alone)
        stage_cut = median_seconds(lambda: config.load(alone, build="gen_0-float"))
    finally:
        os.chdir(here)
    return {"models": count, "stages": len(stages), "params_reads": len(reads),
            "keys_looked_up": sum(len(dep.params) for dep in reads),
            "params_kb": round(params.stat().st_size / 1024, 1),
            "part_kb": round((project / layout.model_params("gen_0")).stat().st_size / 1024, 1),
            "from_parts_seconds": round(parts, 2), "from_params_yaml_seconds": round(whole, 2),
            "stage_whole_ms": round(stage_whole * 1000), "stage_part_ms": round(stage_part * 1000),
            "stage_part_cut_ms": round(stage_cut * 1000)}


def to_markdown(rows: list[dict]) -> str:
    lines = ["| models | stages | params reads | keys looked up | params.yaml (KB) | a model's part (KB) | "
             "reads from the parts (s) | the same from params.yaml (s) | stage config, whole (ms) | "
             "stage config, its part (ms) | the same cut from params.yaml (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['models']} | {row['stages']} | {row['params_reads']} | {row['keys_looked_up']} | "
                     f"{row['params_kb']} | {row['part_kb']} | {row['from_parts_seconds']} | "
                     f"{row['from_params_yaml_seconds']} | {row['stage_whole_ms']} | {row['stage_part_ms']} | "
                     f"{row['stage_part_cut_ms']} |")
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
