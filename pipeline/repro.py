"""One pipeline invocation: compose conf/ into params.yaml, open the MLflow parent run, run DVC.

Shared by `litert-pipeline run` and `nightly`. The invocation's context reaches the stages
(DVC subprocesses) through the environment: LITERT_PARENT_RUN_ID, or LITERT_TRACKING_OFFLINE
when MLflow is unreachable and optional.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple, TypeVar

from tqdm import tqdm

from pipeline import config, layout, tracking
from pipeline.config import PipelineConfig, TrackingConfig
from pipeline.errors import (EXIT_INTERNAL, EXIT_OK, OUTCOMES_ENV, BusyError, ConfigError, InputError, OutputError,
                             TrackingError, first_line, most_severe)
from pipeline.io import sha256_path, write_text

BIN = Path(sys.executable).parent
# Held by each invocation that writes params.yaml or runs the stages (flock: a killed holder
# releases it). A second invocation refuses at once, so no build is validated under its gates.
LOCK_FILE = Path(".litert/lock")


@contextlib.contextmanager
def project_lock(command: str) -> Iterator[None]:
    """Hold the project for `command`; BusyError naming the holder when another invocation has it."""
    try:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot open the project lock: {exc.strerror}", file=str(LOCK_FILE)) from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "another invocation"
            raise BusyError(f"{holder} holds the project: wait for it to finish (nothing was changed)",
                            file=str(LOCK_FILE)) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"litert-pipeline {command} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


@dataclass(frozen=True)
class Invocation:
    cfg: PipelineConfig
    parent: str | None  # the MLflow parent run; None when tracking is off or unreachable


DVC_YAML = Path("dvc.yaml")
T = TypeVar("T")
TRACK_STAGE = "track"  # dvc.yaml's last stage: uploads the build stages' deferred records


def write_composed(overrides: list[str], conf_dir: str, output: str = config.PARAMS_FILE) -> PipelineConfig:
    """Compose `conf/` into `output`; for the project's params.yaml, also declare the builds'
    delivered models as dvc.yaml's artifacts. Returns the typed config. A selection of no model
    is refused before anything is written (a nightly of nothing would pass)."""
    text, cfg = config.compose_typed(overrides, conf_dir=conf_dir)
    if not cfg.model:
        chosen_here = any(o.split("=", 1)[0].lstrip("+~") == "model" for o in overrides)
        raise ConfigError("no model selected: nothing would be built (name one, e.g. 'model=[digits]')",
                          file="command line" if chosen_here else str(Path(conf_dir, "config.yaml")), key="model")
    write_text(output, text)
    if output == config.PARAMS_FILE:
        declare_artifacts(cfg)
    return cfg


def declare_artifacts(cfg: PipelineConfig, verdicts: list[Verdict] | None = None) -> None:
    """dvc.yaml's artifacts section for `cfg`'s builds, each with its validation verdict
    (`verdicts`, or as the files say now)."""
    if not DVC_YAML.is_file():
        return
    text = DVC_YAML.read_text(encoding="utf-8")
    verdicts = build_verdicts(cfg) if verdicts is None else verdicts
    updated = layout.with_dvc_artifacts(text, cfg, {v.build: v.verdict for v in verdicts})
    if updated != text:
        write_text(DVC_YAML, updated)


class Verdict(NamedTuple):
    build: str
    verdict: str  # passed (unverified), failed, not validated, not built, out of date
    paths: layout.BuildPaths
    delivered_sha256: str | None  # of the delivered model, when there is one
    report: dict | None = None  # its validation report, when there is one
    unfinished: tuple[str, ...] = ()  # out of date: the stages up to its validation DVC left so


def build_verdicts(cfg: PipelineConfig, stale: set[str] = frozenset(),
                   graph: dict[str, set[str]] | None = None) -> list[Verdict]:
    """The verdict of every build and auto-selection: passed (unverified), failed, not
    validated (the report is of an earlier model), not built, or out of date: a stage it
    depends on is in `stale` (`dvc status` after a failed run, with `graph`, DVC's), so what
    it delivered, if anything, is an earlier run's."""
    builds = [(b.model, b.variant) for b in cfg.build.values()] + [(m, layout.AUTO_VARIANT) for m in cfg.autoselect]
    verdicts = []
    for model, variant in builds:
        paths = layout.BuildPaths.of(model, variant)
        last = f"autoselect@{model}" if variant == layout.AUTO_VARIANT else f"validate@{model}-{variant}"
        delivered, report = None, None
        unfinished = ancestors(graph or {}, last) & stale
        try:
            delivered = sha256_path(paths.delivered)
            report = json.loads(paths.validation_json.read_text(encoding="utf-8"))
            if not isinstance(report, dict):
                raise ValueError("not a report")
        except (OSError, ValueError, InputError):
            verdict = "not built"  # the stages failed before delivering (or validating) it
        else:
            if unfinished:
                verdict = "out of date"
            elif report.get("model_sha256") != delivered:  # a report of an earlier run's model
                verdict = "not validated"
            elif not report.get("passed"):
                verdict = "failed"  # its gates (the stage exits 4 after writing the report)
            elif last in stale:  # a passing report, but the stage did not finish
                verdict, unfinished = "out of date", {last}
            else:
                verdict = "passed" + (" (unverified)" if report.get("verification") == "unverified" else "")
        verdicts.append(Verdict(f"{model}-{variant}", verdict, paths, delivered, report, tuple(sorted(unfinished))))
    return verdicts


def compose_checked(overrides: list[str], conf_dir: str) -> PipelineConfig:
    """Compose params.yaml and check that the files it names exist (and that a model is named:
    a nightly of nothing would pass)."""
    cfg = write_composed(overrides, conf_dir)
    config.check_inputs_exist(cfg, conf_dir)
    check_output_folders(cfg)
    return cfg


def compose_with_status(overrides: list[str], conf_dir: str) -> tuple[PipelineConfig, set[str]]:
    """`compose_checked` and `dvc status` (`stale_stages`) at once: 4.9 s and 9.5 s at 50
    models (bench/noop_built.md). The status, started first, stands when compose left params.yaml
    and dvc.yaml as they were (both are written whole, by rename): a rerun of the same conf,
    a nightly's usual case. Otherwise it is asked again, after compose."""
    before = _composed_files()
    status = _StatusProcess()
    try:
        cfg = compose_checked(overrides, conf_dir)
    except BaseException:
        status.wait()
        raise
    if _composed_files() == before:
        return cfg, status.stale()
    status.wait()
    return cfg, stale_stages()


def _composed_files() -> tuple[bytes | None, ...]:
    return tuple(path.read_bytes() if path.is_file() else None for path in (Path(config.PARAMS_FILE), DVC_YAML))


def check_output_folders(cfg: PipelineConfig) -> None:
    """A file where a stage writes a folder (`models/<m>` a file) fails DVC before the stage
    runs, which the run could only report as a stage DVC could not run (exit 1): said here."""
    for folder in layout.output_folders(cfg):
        for path in (folder, *folder.parents[:-1]):  # not "." itself
            if path.exists() and not path.is_dir():
                raise OutputError(f"a file where the pipeline writes the folder '{folder}': move it away",
                                  file=str(path))


def nothing_to_upload() -> bool:
    """No records wait: neither the queue of an offline run nor an interrupted one's deferred records."""
    return not tracking.pending() and not tracking.pending(tracking.DEFERRED_DIR)


def start(cfg: PipelineConfig, name: str, kind: str) -> Invocation:
    """Open the parent run of the composed `cfg` and upload what earlier offline runs queued."""
    return _opened(cfg, tracking.start_parent_run(cfg.tracking, name, {"kind": kind}))


def start_while(cfg: PipelineConfig, name: str, kind: str, work: Callable[[], T]) -> tuple[Invocation, T]:
    """`start`, with `work` done meanwhile in this thread: work that logs nothing (the stages
    every model shares) need not wait for MLflow's import and a new store's tables (4.9 s of a
    60 s first run, measured). MLflow's HTTP settings are set for the whole time: `work`
    starts processes, which copy the environment. If `work` fails or is interrupted, a parent
    run opened meanwhile ends FAILED or KILLED, as in `ended_on_failure`."""
    opened: dict[str, object] = {}

    def open_parent() -> None:
        try:
            opened["parent"] = tracking.start_parent_run(cfg.tracking, name, {"kind": kind})
        except BaseException as exc:  # noqa: BLE001 - raised in the main thread below
            opened["error"] = exc

    opening = threading.Thread(target=open_parent, name="parent-run", daemon=True)
    with tracking.http_settings(cfg.tracking):
        opening.start()
        try:
            with _sigterm_interrupts():
                done = work()
        except BaseException as exc:
            opening.join(STOP_SECONDS)  # bounded: an unreachable server may be retried for longer
            if opened.get("parent"):
                tracking.end_parent_run(cfg.tracking, opened["parent"], succeeded=False,
                                        status="KILLED" if isinstance(exc, KeyboardInterrupt) else None)
            raise
        opening.join()
    if "error" in opened:
        raise opened["error"]
    return _opened(cfg, opened["parent"]), done


def _opened(cfg: PipelineConfig, parent: str | None) -> Invocation:
    os.environ.pop(tracking.PARENT_ENV, None)
    os.environ.pop(tracking.OFFLINE_ENV, None)
    tracking.move_deferred_to_pending()  # an interrupted invocation's records: uploaded below, like the queue
    invocation = Invocation(cfg, parent)
    if parent:
        os.environ[tracking.PARENT_ENV] = parent
        if tracking.pending():
            with ended_on_failure(invocation):
                try:
                    count = tracking.sync(cfg.tracking, parent)
                    print(f"uploaded {count} record(s) queued while MLflow was unreachable", file=sys.stderr)
                except TrackingError as exc:  # lost the server again: the queue waits for the next run
                    if cfg.tracking.required:
                        raise
                    print(f"warning: {exc.one_line()} (tracking.required is false: continuing)", file=sys.stderr)
    elif cfg.tracking.enabled:
        os.environ[tracking.OFFLINE_ENV] = "1"
    return invocation


@contextlib.contextmanager
def ended_on_failure(invocation: Invocation) -> Iterator[None]:
    """The parent run never stays RUNNING: FAILED if the block raises, KILLED if it is
    interrupted (Ctrl-C, or SIGTERM from a scheduler)."""
    try:
        with _sigterm_interrupts():
            yield
    except KeyboardInterrupt:
        tracking.end_parent_run(invocation.cfg.tracking, invocation.parent, succeeded=False, status="KILLED")
        raise
    except BaseException:
        tracking.end_parent_run(invocation.cfg.tracking, invocation.parent, succeeded=False)
        raise


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """A scheduler's SIGTERM interrupts as Ctrl-C does: DVC and its stage are stopped."""
    def interrupt(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def upload_deferred(invocation: Invocation) -> None:
    """Log what the stages of this invocation recorded (runs, metrics, artifacts, registry
    versions), in this one process; without a server they join the queue for `sync`."""
    if not tracking.pending(tracking.DEFERRED_DIR):
        return
    if invocation.parent is None:  # tracking.required is false and MLflow was unreachable at the start
        count = tracking.move_deferred_to_pending()
        print(f"warning: MLflow was unreachable: {count} record(s) queued for `litert-pipeline sync`", file=sys.stderr)
        return
    upload_records(invocation.cfg, invocation.parent)


def upload_records(cfg: PipelineConfig, parent: str | None) -> None:
    """The deferred records, under `parent` (or none); if the server is lost, what is left
    waits for `sync` (an error when tracking is required)."""
    try:
        tracking.sync(cfg.tracking, parent, folder=tracking.DEFERRED_DIR)
    except TrackingError as exc:
        count = tracking.move_deferred_to_pending()
        if cfg.tracking.required:
            raise
        print(f"warning: {exc.one_line()}: {count} record(s) queued for `litert-pipeline sync` "
              "(tracking.required is false)", file=sys.stderr)


def track(cfg: PipelineConfig) -> dict:
    """The `track` stage, dvc.yaml's last: upload the records the build stages deferred, in this
    one process, under the invoking `run`'s parent run, or under a parent run of its own when a
    plain `dvc repro` runs it (ended with the comparisons attached); none when the invoking
    `run` uploads them itself (a serial `dvc repro`: `reproduce(uploading=...)`). Returns what `tracked.json`
    holds: each build's verdict and delivered model hash, the same for a serial and a parallel run."""
    if cfg.tracking.enabled and tracking.pending(tracking.DEFERRED_DIR) and not os.environ.get(
            tracking.INVOCATION_UPLOADS_ENV):  # else the invoking `run` uploads them (`Uploads`), and what is left after
        parent = os.environ.get(tracking.PARENT_ENV)
        if parent or os.environ.get(tracking.OFFLINE_ENV):  # `run`/`nightly` own the parent run
            upload_deferred(Invocation(cfg, parent or None))
        else:
            own = Invocation(cfg, tracking.start_parent_run(cfg.tracking, "dvc repro", {"kind": "dvc-repro"}))
            with ended_on_failure(own):
                upload_deferred(own)
            finish(own, succeeded=True)
    return {"builds": {v.build: {"verdict": v.verdict, "model_sha256": v.delivered_sha256} for v in build_verdicts(cfg)}}


def finish(invocation: Invocation, *, succeeded: bool, metrics: dict[str, float] | None = None,
           artifacts: list[Path] | None = None) -> None:
    """End the parent run, attaching the model comparisons (tables and Pareto plots) if made."""
    attached = [*(artifacts or []), *([layout.COMPARISON] if layout.COMPARISON.is_dir() else [])]
    tracking.end_parent_run(invocation.cfg.tracking, invocation.parent, succeeded=succeeded, metrics=metrics,
                            artifacts=attached)


def summary(cfg: PipelineConfig, verdicts: list[Verdict]) -> str:
    """What a run leaves, for a person: each build's verdict, size and file, where the reports
    and the MLflow UI are."""
    rows = []
    for v in verdicts:
        delivered = v.paths.delivered
        size = f"{delivered.stat().st_size / 1024:,.1f} KB" if delivered.is_file() else "-"
        rows.append(f"  {v.build:<36} {v.verdict:<20} {size:>11}  {delivered}")
    passed = sum(v.verdict.startswith("passed") for v in verdicts)
    # DVC leaves the outputs of stages no longer in dvc.yaml: a removed build's model stays.
    delivered = {v.paths.delivered for v in verdicts}
    folders = sorted({path.parent for path in delivered})
    left = sorted(path for folder in folders if folder.is_dir() for path in folder.glob("*.tflite") if path not in delivered)
    if left:
        rows.append(f"  left from builds no longer configured (nothing builds or validates them): "
                    f"{', '.join(map(str, left))}")
    uri = tracking.tracking_uri(cfg.tracking) if cfg.tracking.enabled else None
    ui = (f"{BIN / 'mlflow'} ui --backend-store-uri {uri}" if uri and uri.startswith("sqlite:")
          else tracking.shown(uri) if uri else "tracking is off")
    return "\n".join([f"builds: {passed} of {len(verdicts)} passed", *rows,
                      f"reports: {layout.REPORTS}/<model>/<variant>/validation.md, {layout.COMPARISON}/<model>/report.md",
                      f"MLflow: {ui}"])


def dvc_env() -> dict[str, str]:
    # DVC runs from this interpreter's environment, so stages use the same Python.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


# Lines native libraries log from every stage process, whatever TF_CPP_MIN_LOG_LEVEL says:
# absl's (TensorFlow's CUDA and oneDNN probes: "I0000 00:00:17... 123 port.cc:153] ..."), the
# LiteRT interpreter's delegate notice, and LiteRT's CompiledModel environment set-up
# ("INFO: [gpu_registry.cc:130] ...", "└ Could not load shared library ..."). `-v` shows them.
NATIVE_LOG = re.compile(rb"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w./-]+:\d+\] |WARNING: All log messages before "
                        rb"absl::InitializeLog\(\) is called|INFO: Created TensorFlow Lite XNNPACK delegate|"
                        rb"(INFO|WARNING|VERBOSE): \[[\w./-]+:\d+\] |\xe2\x94\x94 )")


def _forward_without_native_logs(source: int, target: BinaryIO) -> None:
    """Copy `source` (a pipe) to `target` as it comes, dropping NATIVE_LOG lines. Progress bars
    (segments ended by a carriage return) pass at once."""
    pending = b""
    while chunk := os.read(source, 65536):
        pending += chunk
        *segments, pending = re.split(rb"(?<=[\r\n])", pending)
        kept = b"".join(segment for segment in segments if not NATIVE_LOG.match(segment))
        if kept:
            target.write(kept)
            target.flush()
    if pending and not NATIVE_LOG.match(pending):
        target.write(pending)
        target.flush()
    os.close(source)


def dvc(*args: str, env: dict[str, str] | None = None, verbose: bool = True) -> int:
    """Run a DVC command with its output shown (without native libraries' log lines unless
    `verbose`); return its exit code. Interrupted, DVC and its stage are stopped (`stop_group`)."""
    stderr, forwarder = None, None
    if not verbose and hasattr(sys.stderr, "buffer"):
        read_end, stderr = os.pipe()
        forwarder = threading.Thread(target=_forward_without_native_logs, args=(read_end, sys.stderr.buffer),
                                     daemon=True)
        forwarder.start()
    try:
        # A process group of its own: stopping it reaches the stage too (DVC alone ignores a
        # SIGINT while a stage runs, and a scheduler's SIGTERM reaches this process only); a
        # terminal's Ctrl-C reaches this process, which stops it.
        process = subprocess.Popen([str(BIN / "dvc"), *args], env={**dvc_env(), **(env or {})}, stderr=stderr,
                                   start_new_session=True)
    finally:
        if stderr is not None:
            os.close(stderr)  # the child holds its own copy: the forwarder ends when the child does
    try:
        code = process.wait()
        if forwarder is not None:  # bounded: a background process DVC started may hold the pipe open
            forwarder.join(timeout=10)
        return code
    except KeyboardInterrupt:
        stop_group(process)
        raise


STOP_SECONDS = 30  # DVC gets this long to stop its stage after a SIGINT
UPLOAD_SECONDS = 1.0  # how often `Uploads` looks for new records during a serial `dvc repro`


def stop_group(process: subprocess.Popen, seconds: float = STOP_SECONDS) -> None:
    """SIGINT to a process started in a session of its own and to what it runs, once a second:
    DVC ignores it while a stage runs, and the stage stops; with `--keep-going` DVC then starts
    the next one, and between stages the SIGINT stops DVC itself (it leaves no lock behind).
    After `seconds`, SIGKILL to all of them."""
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        _signal_group(process, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1)
    if process.poll() is None:
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


class Reproduced(NamedTuple):
    """How a `dvc repro` ended: 0 or the most severe documented exit code of the stages that
    failed and, after a failure, what `dvc status` and `dvc dag` said (None: not asked). The
    summary's verdicts reuse them: `dvc status` reads params.yaml once per stage, a minute at
    50 models (bench/noop.md)."""

    code: int
    stale: set[str] | None = None
    graph: dict[str, set[str]] | None = None

    def state(self) -> tuple[set[str], dict[str, set[str]]]:
        """The stages out of date and the stage graph, as this run left them."""
        if self.stale is None and self.graph is None:
            return stale_and_graph()
        return (stale_stages() if self.stale is None else self.stale,
                stage_graph() if self.graph is None else self.graph)


def reproduce(*targets: str, single_item: bool = False, verbose: bool = False,
              uploading: TrackingConfig | None = None) -> Reproduced:
    """`dvc repro --keep-going`: one failing build does not stop the others. The exit code is
    never DVC's own 255. The stages defer their tracking records: `upload_deferred` logs them
    afterwards; with `uploading` (the invocation's settings), they go up while DVC builds
    (`Uploads`) instead of in its `track` stage. `single_item`: the targets alone, their
    upstream stages not checked."""
    flags = ["--keep-going", *(["--single-item"] if single_item else [])]
    uploads = Uploads(uploading, every=UPLOAD_SECONDS) if uploading else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="litert-outcomes-") as folder, uploads:
        env = {OUTCOMES_ENV: folder, tracking.DEFER_ENV: "1",
               **({tracking.INVOCATION_UPLOADS_ENV: "1"} if uploading else {})}
        code = dvc("repro", *flags, *targets, env=env, verbose=verbose)
        outcomes = [read_outcome(path) for path in sorted(Path(folder).glob("*.json"))]
    if code == 0:
        return Reproduced(EXIT_OK)
    try:
        stale, graph = stale_and_graph()
    except InputError:  # DVC cannot say: the failures are what the stages recorded
        return Reproduced(summarize_failures(outcomes, set()))
    return Reproduced(summarize_failures(outcomes, first_left(stale, graph)), stale, graph)


class Uploads:
    """The stages' records go up to MLflow from a thread of this process while DVC builds:
    this process opened the parent run, so MLflow is imported and its store open already, where
    the `track` stage would import it again and upload every build at the end (16.5 s of a
    233 s `-j 2` run at 5 models; 6.4 s of P1's serial run, measured). The thread uploads when
    woken (`wake`: a worker's unit ended) or every `every` seconds (a serial `dvc repro`; a
    stage writes its record whole, under a dot-name it then renames). What is not uploaded here
    (MLflow lost, a run interrupted) stays deferred for `upload_deferred`, whose handling of an
    unreachable or refusing server (the queue, `tracking.required`) applies."""

    def __init__(self, settings: TrackingConfig, every: float | None = None):
        self.tracking, self.parent, self.every = settings, os.environ.get(tracking.PARENT_ENV), every
        self.ready, self.done, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._upload, name="uploads", daemon=True)
        self.settings = contextlib.ExitStack()

    def __enter__(self) -> "Uploads":
        if self.tracking.enabled and self.parent:  # else offline, or nothing to log: queued after DVC
            self.settings.enter_context(tracking.http_settings(self.tracking))
            self.thread.start()
        return self

    def wake(self) -> None:
        self.ready.set()

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:  # failed or interrupted: the record being uploaded ends, the rest waits
            self.stop.set()
        self.done.set()
        self.ready.set()
        if self.thread.is_alive():  # interrupted, not for long: the thread dies with the process
            self.thread.join(None if kind is None else STOP_SECONDS)
        self.settings.close()

    def _upload(self) -> None:
        while not self.stop.is_set():
            self.ready.wait(self.every)
            self.ready.clear()
            finishing = self.done.is_set()  # the last records came home before `done` was set
            try:
                tracking.sync(self.tracking, self.parent, folder=tracking.DEFERRED_DIR, stop=self.stop)
            except Exception as exc:  # noqa: BLE001 - whatever it is, the upload after DVC meets it again and reports it
                tqdm.write(f"warning: uploading records while DVC builds stopped: {first_line(exc)}; "
                           "they are uploaded (or queued) after it", file=sys.stderr)
                return
            if finishing:
                return


def first_left(left: set[str], graph: dict[str, set[str]]) -> set[str]:
    """The stages of `left` (not built by a `dvc repro --keep-going`) that failed: those none of
    whose upstream stages, direct or not, was left too; DVC skipped the others because of them
    (a skipped stage's parent may be up to date: `dvc status` names the stages whose own inputs
    changed)."""
    return {stage for stage in left if not (ancestors(graph, stage) & left)}


def summarize_failures(outcomes: list[dict], failed: set[str]) -> int:
    """Print the failing stages; return the most severe exit code. A stage DVC could not run at
    all (it recorded nothing: DVC failed to prepare it, or it crashed) counts as internal."""
    recorded = {outcome["stage"] for outcome in outcomes}
    unexplained = sorted(failed - recorded)
    if not outcomes and not unexplained:
        unexplained = ["dvc repro"]  # DVC failed before any stage (a lock, a malformed dvc.yaml)
    print(f"error: {len(outcomes) + len(unexplained)} stage(s) failed:", file=sys.stderr)
    for outcome in outcomes:
        print(f"  {outcome['stage']} (exit {outcome['exit_code']}): {outcome['message']}", file=sys.stderr)
    for stage in unexplained:
        print(f"  {stage} (exit {EXIT_INTERNAL}): DVC could not run it: see DVC's message above", file=sys.stderr)
    return most_severe([o["exit_code"] for o in outcomes] + [EXIT_INTERNAL] * len(unexplained))


def read_outcome(path: Path) -> dict:
    try:
        outcome = json.loads(path.read_text(encoding="utf-8"))
        return {"stage": str(outcome["stage"]), "exit_code": int(outcome["exit_code"]), "message": str(outcome["message"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"stage": path.stem, "exit_code": EXIT_INTERNAL, "message": "its outcome record is unreadable"}


def stage_graph(cwd: Path | None = None) -> dict[str, set[str]]:
    """Each stage's direct upstream stages, from `dvc dag --dot`."""
    result = subprocess.run([str(BIN / "dvc"), "dag", "--dot"], capture_output=True, text=True, env=dvc_env(), cwd=cwd)
    if result.returncode != 0:
        raise InputError(f"dvc dag failed: {' '.join(result.stderr.split())[:300]}", file="dvc.yaml")
    graph: dict[str, set[str]] = {}
    for upstream, downstream in re.findall(r'"([^"]+)" -> "([^"]+)"', result.stdout):
        graph.setdefault(downstream, set()).add(upstream)
    return graph


def ancestors(graph: dict[str, set[str]], stage: str) -> set[str]:
    """Every stage `stage` depends on, directly or not."""
    found: set[str] = set()
    todo = [stage]
    while todo:
        for upstream in graph.get(todo.pop(), set()) - found:
            found.add(upstream)
            todo.append(upstream)
    return found


def descendants(graph: dict[str, set[str]], stage: str) -> set[str]:
    """Every stage that depends on `stage`, directly or not."""
    below: dict[str, set[str]] = {}
    for downstream, upstream_stages in graph.items():
        for upstream in upstream_stages:
            below.setdefault(upstream, set()).add(downstream)
    return ancestors(below, stage)  # the ancestors in the graph turned around


def stage_graph_soon() -> Future:
    """`stage_graph`, asked now in a thread of its own."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="dvc-dag")
    try:
        return executor.submit(stage_graph)
    finally:
        executor.shutdown(wait=False)  # the thread ends with its one task


def stale_and_graph() -> tuple[set[str], dict[str, set[str]]]:
    """`dvc status` and `dvc dag` at once: two processes, each mostly DVC's start-up and its
    parse of dvc.yaml (1.4 s and 1.1 s at 5 models, 1.7 s at once, measured)."""
    with ThreadPoolExecutor(2) as pool:
        graph = pool.submit(stage_graph)
        return stale_stages(), graph.result()


def stale_stages(cwd: Path | None = None) -> set[str]:
    """Stages `dvc status` reports as not up to date (changed, failed or never run)."""
    return _StatusProcess(cwd).stale()


class _StatusProcess:
    """`dvc status --json`, started now; `stale()` waits for its answer."""

    def __init__(self, cwd: Path | None = None):
        self._process = subprocess.Popen([str(BIN / "dvc"), "status", "--json"], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, env=dvc_env(), cwd=cwd)

    def stale(self) -> set[str]:
        out, err = self._process.communicate()
        if self._process.returncode != 0:
            raise InputError(f"dvc status failed: {' '.join(err.split())[:300]}", file="dvc.yaml")
        return set(json.loads(out))

    def wait(self) -> None:
        """Its end, its answer unread. Never killed: a DVC killed while it rewrites
        .dvc/tmp/rwlock leaves that file unreadable to the next DVC command (seen in a test)."""
        self._process.communicate()
