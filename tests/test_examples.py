"""Tests for the bundled example models (pipeline/examples.py).

Slow tests (marked `slow`) build every example and prove it converts to LiteRT
with builtin ops only and runs with finite outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from pipeline import examples
from pipeline.errors import ConfigError, InputError


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return dict(data)


def test_module_import_does_not_import_heavy_frameworks() -> None:
    code = "import sys, pipeline.examples; print(sorted({'tensorflow', 'keras', 'jax', 'sklearn'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_digits_data_is_deterministic_and_well_formed(tmp_path: Path) -> None:
    first = examples.build_example("digits_data", tmp_path / "a")
    second = examples.build_example("digits_data", tmp_path / "b")
    sizes = {"calibration": 256, "train": 1437 - 256, "evaluation": 360}
    for split, size in sizes.items():
        arrays = _load_npz(first / f"{split}.npz")
        again = _load_npz(second / f"{split}.npz")
        assert arrays.keys() == again.keys() == {"x", "y"}
        for key in arrays:
            np.testing.assert_array_equal(arrays[key], again[key])
        x, y = arrays["x"], arrays["y"]
        assert x.shape == (size, 8, 8, 1) and x.dtype == np.float32
        assert y.shape == (size,) and y.dtype == np.int64
        assert 0.0 <= x.min() and x.max() <= 1.0
    description = json.loads((first / "example.json").read_text())
    assert description["name"] == "digits_data"
    assert description["files"] == ["calibration.npz", "evaluation.npz", "train.npz"]


def test_digits_data_matches_the_shared_split(tmp_path: Path) -> None:
    out = examples.build_example("digits_data", tmp_path / "data")
    split = examples.digits_split()
    written = np.concatenate([_load_npz(out / "calibration.npz")["x"], _load_npz(out / "train.npz")["x"]])
    np.testing.assert_array_equal(written, split.x_train)
    np.testing.assert_array_equal(_load_npz(out / "evaluation.npz")["y"], split.y_eval)


def test_unknown_example_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown example 'nope'"):
        examples.build_example("nope", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_failed_build_leaves_previous_output_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = examples.build_example("digits_data", tmp_path / "data")
    before = sorted(p.name for p in out.iterdir())

    def crash(staged: Path) -> dict:
        (staged / "partial.bin").write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setitem(examples._BUILDERS, "digits_data", crash)
    with pytest.raises(RuntimeError):
        examples.build_example("digits_data", out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary left beside it


def test_digits_jax_without_jax_is_an_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jax", None)  # makes `import jax` raise ImportError
    with pytest.raises(InputError, match=r"pip install 'litert-pipeline\[jax\]'"):
        examples.build_example("digits_jax", tmp_path / "jax")
    assert not (tmp_path / "jax").exists()


@pytest.fixture(scope="module")
def concrete_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = examples.build_example("digits_concrete", tmp_path_factory.mktemp("examples") / "digits_concrete")
    return str(out / "model.weights.h5")


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probabilities.argmax(axis=-1) == labels))


def _single_image_predictions(function: Callable[[Any], Any], images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    return np.concatenate([function(tf.constant(image[np.newaxis])).numpy() for image in images])


def test_concrete_factory_inference_mode_is_accurate(concrete_weights: str) -> None:
    data = examples.digits_split()
    (function,), _ = examples.digits_concrete_functions(concrete_weights)
    predictions = _single_image_predictions(function, data.x_eval)
    accuracy = _accuracy(predictions, data.y_eval)
    assert accuracy >= 0.9
    recorded = json.loads((Path(concrete_weights).parent / "example.json").read_text())["eval_accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1e-4)


def test_concrete_factory_training_mode_breaks_single_image_batches(concrete_weights: str) -> None:
    data = examples.digits_split()
    (inference,), _ = examples.digits_concrete_functions(concrete_weights, training=False)
    (training,), _ = examples.digits_concrete_functions(concrete_weights, training=True)
    expected = _single_image_predictions(inference, data.x_eval)
    broken = _single_image_predictions(training, data.x_eval)
    assert np.abs(expected - broken).max() > 0.5
    assert _accuracy(broken, data.y_eval) < 0.3


# --- slow: build every example, convert it to LiteRT and run it -------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("all_examples")
    return {name: examples.build_example(name, root / name) for name in examples.EXAMPLES}


def _saved_model_dir(example_dir: Path, description: dict, scratch: Path) -> Path:
    """The example as a SavedModel: .keras and .h5 models are loaded (safely) and exported."""
    if description["format"] in ("saved_model", "jax"):
        return example_dir / description["model"]
    import keras

    model = keras.models.load_model(example_dir / description["model"], safe_mode=True)
    model.export(scratch / "saved_model", verbose=False)
    return scratch / "saved_model"


def _to_litert(converter) -> bytes:
    import tensorflow as tf

    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex / custom ops
    return converter.convert()


def _run_litert(model: bytes, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Run `images` through a LiteRT model, `batch_size` at a time (default: all at once)."""
    from ai_edge_litert.interpreter import Interpreter

    batch_size = batch_size or len(images)
    interpreter = Interpreter(model_content=model)
    (source,) = interpreter.get_input_details()
    (result,) = interpreter.get_output_details()
    interpreter.resize_tensor_input(source["index"], [batch_size, *images.shape[1:]])
    interpreter.allocate_tensors()
    outputs = []
    for start in range(0, len(images), batch_size):
        interpreter.set_tensor(source["index"], images[start : start + batch_size])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(result["index"]))
    return np.concatenate(outputs)


def _input_names(model: bytes) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=model).get_signature_list()["serving_default"]["inputs"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_savedmodel", "digits_keras", "digits_h5", "digits_jax"])
def test_digits_model_converts_and_keeps_its_accuracy(name: str, built: dict[str, Path], tmp_path: Path) -> None:
    import tensorflow as tf

    description = json.loads((built[name] / "example.json").read_text())
    assert description["eval_accuracy"] >= 0.9
    saved_model = _saved_model_dir(built[name], description, tmp_path)
    litert = _to_litert(tf.lite.TFLiteConverter.from_saved_model(str(saved_model)))
    assert _input_names(litert) == [examples.INPUT_NAME]
    data = examples.digits_split()
    probabilities = _run_litert(litert, data.x_eval)
    assert np.isfinite(probabilities).all()
    assert _accuracy(probabilities, data.y_eval) == pytest.approx(description["eval_accuracy"], abs=0.01)


@pytest.mark.slow
def test_digits_concrete_converts_in_both_modes(built: dict[str, Path]) -> None:
    import tensorflow as tf

    weights = str(built["digits_concrete"] / "model.weights.h5")
    data = examples.digits_split()
    accuracies = {}
    for training in (False, True):
        functions, owner = examples.digits_concrete_functions(weights, training=training)
        litert = _to_litert(tf.lite.TFLiteConverter.from_concrete_functions(functions, owner))
        probabilities = _run_litert(litert, data.x_eval, batch_size=1)
        assert np.isfinite(probabilities).all()
        accuracies[training] = _accuracy(probabilities, data.y_eval)
    assert accuracies[False] >= 0.9 and accuracies[True] < 0.3


@pytest.mark.slow
def test_mobilenet_v2_converts_and_runs(built: dict[str, Path]) -> None:
    import tensorflow as tf

    description = json.loads((built["mobilenet_v2"] / "example.json").read_text())
    assert description["input_shape"] == [None, 224, 224, 3]
    litert = _to_litert(tf.lite.TFLiteConverter.from_saved_model(str(built["mobilenet_v2"] / "saved_model")))
    assert _input_names(litert) == [examples.INPUT_NAME]
    image = np.random.default_rng(0).random((1, 224, 224, 3), dtype=np.float32)
    probabilities = _run_litert(litert, image)
    assert probabilities.shape == (1, 1000) and np.isfinite(probabilities).all()
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", examples.EXAMPLES)
def test_example_description_lists_its_files(name: str, built: dict[str, Path]) -> None:
    description = json.loads((built[name] / "example.json").read_text())
    assert description["name"] == name
    on_disk = sorted(p.relative_to(built[name]).as_posix() for p in built[name].rglob("*") if p.is_file())
    assert on_disk == sorted([*description["files"], "example.json"])
