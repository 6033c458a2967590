"""`run -j N`: independent builds at once, each unit built by DVC itself in a copy of the project.

DVC has no parallel `repro` (a repository runs one at a time), but several repositories can
share one cache (and its run-cache). So:

1. The stages every model shares (datasets, generated data, example models, the models' parts
   of params.yaml) run here, once, while MLflow opens the run's parent run (they log nothing).
2. What is out of date is cut into units of work: whole models while there are enough to keep
   every worker busy, and the last models (fewer than the workers) into pieces: the stages
   before their builds (conversion, calibration), one piece per build (quantize, metadata,
   validate), and what comes after (auto-selection, the comparison report). 5 models on 2
   workers split 3 : 2 when dealt whole (measured: 1.42×); with the fifth in pieces, its
   builds fill both workers.
3. N workers, each a copy of the project under `.litert/workers/` (code, config, dvc.lock and
   the outputs so far; no git, no MLflow store) using this project's cache, run `dvc repro` of
   one unit at a time: the stages before a model's pieces first (its builds then fill the
   workers as the whole models end: 5 models on 2 workers, one worker ran the fifth's
   conversion alone after the whole ones, measured), then the ready unit with the longest
   chain of stages after it (an auto-selection counts as several), on an idle worker (the one
   holding most of what it needs). Before a worker runs a unit, the outputs of the units it depends on that another
   worker built are copied into it, and its dvc.lock is cut to the entries of the unit's
   stages and of those they depend on: DVC finds them up to date there, and rewrites a small
   lock after each stage instead of the whole project's (4 s of YAML a stage at 5 models,
   measured, and growing with every model).
4. As each unit ends, the dvc.lock entries of its stages and the outputs they name come home:
   dvc.lock holds what a serial run writes (one process per stage, so the converter's
   per-call leak stays bounded as before), the delivered bytes are the same (the builds are
   deterministic) and `dvc status` is clean. Stages that failed stay out of date, with what
   depends on them, as after a serial `dvc repro --keep-going`; their outcomes give the exit
   code. (DVC's own way home, `dvc repro` restoring each stage from the run-cache the
   workers filled, rewrites the whole dvc.lock once per stage: measured 1.5 s a stage at 49
   stages, 87 % of it YAML, growing with the lock, so 2 workers were no faster than 1. The
   run-cache is still filled, for `dvc push --run-cache` to other machines.)

Stage processes defer their tracking records; a worker's records join this project's as each
unit ends, and go up to MLflow from here while the other units build (what is left, the
`track` stage uploads).

The workers are threads here (`parallel: local`) or Ray tasks (`parallel=ray`: a local Ray
instance, or a cluster whose nodes see the project and its cache at the same path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import importlib.util
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import yaml
from tqdm import tqdm

from pipeline import layout, repro, tracking
from pipeline.config import ParallelEngine, PipelineConfig, is_ray_address, safe_loader
from pipeline.errors import EXIT_OK, OUTCOMES_ENV, BusyError, ConfigError, InputError, OutputError, first_line
from pipeline.io import atomic_path, write_text

# Stages of no one model: they run first, here, so no two workers build them.
SHARED_STAGES = ("code", "data", "generate", "params", "prepare")
# Writes each model's part of params.yaml: every per-model stage follows it in DVC's graph, but
# only those whose part changed are out of date.
PARAMS_STAGE = "params"
WORKERS = Path(".litert/workers")
# Not copied into a worker: version control, the caches, MLflow's local store, other workers.
NOT_COPIED = (".git", ".dvc", ".litert", ".venv", "mlruns", "mlflow.db", "dvc_plots", "__pycache__")
# What a stage costs, in plain stages, when units are ordered. Auto-selection quantizes and
# validates every candidate: 10.3 s for digits, against 0.9-2.5 s for each stage of a build
# (P7's timeline, bench/first_run.md). Counted as one stage, it started last and left one
# worker alone with it at the end of a one-model run.
STAGE_COST = {"autoselect": 5}
LOCK = Path("dvc.lock")
LOADER = safe_loader()
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def model_of(stage: str, cfg: PipelineConfig) -> str | None:
    """The model a stage builds, or None for a stage every model may share."""
    kind, _, key = stage.partition("@")
    if kind in SHARED_STAGES:
        return None
    if key in cfg.build:
        return cfg.build[key].model
    return key if key in cfg.model else None


def affected_stages(cfg: PipelineConfig, graph: dict[str, set[str]], stale: set[str]) -> list[str]:
    """The per-model stages out of date, or downstream of one (`dvc status` names only the
    stages whose own inputs changed)."""
    stages = set(graph) | {s for upstream in graph.values() for s in upstream} | stale
    return sorted(stage for stage in stages if model_of(stage, cfg) is not None
                  and (stage in stale or repro.ancestors(graph, stage) & stale))


@dataclasses.dataclass
class Unit:
    """Stages one worker builds with one `dvc repro`."""

    name: str
    stages: list[str]
    after: set[str] = dataclasses.field(default_factory=set)  # units that must be built first
    rank: int = 0  # cost of the longest chain from its start to the end (STAGE_COST): longest first, after `leads`
    @property
    def leads(self) -> bool:
        """The stages before a model's builds, when the model goes in pieces: they go before any
        whole model, so its builds are ready to fill the workers as the whole models end."""
        return self.name.startswith("before:")

    def start_order(self) -> tuple:
        return not self.leads, -self.rank, self.name


def build_of(stage: str, cfg: PipelineConfig) -> str | None:
    """The build a stage belongs to (quantize, metadata, validate), or None."""
    key = stage.partition("@")[2]
    return key if key in cfg.build else None


def plan(stages: Iterable[str], graph: dict[str, set[str]], cfg: PipelineConfig, workers: int) -> dict[str, Unit]:
    """`stages` (per-model) cut into units for `workers` workers: whole models, the largest
    first, but for the last `count % workers` models, which go in pieces (the stages before
    their builds, each build, each stage after), so that every worker has work to the end."""
    stages = sorted(stages)
    by_model: dict[str, list[str]] = {}
    for stage in stages:
        by_model.setdefault(model_of(stage, cfg), []).append(stage)
    by_size = sorted(by_model, key=lambda m: (-len(by_model[m]), m))
    whole = set(by_size[:len(by_size) - len(by_size) % workers])
    before_builds = set().union(*(repro.ancestors(graph, stage) for stage in stages if build_of(stage, cfg)))

    def piece(stage: str) -> str:
        kind, _, key = stage.partition("@")
        model = model_of(stage, cfg)
        if model in whole:
            return f"model:{model}"
        if build_of(stage, cfg):
            return f"build:{key}"
        return f"before:{model}" if stage in before_builds else f"{kind}:{key}"

    unit_of = {stage: piece(stage) for stage in stages}
    units: dict[str, Unit] = {}
    for stage in sorted(unit_of):
        units.setdefault(unit_of[stage], Unit(unit_of[stage], [])).stages.append(stage)
    for unit in units.values():
        upstream = set().union(*(repro.ancestors(graph, stage) for stage in unit.stages))
        unit.after = {unit_of[stage] for stage in upstream if stage in unit_of} - {unit.name}
    below = {name: {other.name for other in units.values() if name in other.after} for name in units}

    def rank(name: str) -> int:
        if not units[name].rank:
            cost = sum(STAGE_COST.get(stage.partition("@")[0], 1) for stage in units[name].stages)
            units[name].rank = cost + max((rank(child) for child in below[name]), default=0)
        return units[name].rank

    for name in units:
        rank(name)
    return units


def units_per_build(units: dict[str, Unit], cfg: PipelineConfig) -> dict[str, set[str]]:
    """The units holding each build's stages: the build is done when they all have ended."""
    per_build: dict[str, set[str]] = {}
    for unit in units.values():
        for stage in unit.stages:
            build = build_of(stage, cfg)
            if build:
                per_build.setdefault(build, set()).add(unit.name)
    return per_build


def _any_independent(units: dict[str, Unit]) -> bool:
    """Whether two units could run at once."""
    return any(a != b and a not in units[b].after and b not in units[a].after for a in units for b in units)


def _sources_outside(cfg: PipelineConfig) -> list[str]:
    """Models whose source lies outside the project (trusted sources): a worker is a copy of
    the project elsewhere, where their path would name another file."""
    return [name for name, model in cfg.model.items()
            if Path(model.source.path).is_absolute() or ".." in Path(model.source.path).parts]


def check_parallel_safe(cfg: PipelineConfig) -> None:
    outside = _sources_outside(cfg)
    if outside:
        raise ConfigError("a source outside the project cannot be built by -j workers: run without -j",
                          key=f"model.{outside[0]}.source.path")


def through_workers(cfg: PipelineConfig, jobs: int) -> bool:
    """Whether to build in workers: with `-j N` (N > 1), and with one worker when several
    models are selected: DVC rewrites the whole dvc.lock after every stage (4 s of YAML a stage
    at 5 models × 4 variants, measured), a cost growing with the square of the stages, where a
    worker's lock holds only its unit's entries. One model, or a source outside the project,
    builds here with a plain `dvc repro`."""
    if jobs > 1:
        check_parallel_safe(cfg)
    elif len(cfg.model) < 2 or _sources_outside(cfg):
        return False
    _check_engine(cfg)
    return True


def _check_engine(cfg: PipelineConfig) -> None:
    """Asked before the run opens anything."""
    if cfg.parallel.engine is ParallelEngine.ray:
        _check_ray(cfg.parallel.ray_address)


class Shared(NamedTuple):
    """What `start_sharing` leaves for `build_rest`."""

    reproduced: repro.Reproduced | None  # how the shared stages' `dvc repro` ended (None: none was out of date)
    graph: Future | None  # `dvc dag`, asked meanwhile for the workers (None: no workers)


def start_sharing(cfg: PipelineConfig, name: str, kind: str, stale: set[str], workers: bool,
                  verbose: bool = False) -> tuple[repro.Invocation, Shared]:
    """The invocation's parent run opens (`repro.start`) while the stages every model shares
    (datasets, example models: what every worker reads) build here, once: they log nothing.
    The workers' stage graph is asked meanwhile too (the shared stages change no stage). Then
    `build_rest` builds the rest, in workers or in a plain `dvc repro` here."""
    shared = _shared(stale)
    graph = repro.stage_graph_soon() if workers and stale else None
    invocation, reproduced = repro.start_while(
        cfg, name, kind, lambda: repro.reproduce(*shared, verbose=verbose) if shared else None)
    return invocation, Shared(reproduced, graph)


def build_rest(cfg: PipelineConfig, jobs: int, workers: bool, stale: set[str], shared: Shared,
               *targets: str, verbose: bool = False) -> repro.Reproduced:
    """After `start_sharing` (`stale`: what `dvc status` said before it): the rest, in workers
    (`reproduce`) or in a plain `dvc repro` here, uploading to MLflow while DVC builds. A failed
    shared stage ends it, as `--keep-going` cannot build on it."""
    if shared.reproduced is not None and shared.reproduced.code != EXIT_OK:
        return shared.reproduced
    if workers:
        return reproduce(cfg, jobs, stale, shared.graph, verbose=verbose)
    return repro.reproduce(*targets, verbose=verbose, uploading=cfg.tracking)


def _graph(asked: Future | None) -> dict[str, set[str]]:
    """The stage graph `start_sharing` asked for, else asked now (also if that `dvc dag` failed:
    it may have read dvc.lock while the shared stages' `dvc repro` rewrote it)."""
    if asked is not None:
        with contextlib.suppress(InputError):
            return asked.result()
    return repro.stage_graph()


def _shared(stale: set[str]) -> list[str]:
    return sorted(stage for stage in stale if stage.partition("@")[0] in SHARED_STAGES)


def reproduce(cfg: PipelineConfig, jobs: int, stale: set[str], asked_graph: Future | None = None, *,
              verbose: bool = False) -> repro.Reproduced:
    """`dvc repro --keep-going` of what `start_sharing` left (`stale`: what `dvc status` said
    before it; `asked_graph`: `dvc dag`, if asked already) with up to `jobs` units at once; it ends as
    `repro.reproduce` does."""
    check_parallel_safe(cfg)
    if not stale:  # `dvc status` found every stage up to date: `dvc repro` would do nothing
        print("Nothing to build: every stage is up to date (dvc status).")
        return repro.Reproduced(EXIT_OK)
    shared_stages = _shared(stale)
    # DVC commands at once, each mostly DVC's start-up and its parse of dvc.yaml.
    with ThreadPoolExecutor(1) as pool:
        cache = pool.submit(_cache_dir, Path.cwd())
        graph = _graph(asked_graph)
        # Which models' params changed shows once their parts are written, unless every stage
        # after them is out of date already (a first run). Other shared stages need no second
        # `dvc status`: what follows a stage just built is out of date by the graph (if its
        # outputs came out the same, the worker's DVC finds it up to date).
        if PARAMS_STAGE in shared_stages and not repro.descendants(graph, PARAMS_STAGE) <= stale:
            stale = repro.stale_stages()
    units = plan(affected_stages(cfg, graph, stale), graph, cfg, jobs)
    if not _any_independent(units):  # one unit, or each waiting for the one before: nothing to share
        return repro.reproduce(verbose=verbose, uploading=cfg.tracking)
    engine: _Engine = _Ray(cfg.parallel.ray_address, jobs) if cfg.parallel.engine is ParallelEngine.ray else _Threads()
    cores = os.cpu_count() or 1
    if isinstance(engine, _Threads) and min(jobs, len(units)) > cores:
        print(f"warning: -j {jobs} on {cores} cores: the workers' stages share them (each uses several threads); "
              f"-j {cores} is usually as fast", file=sys.stderr)
    shutil.rmtree(WORKERS, ignore_errors=True)  # an interrupted run's copies
    try:
        copies = [_Copy.make(index + 1, cache.result()) for index in range(min(jobs, len(units)))]
    except OSError as exc:
        engine.close()
        shutil.rmtree(WORKERS, ignore_errors=True)
        problem = f"could not copy the project for a worker: {first_line(exc)}"
        if jobs > 1:
            raise OutputError(problem, file=str(WORKERS)) from None
        # One worker only saves DVC's whole-lock rewrites: a serial run builds here instead.
        print(f"warning: {problem} ({WORKERS}); building here", file=sys.stderr)
        return repro.reproduce(verbose=verbose, uploading=cfg.tracking)
    try:
        outcomes = WORKERS / "outcomes"
        outcomes.mkdir()
        env = {OUTCOMES_ENV: str(outcomes.resolve()), tracking.DEFER_ENV: "1",
               tracking.GIT_COMMIT_ENV: tracking.git_commit()}
        with _dvc_lock(), repro.Uploads(cfg.tracking) as uploads:
            left = _Build(units, copies, engine, env, graph, cfg, uploads).run()
        failures = [repro.read_outcome(path) for path in sorted(outcomes.glob("*.json"))]
    finally:  # the records of what finished come home and the copies go (their logs stay)
        engine.close()
        for copy in copies:
            copy.collect_records()
            shutil.rmtree(copy.folder, ignore_errors=True)
    planned = {stage for unit in units.values() for stage in unit.stages}
    used = sum(copy.log.exists() for copy in copies)  # a copy whose units all waited on others ran none
    print(f"workers: {used} built {len(planned - left)} of {len(planned)} stage(s) of "
          f"{len({model_of(stage, cfg) for stage in planned})} model(s) in {len(units)} unit(s)", file=sys.stderr)
    # A failed stage is not run twice (its outcome is recorded); with every stage built, the
    # `track` stage runs here, as a serial `dvc repro` ends.
    # `--single-item`: every other stage was just built or found up to date; DVC checking them
    # all again took 8 s at 5 models × 4 variants (measured).
    if not left:
        return repro.reproduce(repro.TRACK_STAGE, single_item=True, verbose=verbose)
    # What is out of date here is asked when needed: the workers' `dvc status` was of their copies.
    return repro.Reproduced(repro.summarize_failures(failures, repro.first_left(left, graph)), graph=graph)


@contextlib.contextmanager
def _dvc_lock() -> Iterator[None]:
    """DVC's own lock of this repository, held while the workers build and their results come
    home: a plain `dvc repro` started meanwhile is refused as DVC refuses a second one, instead
    of building the same stages here and rewriting dvc.lock under us."""
    import zc.lockfile  # DVC's lock backend

    path = Path(".dvc", "tmp", "lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = zc.lockfile.LockFile(str(path))
    except zc.lockfile.LockError:
        raise BusyError("another DVC command is running in this project: wait for it to finish", file=str(path)) from None
    try:
        yield
    finally:
        lock.close()


class _Build:
    """The units, on the copies, in order: returns the stages left out of date."""

    def __init__(self, units: dict[str, Unit], copies: list["_Copy"], engine: "_Engine", env: dict[str, str],
                 graph: dict[str, set[str]], cfg: PipelineConfig, uploads: repro.Uploads):
        self.units, self.copies, self.engine, self.env, self.graph, self.cfg = units, copies, engine, env, graph, cfg
        self.uploads = uploads
        self.home = _read_lock(LOCK)
        self.built: set[str] = set()  # stages built this run, their entries and outputs home
        self.finished: set[str] = set()  # units
        self.failed: set[str] = set()  # units that failed, or were skipped after a failure
        self.left: set[str] = set()  # stages
        self.brought = False
        self.per_build = units_per_build(units, cfg)
        # The whole run's bar, on a terminal only (a nightly's log gets the lines alone).
        self.bar = tqdm(total=len(self.per_build), desc="builds", unit="build", disable=None if self.per_build else True)

    def run(self) -> set[str]:
        waiting = sorted(self.units.values(), key=Unit.start_order)
        idle, running = list(self.copies), {}
        try:
            while waiting or running:
                for unit in [unit for unit in waiting if unit.after & self.failed]:  # as --keep-going skips them
                    waiting.remove(unit)
                    self.failed.add(unit.name)
                    self.left.update(unit.stages)
                for unit in [unit for unit in waiting if unit.after <= self.finished]:
                    if not idle:
                        break
                    upstream = set().union(*(repro.ancestors(self.graph, stage) for stage in unit.stages))
                    copy = max(idle, key=lambda copy: (len(copy.holds & upstream & self.built), -copy.index))
                    idle.remove(copy)
                    waiting.remove(unit)
                    self._prepare(copy, unit, upstream)
                    self.engine.submit(copy, unit.stages, self.env)
                    running[copy.index] = unit
                if not running:  # nothing can start (cannot happen in a DAG): left, not lost
                    self.left.update(stage for unit in waiting for stage in unit.stages)
                    break
                copy, dvc_failed = self.engine.next_ended()
                idle.append(copy)
                copy.collect_records()
                self.uploads.wake()
                self._ended(running.pop(copy.index), copy, dvc_failed)
        finally:
            self.bar.close()
            self.engine.stop()
            if self.brought:
                _write_lock(LOCK, self.home)
        return self.left

    def _ended(self, unit: Unit, copy: "_Copy", dvc_failed: bool) -> None:
        """What the unit built comes home (and what its failed stages wrote, without a lock
        entry, as a serial `--keep-going` leaves it)."""
        left = repro.stale_stages(cwd=copy.folder) & set(unit.stages) if dvc_failed else set()
        if dvc_failed:
            print(f"[worker {copy.index}] its DVC output: {copy.log}", file=sys.stderr)
            self.failed.add(unit.name)
            self.left |= left
            for stage in sorted(left):
                kind, _, key = stage.partition("@")
                for path in sorted(layout.stage_files(kind, key, self.cfg)[1]):
                    if (copy.folder / path).exists():
                        _copy_into(copy.folder / path, Path(path), stage)
                    elif Path(path).is_file():  # DVC removed it before running the stage, as here
                        Path(path).unlink()
        else:
            self.finished.add(unit.name)
        ended = self.finished | self.failed
        _print_above_bar(f"[{len(ended)}/{len(self.units)} units] {unit.name}: "
                         f"{'failed' if dvc_failed else 'built'} by worker {copy.index}")
        self.bar.update(sum(units <= ended for units in self.per_build.values()) - self.bar.n)
        done = sorted(set(unit.stages) - left)
        if not done:
            return
        try:
            built = _read_lock(copy.folder / LOCK)["stages"]
            entries = {stage: built[stage] for stage in done}
        except (KeyError, TypeError) as exc:
            raise OutputError(f"a worker's lock lacks what it built ({first_line(exc)})",
                              file=str(copy.folder / LOCK)) from None
        for stage, entry in entries.items():
            outputs = _outputs(entry, copy.folder / LOCK)
            # The same lock entry does not mean the same files here: a stage that failed in an
            # earlier run left its outputs removed or half-written, and its lock entry as it
            # was; the worker restored it from the run-cache under that same entry.
            if entry == self.home["stages"].get(stage) and all(_same_file(copy.folder / path, path)
                                                               for path in outputs):
                continue
            for path in outputs:
                _copy_into(copy.folder / path, path, stage)
            self.home["stages"][stage] = entry
            self.brought = True
        self.built.update(done)
        copy.holds.update(done)

    def _prepare(self, copy: "_Copy", unit: Unit, upstream: set[str]) -> None:
        """What other workers built that the unit needs comes into `copy` (from home), and the
        copy's dvc.lock holds only the entries of the unit's stages and of those it depends
        on. DVC rewrites the whole lock after each stage (a round-trip YAML parse and dump:
        2.5 + 1.5 s at the 350 KB of 5 models × 4 variants, measured); a lock of the unit's
        own stages keeps that small whatever the number of models."""
        for stage in sorted(upstream & self.built - copy.holds):
            for path in _outputs(self.home["stages"][stage], LOCK):
                _copy_into(path, copy.folder / path, stage)
            copy.holds.add(stage)
        entries = self.home["stages"]
        _write_lock(copy.folder / LOCK, {**self.home, "stages": {stage: entries[stage] for stage in sorted(
            upstream | set(unit.stages)) if stage in entries}})


def _read_lock(path: Path) -> dict:
    try:
        lock = yaml.load(path.read_text(encoding="utf-8"), Loader=LOADER) if path.is_file() else None
    except (OSError, yaml.YAMLError) as exc:
        raise OutputError(f"unreadable lock: {first_line(exc)}", file=str(path)) from None
    lock = lock or {"schema": "2.0", "stages": {}}
    lock.setdefault("stages", {})
    return lock


def _write_lock(path: Path, lock: dict) -> None:
    write_text(path, yaml.dump(lock, Dumper=DUMPER, sort_keys=False, width=120))


def _outputs(entry: dict, lock: Path) -> list[Path]:
    paths = []
    for out in entry.get("outs", []):
        path = Path(os.path.normpath(out["path"]))
        if path.is_absolute() or path.parts[:1] == ("..",):
            raise OutputError(f"an output outside the project: {out['path']}", file=str(lock))
        paths.append(path)
    return paths


def _same_file(source: Path, target: Path) -> bool:
    """Both regular files with the same bytes (folders are always copied)."""
    return source.is_file() and target.is_file() and filecmp.cmp(source, target, shallow=False)


def _copy_into(source: Path, target: Path, stage: str) -> None:
    """`target` becomes a copy of `source`, whole or not at all."""
    try:
        with atomic_path(target) as staged:
            if source.is_dir() and not source.is_symlink():
                shutil.copytree(source, staged, symlinks=True)
            else:
                shutil.copy2(source, staged, follow_symlinks=False)
    except OSError as exc:
        raise OutputError(f"could not copy {stage}'s output: {first_line(exc)}", file=str(target)) from None


@dataclasses.dataclass
class _Copy:
    """One worker's copy of the project, using this project's DVC cache, without git."""

    index: int
    folder: Path
    log: Path
    holds: set[str] = dataclasses.field(default_factory=set)  # stages built this run whose outputs it has

    @classmethod
    def make(cls, index: int, cache: Path) -> "_Copy":
        """A copy whose DVC uses `cache` (this project's) and no git."""
        from dvc.config import Config, ConfigError as DvcConfigError  # what `dvc config --local` runs, in-process

        root, folder = Path.cwd(), WORKERS / f"worker-{index}"
        shutil.copytree(root, folder, symlinks=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
        _relink_into(folder, root)
        (folder / ".dvc").mkdir()
        shutil.copy2(root / ".dvc" / "config", folder / ".dvc" / "config")
        try:
            with Config(dvc_dir=str(folder / ".dvc")).edit("local") as settings:
                settings["core"]["no_scm"] = True
                settings["cache"]["dir"] = str(cache)
        except DvcConfigError as exc:
            raise OSError(f"dvc config failed: {first_line(exc)}") from None
        return cls(index, folder, WORKERS / f"worker-{index}.log")

    def collect_records(self) -> None:
        for entry in tracking.pending(self.folder / tracking.DEFERRED_DIR):
            tracking.DEFERRED_DIR.mkdir(parents=True, exist_ok=True)
            shutil.move(str(entry), tracking.DEFERRED_DIR / entry.name)


def _relink_into(copy: Path, root: Path) -> None:
    """A link in the project leading by an absolute path to a file the copy has leads to the
    copy's file instead: a worker's stages read and write their copy, not the project. Links
    elsewhere (into DVC's cache, which the copies share, or outside the project) stay."""
    root, inside = root.resolve(), copy.resolve()
    for folder, subfolders, files in os.walk(copy):  # links to folders are listed, not followed
        for name in subfolders + files:
            path = Path(folder, name)
            if not path.is_symlink():
                continue
            target = Path(os.path.normpath(os.readlink(path)))
            if target.is_absolute() and target.is_relative_to(root):
                relative = target.relative_to(root)
                if relative.parts and relative.parts[0] not in NOT_COPIED:
                    path.unlink()
                    path.symlink_to(inside / relative)


def _cache_dir(root: Path) -> Path:
    done = subprocess.run([str(repro.BIN / "dvc"), "cache", "dir"], capture_output=True, text=True, cwd=root,
                          env=repro.dvc_env())
    if done.returncode != 0:
        raise OSError(f"dvc cache dir failed: {' '.join(done.stderr.split())[:300]}")
    return Path(done.stdout.strip()).resolve()


class _Engine:
    """Where a worker's `dvc repro` runs."""

    def submit(self, copy: _Copy, stages: list[str], env: dict[str, str]) -> None: ...
    def next_ended(self) -> tuple[_Copy, bool]: ...  # a copy whose DVC ended, and whether it failed
    def stop(self) -> None: ...  # what still runs (interrupted) stops
    def close(self) -> None: ...


class _Threads(_Engine):
    """Each worker's DVC a process of its own, its output copied by a thread."""

    def __init__(self):
        self.ended: queue.Queue[tuple[_Copy, bool]] = queue.Queue()
        self.running: dict[int, subprocess.Popen] = {}

    def submit(self, copy: _Copy, stages: list[str], env: dict[str, str]) -> None:
        process = self.running[copy.index] = _start_dvc(copy.folder, stages, env)
        handle = open(copy.log, "ab")

        def wait() -> None:
            with handle:
                _copy_output(process, handle, copy.index)
            self.ended.put((copy, process.wait() != 0))

        threading.Thread(target=wait, daemon=True).start()

    def next_ended(self) -> tuple[_Copy, bool]:
        copy, failed = self.ended.get()
        del self.running[copy.index]
        return copy, failed

    def stop(self) -> None:
        for process in self.running.values():  # interrupted: each DVC stops its stage, then is killed
            repro.stop_group(process)

    def close(self) -> None:
        pass


class _Ray(_Engine):
    """The workers' `dvc repro` as Ray tasks of one CPU each."""

    def __init__(self, address: str, jobs: int):
        _check_ray(address)
        import ray
        if not sys.stdout.isatty():  # a log gets the workers' lines without colour codes
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        # A new local instance gets token authentication (Ray's default); Ray warns that it did,
        # on every run. The README says it once.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        try:
            ray.init(address=address or None, num_cpus=None if address else jobs, include_dashboard=False,
                     logging_level="WARNING", log_to_driver=True)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError... here
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise ConfigError(f"could not start or reach {where}: {first_line(exc)}", key="parallel.ray_address") from None
        self.ray = ray
        self.task = ray.remote(num_cpus=1, max_retries=0)(run_worker)
        self.running: dict = {}

    def submit(self, copy: _Copy, stages: list[str], env: dict[str, str]) -> None:
        self.running[self.task.remote(str(copy.folder.resolve()), stages, env, copy.index, str(copy.log.resolve()))] = copy

    def next_ended(self) -> tuple[_Copy, bool]:
        (ended,), _ = self.ray.wait(list(self.running), num_returns=1)
        copy = self.running.pop(ended)
        try:
            return copy, self.ray.get(ended)
        except self.ray.exceptions.RayError as exc:  # the task itself died (a node lost, out of memory)
            print(f"[worker {copy.index}] Ray: {first_line(exc)}", file=sys.stderr)
            return copy, True

    def stop(self) -> None:
        for ref in self.running:  # the task gets a KeyboardInterrupt: its DVC stops its stage
            self.ray.cancel(ref)
        if self.running:
            self.ray.wait(list(self.running), num_returns=len(self.running), timeout=repro.STOP_SECONDS + 5)

    def close(self) -> None:
        self.ray.shutdown()


RAY_CONNECT_SECONDS = 10
RAY_HANDSHAKE_SECONDS = 5  # a head's gRPC answers in milliseconds once its port accepted


def _check_ray(address: str) -> None:
    """Ray installed, and a Ray head at the address answering within seconds (its gRPC, not
    just any server on that port); else one line now. Ray itself waits for a head for a
    minute, printing its GCS client's log lines, after the run's parent run opened."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("parallel=ray needs Ray: pip install -e '.[ray]'", key="parallel.engine")
    if address == "":
        return  # a local instance, started by the run
    shown = address
    if address == "auto":
        address = _auto_address()
        shown = f"{address} (auto)"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_SECONDS).close()
    except OSError as exc:
        raise ConfigError(f"nothing answers at {shown}: {exc.strerror or first_line(exc)}",
                          key="parallel.ray_address") from None
    import grpc  # Ray's own RPC library (a dependency of Ray)

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=RAY_HANDSHAKE_SECONDS)
    except grpc.FutureTimeoutError:
        raise ConfigError(f"{shown} answers, but not as a Ray head (no gRPC within {RAY_HANDSHAKE_SECONDS} s): "
                          "is it the head's GCS port (6379 by default) or its client port (ray://…:10001)?",
                          key="parallel.ray_address") from None
    finally:
        channel.close()


def _auto_address() -> str:
    """The cluster `auto` names, as Ray finds it (RAY_ADDRESS, then the last `ray start` on this
    machine); none is one line now instead of after the parent run opened."""
    from ray._private.services import get_ray_address_from_environment  # the lookup ray.init("auto") makes

    try:
        address = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        raise ConfigError("auto: no running Ray cluster found on this machine (start one with `ray start --head`, "
                          "or name its address)", key="parallel.ray_address") from None
    if address == "auto" or not is_ray_address(address):  # RAY_ADDRESS is checked here, as the config was at load
        raise ConfigError(f"auto found {address!r} (RAY_ADDRESS?): not a Ray address (<host>:<port> or "
                          "ray://<host>:<port>)", key="parallel.ray_address")
    return address


def run_worker(worker: str, stages: list[str], env: dict[str, str], index: int, log: str) -> bool:
    """One worker's `dvc repro --keep-going` of some stages (the body of a Ray task): DVC's
    "Running stage" lines printed tagged with the worker, everything appended to `log`.
    Returns whether DVC failed; interrupted, DVC stops its stage first."""
    with open(log, "ab") as handle:
        process = _start_dvc(Path(worker), stages, env)
        try:
            _copy_output(process, handle, index)
            return process.wait() != 0
        except KeyboardInterrupt:
            repro.stop_group(process)
            raise


def _start_dvc(worker: Path, stages: list[str], env: dict[str, str]) -> subprocess.Popen:
    # A process group of its own: stopping it reaches the stage too (DVC alone ignores a
    # SIGINT while a stage runs), and a terminal's Ctrl-C reaches this process, which stops it.
    return subprocess.Popen([str(repro.BIN / "dvc"), "repro", "--keep-going", *stages], cwd=worker,
                            env={**repro.dvc_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _copy_output(process: subprocess.Popen, handle, index: int) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        handle.write(line)
        if line.startswith(b"Running stage"):
            _print_above_bar(f"[worker {index}] {line.decode(errors='replace').strip()}")


def _print_above_bar(line: str) -> None:
    """A line of the run's output, above the builds bar if one is shown."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


