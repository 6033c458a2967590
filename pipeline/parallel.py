"""`run -j N`: independent models built at once, by DVC itself, through its shared run-cache.

DVC has no parallel `repro` (a repository runs one at a time), but it can share one cache
between repositories, and its run-cache restores a stage's outputs, tracked or not, when the
stage's command, dependencies and parameters were seen before. So:

1. The stages every model shares (datasets, generated data, example models) run here, once.
2. The out-of-date models are dealt to N workers, balanced by stage count. Each worker is a
   copy of the project (code, config, dvc.lock and the outputs so far; no git, no MLflow
   store) using this project's cache; it runs `dvc repro` for its models' stages.
3. Here, `dvc repro` of every stage that succeeded in a worker restores it from the
   run-cache: nothing runs again, dvc.lock is what a serial run writes (one process per
   stage, so the converter's per-call leak stays bounded as before) and the delivered bytes
   are the same (the builds are deterministic). Stages that failed stay out of date, as after
   a serial `dvc repro --keep-going`, and their outcomes give the exit code.

Stage processes defer their tracking records (as under `run`); the workers' records are
uploaded here with this project's, once.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterable

from pipeline import repro, tracking
from pipeline.config import PipelineConfig
from pipeline.errors import EXIT_OK, OUTCOMES_ENV, InputError, most_severe

# Stages of no one model: they run first, here, so no two workers build them.
SHARED_STAGES = ("data", "generate", "prepare")
# Not copied into a worker: version control, the caches, MLflow's local store, other workers.
NOT_COPIED = (".git", ".dvc", ".litert", ".venv", "mlruns", "mlflow.db", "dvc_plots", "__pycache__")


def model_of(stage: str, cfg: PipelineConfig) -> str | None:
    """The model a stage builds, or None for a stage every model may share."""
    kind, _, key = stage.partition("@")
    if kind in SHARED_STAGES:
        return None
    if key in cfg.build:
        return cfg.build[key].model
    return key if key in cfg.model else None


def deal(stages: Iterable[str], cfg: PipelineConfig, workers: int) -> list[list[str]]:
    """Out-of-date per-model stages in `workers` groups, whole models each, the largest models
    first onto the least loaded worker (deterministic: ties by model name)."""
    by_model: dict[str, list[str]] = {}
    for stage in sorted(stages):
        model = model_of(stage, cfg)
        if model is not None:
            by_model.setdefault(model, []).append(stage)
    groups: list[list[str]] = [[] for _ in range(workers)]
    for model in sorted(by_model, key=lambda m: (-len(by_model[m]), m)):
        min(groups, key=len).extend(by_model[model])
    return [group for group in groups if group]


def reproduce(cfg: PipelineConfig, jobs: int, *, verbose: bool = False) -> int:
    """`dvc repro --keep-going` of the whole project with up to `jobs` models at once; the
    exit code as `repro.reproduce` gives it."""
    stale = repro.stale_stages()
    shared = sorted(stage for stage in stale if model_of(stage, cfg) is None)
    if shared:  # the datasets and example models every worker reads
        code = repro.reproduce(*shared, verbose=verbose)
        if code != EXIT_OK:
            return code
    groups = deal(stale, cfg, jobs)
    if len(groups) <= 1:
        return repro.reproduce(verbose=verbose)
    with tempfile.TemporaryDirectory(prefix="litert-workers-") as folder:
        workers = [_make_worker(Path(folder) / f"worker-{index}") for index in range(len(groups))]
        outcomes = Path(folder) / "outcomes"
        outcomes.mkdir()
        env = {OUTCOMES_ENV: str(outcomes), tracking.DEFER_ENV: "1", tracking.GIT_COMMIT_ENV: tracking.git_commit()}
        threads = [threading.Thread(target=_run_worker, args=(worker, group, env, index), daemon=True)
                   for index, (worker, group) in enumerate(zip(workers, groups))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # What each worker left out of date among its own stages: failed, or skipped after a failure.
        left = set().union(*(repro.stale_stages(cwd=worker) & set(group) for worker, group in zip(workers, groups)))
        failures = [repro.read_outcome(path) for path in sorted(outcomes.glob("*.json"))]
        for worker in workers:  # their stages' records join this invocation's, uploaded once
            for entry in tracking.pending(worker / tracking.DEFERRED_DIR):
                tracking.DEFERRED_DIR.mkdir(parents=True, exist_ok=True)
                shutil.move(str(entry), tracking.DEFERRED_DIR / entry.name)
    done = sorted(set().union(*groups) - left)
    print(f"parallel: {len(done)} stage(s) built by {len(groups)} workers; restoring them from the run-cache",
          file=sys.stderr)
    # Only what succeeded: a failed stage is not run twice (its outcome is already recorded).
    code = repro.reproduce(*done, verbose=verbose) if done else EXIT_OK
    if not left:
        return code
    graph = repro.stage_graph()
    failed = {stage for stage in left if not (graph.get(stage, set()) & left)}
    return most_severe([code, repro.summarize_failures(failures, failed)])


def _make_worker(folder: Path) -> Path:
    """A copy of the project using this project's DVC cache, without git."""
    root = Path.cwd()
    shutil.copytree(root, folder, symlinks=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
    (folder / ".dvc").mkdir()
    shutil.copy2(root / ".dvc" / "config", folder / ".dvc" / "config")
    cache = _cache_dir(root)
    (folder / ".dvc" / "config.local").write_text(f"[core]\n    no_scm = true\n[cache]\n    dir = {cache}\n")
    return folder


def _cache_dir(root: Path) -> Path:
    result = subprocess.run([str(repro.BIN / "dvc"), "cache", "dir"], capture_output=True, text=True, cwd=root,
                            env=repro.dvc_env())
    if result.returncode != 0:
        raise InputError(f"dvc cache dir failed: {' '.join(result.stderr.split())[:300]}", file=".dvc/config")
    return Path(result.stdout.strip()).resolve()


def _run_worker(worker: Path, stages: list[str], env: dict[str, str], index: int) -> None:
    """`dvc repro --keep-going` of the worker's stages; DVC's "Running stage" lines go to the
    terminal tagged with the worker, the rest (stage output) to the worker's log."""
    command = [str(repro.BIN / "dvc"), "repro", "--keep-going", *stages]
    with open(worker / "worker.log", "wb") as log:
        process = subprocess.Popen(command, cwd=worker, env={**repro.dvc_env(), **env}, stdout=subprocess.PIPE,
                                   stderr=log)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if line.startswith(b"Running stage"):
                print(f"[worker {index + 1}] {line.decode(errors='replace').strip()}", flush=True)
        process.wait()
