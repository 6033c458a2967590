"""MLflow: the only module that talks to the tracking server.

Runs: each invocation (`litert-pipeline run`, `nightly`, `sync`) opens one parent run and
exports LITERT_PARENT_RUN_ID; each model × variant ("build") has one child run under it.
Stages of a build log into that run, found by tags, so a rerun updates it instead of leaving
stray runs.

Registry: MLflow has no tflite flavour. A passing build's record carries a `Registration`
(pipeline/registry.py): its model and report are logged to the run's `model/` folder, and
saved as an MLflow 3 LoggedModel of that run with a small pyfunc flavour
(pipeline/mlflow_tflite.py); the version is created from the LoggedModel (its folder, its id
in the version's `litert.logged_model_id` tag).

Offline: with `tracking.required: false`, a record that cannot be logged is queued under
.litert/pending/ with copies of its files; `sync` (or the next run) replays the queue.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from pipeline import __version__
from pipeline.build import Build
from pipeline.config import TrackingConfig, check_tracking_uri, plain
from pipeline.errors import ConfigError, InputError, OutputError, PipelineError, TrackingError
from pipeline.io import atomic_path, write_text
from pipeline.registry import CANDIDATE, SHA256_TAG, Registration, variant_alias
from pipeline.registry import TAG as TAG_PREFIX

PARENT_ENV = "LITERT_PARENT_RUN_ID"
# Set for the stages of an invocation that found MLflow unreachable (tracking.required false):
# they queue at once instead of each waiting out the retries.
OFFLINE_ENV = "LITERT_TRACKING_OFFLINE"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"
PENDING_DIR = Path(".litert/pending")
# Stage processes (DVC sets DVC_STAGE; `run -j` workers also set DEFER_ENV) save their records
# here instead of logging them: no MLflow import in any build stage (2.4-4.7 s each on these
# machines). dvc.yaml's last stage, `track`, uploads them all in one process (and `run` and
# `nightly` upload what is left when a failed build kept `track` from running).
DEFER_ENV = "LITERT_TRACKING_DEFER"
DEFERRED_DIR = Path(".litert/deferred")
# Set by `run` and `nightly` for a serial `dvc repro`: they upload the records themselves while
# DVC builds, so its `track` stage leaves them (two processes uploading one record would log it twice).
INVOCATION_UPLOADS_ENV = "LITERT_INVOCATION_UPLOADS"
MODEL_FOLDER = "model"  # the run artifact folder a registered version points at
BATCH_LIMIT = 100  # MLflow takes at most 100 params or tags per log_batch request

# A key names a secret when any of its dotted parts does; our schema's own *_key fields
# name tensors and signatures, not credentials.
SECRET_WORD = re.compile(r"token|secret|passw(or)?d|passphrase|pwd|credential|private|auth(?!or)|bearer|cookie"
                         r"|api_?key|access_?key|key(s|_?id)?$", re.IGNORECASE)
SCHEMA_KEYS = frozenset({"signature_key", "inputs_key", "labels_key"})
REDACTED = "***"

log = logging.getLogger(__name__)
T = TypeVar("T")


def tracking_uri(tracking: TrackingConfig) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri
    if not uri:
        return f"sqlite:///{Path(DEFAULT_DB).resolve()}"
    check_tracking_uri(uri)
    return uri


def shown(uri: str) -> str:
    """The URI without a password, for messages."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


# Set for stages that run outside the project's git checkout (`run -j N` workers).
GIT_COMMIT_ENV = "LITERT_GIT_COMMIT"


def git_commit() -> str:
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


@dataclass
class StageRecord:
    """What one stage reports for one build."""

    model: str
    variant: str
    stage: str
    team: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    # The build's resolved config (see `build_config`), logged as `config.*` params.
    config: dict[str, Any] = field(default_factory=dict)
    # A passing build: register its delivered model after logging.
    registration: Registration | None = None
    # Captured when the stage ran, so a record replayed later by `sync` keeps its context.
    parent: str = field(default_factory=lambda: os.environ.get(PARENT_ENV, ""))
    dvc_stage: str = field(default_factory=lambda: os.environ.get("DVC_STAGE", ""))
    git_commit: str = field(default_factory=git_commit)


def build_config(build: Build) -> dict[str, Any]:
    """Everything the config says about one build: its model, variant, gates and runtime."""
    model = build.model
    return {
        "model": {"name": model.name, **plain(model.config)},
        "variant": {"name": build.variant_name, **plain(build.variant)},
        "gates": plain(build.gates),
        "runtime": {"name": model.runtime_name, **plain(model.runtime)},
    }


def is_secret(key: str) -> bool:
    return any(SECRET_WORD.search(part) and part not in SCHEMA_KEYS for part in key.split("."))


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Mask values whose key names a secret; they must never reach the tracking server."""
    return {key: (REDACTED if is_secret(key) else value) for key, value in params.items()}


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        out = {}
        for index, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}{index}."))
        return out
    return {prefix.rstrip("."): obj}


# --- calling MLflow -------------------------------------------------------------------------

_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")\]]+")


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    status = re.search(r"too many (\d+) error responses", text)
    if status:
        return f"HTTP {status.group(1)} responses, retries with backoff exhausted"
    if "Max retries exceeded" in text or "timed out" in text.lower():
        errno = _ERRNO.search(text)
        return f"unreachable ({errno.group(0).strip() if errno else 'timed out'}), retries with backoff exhausted"
    return text[:300]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


# How a store that cannot write says so: a full disk, a file size limit, SQLite's I/O error.
_WRITE_FAILURES = ("disk is full", "No space left", "disk I/O error", "File too large")


def _disk_full(exc: BaseException) -> bool:
    return any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG) or any(w in str(e) for w in _WRITE_FAILURES)
               for e in _chain(exc))


def _refused(exc: BaseException) -> bool:
    """Whether MLflow answered and refused the request (so retrying it later would not help)."""
    from mlflow.exceptions import MlflowException

    text = str(exc)
    if "Max retries exceeded" in text or "timed out" in text.lower() or "error responses" in text:
        return False  # unreachable, or failing for every request
    return isinstance(exc, MlflowException)


@contextlib.contextmanager
def http_settings(tracking: TrackingConfig) -> Iterator[None]:
    """Bounded retries for this call (MLflow's defaults retry for minutes); the environment wins.
    Set in os.environ: a caller uploading in a thread while others start processes holds them
    around both, so no thread changes the environment another is copying."""
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(tracking.http_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(tracking.http_timeout_seconds),
    }
    added = [name for name in settings if name not in os.environ]
    os.environ.update({name: settings[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _call(tracking: TrackingConfig, action: Callable[[Any], T], *, doing: str) -> T:
    """Run `action(client)`; any MLflow failure becomes one TrackingError line naming the URI."""
    uri = tracking_uri(tracking)
    try:
        with http_settings(tracking):
            from mlflow import MlflowClient

            _whole_new_store(uri)
            return action(MlflowClient(tracking_uri=uri))
    except PipelineError:
        raise
    except Exception as exc:
        reason = _reason(exc)
        if _disk_full(exc):  # the store's disk, not the server's mood: an output that cannot be written
            raise OutputError(f"MLflow at {shown(uri)} could not write while {doing}: {reason}",
                              key="tracking.uri") from None
        error = TrackingError(f"MLflow at {shown(uri)} failed while {doing}: {reason}", key="tracking.uri")
        # A server that answered and refused (a 4xx, an invalid value) refuses this record only.
        error.refused = _refused(exc)
        raise error from None


def _whole_new_store(uri: str) -> None:
    """A new SQLite store appears with its tables made: MLflow creates them and runs its
    migrations in the file itself, for seconds, and a first run interrupted meanwhile left a
    store every later run refused ("table trace_info already exists"). So it is made under
    another name and linked into place whole (no link if another process was first)."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if path.exists() or not path.parent.is_dir():  # a missing folder: MLflow's own error names it
        return
    from mlflow import MlflowClient

    making = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    try:
        MlflowClient(tracking_uri=f"sqlite:///{making}").search_experiments(max_results=1)
        os.link(making, path)
    except FileExistsError:
        pass
    finally:
        making.unlink(missing_ok=True)


def _best_effort(tracking: TrackingConfig, action: Callable[[Any], T], *, doing: str) -> T | None:
    """`_call`, but only a warning when tracking is optional."""
    try:
        return _call(tracking, action, doing=doing)
    except TrackingError as exc:
        if tracking.required:
            raise
        log.warning("warning: %s (tracking.required is false: continuing)", exc.one_line())
        return None


def _error_code(exc: Exception) -> str:
    return getattr(exc, "error_code", "")


def _experiment_id(client: Any, tracking: TrackingConfig) -> str:
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the embedded store rather than relative to each stage's cwd.
        location = (Path(uri[len("sqlite:///"):]).parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    try:
        return client.create_experiment(tracking.experiment, artifact_location=location)
    except Exception:  # another process created it first
        return client.get_experiment_by_name(tracking.experiment).experiment_id


# --- build runs -----------------------------------------------------------------------------


def find_or_create_build_run(client: Any, experiment_id: str, record: StageRecord, params: dict[str, str]) -> str:
    """The build's run under the record's parent; a new one when its logged params differ.

    Params differ only when the config changed between two stages logged without a parent
    (stages run by hand): MLflow params are immutable, so the old run is marked superseded.
    """
    parent = record.parent or "none"
    query = (
        f"tags.`{TAG_PREFIX}model` = '{record.model}' and tags.`{TAG_PREFIX}variant` = '{record.variant}'"
        f" and tags.`{TAG_PREFIX}parent` = '{parent}' and tags.`{TAG_PREFIX}superseded` = 'false'"
    )
    found = client.search_runs([experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run = found[0]
        if all(run.data.params.get(k, v) == v for k, v in params.items()):
            return run.info.run_id
        client.set_tag(run.info.run_id, f"{TAG_PREFIX}superseded", "true")
    tags = {
        f"{TAG_PREFIX}model": record.model,
        f"{TAG_PREFIX}variant": record.variant,
        f"{TAG_PREFIX}team": record.team,
        f"{TAG_PREFIX}parent": parent,
        f"{TAG_PREFIX}superseded": "false",
    }
    if record.parent:
        tags["mlflow.parentRunId"] = record.parent
    run = client.create_run(experiment_id, tags=tags, run_name=f"{record.model}/{record.variant}")
    return run.info.run_id


def _params(record: StageRecord) -> dict[str, str]:
    flat = {**flatten(record.params, f"{record.stage}."), **flatten(record.config, "config.")}
    return {key: str(value)[:6000] for key, value in redact(flat).items()}


def _chunks(items: list, size: int = BATCH_LIMIT) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _log(client: Any, tracking: TrackingConfig, record: StageRecord) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    if record.stage == INVOCATION_STAGE:
        return _log_invocation(client, record)
    experiment_id = _experiment_id(client, tracking)
    params = _params(record)
    run_id = find_or_create_build_run(client, experiment_id, record, params)
    existing = client.get_run(run_id).data.params
    tags = {
        f"{TAG_PREFIX}stage.{record.stage}": "done",
        f"{TAG_PREFIX}pipeline_version": __version__,
        f"{TAG_PREFIX}git_commit": record.git_commit,
        **({f"{TAG_PREFIX}dvc_stage": record.dvc_stage} if record.dvc_stage else {}),
        **{f"{TAG_PREFIX}{k}": str(v) for k, v in redact(record.tags).items()},
    }
    now = get_current_time_millis()
    metrics = [Metric(k, float(v), now, 0) for k, v in record.metrics.items() if v is not None]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    for batch in _chunks([Param(k, v) for k, v in params.items() if k not in existing]):
        client.log_batch(run_id, params=batch)
    for batch in _chunks([RunTag(k, v) for k, v in tags.items()]):
        client.log_batch(run_id, tags=batch)
    for artifact in record.artifacts:
        client.log_artifact(run_id, str(artifact), artifact_path=record.stage)
    if record.registration is not None:
        version = register(client, run_id, record.registration)
        client.set_tag(run_id, f"{TAG_PREFIX}registered_version", f"{record.registration.name}/{version}")
    client.set_terminated(run_id)
    return run_id


def log_stage(tracking: TrackingConfig, record: StageRecord) -> str | None:
    """Log a stage's params, metrics, tags and artifacts into its build's run (and register
    the build when the record carries a registration). Returns the run id, or None when
    tracking is off or the record was queued for `sync`."""
    if not tracking.enabled:
        return None
    if os.environ.get(DEFER_ENV) or os.environ.get("DVC_STAGE"):
        queue(record, DEFERRED_DIR)
        return None
    doing = f"logging {record.stage} of {record.model}/{record.variant}"
    if os.environ.get(OFFLINE_ENV) and not tracking.required:
        _queue_with_warning(record, "MLflow was unreachable when this invocation started")
        return None
    try:
        return _call(tracking, lambda client: _log(client, tracking, record), doing=doing)
    except TrackingError as exc:
        if tracking.required:
            raise
        _queue_with_warning(record, exc.one_line())
        return None


# --- registry -------------------------------------------------------------------------------


def _search_versions(client: Any, query: str) -> list[Any]:
    versions, token = [], None
    while True:
        page = client.search_model_versions(query, max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def _versions_of_bytes(client: Any, registration: Registration) -> list[int]:
    query = f"name = '{registration.name}' and tags.`{SHA256_TAG}` = '{registration.model_sha256}'"
    return sorted(int(v.version) for v in _search_versions(client, query))


def register(client: Any, run_id: str, registration: Registration) -> int:
    """The version holding these model bytes: the existing one, or a new `candidate-<variant>`."""
    from mlflow.exceptions import MlflowException

    existing = _versions_of_bytes(client, registration)
    if existing:
        return existing[0]
    for path in (registration.model_file, registration.report_file):
        client.log_artifact(run_id, path, artifact_path=MODEL_FOLDER)
    try:
        client.create_registered_model(registration.name, description=registration.model_description,
                                       tags={f"{TAG_PREFIX}team": registration.tags.get(f"{TAG_PREFIX}team", "")})
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
    logged = _logged_model(client, run_id, registration)
    # The LoggedModel's folder, not `models:/<id>`: the registry would resolve that through the
    # process-wide tracking URI rather than this client's. The tag names the model either way.
    created = int(client.create_model_version(registration.name, logged.artifact_location, run_id=run_id,
                                              tags={**registration.tags, LOGGED_MODEL_TAG: logged.model_id},
                                              description=registration.description, model_id=logged.model_id).version)
    # Two pipelines registering the same bytes at once both get here: the oldest version stays.
    oldest = _versions_of_bytes(client, registration)[0]
    if oldest < created:
        client.delete_model_version(registration.name, str(created))
        return oldest
    if registration.verified:  # an unverified build is registered, never aliased automatically
        client.set_registered_model_alias(registration.name, variant_alias(CANDIDATE, registration.variant),
                                          str(created))
    return created


LOGGED_MODEL_TAG = f"{TAG_PREFIX}logged_model_id"


def _logged_model(client: Any, run_id: str, registration: Registration) -> Any:
    """The delivered model as an MLflow 3 LoggedModel of its build run, loadable with
    `mlflow.pyfunc.load_model` (the `mlflow_tflite` flavour): the `.tflite`, its validation
    report and metrics, lineage tags."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelStatus, Metric
    from mlflow.utils.time import get_current_time_millis

    from pipeline import mlflow_tflite

    logged = client.create_logged_model(client.get_run(run_id).info.experiment_id,
                                        name=re.sub(r"[/:.%\"']", "_", f"{registration.name}-{registration.variant}"),
                                        source_run_id=run_id,
                                        tags=registration.tags, model_type="litert")
    try:
        with tempfile.TemporaryDirectory(prefix="litert-logged-model-") as folder:
            saved = Path(folder) / "model"
            mlflow.pyfunc.save_model(
                str(saved), loader_module=Path(mlflow_tflite.__file__).stem, data_path=registration.model_file,
                code_paths=[mlflow_tflite.__file__],
                pip_requirements=[f"{package}=={installed_version(package)}" for package in ("ai-edge-litert", "numpy")])
            shutil.copy2(registration.report_file, saved)
            client.log_model_artifacts(logged.model_id, str(saved))
        report = json.loads(Path(registration.report_file).read_text(encoding="utf-8"))
        now = get_current_time_millis()
        metrics = [Metric(k, float(v), now, 0, model_id=logged.model_id, run_id=run_id)
                   for k, v in report.get("metrics", {}).items() if isinstance(v, (int, float)) and v is not None]
        for batch in _chunks(metrics):
            client.log_batch(run_id, metrics=batch)
    except BaseException:
        with contextlib.suppress(Exception):  # the first failure is the one to report
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def _version_info(version: Any, aliases: list[str]) -> dict[str, Any]:
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, tz=timezone.utc)
    return {
        "version": int(version.version),
        "aliases": sorted(aliases),
        "tags": dict(version.tags),
        "run_id": version.run_id,
        "source": version.source,
        "description": version.description,
        "created": created.strftime("%Y-%m-%d %H:%M"),
    }


def list_versions(tracking: TrackingConfig, name: str) -> list[dict[str, Any]]:
    """Every version of a registered model, newest first, with aliases and tags."""
    from mlflow.exceptions import MlflowException

    def versions(client: Any) -> list[dict[str, Any]]:
        try:
            model = client.get_registered_model(name)
        except MlflowException as exc:
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                raise InputError(f"no registered model '{name}' at {shown(tracking_uri(tracking))}") from None
            raise
        # Search results carry no aliases: the registered model maps them to versions.
        aliases: dict[int, list[str]] = {}
        for alias, number in model.aliases.items():
            aliases.setdefault(int(number), []).append(alias)
        found = [_version_info(v, aliases.get(int(v.version), []))
                 for v in _search_versions(client, f"name = '{name}'")]
        return sorted(found, key=lambda v: v["version"], reverse=True)

    return _call(tracking, versions, doing=f"listing versions of {name}")


def promote(tracking: TrackingConfig, name: str, version: int, alias: str) -> str:
    """Point `<alias>-<variant of version>` at `version`; returns the alias set."""
    from mlflow.exceptions import MlflowException

    def move(client: Any) -> str:
        try:
            found = client.get_model_version(name, str(version))
        except MlflowException as exc:
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                raise InputError(f"no version {version} of registered model '{name}'") from None
            raise
        variant = found.tags.get(f"{TAG_PREFIX}variant")
        if not variant:
            raise InputError(f"version {version} of '{name}' has no {TAG_PREFIX}variant tag: "
                             "not registered by this pipeline")
        full_alias = variant_alias(alias, variant)
        client.set_registered_model_alias(name, full_alias, str(version))
        return full_alias

    if not re.fullmatch(r"[A-Za-z0-9_-]+", alias):
        raise ConfigError(f"alias '{alias}' may use letters, digits, _ and - only", file="command line", key="--alias")
    return _call(tracking, move, doing=f"promoting {name} version {version}")


# --- parent runs ----------------------------------------------------------------------------


def start_parent_run(tracking: TrackingConfig, name: str, tags: dict[str, str]) -> str | None:
    """One run per pipeline invocation; build runs created under it become its children."""
    if not tracking.enabled:
        return None
    all_tags = {"pipeline_version": __version__, "git_commit": git_commit(), **tags}

    def create(client: Any) -> str:
        run = client.create_run(_experiment_id(client, tracking), run_name=name,
                                tags={f"{TAG_PREFIX}{k}": v for k, v in all_tags.items()})
        return run.info.run_id

    return _best_effort(tracking, create, doing="starting the parent run")


def end_parent_run(
    tracking: TrackingConfig,
    run_id: str | None,
    *,
    succeeded: bool,
    metrics: dict[str, float] | None = None,
    artifacts: list[Path] | None = None,
    status: str | None = None,
) -> None:
    """End the invocation's run: FINISHED or FAILED (or `status`, e.g. KILLED when interrupted).
    With tracking optional and MLflow unreachable, its metrics and artifacts are queued like
    the stages' records: `sync` attaches them to this run (ending it), or to its own parent run
    when this invocation had none."""
    status = status or ("FINISHED" if succeeded else "FAILED")
    record = StageRecord(model="", variant="", stage=INVOCATION_STAGE, metrics=dict(metrics or {}),
                         artifacts=[Path(a) for a in artifacts or [] if Path(a).exists()], tags={"status": status},
                         parent=run_id or "")
    if run_id is None:
        if tracking.enabled and os.environ.get(OFFLINE_ENV) and not tracking.required and (record.metrics or
                                                                                             record.artifacts):
            _queue_with_warning(record, "MLflow was unreachable when this invocation started")
        return
    try:
        _call(tracking, lambda client: _log_invocation(client, record), doing="ending the parent run")
    except TrackingError as exc:
        if tracking.required:
            raise
        _queue_with_warning(record, exc.one_line())


INVOCATION_STAGE = "invocation"  # a record of the parent run itself, not of a build


def _log_invocation(client: Any, record: StageRecord) -> str:
    """Attach an invocation's metrics and artifacts to its parent run and end that run with the
    invocation's status; a record made without a parent run (MLflow was down all along) goes
    into the uploading invocation's run, under `invocation/`, which it does not end."""
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    if not record.parent:
        raise InputError("an invocation record with no run to attach to: run `litert-pipeline sync`")
    own_run = record.tags.get("ended_by") != "sync"
    prefix = "" if own_run else f"{INVOCATION_STAGE}/"
    now = get_current_time_millis()
    client.log_batch(record.parent, metrics=[Metric(k, float(v), now, 0) for k, v in record.metrics.items()])
    for artifact in record.artifacts:
        if artifact.is_dir():
            client.log_artifacts(record.parent, str(artifact), artifact_path=f"{prefix}{artifact.name}")
        else:
            client.log_artifact(record.parent, str(artifact), artifact_path=prefix.rstrip("/") or None)
    if own_run:
        client.set_terminated(record.parent, record.tags.get("status", "FINISHED"))
    return record.parent


# --- offline queue --------------------------------------------------------------------------


def pending(folder: Path = PENDING_DIR) -> list[Path]:
    """Queued records, oldest first (temporary folders of unfinished writes start with '.')."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def move_deferred_to_pending() -> int:
    """Deferred records that were not uploaded join the queue `sync` (and the next run) uploads."""
    entries = pending(DEFERRED_DIR)
    for entry in entries:
        PENDING_DIR.mkdir(parents=True, exist_ok=True)
        os.replace(entry, PENDING_DIR / entry.name)  # one file system: a rename
    return len(entries)


def _queue_with_warning(record: StageRecord, reason: str) -> None:
    entry = queue(record)
    log.warning("warning: %s; tracking.required is false: queued in %s for `litert-pipeline sync`", reason, entry)


def queue(record: StageRecord, folder: Path = PENDING_DIR) -> Path:
    """Save a record and copies of its files, so `sync` uploads what this stage produced even
    if a later run overwrites the files."""
    files = [str(p) for p in record.artifacts]
    if record.registration is not None:
        files += [record.registration.model_file, record.registration.report_file]
    entry = folder / f"{time.time_ns()}-{os.getpid()}-{record.stage}-{record.model}-{record.variant}"
    with atomic_path(entry) as staged:
        staged.mkdir()
        copies: dict[str, str] = {}
        for index, path in enumerate(dict.fromkeys(files)):
            copy = Path("files") / str(index) / Path(path).name
            (staged / copy).parent.mkdir(parents=True)
            if Path(path).is_dir():  # an invocation's comparison folder
                shutil.copytree(path, staged / copy)
            else:
                shutil.copy2(path, staged / copy)
            copies[path] = copy.as_posix()
        data = asdict(record)
        # Secrets never touch the disk queue either: store the params already flattened and masked.
        data["params"] = redact(flatten(record.params))
        data["tags"] = redact(record.tags)
        data["artifacts"] = [copies[str(p)] for p in record.artifacts]
        if record.registration is not None:
            data["registration"].update(model_file=copies[record.registration.model_file],
                                        report_file=copies[record.registration.report_file])
        (staged / "record.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return entry


def _load(entry: Path) -> StageRecord:
    file = entry / "record.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        registration = data.pop("registration")
        record = StageRecord(**{**data, "artifacts": [entry / a for a in data["artifacts"]]})
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"unreadable queued record: {exc}", file=str(file)) from None
    if registration is not None:
        record.registration = Registration(**{**registration, "model_file": str(entry / registration["model_file"]),
                                              "report_file": str(entry / registration["report_file"])})
    return record


REJECTED_DIR = Path(".litert/rejected")


def sync(tracking: TrackingConfig, parent: str | None, folder: Path = PENDING_DIR,
         stop: threading.Event | None = None) -> int:
    """Upload queued records, oldest first; records made without a parent run join `parent`.
    A record the server refuses, or that cannot be read, is set aside under .litert/rejected/
    with its reason (kept, never deleted) and the others go on. An unreachable server stops
    the upload (TrackingError), keeping what is left; so does `stop`, between records.
    Returns how many went up."""
    uploaded = 0
    for entry in pending(folder):
        if stop is not None and stop.is_set():
            break
        try:
            record = _load(entry)
            if record.stage == INVOCATION_STAGE and not record.parent:
                record.tags["ended_by"] = "sync"  # attached to the uploading run, which it must not end
            record.parent = record.parent or parent or ""
            _call(tracking, lambda client: _log(client, tracking, record), doing=f"uploading {entry}")
        except (InputError, TrackingError) as exc:
            if isinstance(exc, TrackingError) and not getattr(exc, "refused", False):
                raise
            set_aside(entry, exc.one_line())
            continue
        shutil.rmtree(entry)
        uploaded += 1
    return uploaded


def set_aside(entry: Path, reason: str) -> Path:
    """Move a queued record that cannot be uploaded out of the queue, with why."""
    target = REJECTED_DIR / entry.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(entry, target)  # one file system: a rename, whole or not at all
    write_text(target / "reason.txt", reason + "\n")
    log.warning("warning: set aside %s: %s", target, reason)
    return target
