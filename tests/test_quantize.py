"""Quantization backends on a tiny conv + dense model (weights dominate its size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from pipeline.config import LITERT_RECIPES, Backend, ConverterMode, IoType, QuantizationConfig
from pipeline.datasets import Samples
from pipeline.errors import ConfigError, InputError, PipelineError
from pipeline.quantize import calibrate, needs_calibration, quantize, uses_shared_calibration

INPUT_SHAPE = (16, 16, 3)
NUM_CLASSES = 10
KEY = "quantization.test"

# The quantizer's calibrator deliberately runs the interpreter with all tensors preserved.
pytestmark = pytest.mark.filterwarnings("ignore:.*experimental_preserve_all_tensors:UserWarning")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    outputs = keras.layers.Dense(NUM_CLASSES)(x)
    path = tmp_path_factory.mktemp("tiny") / "saved_model"
    keras.Model(inputs, outputs).export(str(path), verbose=False)
    return path


@pytest.fixture(scope="module")
def make_converter(saved_model):
    import tensorflow as tf

    def make():
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
        converter.exclude_conversion_metadata = True  # ConversionConfig's default
        return converter

    return make


@pytest.fixture(scope="module")
def float_model(make_converter) -> bytes:
    return make_converter().convert()


@pytest.fixture(scope="module")
def samples() -> Samples:
    inputs = np.random.default_rng(0).uniform(size=(16, *INPUT_SHAPE)).astype(np.float32)
    return Samples({"image": inputs})


def run(model: bytes, x: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    """Outputs (dequantized to float) for one float input, and the model's input dtype."""
    runner = Interpreter(model_content=model).get_signature_runner()
    ((name, detail),) = runner.get_input_details().items()
    if detail["dtype"] != np.float32:
        scale, zero_point = detail["quantization"]
        x = np.round(x / scale + zero_point).astype(detail["dtype"])
    (output,) = runner(**{name: x}).values()
    (out_detail,) = runner.get_output_details().values()
    if out_detail["dtype"] != np.float32:
        scale, zero_point = out_detail["quantization"]
        output = (output.astype(np.float32) - zero_point) * scale
    return output, detail["dtype"]


def litert(recipe: str, io: str = "float32") -> QuantizationConfig:
    return QuantizationConfig(
        backend=Backend.litert_quantizer,
        recipe=recipe,
        inference_input_type=IoType(io),
        inference_output_type=IoType(io),
    )


def converter(mode: str, io: str = "float32") -> QuantizationConfig:
    return QuantizationConfig(
        backend=Backend.converter,
        mode=ConverterMode(mode),
        inference_input_type=IoType(io),
        inference_output_type=IoType(io),
    )


# Largest size / float size expected: int8 weights ~0.25-0.3, int4 ~0.15, float16 ~0.5.
MAX_SIZE_RATIO = {
    "dynamic_wi8_afp32": 0.35,
    "weight_only_wi8_afp32": 0.35,
    "weight_only_wi4_afp32": 0.2,
    "static_wi8_ai8": 0.35,
    "static_wi8_ai16": 0.35,
}
VARIANTS = [pytest.param(litert(recipe), MAX_SIZE_RATIO[recipe], id=recipe) for recipe in LITERT_RECIPES] + [
    pytest.param(litert("static_wi8_ai8", "int8"), 0.35, id="static_wi8_ai8-io-int8"),
    pytest.param(litert("static_wi8_ai8", "uint8"), 0.35, id="static_wi8_ai8-io-uint8"),
    pytest.param(litert("static_wi8_ai16", "int16"), 0.35, id="static_wi8_ai16-io-int16"),
    pytest.param(converter("dynamic"), 0.35, id="converter-dynamic"),
    pytest.param(converter("float16"), 0.55, id="converter-float16"),
    pytest.param(converter("int8"), 0.35, id="converter-int8"),
    pytest.param(converter("int8", "int8"), 0.35, id="converter-int8-io-int8"),
    pytest.param(converter("int8", "uint8"), 0.35, id="converter-int8-io-uint8"),
    pytest.param(converter("int16x8"), 0.4, id="converter-int16x8"),
    pytest.param(converter("int16x8", "int16"), 0.4, id="converter-int16x8-io-int16"),
]


@pytest.mark.parametrize("variant, max_ratio", VARIANTS)
def test_variant_runs_is_smaller_and_deterministic(variant, max_ratio, float_model, samples, make_converter):
    first = quantize(float_model, variant, samples=samples, make_converter=make_converter, key=KEY)
    again = quantize(float_model, variant, samples=samples, make_converter=make_converter, key=KEY)

    assert first.model == again.model, "same inputs must give byte-identical models"
    assert len(first.model) <= max_ratio * len(float_model)
    x = samples.inputs["image"][:1]
    output, input_dtype = run(first.model, x)
    assert output.shape == (1, NUM_CLASSES) and np.isfinite(output).all()
    assert input_dtype == np.dtype(variant.inference_input_type.value)
    reference, _ = run(float_model, x)
    assert np.corrcoef(output.ravel(), reference.ravel())[0, 1] > 0.9  # still the same function
    json.dumps(first.info)
    assert first.info["backend"] == variant.backend.value and first.info["bytes"] == len(first.model)


def test_backend_none_returns_the_float_model(float_model):
    result = quantize(float_model, QuantizationConfig(), samples=None, make_converter=None)
    assert result.model is float_model and result.info["size_ratio"] == 1.0


@pytest.mark.parametrize("recipe", ["static_wi8_ai8", "static_wi8_ai16"])
def test_shared_calibration_gives_the_inline_model(recipe, float_model, samples):
    # One calibration (made with the ai8 recipe, through JSON) serves both static recipes.
    calibration = json.loads(json.dumps(calibrate(float_model, samples)))
    variant = litert(recipe)
    assert uses_shared_calibration(variant, key=KEY)
    shared = quantize(float_model, variant, samples=None, make_converter=None, calibration=calibration, key=KEY)
    inline = quantize(float_model, variant, samples=samples, make_converter=None, key=KEY)
    assert shared.model == inline.model
    assert shared.info["calibration"] == "reused" and inline.info["calibration"] == "inline"
    assert shared.info["calibration_samples_sha256"] == samples.sha256


@pytest.mark.parametrize("recipe", ["static_wi8_ai8", "static_wi8_ai16"])
def test_min_max_calibrated_by_the_profiler_quantizes_as_keeping_every_tensor_does(recipe, float_model, samples):
    """Min/max recipes calibrate with the interpreter's profiler (3-10x faster here): the same
    quantized bytes as the quantizer's default mode, which keeps every tensor for Python."""
    from litert_quantizer import calibrator
    from litert_quantizer.quantizer import Quantizer

    from pipeline.quantize import litert as litert_backend

    variant = litert(recipe)
    ours = quantize(float_model, variant, samples=samples, make_converter=None, key=KEY).model
    full_recipe = litert_backend.load_recipe(recipe, key=KEY) + litert_backend._io_entries(variant)
    kept = calibrator.Calibrator(float_model, qsv_update_func=litert_backend.full_range_update,
                                 mode=calibrator.CalibrationMode.CALIBRATION_PRESERVE_ALL_TENSORS)
    for index in range(len(samples)):
        kept.calibrate({"serving_default": [samples.sample(index)]}, litert_backend._recipe_manager(full_recipe))
    expected = Quantizer(float_model, full_recipe).quantize(kept.get_model_qsvs(), enable_progress_report=False)
    assert ours == bytes(expected.quantized_model)


def test_stale_or_malformed_calibration_is_refused(float_model, samples):
    variant = litert("static_wi8_ai8")
    calibration = calibrate(float_model, samples)
    calibration["metadata"]["float_model_sha256"] = "0" * 64
    with pytest.raises(InputError, match="different float model"):
        quantize(float_model, variant, samples=None, make_converter=None, calibration=calibration)
    with pytest.raises(InputError, match="malformed calibration"):
        quantize(float_model, variant, samples=None, make_converter=None, calibration={"model_qsvs": {}})


def test_only_static_litert_recipes_share_calibration(float_model, samples):
    assert not uses_shared_calibration(litert("dynamic_wi8_afp32"), key=KEY)
    with pytest.raises(ConfigError, match="nothing to share"):
        calibrate(float_model, samples, "dynamic_wi8_afp32")
    assert not uses_shared_calibration(converter("int8"), key=KEY)
    own_samples = QuantizationConfig(backend=Backend.litert_quantizer, recipe="static_wi8_ai8", num_samples=50)
    assert not uses_shared_calibration(own_samples, key=KEY)


@pytest.mark.parametrize(
    "variant, expected",
    [
        pytest.param(QuantizationConfig(), False, id="none"),
        *[pytest.param(litert(recipe), recipe.startswith("static"), id=recipe) for recipe in LITERT_RECIPES],
        *[pytest.param(converter(mode.value), mode.value.startswith("int"), id=mode.value) for mode in ConverterMode],
    ],
)
def test_needs_calibration(variant, expected):
    assert needs_calibration(variant, key=KEY) is expected


def test_custom_json_recipe(tmp_path, float_model):
    recipe = tmp_path / "weights_int8.json"
    op_config = {
        "weight_tensor_config": {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"},
        "compute_precision": "FLOAT",
        "explicit_dequantize": True,
    }
    entry = {"regex": ".*", "operation": "*", "algorithm_key": "min_max_uniform_quantize", "op_config": op_config}
    recipe.write_text(json.dumps([entry]))
    result = quantize(float_model, litert(str(recipe)), samples=None, make_converter=None, key=KEY)
    assert len(result.model) < 0.35 * len(float_model)
    assert result.info["recipe"] == str(recipe) and len(result.info["recipe_sha256"]) == 64


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("[{", id="not-json"),
        pytest.param('{"regex": ".*"}', id="not-a-list"),
        pytest.param("[]", id="empty"),
        pytest.param('[{"regex": ".*"}]', id="missing-keys"),
        pytest.param(
            '[{"regex": ".*", "operation": "*", "algorithm_key": "no_such_algorithm", "op_config": {}}]',
            id="unknown-algorithm",
        ),
    ],
)
def test_malformed_json_recipe_is_a_config_error(tmp_path, float_model, content):
    recipe = tmp_path / "bad.json"
    recipe.write_text(content)
    with pytest.raises(ConfigError) as error:
        quantize(float_model, litert(str(recipe)), samples=None, make_converter=None, key=KEY)
    assert error.value.file == str(recipe) and error.value.key.startswith(f"{KEY}.recipe")  # or the entry's key


def test_missing_recipe_file_is_a_config_error(tmp_path, float_model):
    with pytest.raises(ConfigError, match="cannot read recipe"):
        quantize(float_model, litert(str(tmp_path / "absent.json")), samples=None, make_converter=None, key=KEY)


@pytest.mark.parametrize("variant", [litert("static_wi8_ai8"), converter("int8"), converter("int16x8")])
def test_calibrating_variants_need_samples(variant, float_model, make_converter):
    with pytest.raises(ConfigError, match="needs representative samples") as error:
        quantize(float_model, variant, samples=None, make_converter=make_converter, key=KEY)
    assert error.value.key == KEY


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(converter("dynamic", "int8"), id="converter-dynamic-int8"),
        pytest.param(converter("float16", "int8"), id="converter-float16-int8"),
        pytest.param(converter("int8", "int16"), id="converter-int8-int16"),
        pytest.param(converter("int16x8", "int8"), id="converter-int16x8-int8"),
        pytest.param(litert("dynamic_wi8_afp32", "int8"), id="litert-dynamic-int8"),
    ],
)
def test_unsupported_io_types_are_config_errors(variant, float_model, samples, make_converter):
    with pytest.raises(ConfigError) as error:
        quantize(float_model, variant, samples=samples, make_converter=make_converter, key=KEY)
    assert error.value.key == f"{KEY}.inference_input_type"


def test_quantizer_failure_is_a_one_line_pipeline_error():
    with pytest.raises(PipelineError) as error:
        quantize(b"not a flatbuffer", litert("dynamic_wi8_afp32"), samples=None, make_converter=None, key=KEY)
    assert "LiteRT Quantizer failed" in str(error.value) and "\n" not in str(error.value)


def test_litert_backend_does_not_import_tensorflow(float_model, tmp_path):
    model = tmp_path / "float.tflite"
    model.write_bytes(float_model)
    code = (
        "import sys, pathlib, numpy as np\n"
        "from pipeline.config import Backend, QuantizationConfig\n"
        "from pipeline.datasets import Samples\n"
        "from pipeline.quantize import quantize\n"
        "variant = QuantizationConfig(backend=Backend.litert_quantizer, recipe='static_wi8_ai8')\n"
        f"samples = Samples({{'image': np.ones((2, *{INPUT_SHAPE}), np.float32)}})\n"
        f"quantize(pathlib.Path({str(model)!r}).read_bytes(), variant, samples=samples, make_converter=None)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_static_calibration_covers_every_samples_range(tmp_path):
    """The quantizer's default moving average (0.95 per sample) keeps the recent samples' range:
    a scalar regression output then collapses to about one value. Min/max recipes here take the
    range of every calibration sample, as the converter does."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(1, name="score")(keras.layers.Dense(8, activation="relu")(inputs)))
    model.export(str(tmp_path / "sm"), verbose=False)
    float_model = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm")).convert()
    features = np.random.default_rng(0).normal(scale=3.0, size=(128, 4)).astype(np.float32)
    expected = model.predict(features, verbose=0)

    calibration = calibrate(float_model, Samples({"features": features[:100]}), key=KEY)
    (output,) = Interpreter(model_content=float_model).get_output_details()
    qsv = calibration["model_qsvs"][output["name"]]
    low, high = float(np.min(qsv["min"])), float(np.max(qsv["max"]))
    assert low <= float(expected[:100].min()) + 1e-4 and high >= float(expected[:100].max()) - 1e-4

    static = quantize(float_model, litert("static_wi8_ai8"), samples=Samples({"features": features[:100]}),
                      make_converter=None, key=KEY).model
    runner = Interpreter(model_content=static).get_signature_runner()
    (got,) = runner(features=features[100:]).values()
    noise = np.sum((got - expected[100:]) ** 2)
    assert 10 * np.log10(np.sum(expected[100:] ** 2) / noise) > 25  # dB: 31.7 here; the moving average gave 0.1


ALGORITHM_RECIPE = """[{{"regex": ".*", "operation": "*", "algorithm_key": "{algorithm}", "op_config": {{
  "weight_tensor_config": {{"num_bits": 8, "symmetric": true, "granularity": "CHANNELWISE", "dtype": "INT"}},
  "activation_tensor_config": {{"num_bits": 8, "symmetric": false, "granularity": "TENSORWISE", "dtype": "INT"}},
  "compute_precision": "INTEGER", "explicit_dequantize": false}}}}]"""


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    """A scalar regression head (features ~ N(0, 3)): its float model, inputs and outputs."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(1, name="score")(keras.layers.Dense(8, activation="relu")(inputs)))
    folder = tmp_path_factory.mktemp("regression") / "sm"
    model.export(str(folder), verbose=False)
    features = np.random.default_rng(0).normal(scale=3.0, size=(128, 4)).astype(np.float32)
    return tf.lite.TFLiteConverter.from_saved_model(str(folder)).convert(), features, model.predict(features, verbose=0)


@pytest.mark.parametrize("algorithm", ["min_max_uniform_quantize", "MSE", "OCTAV", "GPTQ"])
def test_every_calibrating_algorithm_sees_the_full_range(algorithm, regression, tmp_path):
    """The quantizer's moving average is every algorithm's default, not min/max's alone: on this
    head each of min/max, MSE, OCTAV and GPTQ static gave 0.1 dB with it, and 31.5-31.7 dB with
    the full range every recipe now calibrates on."""
    float_model, features, expected = regression
    recipe = tmp_path / "recipe.json"
    recipe.write_text(ALGORITHM_RECIPE.format(algorithm=algorithm))
    variant = QuantizationConfig(backend=Backend.litert_quantizer, recipe=str(recipe))
    static = quantize(float_model, variant, samples=Samples({"features": features[:100]}), make_converter=None,
                      key=KEY).model
    (got,) = Interpreter(model_content=static).get_signature_runner()(features=features[100:]).values()
    snr = 10 * np.log10(np.sum(expected[100:] ** 2) / np.sum((got - expected[100:]) ** 2))
    assert snr > 25, f"{algorithm}: {snr:.1f} dB"


def test_float16_through_the_quantizer_matches_the_converters(float_model, samples, make_converter):
    """LiteRT Quantizer's float casting gives float16 weights without TensorFlow: no larger
    than the converter's float16 and as close to the float model."""
    from tests.conftest import ROOT

    recipe = str(ROOT / "conf/recipes/weight_only_wf16_afp32.json")
    cast = quantize(float_model, QuantizationConfig(backend=Backend.litert_quantizer, recipe=recipe), samples=None,
                    make_converter=None, key=KEY).model
    converted = quantize(float_model, converter("float16"), samples=None, make_converter=make_converter, key=KEY).model
    x = samples.inputs["image"][:16]
    reference = np.concatenate([run(float_model, x[i:i + 1])[0] for i in range(16)])

    def snr_db(model: bytes) -> float:
        output = np.concatenate([run(model, x[i:i + 1])[0] for i in range(16)])
        return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((output - reference) ** 2), 1e-30)))

    assert len(cast) <= len(converted) < len(float_model)
    assert snr_db(cast) >= snr_db(converted) - 1.0 and snr_db(cast) > 60


def test_the_recipe_check_knows_the_installed_quantizers_algorithms():
    from litert_quantizer.algorithm_manager import AlgorithmName

    from pipeline.config import QUANTIZER_ALGORITHMS

    assert sorted(QUANTIZER_ALGORITHMS) == sorted(a.value for a in AlgorithmName)
