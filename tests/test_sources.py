"""Sources of every format load, convert to float .tflite and evaluate (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConversionConfig, DataRef, ModelConfig, OpsSet, SourceConfig, SourceFormat
from pipeline.convert import convert_float
from pipeline.datasets import ONLY, Samples, bind
from pipeline.errors import ConfigError, GateError, InputError
from pipeline.evaluate import BUILTIN_PATHS, Evaluation, evaluate, host_support
from pipeline.sources import load_source, resolve_factory
from pipeline.tflite_model import op_uses
from tests.conftest import tiny_keras_model

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    model = tiny_keras_model()
    model.export(str(root / "saved_model"), verbose=False)
    model.save(root / "model.keras")
    model.save(root / "model.h5")
    return root, model


def model_config(fmt: SourceFormat, path, **source) -> ModelConfig:
    return ModelConfig(
        team="t",
        source=SourceConfig(format=fmt, path=str(path), **source),
        evaluation=DataRef(dataset="d", num_samples=4),
    )


IMAGES = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)


def evaluate_source(source, cfg, samples, converted) -> Evaluation:
    bound = bind(samples, source.inputs, source.outputs, key="dataset.d")
    return evaluate(source, "m", bound, op_uses(converted.model), source_path=cfg.source.path, flags={})


@pytest.mark.parametrize(
    ("fmt", "file", "path_name"),
    [
        (SourceFormat.saved_model, "saved_model", "from_saved_model"),
        (SourceFormat.keras, "model.keras", "keras_export_saved_model"),
        (SourceFormat.h5, "model.h5", "keras_export_saved_model"),
    ],
)
def test_formats_convert_and_match_keras(sources, fmt, file, path_name):
    root, keras_model = sources
    cfg = model_config(fmt, root / file)
    source = load_source(cfg, "m")
    assert source.conversion_path == path_name
    assert [i.shape for i in source.inputs] == [[None, 8, 8, 1]]
    converted = convert_float(source, cfg, "m")
    assert converted.info["conversion_path"] == path_name
    assert {u.name for u in op_uses(converted.model)} >= {"CONV_2D", "FULLY_CONNECTED"}
    result = evaluate_source(source, cfg, Samples({ONLY: IMAGES}, {ONLY: np.arange(4)}), converted)
    (outputs,) = result.reference_outputs.values()
    np.testing.assert_allclose(outputs, keras_model(IMAGES).numpy(), atol=1e-5)
    assert {op["name"] for op in result.report["ops"]["used"]} >= {"CONV_2D", "FULLY_CONNECTED"}


def test_converter_is_handed_the_loaded_saved_model_and_converts_the_same_bytes(sources, monkeypatch):
    import contextlib

    from tensorflow.lite.python import lite

    from pipeline import sources as sources_module

    root, _ = sources
    cfg = model_config(SourceFormat.saved_model, root / "saved_model")
    original = lite._load
    loads = []
    monkeypatch.setattr(lite, "_load", lambda *args, **kwargs: loads.append(args) or original(*args, **kwargs))
    with monkeypatch.context() as plain:
        plain.setattr(sources_module, "_handing_over", lambda loaded, path: contextlib.nullcontext())
        expected = convert_float(load_source(cfg, "m"), cfg, "m").model
    assert len(loads) == 2  # what TF Lite does alone: from_saved_model loads, then convert() again
    loads.clear()
    assert convert_float(load_source(cfg, "m"), cfg, "m").model == expected
    assert loads == []  # handed over instead
    lite._load(str(root / "saved_model"), {"serve"})  # and TF Lite's loader is its own again afterwards
    assert len(loads) == 1


def test_concrete_function_factory(sources, tmp_path):
    root, keras_model = sources
    weights = tmp_path / "tiny.weights.h5"
    keras_model.save_weights(weights)
    cfg = model_config(
        SourceFormat.concrete_function, weights, factory="tests.test_sources:tiny_concrete_functions"
    )
    with pytest.raises(ConfigError, match="without trust"):
        load_source(cfg, "m")
    cfg.source.trusted = True
    source = load_source(cfg, "m")
    assert source.conversion_path == "from_concrete_functions"
    (outputs,) = source.call({source.inputs[0].name: IMAGES}).values()
    np.testing.assert_allclose(outputs, keras_model(IMAGES).numpy(), atol=1e-5)
    assert convert_float(source, cfg, "m").model[4:8] == b"TFL3"


def tiny_concrete_functions(path: str):
    model = tiny_keras_model()
    model.load_weights(path)
    function = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32)])
    return [function.get_concrete_function()]


def test_select_tf_ops_are_named_with_the_key_that_allows_them(tmp_path):
    class Determinant(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3, 3], tf.float32, name="x")])
        def __call__(self, x):
            return {"det": tf.linalg.det(x)}

    module = Determinant()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.__call__})
    cfg = model_config(SourceFormat.saved_model, tmp_path / "sm")
    source = load_source(cfg, "m")
    with pytest.raises(GateError) as failure:
        convert_float(source, cfg, "m")
    assert failure.value.one_line() == (
        "params.yaml: ops FlexMatrixDeterminant need select TF ops: add select_tf_ops to model.m.conversion.ops"
    )
    cfg.conversion = ConversionConfig(ops=[OpsSet.builtins, OpsSet.select_tf_ops])
    converted = convert_float(source, cfg, "m")
    result = evaluate_source(source, cfg, Samples({"x": np.eye(3, dtype=np.float32)[None].repeat(2, 0)}), converted)
    assert {op["kind"] for op in result.report["ops"]["used"]} >= {"select_tf"}
    assert result.report["host"]["select_tf_ops"] == ["FlexMatrixDeterminant"]


def test_bad_sources_fail_with_one_line(tmp_path, sources):
    root, _ = sources
    with pytest.raises(InputError, match="does not exist"):
        load_source(model_config(SourceFormat.saved_model, tmp_path / "missing"), "m")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes((root / "saved_model" / "saved_model.pb").read_bytes()[:100])
    with pytest.raises(InputError, match="cannot load SavedModel"):
        load_source(model_config(SourceFormat.saved_model, broken), "m")
    not_zip = tmp_path / "model.keras"
    not_zip.write_text("not a zip")
    with pytest.raises(InputError, match="not a Keras archive"):
        load_source(model_config(SourceFormat.keras, not_zip), "m")
    with pytest.raises(ConfigError, match="signature_key"):
        load_source(model_config(SourceFormat.saved_model, root / "saved_model", signature_key="nope"), "m")


def test_untrusted_lambda_layer_is_refused(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda t: t * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "lambda.keras")
    with pytest.raises(InputError, match="trusted: true"):
        load_source(model_config(SourceFormat.keras, tmp_path / "lambda.keras"), "m")


def test_factory_references_resolve_only_inside_the_project():
    with pytest.raises(ConfigError, match="not 'module:function'"):
        resolve_factory("pipeline.examples", trusted=False, key="k")
    with pytest.raises(ConfigError, match="without trust"):
        resolve_factory("os:system", trusted=False, key="k")
    with pytest.raises(ConfigError, match="without trust"):  # a project function is not a factory
        resolve_factory("pipeline.io:write_text", trusted=False, key="k")
    with pytest.raises(ConfigError, match="has no function"):
        resolve_factory("pipeline.config:nothing_here", trusted=True, key="k")


def test_keras_inputs_are_fed_and_outputs_named_by_name_in_any_order(tmp_path):
    """Two inputs declared in non-alphabetical order, two list outputs: the signature and the
    reference outputs use the model's own names, and each input gets its own array."""
    image = keras.Input((4, 4, 1), name="image")
    features = keras.Input((3,), name="features")
    x = keras.layers.Concatenate()([keras.layers.Flatten()(image), features * 100.0])
    outputs = [keras.layers.Dense(5, activation="softmax", name="label")(x), keras.layers.Dense(1, name="score")(x)]
    model = keras.Model([image, features], outputs)
    model.save(tmp_path / "two.keras")
    cfg = model_config(SourceFormat.keras, tmp_path / "two.keras")
    source = load_source(cfg, "m")
    assert {t.name for t in source.inputs} == {"image", "features"}
    assert {t.name for t in source.outputs} == {"label", "score"}
    rng = np.random.default_rng(0)
    feed = {"image": rng.uniform(size=(2, 4, 4, 1)).astype(np.float32),
            "features": rng.uniform(size=(2, 3)).astype(np.float32)}
    got = source.call(feed)
    expected = model([feed["image"], feed["features"]])
    np.testing.assert_allclose(got["label"], expected[0], atol=1e-6)
    np.testing.assert_allclose(got["score"], expected[1], atol=1e-5)
    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_content=convert_float(source, cfg, "m").model).get_signature_list()
    assert signature == {"serving_default": {"inputs": ["features", "image"], "outputs": ["label", "score"]}}


@pytest.mark.parametrize("unroll", [False, True])
def test_keras_recurrent_layers_need_unroll_for_builtin_ops(tmp_path, unroll):
    """The measurement behind evaluate's hint (TensorFlow 2.21, Keras 3): an LSTM converts with
    builtin ops only when unrolled; otherwise its TensorList ops need select TF ops."""
    inputs = keras.Input((6, 4), name="rows")
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.LSTM(8, unroll=unroll)(inputs)))
    model.save(tmp_path / "lstm.keras")
    cfg = model_config(SourceFormat.keras, tmp_path / "lstm.keras")
    source = load_source(cfg, "m")
    if unroll:
        assert {u.kind for u in op_uses(convert_float(source, cfg, "m").model)} == {"builtin"}
        return
    with pytest.raises(GateError) as failure:
        convert_float(source, cfg, "m")
    assert "FlexTensorListReserve" in failure.value.message and "unroll=True" in failure.value.message
    cfg.conversion = ConversionConfig(ops=[OpsSet.builtins, OpsSet.select_tf_ops])
    host = host_support(op_uses(convert_float(source, cfg, "m").model))
    assert not host["executable_on_host"] and host["builtin_paths"] == [BUILTIN_PATHS["TensorList"]]


def test_no_other_project_function_can_be_named_by_an_untrusted_config():
    import importlib
    import inspect
    import pkgutil

    import pipeline
    from pipeline.config import TRUSTED_FUNCTIONS, TRUSTED_MODULES

    refused = 0
    for module_info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            reference = f"{module_info.name}:{name}"
            if not callable(value) or reference in TRUSTED_FUNCTIONS or module_info.name in TRUSTED_MODULES:
                continue
            with pytest.raises(ConfigError, match="without trust|not 'module:function'"):
                resolve_factory(reference, trusted=False, key="k")
            refused += 1
    assert refused > 200
    for reference in TRUSTED_FUNCTIONS:
        assert inspect.isfunction(resolve_factory(reference, trusted=False, key="k"))


def test_tensorflow_comes_without_what_its_import_pulls_in_for_features_never_used():
    """scikit-learn, matplotlib and JAX (1.7 s of TensorFlow's 4.4 s import, measured) are not
    imported with it, and stay importable afterwards: a concrete-function factory may use them."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.tensorflow_import import UNUSED_BY_ITS_IMPORT, tensorflow; "
            "tf = tensorflow(); print(sorted(n for n in UNUSED_BY_ITS_IMPORT if n in sys.modules)); "
            "import sklearn.base, matplotlib, IPython, jax; print(callable(tf.lite.TFLiteConverter.from_saved_model))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[]", "True"]
