"""Concurrent pipelines against one real `mlflow server` on loopback: no run is lost or doubled,
and the registry ends with exactly one version per distinct delivered model.

* Two sweeps at once (slow: `make test-full`): two teams' checkouts of the same commit sweep
  the same variants of the same model together. Their delivered models are byte-identical
  (rebuilds are deterministic), so both sweeps register the same bytes under the same name.
* Six registrations of new bytes released at the same instant by a file barrier (`make test`):
  the race the sweeps seldom hit exactly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import config, registry, tracking
from pipeline.io import sha256_bytes
from pipeline.metadata import inspect_model
from tests.conftest import BIN, ROOT, copy_project, run_cli
from tests.test_registry import deliver_build

pytestmark = pytest.mark.e2e

ENV = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost", "GIT_COMMITTER_NAME": "ci",
       "GIT_COMMITTER_EMAIL": "ci@localhost"}
BASE = ["model=[digits]", "examples=[digits_data,digits_savedmodel]"]
VARIANTS = ["float", "dynamic_wi8_afp32", "weight_only_wi8_afp32"]
SWEEPS = ("team_a", "team_b")
NAME = "vision.digits"


def _git(project: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, env={**os.environ, **ENV})


@pytest.fixture(scope="module")
def swept(mlflow_server, tmp_path_factory) -> dict[str, Path]:
    """Both sweeps, started together, each in its own checkout; returns their sweep folders."""
    root = tmp_path_factory.mktemp("concurrency")
    base = copy_project(root / "base")
    _git(base, "init", "-q")
    assert run_cli("litert-pipeline", "compose", *BASE, cwd=base).returncode == 0
    # The shared stages once, without tracking (they are not what the sweeps race on).
    result = run_cli("dvc", "repro", "convert@digits", "representative@digits", cwd=base,
                     env={**ENV, "MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    _git(base, "add", "-A")
    _git(base, "commit", "-qm", "shared stages")
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    processes = {}
    for name in SWEEPS:
        project = Path(shutil.copytree(base, root / name, symlinks=True))
        log = (root / f"{name}.log").open("wb")
        command = ["litert-pipeline", "sweep", *BASE, f"quantization={','.join(VARIANTS)}", "--name", name]
        processes[name] = (subprocess.Popen(command, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (process, log) in processes.items():
        process.wait()
        log.close()
        assert process.returncode == 0, (root / f"{name}.log").read_text()[-3000:]
    return {name: next((root / name / "multirun").iterdir()) for name in SWEEPS}


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_each_sweep_has_exactly_one_child_run_per_member(swept, mlflow_server):
    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name("litert-pipeline").experiment_id
    for name in SWEEPS:
        (parent,) = client.search_runs([experiment], f"attributes.run_name = '{name}'")
        assert parent.info.status == "FINISHED"
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted(child.info.run_name for child in children) == sorted(f"digits/{v}" for v in VARIANTS)
        for child in children:  # each holds its whole build: nothing of it went to the other sweep's run
            assert {"litert.stage.quantize", "litert.stage.metadata", "litert.stage.validate"} <= set(child.data.tags)


@pytest.mark.slow
def test_the_registry_holds_one_version_per_distinct_model(swept, mlflow_server):
    client = _client(mlflow_server)
    delivered = {}
    for name, directory in swept.items():
        for variant in VARIANTS:
            data = (directory / "models" / "digits" / f"{variant}.tflite").read_bytes()
            delivered.setdefault(variant, set()).add(sha256_bytes(data))
            assert inspect_model(data)["provenance"]["variant"] == variant
    assert all(len(shas) == 1 for shas in delivered.values())  # both sweeps built the same bytes
    versions = client.search_model_versions(f"name = '{NAME}'")
    by_sha = {}
    for version in versions:
        by_sha.setdefault(version.tags[registry.SHA256_TAG], []).append(int(version.version))
    expected = {sha for shas in delivered.values() for sha in shas}
    assert set(by_sha) == expected  # none missing
    assert all(len(numbers) == 1 for numbers in by_sha.values()), by_sha  # none doubled
    model = client.get_registered_model(NAME)
    for variant, (sha,) in delivered.items():
        alias = registry.variant_alias(registry.CANDIDATE, variant)
        assert model.aliases[alias] == str(by_sha[sha][0])


# Registers one build from its own process, once every process is ready (a file barrier).
REGISTER = """
import sys, time
from pathlib import Path
from pipeline import config, registry, tracking
from pipeline.build import resolve_build
name, model_file, report_file, parent, barrier = sys.argv[1:]
cfg = config.load()
build = resolve_build(cfg, name)
record = tracking.StageRecord(
    model=build.model.name, variant=build.variant_name, stage="validate", team=build.team, parent=parent,
    config=tracking.build_config(build), registration=registry.registration(build, model_file, report_file))
Path(barrier, parent).touch()
while not Path(barrier, "go").exists():
    time.sleep(0.001)
print(tracking.log_stage(cfg.tracking, record))
"""
RACERS = 6


def test_builds_registering_new_bytes_at_the_same_instant_make_one_version(mlflow_server, tiny_float_tflite,
                                                                           tmp_path, monkeypatch):
    """Sweeps seldom register at the very same moment; here six invocations do, released together
    once each has imported MLflow and built its record."""
    shutil.copytree(ROOT / "conf" / "labels", tmp_path / "conf" / "labels")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = config.load()
    model_file, report_file = deliver_build(cfg, "digits-float", tiny_float_tflite)
    parents = [tracking.start_parent_run(cfg.tracking, f"racer-{i}", {"kind": "test"}) for i in range(RACERS)]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    processes = [subprocess.Popen([str(BIN / "python"), "-c", REGISTER, "digits-float", str(model_file),
                                   str(report_file), parent, str(barrier)],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for parent in parents]
    while len(list(barrier.iterdir())) < RACERS and all(process.poll() is None for process in processes):
        time.sleep(0.05)
    (barrier / "go").touch()
    results = [process.communicate() for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-2000:] for _, err in results]

    client = _client(mlflow_server)
    runs = [out.strip().splitlines()[-1] for out, _ in results]  # MLflow prints links before it
    assert len(set(runs)) == RACERS  # one run per invocation, none lost or shared
    for run_id, parent in zip(runs, parents):
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent
    sha256 = sha256_bytes(model_file.read_bytes())
    versions = client.search_model_versions(f"name = '{NAME}' and tags.`{registry.SHA256_TAG}` = '{sha256}'")
    assert len(versions) == 1, [v.version for v in versions]  # without the registry's check: 4 of 6
    assert client.get_registered_model(NAME).aliases["candidate-float"] == versions[0].version


@pytest.mark.parametrize("command", [["run", "model=[digits]", "validation.classifier.min_cosine=0.1"],
                                     ["nightly", "model=[digits]"], ["compose", "model=[digits]"], ["sync"],
                                     ["sweep", "model=[digits]", "quantization=float,static_wi8_ai8"]])
def test_a_second_invocation_refuses_while_one_holds_the_project_and_changes_nothing(tmp_path, monkeypatch, command):
    from pipeline import repro
    from pipeline.errors import EXIT_BUSY

    project = copy_project(tmp_path / "project")
    params = (project / "params.yaml").read_bytes()
    monkeypatch.chdir(project)
    with repro.project_lock("run"):
        result = run_cli("litert-pipeline", *command, cwd=project)
    assert result.returncode == EXIT_BUSY, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: .litert/lock: litert-pipeline run (pid {os.getpid()}) holds the project: wait for it to finish "
        "(nothing was changed)")
    assert (project / "params.yaml").read_bytes() == params


def test_a_killed_holder_releases_the_project(tmp_path, monkeypatch):
    import signal
    import sys

    from pipeline import repro

    monkeypatch.chdir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "from pipeline import repro\nimport time\n"
                               "with repro.project_lock('nightly'):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=tmp_path, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == b"held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with repro.project_lock("run"):
        pass
