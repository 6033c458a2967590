"""The model registry on a real local MLflow store: lineage read from the model's own bytes,
one version per distinct model, variant-scoped aliases, promotion and listing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline import config, deliver, registry, tracking
from pipeline.build import resolve_build
from pipeline.errors import EXIT_CONFIG, InputError
from pipeline.io import sha256_bytes, write_bytes, write_json
from pipeline.metadata import inspect_model
from tests.conftest import ROOT, run_cli

NAME = "vision.digits"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A project folder with params.yaml and the label files, and an empty embedded store."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, tracking.OFFLINE_ENV):
        monkeypatch.delenv(name, raising=False)
    shutil.copytree(ROOT / "conf" / "labels", tmp_path / "conf" / "labels")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


@pytest.fixture
def cfg(workdir):
    return config.load()


def deliver_build(cfg, build, model: bytes, accuracy: float = 0.97):
    """What the metadata and validate stages leave for a passing build: the delivered model with
    its provenance, and a validation report on those bytes."""
    resolved = resolve_build(cfg, build)
    record = deliver.provenance(
        resolved, convert_info={"source_sha256": "ab" * 32, "conversion_path": "from_saved_model"},
        quantize_info={"representative_sha256": "cd" * 32, "representative_samples": 200}, git_commit="c0ffee",
        experiment=cfg.tracking.experiment)
    delivered = deliver.deliver(resolved, model, record, input_ranges={})  # no evaluation data here
    model_file = write_bytes(resolved.paths.delivered, delivered)
    metrics = {"accuracy": accuracy, "source_accuracy": 0.98, "accuracy_drop": 0.98 - accuracy, "cosine": 0.999,
               "snr_db": 30.0, "size_bytes": len(delivered), "size_ratio": 1.0, "latency_median_ms": 0.01}
    report = {"passed": True, "failures": [], "model_sha256": sha256_bytes(delivered), "metrics": metrics}
    report_file = write_json(resolved.paths.validation_json, report)
    return model_file, report_file


def log_validate(cfg, build, model_file, report_file, parent=""):
    resolved = resolve_build(cfg, build)
    return tracking.log_stage(cfg.tracking, tracking.StageRecord(
        model=resolved.model.name, variant=resolved.variant_name, stage="validate", team=resolved.team, parent=parent,
        config=tracking.build_config(resolved), artifacts=[report_file],
        registration=registry.registration(resolved, model_file, report_file)))


def test_a_passing_build_is_registered_once_with_lineage_from_its_bytes(cfg, tiny_float_tflite, tmp_path):
    import mlflow

    model_file, report_file = deliver_build(cfg, "digits-float", tiny_float_tflite)
    first_run = log_validate(cfg, "digits-float", model_file, report_file)
    second_run = log_validate(cfg, "digits-float", model_file, report_file, parent="another-invocation")
    assert first_run != second_run

    (version,) = tracking.list_versions(cfg.tracking, NAME)
    assert version["version"] == 1 and version["aliases"] == ["candidate-float"] and version["run_id"] == first_run
    tags = version["tags"]
    provenance = inspect_model(model_file.read_bytes())["provenance"]
    for field in registry.LINEAGE_FIELDS:
        if provenance.get(field) is not None:
            assert tags[f"litert.{field}"] == str(provenance[field]), field
    assert all(tags[f"litert.tool.{tool}"] == v for tool, v in provenance["tools"].items())
    assert tags["litert.model_sha256"] == sha256_bytes(model_file.read_bytes())
    report = json.loads(report_file.read_text())
    assert registry.version_metrics(tags) == {k: float(v) for k, v in report["metrics"].items()
                                              if k in registry.HIGHER_IS_BETTER}
    assert "Top-1 accuracy 0.9700" in version["description"] and "c0ffee" in version["description"]

    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.tracking))
    mlflow.artifacts.download_artifacts(f"models:/{NAME}@candidate-float", dst_path=str(tmp_path / "down"))
    assert (tmp_path / "down" / "data" / "float.tflite").read_bytes() == model_file.read_bytes()
    assert json.loads((tmp_path / "down" / "validation.json").read_text()) == report


def test_a_registered_version_is_a_logged_model_that_pyfunc_runs_in_litert(cfg, tiny_float_tflite, tmp_path):
    """MLflow has no tflite flavour: the version's LoggedModel carries ours. Loaded by alias,
    it returns what the LiteRT interpreter returns on the delivered bytes, by output name."""
    import mlflow
    from ai_edge_litert.interpreter import Interpreter
    from mlflow import MlflowClient

    model_file, report_file = deliver_build(cfg, "digits-float", tiny_float_tflite)
    run_id = log_validate(cfg, "digits-float", model_file, report_file)
    client = MlflowClient(tracking.tracking_uri(cfg.tracking))
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    logged = client.get_logged_model(version.tags["litert.logged_model_id"])
    assert logged.source_run_id == run_id and logged.status == "READY" and version.source == logged.artifact_location
    assert logged.tags["litert.model_sha256"] == version.tags["litert.model_sha256"]
    assert {m.key for m in logged.metrics} >= {"accuracy", "cosine", "size_bytes"}

    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.tracking))
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate-float")
    images = np.random.default_rng(0).uniform(size=(3, 8, 8, 1)).astype(np.float32)
    predicted = model.predict({"image": images})
    runner = Interpreter(model_content=model_file.read_bytes()).get_signature_runner()
    expected = [runner(image=images[i:i + 1]) for i in range(3)]
    assert sorted(predicted) == sorted(expected[0])
    for name, value in predicted.items():
        np.testing.assert_array_equal(value, np.concatenate([e[name] for e in expected]))
    np.testing.assert_array_equal(model.predict(images)[name], predicted[name])  # one input: a bare array


def test_an_unverified_build_is_registered_tagged_and_never_aliased(cfg, tiny_float_tflite):
    model_file, report_file = deliver_build(cfg, "digits-float", tiny_float_tflite)
    report = json.loads(report_file.read_text())
    write_json(report_file, {**report, "verification": "unverified"})  # select TF ops, accepted by its gate set
    log_validate(cfg, "digits-float", model_file, report_file)
    (version,) = tracking.list_versions(cfg.tracking, NAME)
    assert version["aliases"] == []
    assert version["tags"]["litert.validation"] == "unverified"
    assert version["description"].startswith("digits / float") and "UNVERIFIED" in version["description"]
    assert tracking.promote(cfg.tracking, NAME, 1, "production") == "production-float"  # a person may


def test_new_bytes_make_a_new_candidate_and_promotion_moves_production(cfg, tiny_float_tflite, workdir):
    log_validate(cfg, "digits-float", *deliver_build(cfg, "digits-float", tiny_float_tflite))
    log_validate(cfg, "digits-dynamic_wi8_afp32", *deliver_build(cfg, "digits-dynamic_wi8_afp32", tiny_float_tflite))
    assert tracking.promote(cfg.tracking, NAME, 1, "production") == "production-float"
    cfg.model["digits"].metadata.version = "2.0.0"  # other bytes for the same variant
    log_validate(cfg, "digits-float", *deliver_build(cfg, "digits-float", tiny_float_tflite, accuracy=0.95))

    by_number = {v["version"]: v for v in tracking.list_versions(cfg.tracking, NAME)}
    assert by_number[1]["aliases"] == ["production-float"]
    assert by_number[2]["aliases"] == ["candidate-dynamic_wi8_afp32"]
    assert by_number[3]["aliases"] == ["candidate-float"]

    env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg.tracking)}
    promoted = run_cli("litert-pipeline", "promote", NAME, "3", "--alias", "production", cwd=workdir, env=env)
    assert promoted.returncode == 0, promoted.stderr
    listed = run_cli("litert-pipeline", "versions", NAME, cwd=workdir, env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == f"{NAME}: 3 version(s)" and lines[1].split()[:4] == ["version", "variant", "aliases", "accuracy"]
    assert lines[2].split()[:4] == ["3", "float", "candidate-float,production-float", "0.95"]
    assert lines[4].split()[:3] == ["1", "float", "-"]
    with pytest.raises(InputError, match=f"no version 9 of registered model '{NAME}'"):
        tracking.promote(cfg.tracking, NAME, 9, "production")
    bad = run_cli("litert-pipeline", "versions", "../../x", cwd=workdir, env=env)  # a usage error, not MLflow's
    assert bad.returncode == EXIT_CONFIG and bad.stderr.strip().splitlines()[-1].startswith("error: command line: name:")


def test_only_a_passing_report_on_the_same_bytes_registers(cfg, tiny_float_tflite):
    model_file, report_file = deliver_build(cfg, "digits-float", tiny_float_tflite)
    report = json.loads(report_file.read_text())
    write_json(report_file, {**report, "model_sha256": "0" * 64})
    with pytest.raises(InputError, match="run its validate stage again"):
        registry.registration(resolve_build(cfg, "digits-float"), model_file, report_file)
    write_json(report_file, {**report, "passed": False})
    with pytest.raises(InputError, match="failed validation"):
        registry.registration(resolve_build(cfg, "digits-float"), model_file, report_file)
    # A model validated before the metadata stage has no provenance: not a deliverable.
    bare = write_bytes(model_file, tiny_float_tflite)
    write_json(report_file, {**report, "model_sha256": sha256_bytes(tiny_float_tflite)})
    assert registry.registration(resolve_build(cfg, "digits-float"), bare, report_file) is None


def test_regressions_respect_each_metrics_direction_and_tolerance():
    production = {"accuracy": 0.98, "cosine": 0.999, "size_ratio": 0.50, "latency_median_ms": 1.0}
    current = {"accuracy": 0.97, "cosine": 0.9995, "size_ratio": 0.53, "latency_median_ms": 9.0}
    changes = {c.metric: c for c in registry.compare(
        current, production, {"accuracy": 0.005, "cosine": 0.0, "size_ratio": 0.05, "snr_db": 1.0})}
    assert set(changes) == {"accuracy", "cosine", "size_ratio"}  # snr_db unmeasured, latency not toleranced
    assert changes["accuracy"].regressed and changes["accuracy"].worse_by == pytest.approx(0.01)
    assert not changes["cosine"].regressed and changes["cosine"].worse_by < 0  # better
    assert not changes["size_ratio"].regressed and changes["size_ratio"].worse_by == pytest.approx(0.03)
    assert not registry.compare(production, production, {"accuracy": 0.0})[0].regressed
