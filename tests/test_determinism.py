"""Interrupted runs and byte-identical rebuilds, with the real `dvc repro` in throwaway git repos.

Two runs of the reduced digits pipeline (every digits build, through the metadata stage):

* the first, uninterrupted, in a fresh repo;
* the second in a clone of it (same commit, same config) given the first run's prepared
  examples (Keras' SavedModel export is not byte-stable, so the source must be the same files),
  killed with SIGKILL mid-calibration (DVC and its stage), then resumed with `dvc repro`.

The second run is at once a rebuild (determinism) and a resumed run (reliability): both tests
compare it with the first, which halves the time the two claims would cost on their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.conftest import BIN, copy_project, run_cli

DIGITS = ["model=[digits]", "examples=[digits_data,digits_savedmodel]", "tracking.enabled=false"]
DELIVER = ["--glob", "metadata@*"]  # every build's delivered model, and all it needs
# One identity and date for both repos' commits: the commit id is in every provenance.json.
ENV = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost", "GIT_COMMITTER_NAME": "ci",
       "GIT_COMMITTER_EMAIL": "ci@localhost", "GIT_AUTHOR_DATE": "2025-01-01T00:00:00Z",
       "GIT_COMMITTER_DATE": "2025-01-01T00:00:00Z", "MLFLOW_TRACKING_URI": ""}


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env={**os.environ, **ENV})


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    result = run_cli("dvc", *args, cwd=project, env=ENV)
    assert result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _outputs(project: Path) -> dict[str, bytes | dict]:
    """Every output DVC recorded for the project (files, and files inside output folders); JSON
    reports without their `seconds` (how long a step took: the one thing allowed to differ)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    paths = {out["path"] for stage in lock.values() for out in stage.get("outs", [])}
    files: dict[str, bytes | dict] = {}
    for path in sorted(paths):
        target = project / path
        for file in [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file()):
            data = file.read_bytes()
            if file.suffix == ".json":
                data = json.loads(data)
                data.pop("seconds", None)
            files[file.relative_to(project).as_posix()] = data
    return files


def _new_repo(project: Path, overrides: list[str]) -> Path:
    """A fresh clone's worth of the project, composed with `overrides` and committed."""
    copy_project(project)
    _git(project, "init", "-q")
    assert run_cli("litert-pipeline", "compose", *overrides, cwd=project, env=ENV).returncode == 0
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "fixture")
    return project


def _clone_with_examples(first: Path, project: Path) -> Path:
    """A clone of `first` (same commit) holding its prepared examples, recorded as the prepare
    stages' outputs so that DVC does not rebuild them."""
    project.parent.mkdir(parents=True, exist_ok=True)
    _git(project.parent, "clone", "-q", str(first), project.name)
    shutil.copytree(first / "examples", project / "examples")
    examples = yaml.safe_load((project / "params.yaml").read_text())["examples"]
    _dvc(project, "repro", "code")  # the prepare stages' code dependency (fingerprints, in no clone)
    _dvc(project, "commit", "--force", *(f"prepare@{name}" for name in examples))
    return project


def _popen(project: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "dvc"), *args], cwd=project, stderr=subprocess.STDOUT,
        env={**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        start_new_session=True,  # its own process group: DVC and its stage can be killed together
        **kwargs,
    )


@contextlib.contextmanager
def _in_background(project: Path, *args: str) -> Iterator[None]:
    """Run `dvc <args>` alongside the block (the two runs share the machine); it must succeed."""
    log = project.parent / "background.log"
    with log.open("wb") as handle:
        process = _popen(project, *args, stdout=handle)
        try:
            yield
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            process.wait()
    assert process.returncode == 0, log.read_text()[-3000:]


def _run_until(project: Path, marker: bytes) -> tuple[str, str]:
    """Start `dvc repro`, SIGKILL it and its stage as soon as the stage prints `marker`;
    return (the stage that was running, the output so far)."""
    process = _popen(project, "repro", *DELIVER, stdout=subprocess.PIPE)
    output = b""
    try:
        while marker not in output:
            chunk = os.read(process.stdout.fileno(), 65536)
            assert chunk, f"the run ended before {marker!r}:\n{output.decode()[-3000:]}"
            output += chunk
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    text = output.decode(errors="replace")
    return re.findall(r"Running stage '([^']+)'", text)[-1], text


@dataclass(frozen=True)
class Runs:
    first: Path  # uninterrupted
    second: Path  # killed mid-calibration, then resumed
    killed: str  # the stage that was running when the kill came
    before_kill: str  # DVC's output up to the kill
    files_after_kill: set[str]
    resumed: str  # DVC's output when resuming


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("determinism")
    first = _new_repo(root / "first" / "project", DIGITS)
    _dvc(first, "repro", "--glob", "prepare@*")
    second = _clone_with_examples(first, root / "second" / "project")
    with _in_background(first, "repro", *DELIVER):
        killed, before_kill = _run_until(second, b"calibrating")
        files_after_kill = {p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file()}
        resumed = _dvc(second, "repro", *DELIVER).stdout
    return Runs(first, second, killed, before_kill, files_after_kill, resumed)


@pytest.mark.e2e
def test_a_run_killed_mid_calibration_resumes_to_the_uninterrupted_outputs(runs):
    lock = yaml.safe_load((runs.first / "dvc.lock").read_text())["stages"]
    # Killed before it finished, the stage left no output (atomic writes), or only complete ones.
    for path in (out["path"] for out in lock[runs.killed]["outs"]):
        if path in runs.files_after_kill:
            assert (runs.second / path).read_bytes() == (runs.first / path).read_bytes(), f"{path} is partial"
    finished = re.findall(r"Running stage '([^']+)'", runs.before_kill)[:-1]
    assert finished, "the kill came before any stage had finished"
    resumed = re.findall(r"Running stage '([^']+)'", runs.resumed)
    assert runs.killed in resumed  # DVC reran the killed stage...
    assert not set(finished) & set(resumed)  # ...but none that had finished
    assert "Running stage" not in _dvc(runs.second, "repro", *DELIVER).stdout  # and now all is up to date
    assert _outputs(runs.second) == _outputs(runs.first)


@pytest.mark.e2e
def test_rebuilding_from_the_same_source_gives_byte_identical_models(runs):
    from pipeline import config

    builds = config.load(runs.first / "params.yaml").build
    first, second = _outputs(runs.first), _outputs(runs.second)
    delivered = {f"models/{b.model}/{b.variant}.tflite" for b in builds.values()}
    assert delivered <= set(first)
    different = sorted(path for path in first if first[path] != second.get(path))
    assert not different, f"not byte-identical: {different}"


@pytest.mark.slow
def test_every_example_model_rebuilds_byte_identical(tmp_path):
    """The full default config (MobileNetV2 and every digits source format), built twice."""
    first = _new_repo(tmp_path / "first" / "project", ["tracking.enabled=false"])
    _dvc(first, "repro", "--glob", "prepare@*")
    second = _clone_with_examples(first, tmp_path / "second" / "project")
    with _in_background(first, "repro", *DELIVER):
        _dvc(second, "repro", *DELIVER)
    first_outputs, second_outputs = _outputs(first), _outputs(second)
    different = sorted(path for path in first_outputs if first_outputs[path] != second_outputs.get(path))
    assert not different, f"not byte-identical: {different}"
