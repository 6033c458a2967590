"""A real client reads the delivered metadata as the pipeline means it: MediaPipe's
ImageClassifier, fed raw 8-bit RGB pixels, picks the pipeline's own top-1 (the `clients` extra)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.config import ColorSpace, MetadataConfig, RuntimeConfig, TensorContent, TensorMetadataConfig, ValidationConfig
from pipeline.datasets import Samples
from pipeline.metadata import ModelSpec, TensorSpec, attach_metadata
from pipeline.validate import validate

pytest.importorskip("mediapipe", reason="the `clients` extra (make test installs it)")

RGB = TensorMetadataConfig(name="image", content=TensorContent.image, color_space=ColorSpace.RGB, mean=[127.5],
                           std=[127.5])


def _delivered(float_model: bytes, entry: TensorMetadataConfig) -> bytes:
    spec = ModelSpec(name="m", inputs=(TensorSpec(entry.name, content=entry.content.value,
                                                  color_space=entry.color_space.value, mean=tuple(entry.mean),
                                                  std=tuple(entry.std)),),
                     outputs=(TensorSpec("scores"),))
    return attach_metadata(float_model, spec, {})


def _check(float_model: bytes, entry: TensorMetadataConfig, shape: tuple[int, ...]) -> dict:
    """The client check of `validate` on the delivered model, with 16 images in [-1, 1]."""
    from pipeline.validate.runner import run_samples

    samples = Samples({"image": np.random.default_rng(0).uniform(-1, 1, (16, *shape)).astype(np.float32)})
    reference = run_samples(float_model, samples, num_threads=1, signature_key=None).outputs
    result = validate(_delivered(float_model, entry), float_model=float_model, samples=samples, reference=reference,
                      gates=ValidationConfig(), runtime=RuntimeConfig(), metadata=MetadataConfig(inputs=[entry]))
    (client,) = result.report["clients"]
    return client


@pytest.fixture(scope="module")
def rgb_classifier(tmp_path_factory) -> bytes:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    folder = tmp_path_factory.mktemp("rgb") / "sm"
    keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x)).export(str(folder), verbose=False)
    return tf.lite.TFLiteConverter.from_saved_model(str(folder)).convert()


def test_mediapipe_classifies_raw_pixels_as_the_pipeline_does(rgb_classifier):
    client = _check(rgb_classifier, RGB, (16, 16, 3))
    assert client["status"] == "passed" and client["top1_agreement"] == 1.0 and client["samples"] == 16
    assert client["client"].startswith("mediapipe ImageClassifier 1.")


def test_models_the_client_cannot_take_are_skipped_with_the_reason(rgb_classifier, tiny_float_tflite):
    client = _check(tiny_float_tflite, replace(RGB, color_space=ColorSpace.GRAYSCALE), (8, 8, 1))  # the digits shape
    assert client["status"] == "skipped" and "GRAYSCALE input" in client["reason"]
    client = _check(rgb_classifier, replace(RGB, content=TensorContent.feature, color_space=ColorSpace.UNKNOWN),
                    (16, 16, 3))
    assert client["status"] == "skipped" and "not described as an image" in client["reason"]


def test_mobilenet_v2_as_delivered_passes_the_client_check(tmp_path):
    """The bundled MobileNetV2 (random weights, logits) with its conf file's metadata."""
    import tensorflow as tf

    from pipeline import config, examples
    from tests.conftest import ROOT

    examples.build_example("mobilenet_v2", tmp_path / "mobilenet_v2")
    float_model = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "mobilenet_v2" / "saved_model")).convert()
    (entry,) = config.validate(__import__("yaml").safe_load(config.compose(["model=[mobilenet_v2]"],
                                                                          conf_dir=ROOT / "conf")),
                               file="params.yaml").model["mobilenet_v2"].metadata.inputs
    client = _check(float_model, entry, (224, 224, 3))
    assert client["status"] == "passed" and client["top1_agreement"] == 1.0, client


def test_a_quantized_classifier_passes_though_runtimes_differ(rgb_classifier):
    """MediaPipe's kernels for quantized ops are not XNNPACK's: its scores differ a little from
    the pipeline's, and a top-1 within that difference still agrees; the scores must match."""
    from pipeline.config import Backend, QuantizationConfig
    from pipeline.quantize import quantize

    dynamic = quantize(rgb_classifier, QuantizationConfig(backend=Backend.litert_quantizer, recipe="dynamic_wi8_afp32"),
                       samples=None, make_converter=None).model
    client = _check(dynamic, RGB, (16, 16, 3))
    assert client["status"] == "passed" and client["top1_agreement"] == 1.0, client
    assert 0.95 <= client["min_score_cosine"] <= 1.0 and client["same_top1"] <= 16


def test_mediapipe_loads_without_tensorflow_and_matplotlib_which_stay_importable():
    """Held off while MediaPipe loads (8.7 s and 0.8 s of a validate stage), real afterwards."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys\n"
            "from pipeline.validate.clients import _import_mediapipe\n"
            "_import_mediapipe()\n"
            "assert 'tensorflow' not in sys.modules and 'matplotlib' not in sys.modules, 'imported'\n"
            "import matplotlib.pyplot\n"
            "assert callable(matplotlib.pyplot.figure)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
