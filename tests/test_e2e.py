"""End to end: the real `litert-pipeline run` (compose + `dvc repro`) in a throwaway git repo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pipeline import fingerprint, layout
from pipeline.tensorflow_import import UNUSED_BY_ITS_IMPORT
from tests.conftest import copy_project, run_cli

pytestmark = pytest.mark.e2e

OVERRIDES = ["model=[digits]", "examples=[digits_data,digits_savedmodel]"]


# A fresh identity for the throwaway repo; an empty URI selects the embedded MLflow store.
ENV = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost", "GIT_COMMITTER_NAME": "ci",
       "GIT_COMMITTER_EMAIL": "ci@localhost", "MLFLOW_TRACKING_URI": ""}


def _git(project, *args):
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, env={**os.environ, **ENV})


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """Run the pipeline once on the digits model; yield the project folder."""
    project = copy_project(tmp_path_factory.mktemp("e2e") / "project")
    _git(project, "init", "-q")
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "fixture")
    result = run_cli("litert-pipeline", "run", *OVERRIDES, "--name", "e2e", cwd=project, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (project / "run.log").write_text(result.stdout + result.stderr)
    return project


def _builds(project):
    from pipeline import config

    return config.load(project / "params.yaml").build


def test_every_build_yields_a_runnable_model(repro):
    from ai_edge_litert.interpreter import Interpreter

    builds = _builds(repro)
    assert {"digits-float", "digits-dynamic_wi8_afp32", "digits-static_wi8_ai8", "digits-weight_only_wf16_afp32"} <= set(builds)
    samples = np.load(repro / "artifacts" / "digits" / "reference.npz")["input:image"][:1]
    for build in builds.values():
        path = repro / "artifacts" / "digits" / "quantized" / f"{build.variant}.tflite"
        interpreter = Interpreter(model_path=str(path))
        runner = interpreter.get_signature_runner()
        (input_name, detail), = runner.get_input_details().items()
        feed = samples.astype(np.float32)
        if detail["dtype"] != np.float32:
            scale, zero = detail["quantization"]
            feed = np.round(feed / scale + zero).astype(detail["dtype"])
        (output,) = runner(**{input_name: feed}).values()
        assert output.shape == (1, 10) and np.isfinite(output).all(), build.variant
        report = json.loads((path.with_suffix(".json")).read_text())
        assert report["bytes"] == path.stat().st_size


def test_run_is_quiet_by_default(repro):
    """Every stage process imports TensorFlow or LiteRT; none of their native start-up lines
    reach the run's output (`-v` shows them)."""
    from pipeline.repro import NATIVE_LOG

    output = (repro / "run.log").read_text()
    assert "Running stage 'convert@digits'" in output
    assert not [line for line in output.splitlines() if NATIVE_LOG.match(line.encode())]
    assert "absl" not in output and "XNNPACK" not in output and "experimental_preserve_all_tensors" not in output


def test_run_ends_with_a_summary_of_the_builds(repro):
    output = (repro / "run.log").read_text()
    builds = _builds(repro)
    assert f"builds: {len(builds) + 1} of {len(builds) + 1} passed" in output  # and the auto-selected one
    assert "digits-static_wi8_ai8" in output and "models/digits/static_wi8_ai8.tflite" in output
    assert "mlflow ui --backend-store-uri sqlite:///" in output


def test_every_delivered_buffer_is_16_byte_aligned(repro):
    from pipeline.metadata.tflite import misaligned_buffers

    for build in _builds(repro).values():
        delivered = (repro / "models" / "digits" / f"{build.variant}.tflite").read_bytes()
        assert misaligned_buffers(delivered) == [], build.variant


def test_mlflow_has_one_run_per_build_with_size_and_model(repro):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repro / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("litert-pipeline")
    runs = client.search_runs([experiment.experiment_id], "tags.`litert.model` = 'digits'")
    by_variant = {r.data.tags["litert.variant"]: r for r in runs}
    assert len(by_variant) == len(runs) == len(_builds(repro)) + 1  # and autoselect@digits's run
    auto = by_variant.pop("auto")
    assert auto.data.tags["litert.selected_variant"] and auto.data.metrics["accuracy_drop"] <= 0.005
    parent = client.search_runs([experiment.experiment_id], "attributes.run_name = 'e2e'")[0]
    for variant, run in by_variant.items():
        assert run.data.metrics["size_bytes"] > 0
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        names = [a.path for a in client.list_artifacts(run.info.run_id, "quantize")]
        assert f"quantize/{variant}.tflite" in names
    # The stages deferred their records and `run` uploaded them: every passing build has a
    # registry version, and the auto-selection's run has its trail and sensitivity plot.
    versions = client.search_model_versions("name = 'vision.digits'")
    assert {v.tags["litert.variant"] for v in versions} >= set(by_variant)
    assert {"autoselect/autoselect.md", "autoselect/sensitivity.png"} <= {
        a.path for a in client.list_artifacts(auto.info.run_id, "autoselect")}
    assert not list((repro / ".litert" / "deferred").glob("*")) and not list((repro / ".litert" / "pending").glob("*"))


def test_no_build_stage_process_imports_mlflow(repro, tmp_path):
    """Run by DVC (which sets DVC_STAGE), every kind of build stage defers its tracking record
    to the `track` stage instead of logging it: no build stage process imports MLflow
    (`python -X importtime` lists every module a process imports), and only conversion needs
    TensorFlow."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(repro, project, ignore=shutil.ignore_patterns(".dvc", ".git", "mlruns", "mlflow.db"))
    for stage, key in (("convert", "digits"), ("representative", "digits"), ("quantize", "digits-static_wi8_ai8"),
                       ("metadata", "digits-static_wi8_ai8"), ("validate", "digits-static_wi8_ai8"),
                       ("autoselect", "digits"), ("report", "digits")):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", f"stages.{stage}", key], cwd=project,
                                env={**os.environ, **ENV, "DVC_STAGE": f"{stage}@{key}"}, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
        assert not {module for module in imported if module.split(".")[0] == "mlflow"}, stage
        ours = {fingerprint.module_file(m, project).relative_to(project).as_posix()
                for m in imported if m.split(".")[0] in fingerprint.PACKAGES}
        code = json.loads((project / layout.code_fingerprint(stage)).read_text())
        assert ours <= set(code), f"{stage} ran {sorted(ours - set(code))}, not in its code fingerprint"
        if stage in ("representative", "quantize", "metadata", "validate", "report"):  # LiteRT builds and checks
            assert "tensorflow" not in imported, stage  # (validate: not through MediaPipe's client check either)
        if stage == "convert":  # nor what TensorFlow imports for features never used (pipeline/tensorflow_import.py):
            # a refused import is listed too, taking microseconds; each of these takes 0.1-0.8 s
            microseconds = {line.split("|")[-1].strip(): int(line.split("|")[1]) for line in result.stderr.splitlines()
                            if line.startswith("import time:") and line.split("|")[1].strip().isdigit()}
            assert all(microseconds.get(name, 0) < 1000 for name in UNUSED_BY_ITS_IMPORT), microseconds
    assert len(list((project / ".litert" / "deferred").iterdir())) >= 5  # the records, saved for `track` to upload


def test_a_plain_dvc_repro_logs_every_build_once_through_the_track_stage(repro, tmp_path):
    """Without `litert-pipeline run`: the stages an edit reruns defer their records, the `track`
    stage uploads them under a parent run of its own and registers the passing build; a no-op
    rerun logs nothing."""
    import shutil

    from mlflow import MlflowClient

    project = tmp_path / "project"
    shutil.copytree(repro, project, ignore=shutil.ignore_patterns("mlruns", "mlflow.db"))
    params = project / "params.yaml"
    edited = re.sub(r"(  static_wi8_ai16:\n(    .*\n)*?    num_samples:) null\n", r"\1 50\n", params.read_text())
    params.write_text(edited)
    result = run_cli("dvc", "repro", cwd=project, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Running stage 'track'" in result.stdout
    assert not list((project / ".litert" / "deferred").glob("*"))
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("litert-pipeline")
    (parent,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'dvc repro'")
    assert parent.info.status == "FINISHED"
    runs = client.search_runs([experiment.experiment_id], "tags.`litert.model` = 'digits'")
    assert {r.data.tags["litert.variant"] for r in runs} == {"static_wi8_ai16", "auto"}  # what the edit reran
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    build = next(r for r in runs if r.data.tags["litert.variant"] == "static_wi8_ai16")
    assert {"litert.stage.quantize", "litert.stage.metadata", "litert.stage.validate"} <= set(build.data.tags)
    versions = client.search_model_versions("name = 'vision.digits'")
    assert "static_wi8_ai16" in {v.tags["litert.variant"] for v in versions} <= {"static_wi8_ai16", "auto"}
    tracked = json.loads((project / "tracked.json").read_text())
    assert tracked["builds"]["digits-static_wi8_ai16"]["verdict"] == "passed"

    again = run_cli("dvc", "repro", cwd=project, env=ENV)
    assert again.returncode == 0 and "Running stage" not in again.stdout
    assert len(client.search_runs([experiment.experiment_id], "")) == len(runs) + 1


def test_second_repro_runs_nothing_and_status_is_clean(repro):
    result = run_cli("dvc", "repro", cwd=repro, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "Running stage" not in result.stdout
    status = run_cli("dvc", "status", "--json", cwd=repro)
    assert json.loads(status.stdout) == {}


def test_editing_one_variant_reruns_only_that_build(repro):
    params = repro / "params.yaml"
    original = params.read_text()
    edited = re.sub(r"(  static_wi8_ai16:\n(    .*\n)*?    num_samples:) null\n", r"\1 50\n", original)
    assert edited != original
    params.write_text(edited)
    try:
        # The stages' params are in each model's part of params.yaml, which the `params` stage writes.
        assert set(json.loads(run_cli("dvc", "status", "--json", cwd=repro).stdout)) == {"params"}
        assert run_cli("dvc", "repro", "params", cwd=repro, env=ENV).returncode == 0
        status = json.loads(run_cli("dvc", "status", "--json", cwd=repro).stdout)
        # Only that build's stages: quantize, and metadata whose provenance names the variant config;
        # and the auto-selection, whose candidates include every variant.
        assert set(status) == {"quantize@digits-static_wi8_ai16", "metadata@digits-static_wi8_ai16", "autoselect@digits"}
    finally:
        params.write_text(original)
        assert run_cli("dvc", "repro", "params", cwd=repro, env=ENV).returncode == 0


def test_editing_one_module_reruns_only_the_stages_that_run_it(repro):
    """A code edit: `dvc status` names the `code` stage; once it ran, the stages whose module's
    fingerprint holds the edited file, and no other."""
    module = repro / "pipeline" / "report.py"
    original = module.read_text()
    module.write_text(original + "\n# edited\n")
    try:
        assert set(json.loads(run_cli("dvc", "status", "--json", cwd=repro).stdout)) == {"code"}
        assert run_cli("dvc", "repro", "code", cwd=repro, env=ENV).returncode == 0
        status = set(json.loads(run_cli("dvc", "status", "--json", cwd=repro).stdout))
        running = {path.stem for path in (repro / layout.CODE_FINGERPRINTS).glob("*.json")
                   if "pipeline/report.py" in json.loads(path.read_text())}
        assert {"report", "autoselect"} <= running and "quantize" not in running
        assert status and {stage.partition("@")[0] for stage in status} == running
    finally:
        module.write_text(original)
        assert run_cli("dvc", "repro", "code", cwd=repro, env=ENV).returncode == 0
    assert json.loads(run_cli("dvc", "status", "--json", cwd=repro).stdout) == {}


def test_dvc_artifacts_get_fetches_a_delivered_model(repro, tmp_path):
    """The run declared its delivered models as DVC artifacts; once its lock is committed and a
    version registered (GTO's git tag), any clone gets one by name from the cache."""
    _git(repro, "add", "dvc.yaml", "dvc.lock", "params.yaml")
    _git(repro, "commit", "-qm", "run")
    registered = run_cli("gto", "register", "digits-float", cwd=repro, env=ENV)
    assert registered.returncode == 0, registered.stderr[-3000:]
    got = tmp_path / "digits-float.tflite"
    result = run_cli("dvc", "artifacts", "get", str(repro), "digits-float", "-o", str(got), cwd=tmp_path, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert got.read_bytes() == (repro / "models" / "digits" / "float.tflite").read_bytes()
    # The run left each artifact's verdict in its meta (the report's path beside it).
    import yaml

    declared = yaml.safe_load((repro / "dvc.yaml").read_text())["artifacts"]
    assert {name: artifact["meta"]["validation"] for name, artifact in declared.items()} == {
        name: "passed" for name in declared}
