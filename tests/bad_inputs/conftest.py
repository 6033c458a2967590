"""A tiny project that every bad-input case copies, and the checks every case makes.

The template is the digits model's config pointed at a tiny Keras model and small `.npz`
files, with the upstream artifacts (samples, float model, calibration, quantized float build)
made by the real stages, so a case can start any stage after one cheap edit.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import copy_project, run_cli, tiny_keras_model

COMPOSE = [
    "model=[digits]",
    "examples=[]",
    "tracking.enabled=false",
    "model.digits.source.path=tiny/saved_model",
    "dataset.digits_calibration.path=tiny/calibration.npz",
    "dataset.digits_evaluation.path=tiny/evaluation.npz",
    "model.digits.representative.num_samples=16",
    "model.digits.evaluation.num_samples=20",
]
# The upstream stages a case may need, in DVC's order.
UPSTREAM = [
    ("data", "digits_calibration"),
    ("data", "digits_evaluation"),
    ("convert", "digits"),
    ("representative", "digits"),
    ("quantize", "digits-float"),
]
ENV = {"MLFLOW_TRACKING_URI": "", "PYTHONDONTWRITEBYTECODE": "1"}


def tiny_samples(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits-shaped inputs in [0, 1) and labels 0..9."""
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(count, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, count)


def run(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=project, env={**ENV, **(env or {})})


def stage(name: str, *args: str) -> list[str]:
    """A DVC stage's command, as dvc.yaml runs it."""
    return ["python", "-m", f"stages.{name}", *args]


def set_params(project: Path, changes: dict[str, Any]) -> None:
    """Edit params.yaml: each dotted key (created if absent) gets its value."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def fails(result: subprocess.CompletedProcess, code: int, *names: str) -> str:
    """Check a failed command: exit `code`, no traceback, exactly one `error:` line, printed
    last and naming each of `names` (file, key). Returns that line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    for name in names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"
    return errors[0]


def fails_cleanly(project: Path, command: list[str], code: int, *names: str, env: dict | None = None) -> str:
    """Run `command` in `project`: it `fails(...)` and leaves every file as it was."""
    before = snapshot(project)
    line = fails(run(project, *command, env=env), code, *names)
    after = snapshot(project)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the failed command changed {changed}"
    return line


def snapshot(root: Path) -> dict[str, str]:
    """Every file (by content hash) and folder under `root`: equal snapshots, nothing written."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
        if "__pycache__" not in path.parts and path.relative_to(root).as_posix() != ".litert/lock"  # the one-run lock
    }


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("bad_inputs") / "template")
    tiny = project / "tiny"
    model = tiny_keras_model()
    model.export(str(tiny / "saved_model"), verbose=False)
    model.save(tiny / "model.keras")
    for name, count, seed in (("calibration", 32, 1), ("evaluation", 24, 2)):
        inputs, labels = tiny_samples(count, seed)
        np.savez(tiny / f"{name}.npz", x=inputs, y=labels)
    result = run(project, "litert-pipeline", "compose", *COMPOSE)
    assert result.returncode == 0, result.stderr
    for name, arg in UPSTREAM:
        result = run(project, *stage(name, arg))
        assert result.returncode == 0, f"{name} {arg}: {result.stderr[-3000:]}"
    return project


@pytest.fixture
def tiny_project(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template for one case."""
    return Path(shutil.copytree(template, tmp_path / "project", symlinks=True))
