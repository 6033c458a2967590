"""Validation of LiteRT models against their TensorFlow source, on a tiny trained classifier."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Backend, IoType, QuantizationConfig, RuntimeConfig, RuntimeKind, ValidationConfig
from pipeline.datasets import Samples
from pipeline.errors import EXIT_GATE
from pipeline.validate import to_csv, to_markdown, validate
from pipeline.validate.runtime import _analyzer_warnings

FEATURES = 16
CLASSES = 4
REPO = Path(__file__).resolve().parents[1]
# params.yaml's `classifier` gates plus an SNR floor; few latency runs to stay fast.
GATES = ValidationConfig(max_accuracy_drop=0.02, min_cosine=0.95, min_snr_db=10.0, latency_runs=5, warmup_runs=1)
NO_GATES = ValidationConfig(latency_runs=5, warmup_runs=1)


def draw(rng: np.random.Generator, centers: np.ndarray, count: int) -> Samples:
    labels = rng.integers(0, CLASSES, count)
    inputs = centers[labels] + rng.normal(size=(count, FEATURES))
    return Samples({"features": inputs.astype(np.float32)}, {"output_0": labels})


@pytest.fixture(scope="module")
def data() -> tuple[Samples, Samples]:
    """(training, evaluation) samples: Gaussian blobs, one per class."""
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=0.8, size=(CLASSES, FEATURES))  # overlapping: ~93% accuracy
    return draw(rng, centers, 1024), draw(rng, centers, 200)


@pytest.fixture(scope="module")
def keras_model(data):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((FEATURES,), name="features"),
        keras.layers.Dense(32),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Dense(CLASSES, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    train, _ = data
    model.fit(train.inputs["features"], train.labels["output_0"], epochs=8, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def reference(keras_model, data) -> dict[str, np.ndarray]:
    """The source's outputs in inference mode, named as the evaluate stage names them."""
    _, evaluation = data
    return {"output_0": np.asarray(keras_model(evaluation.inputs["features"], training=False))}


@pytest.fixture(scope="module")
def float_model(keras_model) -> bytes:
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_keras_model(keras_model).convert()


@pytest.fixture(scope="module")
def training_mode_model(keras_model) -> bytes:
    """The classic bug: a concrete function calling the model with training=True, so
    BatchNormalization normalizes with each batch's statistics (converts without a SignatureDef)."""
    import tensorflow as tf

    # Weights as constants: stateless_call returns the moving-average updates instead of
    # assigning variables, which would not convert.
    trainable = [np.asarray(v) for v in keras_model.trainable_variables]
    non_trainable = [np.asarray(v) for v in keras_model.non_trainable_variables]

    @tf.function(input_signature=[tf.TensorSpec([None, FEATURES], tf.float32, name="features")])
    def serve(x):
        outputs, _ = keras_model.stateless_call(trainable, non_trainable, x, training=True)
        return outputs

    return tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()]).convert()


@pytest.fixture(scope="module")
def perturbed_model(float_model) -> bytes:
    """The float model with noise as large as its weights added to them after export."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(float_model)
    rng = np.random.default_rng(0)
    weights = {t.buffer for t in model.subgraphs[0].tensors if t.type == flatbuffer_utils.TensorType.FLOAT32}
    for index in weights:
        buffer = model.buffers[index]
        if buffer.data is not None and len(buffer.data):
            values = np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), np.float32)
            noisy = values + rng.normal(scale=values.std() + 1e-3, size=values.shape).astype(np.float32)
            buffer.data = np.frombuffer(noisy.tobytes(), np.uint8)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


@pytest.fixture(scope="module")
def select_ops_model() -> tuple[bytes, Samples, dict[str, np.ndarray]]:
    """A model needing a select TF op (Cosh is no builtin), its samples and reference outputs."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, FEATURES], tf.float32, name="features")])
    def serve(x):
        return tf.raw_ops.Cosh(x=x * 0.1)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    samples = Samples({"features": np.random.default_rng(1).normal(size=(8, FEATURES)).astype(np.float32)})
    return converter.convert(), samples, {"output_0": serve(samples.inputs["features"]).numpy()}


@pytest.fixture(scope="module")
def int8_model(float_model, data) -> bytes:
    """Full-integer (static int8) model with int8 inputs and outputs, from LiteRT Quantizer."""
    from pipeline.quantize import quantize

    variant = QuantizationConfig(backend=Backend.litert_quantizer, recipe="static_wi8_ai8",
                                 inference_input_type=IoType.int8, inference_output_type=IoType.int8)
    train, _ = data
    return quantize(float_model, variant, samples=train.take(slice(0, 128)), make_converter=None).model


def target_runtime(kind: str = "litert", min_runtime_version: str = "") -> RuntimeConfig:
    return RuntimeConfig(kind=RuntimeKind(kind), num_threads=1, min_runtime_version=min_runtime_version)


def run_validation(model: bytes, float_model: bytes, samples: Samples, reference, gates=GATES, runtime=None):
    return validate(model, float_model=float_model, samples=samples, reference=reference, gates=gates,
                    runtime=runtime or target_runtime())


def test_correct_conversion_passes_with_sane_metrics(float_model, data, reference):
    _, evaluation = data
    result = run_validation(float_model, float_model, evaluation, reference, runtime=target_runtime("gpu"))
    metrics = result.report["metrics"]
    assert result.failures == [] and result.report["passed"]
    assert metrics["cosine"] > 0.99999 and metrics["snr_db"] > 60
    assert metrics["source_accuracy"] > 0.9 and abs(metrics["accuracy_drop"]) < 1e-9
    assert metrics["size_ratio"] == 1.0 and 0 < metrics["latency_median_ms"] <= metrics["latency_p90_ms"]
    assert result.report["run"]["signature"] == "serving_default" and result.report["run"]["batch_size"] == 1
    assert result.report["run"]["outputs_api"] == "CompiledModel" and "outputs_fallback" not in result.report["run"]
    assert result.report["run"]["latency_api"] == "CompiledModel" and "latency_fallback" not in result.report["run"]
    assert result.report["runtime"]["gpu"]["incompatible"] == []
    assert result.report["layer_errors"]["reason"].startswith("not a static integer model")
    json.dumps(result.report, allow_nan=False)  # strict JSON: DVC reads it as metrics
    assert "PASSED" in to_markdown(result.report)


def test_training_mode_batchnorm_fails_accuracy_and_cosine(training_mode_model, float_model, data, reference):
    _, evaluation = data
    result = run_validation(training_mode_model, float_model, evaluation, reference)
    run, metrics = result.report["run"], result.report["metrics"]
    # Batched, batch statistics look like the moving averages; one sample at a time (as on
    # device) they collapse: the batch check must catch it and fall back to batch size 1.
    assert run["signature"] is None and run["batch_dependent"] and run["batch_size"] == 1
    assert metrics["accuracy"] < 0.5
    failed = {message.split()[0] for message in result.failures}
    assert {"accuracy_drop", "cosine", "snr_db"} <= failed
    drop = next(m for m in result.failures if m.startswith("accuracy_drop"))
    assert drop == f"accuracy_drop {metrics['accuracy_drop']:.4g} > max_accuracy_drop 0.02"
    assert "FAILED" in to_markdown(result.report)


def test_perturbed_weights_fail_cosine(perturbed_model, float_model, data, reference):
    _, evaluation = data
    result = run_validation(perturbed_model, float_model, evaluation, reference)
    cosine = result.report["metrics"]["cosine"]
    assert f"cosine {cosine:.4g} < min_cosine 0.95" in result.failures
    assert any(m.startswith("accuracy_drop ") for m in result.failures)


@pytest.mark.parametrize("kind, violation", [
    ("litert", None),
    ("play_services", "select_tf_ops FlexCosh not allowed by runtime play_services"),
    ("builtin_only", "select_tf_ops FlexCosh not allowed by runtime builtin_only"),
    ("gpu", "gpu_incompatible_ops FlexCosh not supported by the GPU delegate"),
])
def test_select_tf_ops_fail_builtin_runtimes_only(select_ops_model, kind, violation):
    model, samples, reference = select_ops_model
    result = run_validation(model, model, samples, reference, gates=NO_GATES, runtime=target_runtime(kind))
    assert result.failures == ([violation] if violation else [])
    # The interpreter has no Flex delegate: the checks above are static, numbers are missing.
    assert "Flex delegate" in result.report["run"]["error"]


def test_unmeasurable_gate_fails(select_ops_model):
    model, samples, reference = select_ops_model
    result = run_validation(model, model, samples, reference, gates=ValidationConfig(min_cosine=0.9))
    (failure,) = result.failures
    assert failure.startswith("cosine unverifiable (select TF ops FlexCosh need the Flex delegate")
    assert "for min_cosine 0.9: set accept_unverified: true" in failure
    assert result.report["verification"] == "unverified"


def test_compiled_model_outputs_are_the_interpreters(float_model, int8_model, data):
    """Validation reads outputs through the CompiledModel API (one sample at a time) and the
    interpreter (batched) gives the same numbers, for float and for integer inputs/outputs."""
    from pipeline.validate.runner import run_samples

    _, evaluation = data
    for model in (float_model, int8_model):
        compiled = run_samples(model, evaluation, num_threads=1, signature_key="serving_default", compiled=True)
        interpreted = run_samples(model, evaluation, num_threads=1, signature_key="serving_default")
        assert compiled.api == "CompiledModel" and interpreted.api == "Interpreter"
        for name, values in interpreted.outputs.items():
            np.testing.assert_allclose(compiled.outputs[name], values, rtol=1e-5, atol=1e-6)


def test_latency_falls_back_to_the_interpreter_with_the_reason():
    """A model the CompiledModel API cannot run by name (no signature: a legacy conversion) is
    timed through the interpreter, and the report says so and why."""
    import tensorflow as tf

    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x * 2.0}, input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    model = tf.lite.TFLiteConverter.from_concrete_functions([module.f.get_concrete_function()]).convert()  # no module
    samples = Samples({"x": np.ones((3, 4), np.float32)})
    result = run_validation(model, model, samples, {"y": np.full((3, 4), 2.0, np.float32)})
    run = result.report["run"]
    assert run["signature"] is None and run["latency_api"] == "Interpreter" and "no signature" in run["latency_fallback"]
    assert run["outputs_api"] == "Interpreter" and "no signature" in run["outputs_fallback"]
    assert result.report["metrics"]["latency_median_ms"] > 0


def test_static_batch_model_runs_one_sample_at_a_time():
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, FEATURES], tf.float32, name="features")])
    def serve(x):
        return tf.nn.relu(x) * 2.0

    model = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()]).convert()
    samples = Samples({"features": np.random.default_rng(2).normal(size=(5, FEATURES)).astype(np.float32)})
    reference = {"output_0": np.maximum(samples.inputs["features"], 0) * 2}
    result = run_validation(model, model, samples, reference, gates=ValidationConfig(min_cosine=0.999))
    assert result.failures == [] and result.report["run"]["batch_size"] == 1


def test_gpu_warnings_of_the_analyzer_are_parsed():
    # The format of analyzers that still check ops (TensorFlow <= 2.1x); today's print none.
    text = textwrap.dedent("""\
        Subgraph#0 main(T#0) -> [T#4]
          Op#0 FlexCosh(T#0) -> [T#2]
        GPU COMPATIBILITY WARNING: Not supported custom op FlexCosh
          Op#1 ADD(T#2, T#0) -> [T#4]

        GPU COMPATIBILITY WARNING: Subgraph#0 has GPU delegate compatibility issues at nodes 0
        """)
    assert _analyzer_warnings(text) == [{"op": "FlexCosh", "subgraph": 0, "node": 0, "source": "analyzer",
                                         "reason": "Not supported custom op FlexCosh"}]


def test_op_versions_newer_than_the_runtime_fail(float_model, data, reference):
    _, evaluation = data
    result = run_validation(float_model, float_model, evaluation, reference, gates=NO_GATES,
                            runtime=target_runtime(min_runtime_version="1.0.0"))
    (failure,) = result.failures
    required = result.report["runtime"]["op_versions"]["required"]
    assert failure.startswith(f"required_runtime_version {required} > min_runtime_version 1.0.0 (")
    assert "FULLY_CONNECTED v1" in failure


def test_int8_io_model_is_quantized_and_dequantized(int8_model, float_model, data, reference):
    _, evaluation = data
    result = run_validation(int8_model, float_model, evaluation, reference, gates=GATES)
    metrics = result.report["metrics"]
    assert result.report["run"]["input_dtypes"] == {"features": "int8"}
    assert result.report["run"]["latency_api"] == "CompiledModel", result.report["run"].get("latency_fallback")
    assert result.failures == [], result.failures
    assert metrics["cosine"] > 0.99 and abs(metrics["accuracy_drop"]) <= 0.02
    layers = result.report["layer_errors"]
    assert layers["reason"] is None and 0 < len(layers["worst"]) <= 10 and layers["num_samples"] == 32
    assert [row["snr_db"] for row in layers["worst"]] == sorted(row["snr_db"] for row in layers["worst"])
    csv_lines = to_csv(result.layer_errors).splitlines()
    assert csv_lines[0] == "tensor,kind,snr_db,cosine,mse" and len(csv_lines) == 1 + layers["num_tensors"]



def test_layer_errors_are_what_litert_quantizers_validator_measures(int8_model, float_model, data):
    """layer_errors measures as `compare_model` does (two interpreters per sample there, two for
    all samples here): the same tensors, kinds and mean MSE, SNR and cosine."""
    from litert_quantizer import model_validator
    from litert_quantizer.utils.validation_utils import ValidationErrorMetric as Metric

    from pipeline.validate.layers import layer_errors
    from pipeline.validate.metrics import snr_db

    _, evaluation = data
    subset = Samples({name: values[:5] for name, values in evaluation.inputs.items()})
    rows, reason = layer_errors(float_model, int8_model, subset, num_threads=1)
    assert reason is None and rows
    expected = model_validator.compare_model(
        float_model, int8_model, {"serving_default": [subset.sample(i) for i in range(5)]},
        [Metric.MSE, Metric.SNR, Metric.COSINE_SIMILARITY], num_threads=1,
    ).get_signature_comparison_result("serving_default")
    theirs = {name: (kind, values) for kind, tensors in (("intermediate", expected.intermediate_tensors),
                                                         ("output", expected.output_tensors))
              for name, values in tensors.items()}
    assert {row.tensor for row in rows} <= set(theirs) and any(row.kind == "output" for row in rows)
    for row in rows:
        kind, values = theirs[row.tensor]
        assert row.kind == kind
        assert row.mse == pytest.approx(values["mse"], rel=1e-4, abs=1e-9)
        assert row.cosine == pytest.approx(values["cosine_similarity"], rel=1e-4)
        assert row.snr_db == pytest.approx(snr_db(values["snr"], 1.0), rel=1e-4, abs=1e-6)


PARAMS = """
model:
  tiny:
    team: tests
    source: {{path: missing}}
    representative: {{dataset: noise}}
    evaluation: {{dataset: noise, allow_overlap: true}}
    runtime: cpu
    validation: classifier
    metadata:
      inputs: [{{name: x}}]
      outputs: [{{name: y}}]
build:
  tiny-float: {{model: tiny, variant: float}}
quantization:
  float: {{backend: none}}
dataset:
  noise: {{path: unused.npz, inputs_key: x, labels_key: y}}
runtime:
  cpu: {{kind: play_services, num_threads: 1}}
validation:
  classifier: {{max_accuracy_drop: 0.02, min_cosine: 0.95, max_size_ratio: 1.05, latency_runs: 5, warmup_runs: 1}}
tracking: {{enabled: false}}
"""


def test_stage_writes_reports_then_exits_with_every_failed_gate(
    tmp_path, perturbed_model, float_model, data, reference
):
    _, evaluation = data
    (tmp_path / "params.yaml").write_text(PARAMS.format(features=FEATURES))
    artifacts = tmp_path / "artifacts" / "tiny"
    artifacts.mkdir(parents=True)
    (artifacts / "float.tflite").write_bytes(float_model)
    (tmp_path / "broken.tflite").write_bytes(perturbed_model)
    np.savez(artifacts / "reference.npz", **{"input:features": evaluation.inputs["features"],
                                             "label:output_0": evaluation.labels["output_0"]},
             **{f"output:{k}": v for k, v in reference.items()})

    def stage(model: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "stages" / "validate.py"), "tiny-float", "--model", model],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    reports = tmp_path / "reports" / "tiny" / "float"
    passed = stage("artifacts/tiny/float.tflite")
    assert passed.returncode == 0, passed.stderr
    assert json.loads((reports / "validation.json").read_text())["passed"]

    failed = stage("broken.tflite")
    assert failed.returncode == EXIT_GATE
    error = failed.stderr.strip().splitlines()[-1]
    report = json.loads((reports / "validation.json").read_text())
    assert not report["passed"] and report["model_path"] == "broken.tflite"
    report_path = Path("reports/tiny/float/validation.json")
    assert error == f"error: {report_path}: tiny-float failed validation: " + "; ".join(report["failures"])
    assert "accuracy_drop" in error and "> max_accuracy_drop 0.02" in error and "< min_cosine 0.95" in error
    assert "FAILED" in (reports / "validation.md").read_text()
    assert (reports / "layer_errors.csv").read_text() == "tensor,kind,snr_db,cosine,mse\n"


def test_user_task_metric_by_reference_is_computed_and_gated(float_model, perturbed_model, data, reference):
    _, evaluation = data
    gates = ValidationConfig(task_metric="pipeline.task_metrics:top5_accuracy", max_task_metric_drop=0.0,
                             latency_runs=2, warmup_runs=1)
    metrics = run_validation(float_model, float_model, evaluation, reference, gates=gates).report["metrics"]
    assert metrics["task_metric"] == metrics["source_task_metric"] == 1.0  # 4 classes: top-5 is always right
    assert metrics["task_metric_drop"] == 0.0


def test_task_metric_outside_the_project_is_refused(float_model, data, reference):
    from pipeline.errors import ConfigError

    _, evaluation = data
    gates = ValidationConfig(task_metric="os:getcwd", latency_runs=2, warmup_runs=1)
    with pytest.raises(ConfigError, match="validation.task_metric"):
        run_validation(float_model, float_model, evaluation, reference, gates=gates)


def test_a_one_value_output_is_compared_as_a_column_not_by_its_sign():
    from pipeline.validate.metrics import compare

    reference = np.linspace(0.5, 2.0, 50)[:, None]
    close = reference * 1.01
    flipped = reference.copy()
    flipped[0] = -flipped[0]  # one sample's sign: per-sample cosine would be -1 for it
    assert compare(close, reference)["cosine"] > 0.9999
    assert 0.9 < compare(flipped, reference)["cosine"] < 1.0 and compare(flipped, reference)["cosine_min"] > 0.9


def test_validate_build_keeps_litert_benchmark_tools_json(float_model):
    """The wheel's own benchmark tool runs the delivered model (CompiledModel, CPU) in a child
    process; its JSON results are kept in the report, and a model it cannot run says why."""
    from pipeline.validate.runner import benchmark_tool

    result = benchmark_tool(float_model, signature="serving_default", num_threads=1, runs=5, warmup=1)
    assert result["latency"]["num_runs"] == 5 and result["latency"]["median_ms"] >= 0
    assert result["accelerators"] == ["CPU"] and result["signature"] == "serving_default" and "model" not in result
    broken = benchmark_tool(b"not a model", signature=None, num_threads=1, runs=1, warmup=1)
    assert "latency" not in broken and broken["error"]


def test_the_benchmark_tools_failure_on_ids_says_why():
    """The tool fills integer inputs with random values in -128..127: embedding ids out of
    range fail its invoke. The report says so (our latency, on real samples, still gates)."""
    import keras
    import tensorflow as tf

    from pipeline.validate.runner import benchmark_tool

    ids = keras.Input((4,), dtype="int32", name="ids")
    model = keras.Model(ids, keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Embedding(3, 2)(ids))))
    tflite = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    result = benchmark_tool(tflite, signature=None, num_threads=1, runs=1, warmup=1)
    assert "latency" not in result
    assert "feeds integer inputs (ids) random values in -128..127" in result["error"], result
    # int64 ids: the tool's CompiledModel takes no such input at all; the values are not to blame.
    ids64 = tf.TensorSpec([1, 4], tf.int64, name="ids")
    table = tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    gather = tf.function(lambda ids: {"y": tf.reduce_sum(tf.gather(table, ids), axis=1)}, input_signature=[ids64])
    tflite = tf.lite.TFLiteConverter.from_concrete_functions([gather.get_concrete_function()]).convert()
    result = benchmark_tool(tflite, signature=None, num_threads=1, runs=1, warmup=1)
    assert "Unsupported dtype: int64" in result["error"] and "random values" not in result["error"], result
