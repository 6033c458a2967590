"""Tracking-server mode: the real pipeline against a real `mlflow server` on loopback, and what
happens when the server cannot be reached (tracking.required true or false, then `sync`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline import registry
from pipeline.metadata import inspect_model
from tests.conftest import copy_project, free_port, only_builds, run_cli
from tests.test_e2e import ENV, _git

pytestmark = pytest.mark.e2e

VARIANTS = ("float", "dynamic_wi8_afp32")
OVERRIDES = ["model=[digits]", "examples=[digits_data,digits_savedmodel]", *only_builds("digits", *VARIANTS),
             "~autoselect.digits"]
NAME = "vision.digits"


@pytest.fixture(scope="module")
def served(mlflow_server, tmp_path_factory):
    """The digits model (two variants) run once with MLFLOW_TRACKING_URI at the server."""
    project = copy_project(tmp_path_factory.mktemp("served") / "project")
    _git(project, "init", "-q")
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "fixture")
    env = {**ENV, "MLFLOW_TRACKING_URI": mlflow_server}
    result = run_cli("litert-pipeline", "run", *OVERRIDES, "--name", "served", cwd=project, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _versions(client):
    return client.search_model_versions(f"name = '{NAME}'")


def test_build_runs_are_children_of_the_invocation_with_tags_params_metrics_and_artifacts(served, mlflow_server):
    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name("litert-pipeline").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'served'")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    builds = [run for run in children if run.data.tags["litert.variant"] in VARIANTS]
    by_variant = {run.data.tags["litert.variant"]: run for run in builds}
    assert sorted(by_variant) == sorted(VARIANTS) and len(builds) == len(VARIANTS)  # one run per build
    commit = parent.data.tags["litert.git_commit"]
    for variant, run in by_variant.items():
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert (tags["litert.team"], tags["litert.model"]) == ("vision", "digits")
        assert tags["litert.backend"] == ("none" if variant == "float" else "litert_quantizer")
        assert tags["litert.git_commit"] == commit and tags["litert.pipeline_version"]
        assert tags["litert.dvc_stage"] == f"validate@digits-{variant}"
        assert {f"litert.stage.{s}" for s in ("quantize", "metadata", "validate")} <= set(tags)
        assert params["config.model.team"] == "vision" and params["config.variant.name"] == variant
        assert metrics["accuracy"] > 0.9 and metrics["size_bytes"] > 0 and metrics["passed"] == 1.0
        files = {a.path for folder in ("validate", "metadata", "model")
                 for a in client.list_artifacts(run.info.run_id, folder)}
        assert {f"validate/{f}" for f in ("validation.json", "validation.md", "layer_errors.csv")} <= files
        assert {f"metadata/{variant}.tflite", f"model/{variant}.tflite", "model/validation.json"} <= files


def test_each_passing_variant_is_a_version_whose_lineage_matches_its_delivered_model(served, mlflow_server, tmp_path):
    import mlflow

    client = _client(mlflow_server)
    versions = {v.tags["litert.variant"]: v for v in _versions(client)}
    assert sorted(versions) == sorted(VARIANTS) and len(_versions(client)) == len(VARIANTS)
    mlflow.set_tracking_uri(mlflow_server)
    for variant, version in versions.items():
        delivered = (served / "models" / "digits" / f"{variant}.tflite").read_bytes()
        provenance = inspect_model(delivered)["provenance"]
        for field in registry.LINEAGE_FIELDS:
            if provenance.get(field) is not None:
                assert version.tags[f"litert.{field}"] == str(provenance[field]), field
        report = json.loads((served / "reports" / "digits" / variant / "validation.json").read_text())
        assert version.tags["litert.model_sha256"] == report["model_sha256"]
        assert float(version.tags["litert.metric.accuracy"]) == report["metrics"]["accuracy"]
        mlflow.artifacts.download_artifacts(f"models:/{NAME}@candidate-{variant}", dst_path=str(tmp_path / variant))
        assert (tmp_path / variant / "data" / f"{variant}.tflite").read_bytes() == delivered
        logged = client.get_logged_model(version.tags["litert.logged_model_id"])
        assert logged.source_run_id == version.run_id and version.source == logged.artifact_location
    # The pyfunc flavour runs a served version in LiteRT, as the interpreter does.
    from ai_edge_litert.interpreter import Interpreter

    images = np.load(served / "artifacts" / "digits" / "reference.npz")["input:image"][:4]
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate-float")
    runner = Interpreter(model_path=str(served / "models" / "digits" / "float.tflite")).get_signature_runner()
    (output,) = model.predict({"image": images}).values()
    expected = np.concatenate([next(iter(runner(image=images[i:i + 1]).values())) for i in range(4)])
    np.testing.assert_array_equal(output, expected)


def test_unreachable_server_fails_in_one_line_or_queues_until_sync(served, mlflow_server):
    """The server is down (nothing listens on its port): with tracking.required true the run
    fails in one line and the stage's outputs stay on disk; with false it finishes, queues,
    and `sync` uploads to the server once it is back, without a second registry version."""
    down = {**ENV, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    # A gate edit: something to build and log (with nothing to do, `run` opens no MLflow run).
    required = run_cli("litert-pipeline", "run", *OVERRIDES, "validation.classifier.min_cosine=0.952", cwd=served, env=down)
    errors = [line for line in required.stderr.splitlines() if line.startswith("error:")]
    assert required.returncode == 5 and len(errors) == 1, required.stderr[-2000:]
    assert errors[0].startswith(f"error: tracking.uri: MLflow at {down['MLFLOW_TRACKING_URI']} failed")
    assert "unreachable" in errors[0]

    for variant in VARIANTS:
        shutil.rmtree(served / "reports" / "digits" / variant)
    # A build stage never talks to MLflow: forced (DVC would otherwise restore the cached
    # report), it succeeds and its record waits for the `track` stage, which fails in one line.
    stage = run_cli("dvc", "repro", "--force", "--single-item", "validate@digits-float", cwd=served, env=down)
    assert stage.returncode == 0, stage.stderr[-2000:]
    assert json.loads((served / "reports" / "digits" / "float" / "validation.json").read_text())["passed"]
    track = run_cli("dvc", "repro", "--single-item", "track", cwd=served, env=down)
    assert track.returncode != 0 and "error: tracking.uri: MLflow at" in track.stderr, track.stderr[-2000:]
    assert len(list((served / ".litert" / "deferred").iterdir())) == 1  # kept for the next upload

    # A gate setting changed, so the validate stages run again (not restored from the run-cache)
    # and, with the server down, queue their records.
    optional = run_cli("litert-pipeline", "run", *OVERRIDES, "tracking.required=false",
                       "validation.classifier.min_cosine=0.951", cwd=served, env=down)
    assert optional.returncode == 0, optional.stderr[-3000:]
    assert "tracking.required is false" in optional.stderr
    queued = sorted(p.name for p in (served / ".litert" / "pending").iterdir())
    # The forced stage's record, the builds' records, then the invocation's own (its comparison,
    # for the run that uploads it).
    assert [name.split("-", 2)[2] for name in queued] == ["validate-digits-float"] + [
        f"validate-digits-{v}" for v in VARIANTS] + ["invocation--"]

    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name("litert-pipeline").experiment_id
    back = {**ENV, "MLFLOW_TRACKING_URI": mlflow_server}
    synced = run_cli("litert-pipeline", "sync", cwd=served, env=back)
    assert synced.returncode == 0 and "uploaded 4 queued record(s)" in synced.stdout, synced.stderr[-2000:]
    assert not list((served / ".litert" / "pending").iterdir())
    (sync_run,) = client.search_runs([experiment], "attributes.run_name = 'sync'")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sync_run.info.run_id}'")
    # The forced stage's float record (no parent: it joined sync's run) is superseded by the run
    # of float's new gate config.
    current = [r for r in children if r.data.tags["litert.superseded"] == "false"]
    assert sorted(r.data.tags["litert.variant"] for r in current) == sorted(VARIANTS) and len(children) == 3
    assert all(r.data.metrics["passed"] == 1.0 for r in children)
    assert "invocation" in {a.path for a in client.list_artifacts(sync_run.info.run_id)}
    # The offline run rebuilt nothing but reports: the same bytes, so no second version.
    assert sorted(v.tags["litert.variant"] for v in _versions(client)) == sorted(VARIANTS)
