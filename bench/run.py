"""Benchmark the pipeline against the bare converter script, side by side in one run.

    make bench                                   # everything, 3 repetitions (about 35 min on 2 cores)
    .venv/bin/python bench/run.py --quick        # 1 repetition, digits only: a smoke test
    .venv/bin/python bench/run.py --p1-only      # P1 alone (about 15 min): bench/p1.{json,md}

P1  cold `dvc repro` of MobileNetV2 x {float, dynamic_wi8_afp32, weight_only_wf16_afp32,
    static_wi8_ai8} vs bench/bare_converter.py (TFLiteConverter: float, dynamic, float16,
    int8), also with tracking off. Both start from the same prebuilt SavedModel: building
    the example (the `prepare` stage) is excluded from both. Also the one command a user
    types, `litert-pipeline run` and `run -j 2` (composing, `dvc status` and the MLflow
    parent run included; MLflow uploads from that process while DVC builds).
P2  no-op `dvc repro`; `litert-pipeline --help` and whether it imports TensorFlow.
P3  which stages a validation-threshold edit reruns, and the rerun's wall time.
P4/P5  delivered size ratio and accuracy drop (or cosine) per variant, against the limits.
P6  an 8-member `dvc exp run --queue -S ...` sweep with 1 and 2 queue workers, and peak
    memory per experiment; plus which stages import TensorFlow (`python -X importtime`).

Everything runs in throwaway git repositories under a temporary folder, with this
interpreter's environment; results go to bench/results.json and bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import copy_project  # noqa: E402  (the tests' own "fresh clone" copy)

PYTHON = sys.executable
BIN = Path(PYTHON).parent
MOBILENET = ["model=[mobilenet_v2]", "examples=[mobilenet_v2]", "~build.mobilenet_v2-converter_int8",
             "dataset=[]", "+dataset={}"]  # the generator makes its data: no dataset files
DIGITS = ["model=[digits]", "examples=[digits_data,digits_savedmodel]"]
UNTRACKED = ["tracking.enabled=false"]
THRESHOLD_EDIT = "validation.classifier.min_cosine=0.9"
SWEEP_KEY = "quantization.static_wi8_ai8.num_samples"
SWEEP_VALUES = [16, 32, 48, 64, 80, 96, 112, 128]
BARE_SAMPLES = 100  # = model.mobilenet_v2.representative.num_samples
# Goals from the issue.
GOAL_P1_RATIO = 1.0  # stretch: 0.75
GOAL_NOOP_SECONDS = 2.0
GOAL_HELP_SECONDS = 0.5
GOAL_SPEEDUP = 1.6
# Ideal delivered/float size ratio by weight type: int8 weights are 0.25x float32.
IDEAL_RATIO = {"float32": 1.0, "float16": 0.5, "int8": 0.25, "int4": 0.125}
# Stage commands to check for a TensorFlow import (digits project), and whether one is expected.
IMPORT_CHECKS = [
    ("data", ["stages.data", "digits_calibration"], False),
    ("convert", ["stages.convert", "digits"], True),
    ("representative", ["stages.representative", "digits"], False),
    ("quantize (litert)", ["stages.quantize", "digits-static_wi8_ai8"], False),
    ("quantize (converter)", ["stages.quantize", "digits-converter_int8"], True),
    ("metadata", ["stages.metadata", "digits-static_wi8_ai8"], False),
    ("validate", ["stages.validate", "digits-static_wi8_ai8", "--model", "models/digits/static_wi8_ai8.tflite"], False),
]
RUNNING = re.compile(r"Running stage '([^']+)'")
FAILED = re.compile(r"failed to reproduce '([^']+)'")
TENSORFLOW_IMPORT = re.compile(r"^import time:.*\|\s+tensorflow$", re.MULTILINE)

ENV = {
    **os.environ,
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "MLFLOW_TRACKING_URI": "",  # each throwaway project gets the default embedded store
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
}
ENV.pop("PYTHONPATH", None)  # stages import the project's own pipeline/ (python -m from its folder)


# --- running and timing ----------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    returncode: int
    output: str = field(repr=False)
    stages: list[tuple[str, float]]  # stages DVC ran, with their wall seconds (incl. DVC's bookkeeping)

    @property
    def failed_stages(self) -> list[str]:
        return FAILED.findall(self.output)


def run(args: list[str], cwd: Path, *, check: bool = True) -> Run:
    """Run a command, timing it and each DVC stage it reports ("Running stage ...")."""
    started = time.perf_counter()
    process = subprocess.Popen(args, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks: list[tuple[str, float]] = []
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if match := RUNNING.search(line):
            marks.append((match.group(1), time.perf_counter()))
    code = process.wait()
    ended = time.perf_counter()
    ends = [t for _, t in marks[1:]] + [ended]
    result = Run(round(ended - started, 2), code, "".join(lines),
                 [(name, round(end - start, 2)) for (name, start), end in zip(marks, ends)])
    if check and code != 0:
        raise RuntimeError(f"{' '.join(args)} exited {code} in {cwd}:\n{result.output[-3000:]}")
    return result


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


# --- throwaway projects ----------------------------------------------------------------------


def build_examples(source: Path, names: list[str], into: Path) -> Path:
    """Build the example models once, with the project's own code; every project copies them."""
    missing = [n for n in names if not (into / n).exists()]
    if missing:
        code = "import sys\nfrom pipeline.examples import build_example\nfor n in sys.argv[2:]: build_example(n, f'{sys.argv[1]}/{n}')"
        run([PYTHON, "-c", code, str(into), *missing], source)
    return into


def git(project: Path, *args: str) -> None:
    run(["git", *args], project)


def make_project(folder: Path, source: Path, overrides: list[str], examples: Path) -> Path:
    """A fresh clone of `source` composed with `overrides`, its examples in place and recorded
    as built (`dvc commit`), committed to a new git repo: the next `dvc repro` is cold."""
    project = copy_project(folder, root=source)
    (project / "dvc.lock").unlink(missing_ok=True)
    run([PYTHON, "-m", "pipeline.cli", "compose", *overrides], project)
    names = yaml.safe_load((project / "params.yaml").read_text())["examples"]
    for name in names:
        shutil.copytree(examples / name, project / "examples" / name)
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "bench project")
    # The examples' stages depend on the code fingerprints: made first, so they can be recorded.
    run(["dvc", "repro", "--quiet", "code"], project)
    run(["dvc", "commit", "--force", "--quiet", *[f"prepare@{name}" for name in names]], project)
    git(project, "add", "-A")
    git(project, "commit", "-qm", "examples built")
    return project


# --- P1: cold repro vs the bare converter -------------------------------------------------------


def p1_cold(work: Path, args: argparse.Namespace, examples: Path) -> dict[str, Any]:
    saved_model = examples / "mobilenet_v2" / "saved_model"
    contenders: dict[str, Callable[[Path], dict[str, Any]]] = {}

    def ours(source: Path, extra: list[str]) -> Callable[[Path], dict[str, Any]]:
        def measure(folder: Path) -> dict[str, Any]:
            project = make_project(folder, source, MOBILENET + extra, examples)
            result = run(["dvc", "repro", "--keep-going"], project, check=False)
            return {"seconds": result.seconds, "returncode": result.returncode,
                    "failed_stages": result.failed_stages, "stages": result.stages, "project": str(project)}
        return measure

    def bare(folder: Path) -> dict[str, Any]:
        result = run([PYTHON, str(BENCH / "bare_converter.py"), str(saved_model), str(folder),
                      "--num-samples", str(BARE_SAMPLES)], BENCH)
        steps = json.loads([line for line in result.output.splitlines() if line.startswith("{")][-1])
        return {"seconds": result.seconds, "returncode": result.returncode, "steps": steps,
                "sizes": {p.stem: p.stat().st_size for p in folder.glob("*.tflite")}}

    def ours_run(*jobs: str) -> Callable[[Path], dict[str, Any]]:  # the one command a user types
        def measure(folder: Path) -> dict[str, Any]:
            project = make_project(folder, args.project, MOBILENET, examples)
            result = run([str(BIN / "litert-pipeline"), "run", *jobs, *MOBILENET], project, check=False)
            return {"seconds": result.seconds, "returncode": result.returncode, "failed_stages": result.failed_stages,
                    "stages": [], "project": str(project)}
        return measure

    contenders["ours"] = ours(args.project, [])
    contenders["ours_tracking_off"] = ours(args.project, UNTRACKED)
    contenders["ours_run"] = ours_run()  # composing, `dvc status` and the parent run included
    contenders["ours_run_j2"] = ours_run("-j", "2")
    if args.baseline:
        contenders["baseline"] = ours(args.baseline, [])
    contenders["bare"] = bare
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    names = list(contenders)
    for rep in range(args.repetitions):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate: spread the noise
            folder = work / f"p1-{rep}-{name}"
            load = load_average()
            measured = contenders[name](folder)
            runs[name].append({"load_before": load, **measured})
            print(f"P1 rep {rep + 1} {name}: {measured['seconds']} s (load {load})", flush=True)
            if rep < args.repetitions - 1 or name != "ours":
                shutil.rmtree(folder, ignore_errors=True)  # keep only the last "ours" project (P4/P5)
    medians = {name: median([r["seconds"] for r in values]) for name, values in runs.items()}
    ratios = {name: round(medians[name] / medians["bare"], 3) for name in medians if name != "bare"}
    return {"runs": runs, "median_seconds": medians, "ratio_to_bare": ratios,
            "stage_medians": {name: stage_medians(values) for name, values in runs.items()
                              if name not in ("bare", "ours_run", "ours_run_j2")},  # `run`: no stage timeline
            "project": runs["ours"][-1]["project"]}


def stage_medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    per_stage: dict[str, list[float]] = {}
    for result in runs:
        for name, seconds in result["stages"]:
            per_stage.setdefault(name, []).append(seconds)
    return {name: median(values) for name, values in per_stage.items()}


# --- P2, P3: reruns --------------------------------------------------------------------------


def p2_noop(project: Path, repetitions: int) -> dict[str, Any]:
    noop = [run(["dvc", "repro"], project) for _ in range(repetitions)]
    helps = [run(["litert-pipeline", "--help"], project) for _ in range(repetitions)]
    imports = run([PYTHON, "-X", "importtime", "-m", "pipeline.cli", "--help"], project)
    return {
        "noop_repro_seconds": median([r.seconds for r in noop]),
        "noop_repro_stages_run": sorted({s for r in noop for s, _ in r.stages}),
        "help_seconds": median([r.seconds for r in helps]),
        "help_imports_tensorflow": bool(TENSORFLOW_IMPORT.search(imports.output)),
    }


def p3_threshold(project: Path) -> dict[str, Any]:
    run([PYTHON, "-m", "pipeline.cli", "compose", *DIGITS, THRESHOLD_EDIT], project)
    result = run(["dvc", "repro"], project, check=False)
    return {"edit": THRESHOLD_EDIT, "seconds": result.seconds, "returncode": result.returncode,
            "stages_run": [name for name, _ in result.stages]}


def import_checks(project: Path) -> list[dict[str, Any]]:
    """Which stage processes import TensorFlow (`python -X importtime`), and their wall time."""
    rows = []
    for stage, command, expected in IMPORT_CHECKS:
        result = run([PYTHON, "-X", "importtime", "-m", *command], project, check=False)
        imports = bool(TENSORFLOW_IMPORT.search(result.output))
        rows.append({"stage": stage, "command": " ".join(command), "seconds": result.seconds,
                     "returncode": result.returncode, "imports_tensorflow": imports, "needs_tensorflow": expected})
    return rows


# --- P4/P5: sizes and accuracy -----------------------------------------------------------------


def ideal_ratio(variant: dict[str, Any]) -> float:
    backend = variant.get("backend")
    if backend == "none":
        return IDEAL_RATIO["float32"]
    if backend == "converter":
        return IDEAL_RATIO["float16" if variant.get("mode") == "float16" else "int8"]
    recipe = str(variant.get("recipe"))
    return IDEAL_RATIO["int4" if "wi4" in recipe else "float16" if "wf16" in recipe else "int8"]


def quality(project: Path) -> list[dict[str, Any]]:
    params = yaml.safe_load((project / "params.yaml").read_text())
    rows = []
    for build, entry in params["build"].items():
        model, variant = entry["model"], entry["variant"]
        report_file = project / "reports" / model / variant / "validation.json"
        row: dict[str, Any] = {"build": build, "model": model, "variant": variant,
                               "ideal_ratio": ideal_ratio(params["quantization"][variant])}
        delivered = project / "models" / model / f"{variant}.tflite"
        float_model = project / "artifacts" / model / "float.tflite"
        if delivered.exists() and float_model.exists():
            row["size_ratio"] = round(delivered.stat().st_size / float_model.stat().st_size, 4)
        if report_file.exists():
            report = json.loads(report_file.read_text())
            metrics = report["metrics"]
            row.update({k: metrics.get(k) for k in ("accuracy_drop", "cosine", "snr_db", "latency_median_ms")})
            row["gates"] = {g["gate"]: g["threshold"] for g in report["gates"]}
            row["passed"] = report["passed"]
            row["failures"] = report["failures"]
        rows.append(row)
    return rows


# --- P6: sweep scaling ------------------------------------------------------------------------


class MemorySampler:
    """Peak resident memory of the processes working in `project` (Linux /proc), per
    experiment workspace (.dvc/tmp/exps/<dir>) and in total."""

    def __init__(self, project: Path, interval: float = 0.25):
        self.project = str(project.resolve())
        self.exps = os.path.join(self.project, ".dvc", "tmp", "exps") + os.sep
        self.interval = interval
        self.peak_total = 0
        self.peak_per_experiment: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            total, groups = 0, {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cwd = os.readlink(f"/proc/{pid}/cwd")
                    with open(f"/proc/{pid}/statm") as handle:
                        rss = int(handle.read().split()[1]) * self._page
                except OSError:  # the process ended meanwhile
                    continue
                if not (cwd == self.project or cwd.startswith(self.project + os.sep)):
                    continue
                total += rss
                if cwd.startswith(self.exps):
                    group = cwd[len(self.exps):].split(os.sep)[0]
                    groups[group] = groups.get(group, 0) + rss
            self.peak_total = max(self.peak_total, total)
            for group, rss in groups.items():
                self.peak_per_experiment[group] = max(self.peak_per_experiment.get(group, 0), rss)


def finished_experiments(project: Path) -> int:
    """Experiments that succeeded (a ref under refs/exps) or failed (the failed-queue reflog)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project,
                          capture_output=True, text=True).stdout.split()
    done = [r for r in refs if not r.startswith("refs/exps/celery/")]
    failed = subprocess.run(["git", "reflog", "show", "--format=%H", "refs/exps/celery/failed"], cwd=project,
                            capture_output=True, text=True).stdout.split()
    return len(done) + len(failed)


def queue_workers(project: Path) -> int:
    """Running `dvc queue` worker processes of `project`."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if "queue-worker" in cmdline and cwd == str(project.resolve()):
            count += 1
    return count


def p6_sweep(work: Path, digits_project: Path, workers: list[int], timeout: float) -> dict[str, Any]:
    base = work / "sweep-base"
    shutil.copytree(digits_project, base, symlinks=True)
    # -S then sets params.yaml keys directly (no Hydra composition of the full conf/).
    run(["dvc", "config", "hydra.enabled", "false"], base)
    git(base, "add", "-A")
    git(base, "commit", "-qm", "sweep baseline")
    results = {}
    for jobs in workers:
        project = work / f"sweep-j{jobs}"
        shutil.copytree(base, project, symlinks=True)
        for value in SWEEP_VALUES:
            run(["dvc", "exp", "run", "--queue", "-S", f"++{SWEEP_KEY}={value}"], project)  # ++: set or add
        load = load_average()
        with MemorySampler(project) as memory:
            started = time.perf_counter()
            run(["dvc", "queue", "start", "-j", str(jobs)], project)
            while finished_experiments(project) < len(SWEEP_VALUES):
                if time.perf_counter() - started > timeout:
                    raise RuntimeError(f"sweep with {jobs} workers did not finish in {timeout} s")
                time.sleep(0.5)
            seconds = round(time.perf_counter() - started, 2)
            while queue_workers(project):  # idle workers exit within ~10 s of an empty queue
                time.sleep(0.5)
        status = run(["dvc", "queue", "status"], project).output
        results[jobs] = {
            "workers": jobs, "seconds": seconds, "load_before": load,
            "succeeded": status.count("Success"), "failed": status.count("Failed"),
            "peak_rss_total_mb": round(memory.peak_total / 2**20),
            "peak_rss_per_experiment_mb": round(max(memory.peak_per_experiment.values(), default=0) / 2**20),
        }
        print(f"P6 {jobs} worker(s): {seconds} s (load {load})", flush=True)
        shutil.rmtree(project, ignore_errors=True)
    speedup = None
    if 1 in results and 2 in results:
        speedup = round(results[1]["seconds"] / results[2]["seconds"], 2)
    return {"key": SWEEP_KEY, "values": SWEEP_VALUES, "by_workers": list(results.values()), "speedup_2_vs_1": speedup}


# --- report -----------------------------------------------------------------------------------


def verdict(value: float | None, goal: float, *, at_most: bool = True) -> str:
    if value is None:
        return "n/a"
    return "met" if (value <= goal if at_most else value >= goal) else "NOT met"


def to_markdown(results: dict[str, Any]) -> str:
    lines = [f"Machine: {results['machine']}; repetitions: {results['repetitions']} (medians); "
             f"load average at start: {results['load_at_start']}.", ""]
    p1 = results.get("p1")
    if p1:
        lines += ["**P1, cold `dvc repro`, MobileNetV2 x {float, dynamic_wi8_afp32, weight_only_wf16_afp32, "
                  "static_wi8_ai8}** (building the example is excluded from both)", "",
                  "| run | median s | x bare | goal |", "| --- | --- | --- | --- |"]
        for name, seconds in p1["median_seconds"].items():
            ratio = p1["ratio_to_bare"].get(name, 1.0)
            goal = f"<= {GOAL_P1_RATIO}x: {verdict(ratio, GOAL_P1_RATIO)}" if name == "ours" else ""
            lines.append(f"| {name} | {seconds} | {ratio} | {goal} |")
        bare_steps = p1["runs"]["bare"][-1]["steps"]
        lines += ["", "Bare script, last run (s): " + ", ".join(f"{k} {v}" for k, v in bare_steps.items()) + ".", ""]
        contenders = list(p1["stage_medians"])
        lines += ["Stage wall times (median s, including DVC's bookkeeping):", "",
                  "| stage | " + " | ".join(contenders) + " |", "| --- |" + " --- |" * len(contenders)]
        stages = list(dict.fromkeys(s for name in contenders for s in p1["stage_medians"][name]))
        for stage in stages:
            cells = [str(p1["stage_medians"][name].get(stage, "")) for name in contenders]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        failed = sorted({s for r in p1["runs"]["ours"] for s in r["failed_stages"]})
        if failed:
            lines += ["", f"Failed in our runs (a gate, exit 4; `--keep-going` ran the rest): {', '.join(failed)}."]
        lines.append("")
    if "p2" not in results:  # --p1-only
        return "\n".join(lines)
    p2 = results["p2"]
    lines += ["**P2, reruns (digits project)**", "", "| measure | median s | goal |", "| --- | ---: | --- |",
              f"| no-op `dvc repro` | {p2['noop_repro_seconds']} | <= {GOAL_NOOP_SECONDS} s: "
              f"{verdict(p2['noop_repro_seconds'], GOAL_NOOP_SECONDS)} |",
              f"| `litert-pipeline --help` | {p2['help_seconds']} | <= {GOAL_HELP_SECONDS} s: "
              f"{verdict(p2['help_seconds'], GOAL_HELP_SECONDS)}; imports TensorFlow: "
              f"{'yes' if p2['help_imports_tensorflow'] else 'no'} |", ""]
    lines += [f"Cold `dvc repro` of the digits project (7 builds): {results['digits_cold_repro_seconds']} s.", ""]
    p3 = results["p3"]
    lines += [f"**P3**, `{p3['edit']}`: {p3['seconds']} s, reran {len(p3['stages_run'])} stages: "
              f"{', '.join(p3['stages_run']) or 'none'}.", ""]
    lines += ["**P4/P5, delivered models** (size ratio = delivered / float .tflite; ideal: int8 weights 0.25, "
              "float16 0.5, int4 0.125)", "", "| build | size ratio | ideal | accuracy drop | cosine | gates |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in results["quality"]:
        gates = "passed" if row.get("passed") else "; ".join(row.get("failures", [])) or "no report"
        lines.append(f"| {row['build']} | {row.get('size_ratio', 'n/a')} | {row['ideal_ratio']} | "
                     f"{_fmt(row.get('accuracy_drop'))} | {_fmt(row.get('cosine'))} | {gates} |")
    lines += ["", "**TensorFlow imports per stage process** (`python -X importtime`, digits)", "",
              "| stage | s | imports TF | needs TF |", "| --- | ---: | --- | --- |"]
    for row in results["imports"]:
        lines.append(f"| {row['stage']} | {row['seconds']} | {'yes' if row['imports_tensorflow'] else 'no'} | "
                     f"{'yes' if row['needs_tensorflow'] else 'no'} |")
    p6 = results.get("p6")
    if p6:
        lines += ["", f"**P6, 8-member sweep** (`dvc exp run --queue -S {p6['key']}=...`, digits)", "",
                  "| workers | s | succeeded | peak RSS / experiment MB | peak RSS total MB |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for row in p6["by_workers"]:
            lines.append(f"| {row['workers']} | {row['seconds']} | {row['succeeded']} | "
                         f"{row['peak_rss_per_experiment_mb']} | {row['peak_rss_total_mb']} |")
        lines += ["", f"Speed-up 2 vs 1 workers: {p6['speedup_2_vs_1']} (goal >= {GOAL_SPEEDUP}: "
                  f"{verdict(p6['speedup_2_vs_1'], GOAL_SPEEDUP, at_most=False)})."]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repetition, digits only (no P1, no P6)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--project", type=Path, default=ROOT, help="the checkout to benchmark (default: this one)")
    parser.add_argument("--baseline", type=Path, help="another checkout to time beside it in P1 (before/after)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="P6 queue worker counts")
    parser.add_argument("--sweep-timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=BENCH, help="folder for results.json and results.md")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway projects")
    parser.add_argument("--p1-only", action="store_true", help="P1 alone, into p1.json and p1.md")
    args = parser.parse_args()
    if args.quick:
        args.repetitions = 1
    args.project = args.project.resolve()
    work = Path(tempfile.mkdtemp(prefix="litert-bench-"))
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
        "repetitions": args.repetitions, "quick": args.quick, "load_at_start": load_average(),
        "project": str(args.project), "baseline": str(args.baseline) if args.baseline else None,
    }
    try:
        if args.p1_only:
            examples = build_examples(args.project, ["mobilenet_v2"], work / "examples")
            results["p1"] = p1_cold(work, args, examples)
            return _write(results, args.out, "p1")
        names = ["digits_data", "digits_savedmodel"] + ([] if args.quick else ["mobilenet_v2"])
        examples = build_examples(args.project, names, work / "examples")
        quality_rows = []
        if not args.quick:
            results["p1"] = p1_cold(work, args, examples)
            quality_rows += quality(Path(results["p1"]["project"]))
        digits = make_project(work / "digits", args.project, DIGITS, examples)
        cold = run(["dvc", "repro"], digits)
        results["digits_cold_repro_seconds"] = cold.seconds
        results["p2"] = p2_noop(digits, args.repetitions)
        if not args.quick:
            results["p6"] = p6_sweep(work, digits, args.workers, args.sweep_timeout)
        quality_rows = quality(digits) + quality_rows
        results["quality"] = quality_rows
        results["p3"] = p3_threshold(digits)
        results["imports"] = import_checks(digits)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    _write(results, args.out, "results")


def _write(results: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
