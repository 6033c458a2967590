"""Shared test helpers."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with this interpreter's environment first on PATH."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run(list(args), cwd=cwd, env=full_env, capture_output=True, text=True)


@functools.lru_cache(maxsize=1)
def _all_examples_yaml() -> str:
    from pipeline import config

    models = re.search(r"^ALL_MODELS := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1).strip()
    return config.compose([f"model=[{models}]"], conf_dir=ROOT / "conf")


def all_examples_params() -> dict:
    """params.yaml as `make run-all` composes it (every bundled example; the committed one holds
    the default selection only): a fresh copy on every call, so a test may edit it."""
    import yaml

    return yaml.safe_load(_all_examples_yaml())


# What `make run` leaves beside the sources: a copy must not inherit the run's lock.
RUN_OUTPUTS = ("dvc.lock",)
RUN_OUTPUT_FOLDERS = ("comparison/",)  # its report.json is left visible to git for DVC experiments


def copy_project(target: Path, root: Path = ROOT) -> Path:
    """Copy a project's git-tracked (and new, unignored) files: what a fresh clone holds."""
    def files(*options: str) -> list[str]:
        return subprocess.run(["git", "ls-files", *options], cwd=root, capture_output=True, text=True,
                              check=True).stdout.split()

    new = [name for name in files("--others", "--exclude-standard")
           if name not in RUN_OUTPUTS and not name.startswith(RUN_OUTPUT_FOLDERS)]
    for name in files("--cached") + new:
        source = root / name
        if source.is_file() and not name.startswith(("tests/", "bench/")):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


def run_model_stages(cfg, name: str) -> None:
    """What the convert and representative stages write for model `name`, made by the same
    pipeline functions, in the current folder (its samples already materialized)."""
    from pipeline import datasets, steps
    from pipeline.build import resolve_model
    from pipeline.evaluate import save_reference
    from pipeline.io import atomic_path, write_bytes, write_json

    model = resolve_model(cfg, name)
    converted, evaluation = steps.convert_model(model)
    write_bytes(model.paths.float_model, converted.model)
    write_json(model.paths.convert_report, converted.info)
    write_json(model.paths.evaluate_report, evaluation.report)
    with atomic_path(model.paths.reference) as tmp, open(tmp, "wb") as handle:
        save_reference(evaluation, handle)
    pool = steps.representative_pool(model)
    with atomic_path(model.paths.representative) as tmp, open(tmp, "wb") as handle:
        datasets.save(pool, handle)
    write_json(model.paths.calibration, steps.shared_calibration(model, pool, converted.model))


def tiny_keras_model():
    """A digits-shaped classifier: (None, 8, 8, 1) float32 -> 10 softmax scores."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="session")
def tiny_float_tflite(tmp_path_factory) -> bytes:
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("tiny") / "saved_model"
    tiny_keras_model().export(str(folder), verbose=False)
    return tf.lite.TFLiteConverter.from_saved_model(str(folder)).convert()


# --- a real MLflow tracking server (server-mode and concurrency tests) ---------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(root: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` on 127.0.0.1 storing into `root` (SQLite + proxied artifacts); return
    once /health answers. Reuse `root` with a new port to restart the same server."""
    import time
    import urllib.request

    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    with (root / "server.log").open("ab") as log:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: stop ends its workers
            # No GenAI job runner: it starts a dozen worker processes the registry does not need.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return process, uri
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_mlflow_server(process)
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def stop_mlflow_server(process: subprocess.Popen) -> None:
    """End the server's process group (the CLI, uvicorn and its job runner) and wait for it."""
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            process.poll()  # reap the leader, or the group never looks empty
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """The URI of a real MLflow server on a free loopback port, for this test module."""
    process, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield uri
    finally:
        stop_mlflow_server(process)


def only_builds(model: str, *variants: str) -> list[str]:
    """Hydra overrides composing just these builds of `model` (fewer stages for end-to-end tests)."""
    builds = ",".join(f"{model}-{v}:{{model:{model},variant:{v}}}" for v in variants)
    return ["~build", f"+build={{{builds}}}"]
