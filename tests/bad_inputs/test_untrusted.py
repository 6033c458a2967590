"""Untrusted models and configs: no code runs unless the config trusts it, extraction stays in its
folder, and secrets in the config never reach MLflow, provenance or reports."""

from __future__ import annotations

import io
import json
import sqlite3
import zipfile
from pathlib import Path

import pytest

from pipeline.errors import EXIT_INPUT
from tests.bad_inputs.conftest import fails_cleanly, run, set_params, snapshot, stage

SOURCE = "model.digits.source"


def test_lambda_layer_is_refused_unless_the_config_trusts_it(tiny_project):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    scaled = keras.layers.Lambda(lambda t: t * 2.0)(inputs)  # arbitrary Python, stored as bytecode
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(scaled))
    keras.Model(inputs, outputs).save(tiny_project / "tiny/lambda.keras")
    set_params(tiny_project, {f"{SOURCE}.format": "keras", f"{SOURCE}.path": "tiny/lambda.keras"})

    line = fails_cleanly(tiny_project, stage("convert", "digits"), EXIT_INPUT, "tiny/lambda.keras",
                         f"{SOURCE}.trusted")
    assert "Lambda" in line and f"set {SOURCE}.trusted: true" in line

    set_params(tiny_project, {f"{SOURCE}.trusted": True})
    result = run(tiny_project, *stage("convert", "digits"))
    assert result.returncode == 0, result.stderr[-3000:]


def _crafted(model: bytes, members: dict[str, bytes]) -> bytes:
    """`model` with a ZIP of `members` appended, names as given (zipfile keeps '../' and '/')."""
    out = io.BytesIO(model)
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


@pytest.mark.parametrize(
    "evil",
    ["../escaped.txt", "/tmp/litert-absolute.txt", "nested/dir.txt", "..\\windows.txt"],
)
def test_extract_cannot_write_outside_its_folder(tiny_project, evil):
    model = (tiny_project / "artifacts/digits/float.tflite").read_bytes()
    (tiny_project / "crafted.tflite").write_bytes(_crafted(model, {"labels.txt": b"a\n", evil: b"owned\n"}))
    (tiny_project / "out").mkdir()
    line = fails_cleanly(tiny_project, ["litert-pipeline", "inspect", "crafted.tflite", "--extract", "out"],
                         EXIT_INPUT, "out", repr(evil))
    assert "refusing to extract" in line
    assert not Path("/tmp/litert-absolute.txt").exists() and not (tiny_project / "escaped.txt").exists()


def test_extract_does_not_follow_a_planted_symlink(tiny_project):
    model = (tiny_project / "artifacts/digits/float.tflite").read_bytes()
    (tiny_project / "crafted.tflite").write_bytes(_crafted(model, {"labels.txt": b"owned\n"}))
    (tiny_project / "victim.txt").write_text("precious\n")
    (tiny_project / "out").mkdir()
    (tiny_project / "out/labels.txt").symlink_to("../victim.txt")
    line = fails_cleanly(tiny_project, ["litert-pipeline", "inspect", "crafted.tflite", "--extract", "out"],
                         EXIT_INPUT, "out", "'labels.txt'")
    assert "outside the output directory" in line
    assert (tiny_project / "victim.txt").read_text() == "precious\n"


def test_zip_bomb_is_refused_before_decompressing(tiny_project):
    from pipeline.metadata.packing import MAX_PACKED_BYTES

    out = io.BytesIO((tiny_project / "artifacts/digits/float.tflite").read_bytes())
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("labels.txt", "w", force_zip64=True) as member:
            chunk = bytes(2**20)
            for _ in range(MAX_PACKED_BYTES // len(chunk) + 1):
                member.write(chunk)
    assert len(out.getvalue()) < 2 * 2**20  # a small file that would inflate past the limit
    (tiny_project / "bomb.tflite").write_bytes(out.getvalue())
    line = fails_cleanly(tiny_project, ["litert-pipeline", "inspect", "bomb.tflite", "--extract", "out"],
                         EXIT_INPUT, "bomb.tflite")
    assert "more than the" in line


TEAM_FACTORY = '''
"""A team's factory that needs a credential (here only checked) to fetch its model."""


_MODELS = []  # a concrete function holds its model's variables weakly: keep the model alive


def tiny_classifier(path, api_token):
    import keras
    import tensorflow as tf

    if not api_token:
        raise ValueError("no token")
    model = keras.models.load_model(path)
    _MODELS.append(model)
    function = tf.function(lambda image: model(image, training=False),
                           input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="image")])
    return [function.get_concrete_function()]
'''
SECRET = "s3cr3t-7f0a9c1e-do-not-log"


def test_a_secret_in_factory_args_reaches_no_run_report_or_model(tiny_project):
    (tiny_project / "team_factory.py").write_text(TEAM_FACTORY)
    set_params(tiny_project, {
        f"{SOURCE}.format": "concrete_function",
        f"{SOURCE}.path": "tiny/model.keras",
        f"{SOURCE}.factory": "team_factory:tiny_classifier",
        f"{SOURCE}.factory_args": {"api_token": SECRET},
        f"{SOURCE}.trusted": True,  # the factory is outside the project
        "tracking.enabled": True,  # the embedded store: ./mlflow.db and ./mlruns
        "build.digits-float.validation": {"max_size_ratio": None},  # metadata outweighs a tiny model
    })
    for command in (stage("convert", "digits"), stage("representative", "digits"), stage("quantize", "digits-float"),
                    stage("metadata", "digits-float"), stage("validate", "digits-float")):
        result = run(tiny_project, *command)
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"

    with sqlite3.connect(tiny_project / "mlflow.db") as db:
        params = db.execute("select key, value from params").fetchall()
        tags = db.execute("select key, value from tags").fetchall()
    logged_token = {value for key, value in params if key.endswith("factory_args.api_token")}
    assert logged_token == {"***"}  # the source config was logged, the secret masked...
    assert not [row for row in params + tags if SECRET in row[1]]  # ...and nowhere else either
    delivered = (tiny_project / "models/digits/float.tflite").read_bytes()
    provenance = json.loads(zipfile.ZipFile(io.BytesIO(delivered)).read("provenance.json"))
    assert provenance["source_format"] == "concrete_function"
    # Every byte written: reports, artifacts, the delivered model, MLflow's store and artifacts.
    # Only the config itself holds the secret (so should params.yaml stay out of git? see README).
    holders = [path for path, digest in snapshot(tiny_project).items()
               if digest != "dir" and SECRET.encode() in (tiny_project / path).read_bytes()]
    assert holders == ["params.yaml"]
