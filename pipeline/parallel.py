"""`run -j N`: independent models built at once, each by DVC itself in a copy of the project.

DVC has no parallel `repro` (a repository runs one at a time), but several repositories can
share one cache (and its run-cache). So:

1. The stages every model shares (datasets, generated data, example models) run here, once.
2. The models with anything out of date are dealt, whole, to N workers, balanced by stage
   count. Each worker is a copy of the project under `.litert/workers/` (code, config,
   dvc.lock and the outputs so far; no git, no MLflow store) using this project's cache; it
   runs `dvc repro` of its models' stages.
3. Here, each worker's dvc.lock entries of the stages it built, and their outputs, are
   brought home: dvc.lock holds what a serial run writes (one process per stage, so the
   converter's per-call leak stays bounded as before), the delivered bytes are the same (the
   builds are deterministic) and `dvc status` is clean. Stages that failed stay out of date,
   as after a serial `dvc repro --keep-going`, and their outcomes give the exit code.
   (DVC's own way home, `dvc repro` restoring each stage from the run-cache the workers
   filled, rewrites the whole dvc.lock once per stage: measured 1.5 s a stage at 49 stages,
   87 % of it YAML, growing with the lock, so 2 workers were no faster than 1. The run-cache
   is still filled, for `dvc push --run-cache` to other machines.)

Stage processes defer their tracking records; each worker's records join this project's as
soon as it ends, for the `track` stage to upload them once.

The workers are threads here (`parallel: local`) or Ray tasks (`parallel=ray`: a local Ray
instance, or a cluster whose nodes see the project and its cache at the same path).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterable

import yaml

from pipeline import layout, repro, tracking
from pipeline.config import ParallelEngine, PipelineConfig
from pipeline.errors import EXIT_OK, OUTCOMES_ENV, ConfigError, OutputError, first_line, most_severe
from pipeline.io import write_text

# Stages of no one model: they run first, here, so no two workers build them.
SHARED_STAGES = ("data", "generate", "prepare")
WORKERS = Path(".litert/workers")
# Not copied into a worker: version control, the caches, MLflow's local store, other workers.
NOT_COPIED = (".git", ".dvc", ".litert", ".venv", "mlruns", "mlflow.db", "dvc_plots", "__pycache__")
STOP_SECONDS = 30  # a worker's DVC gets this long to stop its stage after a SIGINT


def model_of(stage: str, cfg: PipelineConfig) -> str | None:
    """The model a stage builds, or None for a stage every model may share."""
    kind, _, key = stage.partition("@")
    if kind in SHARED_STAGES:
        return None
    if key in cfg.build:
        return cfg.build[key].model
    return key if key in cfg.model else None


def deal(stages: Iterable[str], cfg: PipelineConfig, workers: int) -> list[list[str]]:
    """Per-model stages in `workers` groups, whole models each, the largest models first onto
    the least loaded worker (deterministic: ties by model name)."""
    by_model: dict[str, list[str]] = {}
    for stage in sorted(stages):
        model = model_of(stage, cfg)
        if model is not None:
            by_model.setdefault(model, []).append(stage)
    groups: list[list[str]] = [[] for _ in range(workers)]
    for model in sorted(by_model, key=lambda m: (-len(by_model[m]), m)):
        min(groups, key=len).extend(by_model[model])
    return [group for group in groups if group]


def out_of_date_models(cfg: PipelineConfig, graph: dict[str, set[str]], stale: set[str]) -> list[str]:
    """Every stage of each model that has a stage out of date, or downstream of one (`dvc
    status` names only the stages whose own inputs changed)."""
    stages = set(graph) | {s for upstream in graph.values() for s in upstream} | stale
    affected = {model_of(stage, cfg) for stage in stages if stage in stale or repro.ancestors(graph, stage) & stale}
    return sorted(stage for stage in stages if model_of(stage, cfg) in affected - {None})


def check_parallel_safe(cfg: PipelineConfig) -> None:
    """A worker is a copy of the project elsewhere: a source outside the project would resolve
    to another file there."""
    for name, model in cfg.model.items():
        if Path(model.source.path).is_absolute() or ".." in Path(model.source.path).parts:
            raise ConfigError("a source outside the project cannot be built by -j workers: run without -j",
                              key=f"model.{name}.source.path")


def reproduce(cfg: PipelineConfig, jobs: int, *, verbose: bool = False) -> int:
    """`dvc repro --keep-going` of the whole project with up to `jobs` models at once; the
    exit code as `repro.reproduce` gives it."""
    check_parallel_safe(cfg)
    stale = repro.stale_stages()
    shared = sorted(stage for stage in stale if stage.partition("@")[0] in SHARED_STAGES)
    if shared:  # the datasets and example models every worker reads
        code = repro.reproduce(*shared, verbose=verbose)
        if code != EXIT_OK:
            return code
        stale = repro.stale_stages()
    groups = deal(out_of_date_models(cfg, repro.stage_graph(), stale), cfg, jobs) if stale else []
    if len(groups) <= 1:
        return repro.reproduce(verbose=verbose)
    shutil.rmtree(WORKERS, ignore_errors=True)  # an interrupted run's copies
    try:
        workers = [_make_worker(WORKERS / f"worker-{index + 1}") for index in range(len(groups))]
    except OSError as exc:
        shutil.rmtree(WORKERS, ignore_errors=True)
        raise OutputError(f"could not copy the project for a worker: {first_line(exc)}", file=str(WORKERS)) from None
    outcomes = WORKERS / "outcomes"
    outcomes.mkdir()
    env = {OUTCOMES_ENV: str(outcomes.resolve()), tracking.DEFER_ENV: "1",
           tracking.GIT_COMMIT_ENV: tracking.git_commit()}
    runs = [_WorkerRun(worker, group, env, index + 1) for index, (worker, group) in enumerate(zip(workers, groups))]
    try:
        if cfg.parallel.engine is ParallelEngine.ray:
            _on_ray(runs, cfg.parallel.ray_address, jobs)
        else:
            _on_threads(runs)
        # What each worker left out of date among its own stages: failed, or skipped after a failure.
        left = set().union(*(repro.stale_stages(cwd=run.worker) & set(run.stages) for run in runs))
        failures = [repro.read_outcome(path) for path in sorted(outcomes.glob("*.json"))]
        for run in runs:
            if run.worker_failed or set(run.stages) & left:
                print(f"[worker {run.index}] its DVC output: {run.log}", file=sys.stderr)
        done = set().union(*groups) - left
        _bring_home(runs, done, {failure["stage"] for failure in failures}, cfg)
    finally:  # the records of what finished come home and the copies go (their logs stay)
        for run in runs:
            run.collect_records()
            shutil.rmtree(run.worker, ignore_errors=True)
    print(f"parallel: {len(groups)} workers built {len(set().union(*groups))} stage(s) of "
          f"{len({model_of(stage, cfg) for stage in set().union(*groups)})} model(s)", file=sys.stderr)
    # A failed stage is not run twice (its outcome is recorded); with every stage built, the
    # `track` stage runs here, as a serial `dvc repro` ends.
    code = EXIT_OK if left else repro.reproduce(repro.TRACK_STAGE, verbose=verbose)
    if not left:
        return code
    graph = repro.stage_graph()
    failed = {stage for stage in left if not (graph.get(stage, set()) & left)}
    return most_severe([code, repro.summarize_failures(failures, failed)])


LOCK = Path("dvc.lock")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _bring_home(runs: list["_WorkerRun"], done: set[str], failed: set[str], cfg: PipelineConfig) -> None:
    """The dvc.lock entries of the stages the workers built, and the outputs they name, into
    this project (dvc.lock written once); and what the stages that failed wrote (a failed
    gate's validation report), without a lock entry, as a serial `--keep-going` leaves it."""
    lock = yaml.load(LOCK.read_text(encoding="utf-8"), Loader=LOADER) if LOCK.is_file() else None
    lock = lock or {"schema": "2.0", "stages": {}}
    for run in runs:
        for stage in sorted(failed & set(run.stages)):
            kind, _, key = stage.partition("@")
            for path in sorted(layout.stage_files(kind, key, cfg)[1]):
                if (run.worker / path).exists():
                    _replace(run.worker / path, Path(path), stage)
                elif Path(path).is_file():  # DVC removed it before running the stage, as here
                    Path(path).unlink()
        finished = sorted(done & set(run.stages))
        if not finished:
            continue
        worker_lock = run.worker / LOCK
        try:
            built = yaml.load(worker_lock.read_text(encoding="utf-8"), Loader=LOADER)["stages"]
            entries = {stage: built[stage] for stage in finished}
        except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
            raise OutputError(f"a worker's lock lacks what it built ({first_line(exc)})", file=str(worker_lock)) from None
        for stage, entry in entries.items():
            for out in entry.get("outs", []):
                path = Path(os.path.normpath(out["path"]))
                if path.is_absolute() or path.parts[:1] == ("..",):
                    raise OutputError(f"an output outside the project: {out['path']}", file=str(worker_lock))
                _replace(run.worker / path, path, stage)
            lock["stages"][stage] = entry
    if done:
        write_text(LOCK, yaml.dump(lock, Dumper=DUMPER, sort_keys=False, width=120))


def _replace(source: Path, target: Path, stage: str) -> None:
    """`target` becomes `source` (moved: the worker copy is removed next)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.is_symlink() or (target.exists() and source.is_dir()):
            target.unlink()
        os.replace(source, target)
    except OSError as exc:
        raise OutputError(f"could not bring {stage}'s output home: {first_line(exc)}", file=str(target)) from None


def _make_worker(folder: Path) -> Path:
    """A copy of the project using this project's DVC cache, without git."""
    root = Path.cwd()
    shutil.copytree(root, folder, symlinks=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
    (folder / ".dvc").mkdir()
    shutil.copy2(root / ".dvc" / "config", folder / ".dvc" / "config")
    for setting, value in (("core.no_scm", "true"), ("cache.dir", str(_cache_dir(root)))):
        done = subprocess.run([str(repro.BIN / "dvc"), "config", "--local", setting, value], cwd=folder,
                              capture_output=True, text=True, env=repro.dvc_env())
        if done.returncode != 0:
            raise OSError(f"dvc config {setting} failed: {' '.join(done.stderr.split())[:300]}")
    return folder


def _cache_dir(root: Path) -> Path:
    done = subprocess.run([str(repro.BIN / "dvc"), "cache", "dir"], capture_output=True, text=True, cwd=root,
                          env=repro.dvc_env())
    if done.returncode != 0:
        raise OSError(f"dvc cache dir failed: {' '.join(done.stderr.split())[:300]}")
    return Path(done.stdout.strip()).resolve()


def _on_threads(runs: list["_WorkerRun"]) -> None:
    try:
        for run in runs:
            run.start()
        for run in runs:
            run.join()
    finally:
        for run in runs:  # interrupted: each worker's DVC stops its stage, then is killed
            run.stop()


def _on_ray(runs: list["_WorkerRun"], address: str, jobs: int) -> None:
    """The workers as Ray tasks of one CPU each; each worker's records are collected as it ends."""
    try:
        import ray
    except ImportError:
        raise ConfigError("parallel=ray needs Ray: pip install -e '.[ray]'", key="parallel.engine") from None
    _check_reachable(address)
    try:
        ray.init(address=address or None, num_cpus=None if address else jobs, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=True)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError... here
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise ConfigError(f"could not start or reach {where}: {first_line(exc)}", key="parallel.ray_address") from None
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(run_worker)
        started = {task.remote(str(run.worker.resolve()), run.stages, run.env, run.index, str(run.log.resolve())): run
                   for run in runs}
        waiting = list(started)
        try:
            while waiting:
                (ended,), waiting = ray.wait(waiting, num_returns=1)
                run = started[ended]
                try:
                    run.worker_failed = ray.get(ended)
                except ray.exceptions.RayError as exc:  # the task itself died (a node lost, out of memory)
                    run.worker_failed = True
                    print(f"[worker {run.index}] Ray: {first_line(exc)}", file=sys.stderr)
                run.collect_records()
        except KeyboardInterrupt:
            for ref in waiting:  # the task gets a KeyboardInterrupt: its DVC stops its stage
                ray.cancel(ref)
            ray.wait(waiting, num_returns=len(waiting), timeout=STOP_SECONDS + 5)
            raise
    finally:
        ray.shutdown()


RAY_CONNECT_SECONDS = 10


def _check_reachable(address: str) -> None:
    """A head at <host>:<port> answers within seconds; else one line now (Ray itself would wait
    for it for minutes)."""
    if address in ("", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_SECONDS).close()
    except OSError as exc:
        raise ConfigError(f"nothing answers at {address}: {exc.strerror or first_line(exc)}",
                          key="parallel.ray_address") from None


def run_worker(worker: str, stages: list[str], env: dict[str, str], index: int, log: str) -> bool:
    """One worker's `dvc repro --keep-going` of its stages (the body of a Ray task): DVC's
    "Running stage" lines printed tagged with the worker, everything to `log`. Returns whether
    DVC failed; interrupted, DVC stops its stage first."""
    with open(log, "wb") as handle:
        process = _start_dvc(Path(worker), stages, env)
        try:
            _copy_output(process, handle, index)
            return process.wait() != 0
        except KeyboardInterrupt:
            _stop(process)
            raise


def _start_dvc(worker: Path, stages: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(repro.BIN / "dvc"), "repro", "--keep-going", *stages], cwd=worker,
                            env={**repro.dvc_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _copy_output(process: subprocess.Popen, handle, index: int) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        handle.write(line)
        if line.startswith(b"Running stage"):
            print(f"[worker {index}] {line.decode(errors='replace').strip()}", flush=True)


def _stop(process: subprocess.Popen) -> None:
    """SIGINT (DVC stops the stage it runs and leaves no lock behind), then kill."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class _WorkerRun:
    """One worker: its copy of the project, its stages, its log; run in a thread here (or by
    `run_worker` in a Ray task). Its tracking records join the project's when it ends."""

    def __init__(self, worker: Path, stages: list[str], env: dict[str, str], index: int):
        self.worker, self.stages, self.env, self.index = worker, stages, env, index
        self.log = WORKERS / f"worker-{index}.log"
        self.process: subprocess.Popen | None = None
        self.worker_failed = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._handle = open(self.log, "wb")
        self.process = _start_dvc(self.worker, self.stages, self.env)
        self._thread.start()

    def _run(self) -> None:
        assert self.process is not None
        with self._handle:
            _copy_output(self.process, self._handle, self.index)
        self.worker_failed = self.process.wait() != 0
        self.collect_records()

    def collect_records(self) -> None:
        for entry in tracking.pending(self.worker / tracking.DEFERRED_DIR):
            tracking.DEFERRED_DIR.mkdir(parents=True, exist_ok=True)
            shutil.move(str(entry), tracking.DEFERRED_DIR / entry.name)

    def join(self) -> None:
        self._thread.join()

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
        if self._thread.ident is not None:  # started
            self._thread.join()
