"""MLflow logging against a real local store (SQLite in a temp folder)."""

from __future__ import annotations

import pytest

from pipeline.build import resolve_build
from pipeline import tracking
from pipeline.config import TrackingConfig
from pipeline.errors import ConfigError, TrackingError

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens on loopback


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, tracking.OFFLINE_ENV, "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    return TrackingConfig(experiment="test")


@pytest.fixture
def fast_failures(monkeypatch):
    """No retries against the dead port (the bounded retries are the production default)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def _client(store):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.tracking_uri(store))


def _record(**params):
    return tracking.StageRecord(model="m", variant="v", stage="quantize", team="t", params=params,
                                metrics={"size_bytes": 10}, tags={"token": "s3cret", "backend": "none"})


def test_reruns_update_the_same_run_and_config_changes_start_a_new_one(store, tmp_path):
    first = tracking.log_stage(store, _record(recipe="a", api_token="s3cret"))
    assert tracking.log_stage(store, _record(recipe="a", api_token="s3cret")) == first
    second = tracking.log_stage(store, _record(recipe="b"))
    assert second != first
    client = _client(store)
    old, new = client.get_run(first), client.get_run(second)
    assert old.data.tags["litert.superseded"] == "true" and new.data.tags["litert.superseded"] == "false"
    assert old.data.params["quantize.api_token"] == "***" and old.data.tags["litert.token"] == "***"
    assert new.data.metrics["size_bytes"] == 10
    assert client.get_experiment(new.info.experiment_id).artifact_location == (tmp_path / "mlruns").as_uri()


def test_children_of_a_parent_run(store, monkeypatch):
    parent = tracking.start_parent_run(store, "nightly", {"kind": "test"})
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    child = tracking.log_stage(store, _record(recipe="a"))
    assert _client(store).get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_secrets_are_masked_at_any_depth_and_schema_keys_are_not():
    flat = tracking.flatten({"source": {"signature_key": "serving_default", "factory_args": {
        "hf_token": "t", "credentials": {"user": "u"}, "aws_access_key_id": "AKIA", "api_key": "k", "n": 3,
        "db_pwd": "p", "passphrase": "p", "OAuth_header": "h", "private_pem": "-----", "bearer": "b",
        "session_cookie": "c", "accessKey": "k"}},
        "dataset": {"inputs_key": "x", "labels_key": "y"}, "metadata": {"author": "me"}})
    redacted = tracking.redact(flat)
    assert {k for k, v in redacted.items() if v == tracking.REDACTED} == {
        "source.factory_args.hf_token", "source.factory_args.credentials.user",
        "source.factory_args.aws_access_key_id", "source.factory_args.api_key", "source.factory_args.db_pwd",
        "source.factory_args.passphrase", "source.factory_args.OAuth_header", "source.factory_args.private_pem",
        "source.factory_args.bearer", "source.factory_args.session_cookie", "source.factory_args.accessKey"}
    assert redacted["source.signature_key"] == "serving_default" and redacted["dataset.inputs_key"] == "x"
    assert redacted["metadata.author"] == "me" and redacted["source.factory_args.n"] == 3


def test_every_run_carries_the_build_context_and_its_whole_config(store, monkeypatch):
    from pipeline import __version__, config
    from tests.conftest import ROOT

    monkeypatch.setenv("DVC_STAGE", "validate@digits-float")
    cfg = config.load(ROOT / "params.yaml")
    resolved = tracking.build_config(resolve_build(cfg, "digits-float"))
    extra = {f"p{i}": i for i in range(60)}  # with the config, more than one log_batch takes
    record = tracking.StageRecord(model="digits", variant="float", stage="validate", team="vision",
                                  config=resolved, params=extra)
    # Run by DVC, a stage defers its record to the `track` stage, which uploads it.
    assert tracking.log_stage(store, record) is None and len(tracking.pending(tracking.DEFERRED_DIR)) == 1
    monkeypatch.delenv("DVC_STAGE")
    assert tracking.sync(store, None, folder=tracking.DEFERRED_DIR) == 1
    (run,) = _client(store).search_runs([_client(store).get_experiment_by_name("test").experiment_id])
    tags, params = run.data.tags, run.data.params
    assert tags["litert.dvc_stage"] == "validate@digits-float" and tags["litert.pipeline_version"] == __version__
    assert tags["litert.git_commit"] == record.git_commit and tags["litert.team"] == "vision"
    flat = {**tracking.flatten(resolved, "config."), **tracking.flatten(extra, "validate.")}
    assert len(flat) > tracking.BATCH_LIMIT and {k: str(v) for k, v in flat.items()} == params
    assert params["config.variant.backend"] == "none" and params["config.gates.max_accuracy_drop"] == "0.02"


def test_unreachable_server_fails_in_one_line_naming_the_uri(store, fast_failures):
    dead = TrackingConfig(uri=DEAD, experiment="x", required=True)
    with pytest.raises(TrackingError) as caught:
        tracking.log_stage(dead, _record(recipe="a"))
    assert DEAD in caught.value.one_line() and "\n" not in caught.value.one_line()
    assert "unreachable" in caught.value.one_line()
    assert not tracking.pending()  # required: the stage fails and DVC reruns it; nothing queued


def test_offline_records_are_queued_with_their_files_and_synced_later(store, fast_failures, tmp_path):
    report = tmp_path / "validation.json"
    report.write_text('{"passed": true}')
    record = _record(recipe="a")
    record.artifacts = [report]
    offline = TrackingConfig(uri=DEAD, experiment="test", required=False)
    assert tracking.log_stage(offline, record) is None
    (entry,) = tracking.pending()
    report.write_text('{"passed": false}')  # a later run overwrites the file: the queued copy is what ran

    parent = tracking.start_parent_run(store, "sync", {"kind": "sync"})
    assert tracking.sync(store, parent) == 1
    assert not tracking.pending() and not entry.exists()
    client = _client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id], "tags.`litert.model` = 'm'")
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.metrics["size_bytes"] == 10
    downloaded = client.download_artifacts(run.info.run_id, "quantize/validation.json", str(tmp_path / "down"))
    assert open(downloaded).read() == '{"passed": true}'


def test_an_invocation_that_found_mlflow_down_queues_without_trying(store, monkeypatch):
    monkeypatch.setenv(tracking.OFFLINE_ENV, "1")
    optional = TrackingConfig(experiment="test", required=False)
    assert tracking.log_stage(optional, _record(recipe="a")) is None
    assert len(tracking.pending()) == 1
    assert _client(store).get_experiment_by_name("test") is None  # the (reachable) store was not touched


def test_malformed_uri_is_a_config_error(store):
    with pytest.raises(ConfigError, match="tracking.uri"):
        tracking.log_stage(TrackingConfig(uri="ftp:/nowhere"), _record())


def test_passwords_in_uris_stay_out_of_messages():
    assert tracking.shown("http://alice:pw@mlflow.example:5000") == "http://***@mlflow.example:5000"


def test_a_record_the_server_refuses_or_cannot_read_is_set_aside_and_the_rest_uploads(store, fast_failures):
    from pipeline.registry import Registration

    offline = TrackingConfig(uri=DEAD, experiment="test", required=False)
    tracking.log_stage(offline, _record(recipe="first"))
    refused = _record(recipe="refused")
    # A registered-model name MLflow's search grammar cannot take (a config can no longer name one).
    refused.registration = Registration(name="team's.model", variant="v", model_file=__file__, report_file=__file__,
                                        model_sha256="ab", tags={}, description="", model_description="")
    tracking.log_stage(offline, refused)
    tracking.log_stage(offline, _record(recipe="truncated"))
    tracking.log_stage(offline, _record(recipe="last"))
    first, refused_entry, truncated, last = tracking.pending()
    (truncated / "record.json").write_text('{"model": "m", "vari')

    assert tracking.sync(store, None) == 2
    assert tracking.pending() == []
    aside = sorted(p.name for p in tracking.REJECTED_DIR.iterdir())
    assert aside == sorted([refused_entry.name, truncated.name])
    assert "unreadable queued record" in (tracking.REJECTED_DIR / truncated.name / "reason.txt").read_text()
    assert "team's.model" in (tracking.REJECTED_DIR / refused_entry.name / "reason.txt").read_text()
    client = _client(store)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert {r.data.params.get("quantize.recipe") for r in runs} >= {"first", "last"}


def test_a_new_store_interrupted_while_mlflow_makes_it_is_not_left_half_made(store, tmp_path):
    """Ctrl-C while MLflow creates the embedded store's tables (seconds, on a first run) leaves
    no store at all: the next run makes it whole (before, every later run was refused)."""
    import signal
    import subprocess
    import sys
    import time

    script = """
from pipeline import tracking
from pipeline.config import TrackingConfig
tracking._call(TrackingConfig(experiment="test"), lambda client: client.search_experiments(), doing="testing")
"""

    def being_made() -> bool:  # SQLite opened it: MLflow's tables and migrations take seconds more
        return any(tmp_path.glob(".mlflow.db.*.new"))

    def interruptible() -> None:  # an earlier test in this process can leave SIGINT ignored or blocked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    child = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                             preexec_fn=interruptible)
    deadline = time.monotonic() + 300
    while not being_made() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert child.poll() is None, "the store was made before the test saw it being made"
    child.send_signal(signal.SIGINT)  # as soon as the store being made has a file
    stderr = child.communicate(timeout=300)[1]
    assert child.returncode != 0 and "KeyboardInterrupt" in stderr, stderr[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    assert tracking._call(store, lambda client: len(client.search_experiments()), doing="testing") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == [tracking.DEFAULT_DB]


def test_a_store_that_cannot_write_is_an_output_error(store, tmp_path):
    """A full disk under the embedded store (a file size limit stands in for it): exit 7, one line."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    tracking.log_stage(store, _record(recipe="fits"))  # the store exists; now cap files at its size
    script = (
        "import os, resource\n"
        "from pipeline import tracking\nfrom pipeline.config import TrackingConfig\n"
        "size = os.path.getsize('mlflow.db')\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))\n"
        "record = tracking.StageRecord(model='big', variant='v', stage='quantize', team='t',\n"
        "                              params={f'p{i}': 'x' * 5000 for i in range(200)})\n"
        "from pipeline.entry import exit_on_error\n"
        "exit_on_error(lambda: tracking.log_stage(TrackingConfig(experiment='test'), record))()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 7, result.stderr[-2000:]
    (line,) = [row for row in result.stderr.splitlines() if row.startswith("error:")]
    assert line.startswith("error: tracking.uri: MLflow at sqlite:///") and "could not write" in line


def test_a_parent_runs_artifacts_are_queued_when_mlflow_is_down_and_attached_by_sync(store, fast_failures, tmp_path,
                                                                                    monkeypatch):
    """Both ways MLflow can be down at the end: all along (no parent run: sync attaches the
    comparison to its own run, under invocation/, without ending it), and only at the end (the
    parent run exists: sync attaches the files to it and ends it with the invocation's status)."""
    comparison = tmp_path / "comparison" / "digits"
    comparison.mkdir(parents=True)
    (comparison / "report.md").write_text("| variant |")
    offline = TrackingConfig(uri=DEAD, experiment="test", required=False)
    monkeypatch.setenv(tracking.OFFLINE_ENV, "1")
    tracking.end_parent_run(offline, None, succeeded=True, metrics={"builds": 7}, artifacts=[comparison.parent])
    monkeypatch.delenv(tracking.OFFLINE_ENV)
    ended_late = tracking.start_parent_run(store, "nightly", {"kind": "nightly"})
    tracking.end_parent_run(offline, ended_late, succeeded=False, artifacts=[comparison.parent])
    assert len(tracking.pending()) == 2
    (comparison / "report.md").write_text("overwritten by a later run")

    uploader = tracking.start_parent_run(store, "sync", {"kind": "sync"})
    assert tracking.sync(store, uploader) == 2 and not tracking.pending()
    client = _client(store)
    late = client.get_run(ended_late)
    assert late.info.status == "FAILED"
    down = client.download_artifacts(ended_late, "comparison/digits/report.md", str(tmp_path / "a"))
    assert open(down).read() == "| variant |"
    sync_run = client.get_run(uploader)
    assert sync_run.info.status == "RUNNING" and sync_run.data.metrics["builds"] == 7
    down = client.download_artifacts(uploader, "invocation/comparison/digits/report.md", str(tmp_path / "b"))
    assert open(down).read() == "| variant |"
