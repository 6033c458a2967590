"""Named inputs and outputs of every dtype a LiteRT model takes, from dataset config to report,
through calibration on both backends; select-TF-ops models decided by policy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import datasets, layout, steps
from pipeline import quantize as quantize_backends
from pipeline.build import resolve_build, resolve_model
from pipeline.config import (
    Backend, BuildConfig, ConversionConfig, ConverterMode, DataRef, DatasetConfig, DatasetType, ModelConfig, OpsSet,
    PipelineConfig,
    QuantizationConfig, RuntimeConfig, SourceConfig, ValidationConfig,
)
from pipeline.errors import ConfigError, InputError
from pipeline.io import atomic_path, write_bytes
from pipeline.validate import validate_build
from tests.conftest import run_model_stages

pytestmark = pytest.mark.filterwarnings("ignore:.*experimental_preserve_all_tensors:UserWarning")

COUNT = 24
VARIANTS = {
    "float": QuantizationConfig(),
    "dynamic": QuantizationConfig(backend=Backend.litert_quantizer, recipe="dynamic_wi8_afp32"),
    "static": QuantizationConfig(backend=Backend.litert_quantizer, recipe="static_wi8_ai8"),
    "converter_int8": QuantizationConfig(backend=Backend.converter, mode=ConverterMode.int8),
}
# Every input dtype, with values no float32 cast would keep (an int64 above 2**24, a full-range int8).
INPUTS = {
    "features": ("float32", lambda rng: rng.uniform(-1, 1, (COUNT, 4)).astype(np.float32)),
    "token_ids": ("int32", lambda rng: rng.integers(0, 50, (COUNT, 6)).astype(np.int32)),
    "big_ids": ("int64", lambda rng: (2**24 + 1 + rng.integers(0, 3, (COUNT, 1))).astype(np.int64)),
    "pixels": ("uint8", lambda rng: rng.integers(0, 256, (COUNT, 3)).astype(np.uint8)),
    "offsets": ("int8", lambda rng: rng.integers(-128, 128, (COUNT, 2)).astype(np.int8)),
    "flags": ("bool", lambda rng: rng.integers(0, 2, (COUNT, 2)).astype(bool)),
}


def write_source(folder) -> None:
    """A SavedModel taking every dtype by name, with a float head and an exact integer head."""
    import tensorflow as tf

    class EveryDtype(tf.Module):
        def __init__(self):
            self.weights = tf.Variable(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32))
            self.embedding = tf.Variable(np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, *np.zeros((COUNT, 4))[0].shape], tf.float32, name="features"),
                                      tf.TensorSpec([None, 6], tf.int32, name="token_ids"),
                                      tf.TensorSpec([None, 1], tf.int64, name="big_ids"),
                                      tf.TensorSpec([None, 3], tf.uint8, name="pixels"),
                                      tf.TensorSpec([None, 2], tf.int8, name="offsets"),
                                      tf.TensorSpec([None, 2], tf.bool, name="flags")])
        def serve(self, features, token_ids, big_ids, pixels, offsets, flags):
            score = tf.matmul(features, self.weights) + tf.reduce_mean(tf.gather(self.embedding, token_ids), axis=1)
            extra = tf.reduce_mean(tf.cast(pixels, tf.float32), axis=1, keepdims=True) / 255.0
            extra += tf.reduce_mean(tf.cast(offsets, tf.float32), axis=1, keepdims=True) / 128.0
            extra += tf.reduce_mean(tf.cast(flags, tf.float32), axis=1, keepdims=True)
            # Exact integer arithmetic: wrong if any integer input went through float32.
            id_sum = big_ids - 2**24 + tf.reduce_sum(tf.cast(token_ids, tf.int64), axis=1, keepdims=True)
            return {"score": tf.nn.softmax(score + extra), "id_sum": id_sum}

    module = EveryDtype()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})


def config(source: str, *, labels: bool = True, **model_fields) -> PipelineConfig:
    return PipelineConfig(
        model={"m": ModelConfig(
            team="t",
            source=SourceConfig(path=source),
            representative=DataRef(dataset="calibration", num_samples=16),
            evaluation=DataRef(dataset="evaluation", num_samples=COUNT),
            **model_fields,
        )},
        build={f"m-{v}": BuildConfig(model="m", variant=v) for v in VARIANTS},
        quantization=VARIANTS,
        dataset={name: DatasetConfig(path=f"{name}.npz", inputs={n: n for n in INPUTS},
                                     labels={"score": "label"} if labels else {})
                 for name in ("calibration", "evaluation")},
        runtime={"litert": RuntimeConfig()},
        validation={"default": ValidationConfig(min_cosine=0.9, max_accuracy_drop=0.5 if labels else None,
                                                latency_runs=2, warmup_runs=1)},
    )


def materialize(cfg: PipelineConfig, seed: int) -> None:
    for offset, name in enumerate(("calibration", "evaluation")):
        rng = np.random.default_rng(seed + offset)
        arrays = {input_name: make(rng) for input_name, (_, make) in INPUTS.items()}
        np.savez(f"{name}.npz", label=rng.integers(0, 3, COUNT), **arrays)
        samples = datasets.materialize(cfg.dataset[name], key=f"dataset.{name}")
        with atomic_path(layout.samples(name)) as tmp, open(tmp, "wb") as handle:
            datasets.save(samples, handle)


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory):
    folder = tmp_path_factory.mktemp("every_dtype")
    write_source(folder / "saved_model")
    return folder


@pytest.fixture
def built(every_dtype, monkeypatch):
    monkeypatch.chdir(every_dtype)
    cfg = config(str(every_dtype / "saved_model"))
    if not layout.ModelPaths.of("m").calibration.exists():
        materialize(cfg, seed=0)
        run_model_stages(cfg, "m")
    return cfg


def test_samples_keep_their_dtypes_from_dataset_to_reference(built):
    samples = steps.representative_samples(resolve_build(built, "m-static"),
                                           layout.ModelPaths.of("m").float_model.read_bytes())
    assert {name: str(array.dtype) for name, array in samples.inputs.items()} == {n: d for n, (d, _) in INPUTS.items()}
    evaluation = json.loads(layout.ModelPaths.of("m").evaluate_report.read_text())
    assert {t["name"] for t in evaluation["inputs"]} == set(INPUTS)
    assert evaluation["labelled_outputs"] == ["score"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_input_dtype_quantizes_and_validates(built, variant):
    build = resolve_build(built, f"m-{variant}")
    result = steps.quantize_build(build)
    if variant in ("static", "converter_int8"):  # both backends calibrated on the named, typed samples
        assert result.info["num_calibration_samples"] == 16
    write_bytes(build.paths.delivered, result.model)
    validation = validate_build(build, build.paths.delivered)
    report = validation.report
    assert report["passed"], report["failures"]
    assert report["outputs"]["id_sum"]["max_abs_error"] == 0.0  # exact: no integer input went through float
    assert set(report["outputs"]) == {"score", "id_sum"}  # parity per output, by name
    assert report["outputs"]["score"]["accuracy"] is not None and "accuracy" not in report["outputs"]["id_sum"]
    assert report["run"]["input_dtypes"]["big_ids"] == "int64" and report["run"]["input_dtypes"]["flags"] == "bool"


def test_float_samples_never_feed_an_integer_input(every_dtype, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config(str(every_dtype / "saved_model"))
    np.savez("evaluation.npz", label=np.zeros(COUNT, int), **{
        n: (make(np.random.default_rng(0)).astype(np.float32) if n == "token_ids" else make(np.random.default_rng(0)))
        for n, (_, make) in INPUTS.items()})
    samples = datasets.materialize(cfg.dataset["evaluation"], key="dataset.evaluation")
    with atomic_path(layout.samples("evaluation")) as tmp, open(tmp, "wb") as handle:
        datasets.save(samples, handle)
    with pytest.raises(InputError, match=r"dataset\.evaluation\.inputs\.token_ids: .*float32.*int32.*never rounded"):
        steps.convert_model(resolve_model(cfg, "m"))


def test_an_array_for_no_input_and_an_input_without_array_are_named(every_dtype):
    tensors = [datasets.TensorInfo("a", [None, 2], "float32"), datasets.TensorInfo("b", [None, 2], "int32")]
    outputs = [datasets.TensorInfo("y", [None, 3], "float32")]
    arrays = {"a": np.zeros((3, 2), np.float32), "b": np.zeros((3, 2), np.int32)}
    with pytest.raises(InputError, match=r"d\.inputs\.c: the model has no input 'c'"):
        datasets.bind(datasets.Samples({**arrays, "c": arrays["a"]}), tensors, outputs, key="d")
    with pytest.raises(InputError, match=r"d\.inputs: no array for the model's input 'b'"):
        datasets.bind(datasets.Samples({"a": arrays["a"]}), tensors, outputs, key="d")
    with pytest.raises(InputError, match=r"d\.inputs: the model has 2 inputs \(a, b\): name the array of each"):
        datasets.bind(datasets.Samples({datasets.ONLY: arrays["a"]}), tensors, outputs, key="d")
    with pytest.raises(InputError, match=r"d\.inputs\.b: values 0\.\.300 do not fit"):
        datasets.bind(datasets.Samples({"a": arrays["a"], "b": np.array([[0, 300]] * 3, np.int64)}),
                      [tensors[0], datasets.TensorInfo("b", [None, 2], "int8")], outputs, key="d")


# --- select TF ops ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flex_project(tmp_path_factory):
    """A tf.Module whose determinant needs select TF ops, converted, with its reference."""
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("flex")

    class Determinant(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2, 2], tf.float32, name="matrix")])
        def serve(self, matrix):
            return {"det": tf.linalg.det(matrix), "scaled": matrix * 2.0}

    module = Determinant()
    tf.saved_model.save(module, str(folder / "saved_model"), signatures={"serving_default": module.serve})
    rng = np.random.default_rng(0)
    for name in ("calibration", "evaluation"):
        np.savez(folder / f"{name}.npz", x=rng.normal(size=(COUNT, 2, 2)).astype(np.float32))
    return folder


def flex_config(folder, *, accept_unverified: bool = False) -> PipelineConfig:
    variants = {"float": QuantizationConfig(), "static": VARIANTS["static"], "converter_int8": VARIANTS["converter_int8"]}
    return PipelineConfig(
        model={"det": ModelConfig(
            team="t", source=SourceConfig(path=str(folder / "saved_model")),
            conversion=ConversionConfig(ops=[OpsSet.builtins, OpsSet.select_tf_ops]),
            representative=DataRef(dataset="calibration", num_samples=8),
            evaluation=DataRef(dataset="evaluation", num_samples=8),
        )},
        build={f"det-{v}": BuildConfig(model="det", variant=v) for v in variants},
        quantization=variants,
        dataset={name: DatasetConfig(path=str(folder / f"{name}.npz"), inputs_key="x")
                 for name in ("calibration", "evaluation")},
        runtime={"litert": RuntimeConfig()},
        validation={"default": ValidationConfig(min_cosine=0.99, max_size_ratio=1.5,
                                                accept_unverified=accept_unverified)},
    )


@pytest.fixture
def flex_built(flex_project, monkeypatch):
    monkeypatch.chdir(flex_project)
    cfg = flex_config(flex_project)
    if not layout.ModelPaths.of("det").calibration.exists():
        materialize_flex = [("calibration", cfg.dataset["calibration"]), ("evaluation", cfg.dataset["evaluation"])]
        for name, dataset in materialize_flex:
            with atomic_path(layout.samples(name)) as tmp, open(tmp, "wb") as handle:
                datasets.save(datasets.materialize(dataset, key=f"dataset.{name}"), handle)
        run_model_stages(cfg, "det")
    return cfg


def test_evaluate_lists_the_flex_ops_the_host_cannot_run(flex_built):
    report = json.loads(layout.ModelPaths.of("det").evaluate_report.read_text())
    assert report["host"]["select_tf_ops"] == ["FlexMatrixDeterminant"]
    assert report["host"]["executable_on_host"] is False
    calibration = json.loads(layout.ModelPaths.of("det").calibration.read_text())
    assert "FlexMatrixDeterminant cannot run on this host" in calibration[steps.CALIBRATION_UNAVAILABLE]


@pytest.mark.parametrize("variant", ["static", "converter_int8"])
def test_a_calibrating_variant_of_a_flex_model_fails_before_calibration_naming_variant_and_ops(flex_built, variant):
    with pytest.raises(ConfigError) as caught:
        steps.quantize_build(resolve_build(flex_built, f"det-{variant}"))
    line = caught.value.one_line()
    assert f"quantization.{variant}:" in line and "FlexMatrixDeterminant" in line and "\n" not in line


def test_a_flex_float_build_is_refused_by_default_and_delivered_unverified_when_accepted(flex_built, flex_project):
    build = resolve_build(flex_built, "det-float")
    write_bytes(build.paths.delivered, steps.quantize_build(build).model)
    refused = validate_build(build, build.paths.delivered).report
    assert not refused["passed"] and refused["verification"] == "unverified"
    assert any("cosine unverifiable" in failure and "accept_unverified" in failure for failure in refused["failures"])
    assert {g["gate"]: g["status"] for g in refused["gates"]} == {"min_cosine": "unverifiable", "max_size_ratio": "passed"}

    accepted = validate_build(resolve_build(flex_config(flex_project, accept_unverified=True), "det-float"),
                              build.paths.delivered).report
    assert accepted["passed"] and accepted["verification"] == "unverified"
    assert "cosine" not in accepted["metrics"] and accepted["metrics"]["size_ratio"] <= 1.5


def test_samples_the_source_rejects_are_an_input_error_naming_the_data(every_dtype, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config(str(every_dtype / "saved_model"))
    rng = np.random.default_rng(0)
    arrays = {name: make(rng) for name, (_, make) in INPUTS.items()}
    arrays["token_ids"][5, 2] = 1000  # outside the 50-word vocabulary
    np.savez("evaluation.npz", label=np.zeros(COUNT, int), **arrays)
    with atomic_path(layout.samples("evaluation")) as tmp, open(tmp, "wb") as handle:
        datasets.save(datasets.materialize(cfg.dataset["evaluation"], key="dataset.evaluation"), handle)
    with pytest.raises(InputError) as caught:
        steps.convert_model(resolve_model(cfg, "m"))
    line = caught.value.one_line()
    assert line.startswith("evaluation.npz: dataset.evaluation: the source model fails on samples 0..31")
    assert "1000" in line


def test_calibration_samples_the_float_model_rejects_are_an_input_error_naming_the_data(built):
    """Not a failed calibration (exit 4 under the variant's key): bad data, named."""
    model = resolve_model(built, "m")
    float_model = model.paths.float_model.read_bytes()
    pool = steps.representative_pool(model)
    pool.inputs["token_ids"] = pool.inputs["token_ids"].copy()
    pool.inputs["token_ids"][3, 2] = 1000  # outside the 50-word vocabulary
    reason = steps.shared_calibration(model, pool, float_model)[steps.CALIBRATION_UNAVAILABLE]
    assert reason.startswith("calibration.npz: dataset.calibration: calibration sample 3 (of the 16 drawn) does not "
                             "run through the float model: RuntimeError: "), reason
    samples = steps.bind_representative(model, datasets.first(pool, 16, key="k"), float_model)
    with pytest.raises(InputError) as caught, steps.naming_the_data(model):
        quantize_backends.quantize(float_model, built.quantization["static"], samples=samples, calibration=None,
                                   make_converter=None, key="quantization.static")
    assert caught.value.exit_code == 3 and caught.value.one_line() == reason
    # Every sample rejected: the model or all of the data; not one sample's fault.
    pool.inputs["token_ids"][:, 2] = 1000
    reason = steps.shared_calibration(model, pool, float_model)[steps.CALIBRATION_UNAVAILABLE]
    assert reason.startswith("model.m.representative: LiteRT Quantizer calibration failed: RuntimeError: gather index")
    assert reason.endswith("the float model itself runs none of the samples tried (the model, or all of the data)")


def test_an_image_folder_feeds_one_input_and_labels_by_class_folder(tmp_path):
    from PIL import Image

    for label, color in (("cat", 10), ("dog", 200)):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (6, 4), (color, index, 0)).save(tmp_path / "photos" / label / f"{index}.png")
    labelled = DatasetConfig(type=DatasetType.images, path=str(tmp_path / "photos"), labels_key="classes", image_size=[4, 6])
    samples = datasets.materialize(labelled, key="dataset.photos")
    assert samples.inputs[datasets.ONLY].shape == (6, 4, 6, 3) and list(samples.labels[datasets.ONLY]) == [0] * 3 + [1] * 3
    bound = datasets.bind(samples, [datasets.TensorInfo("pixels", [None, 4, 6, 3], "float32")],
                          [datasets.TensorInfo("kind", [None, 2], "float32")], key="dataset.photos")
    assert set(bound.inputs) == {"pixels"} and set(bound.labels) == {"kind"}
    unlabelled = datasets.materialize(DatasetConfig(type=DatasetType.images, path=str(tmp_path / "photos" / "cat")),
                                      key="dataset.cats")
    assert len(unlabelled) == 3 and unlabelled.labels == {}


def test_binary_and_multi_label_outputs_are_scored_per_unit_at_the_sources_threshold():
    """A one-unit sigmoid scored by argmax was always 'class 0'; multi-hot rows were not scored."""
    from pipeline.evaluate import accuracies

    tags = np.array([[1, 0, 1], [0, 1, 0]])
    probabilities = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1]])  # every unit right at 0.5
    assert accuracies({"tags": probabilities}, {"tags": tags}) == {"tags": 1.0}
    logits = np.array([[2.0, -1.0, -0.5], [-3.0, 1.0, -2.0]])  # 5 of 6 right at 0
    assert accuracies({"tags": logits}, {"tags": tags.astype(bool)})["tags"] == pytest.approx(5 / 6)
    binary, truth = np.array([[0.8], [0.3], [0.6], [0.1]]), np.array([1, 0, 0, 0])  # 3 of 4
    assert accuracies({"p": binary}, {"p": truth}) == {"p": 0.75}
    # A quantized model is read at its source's threshold: an output nudged past 1 is still a probability.
    nudged = np.array([[1.01], [0.3], [0.6], [0.1]])
    assert accuracies({"p": nudged}, {"p": truth}, reference={"p": binary}) == {"p": 0.75}
    assert accuracies({"c": np.array([[0.1, 0.9], [0.8, 0.2]])}, {"c": np.array([1, 1])}) == {"c": 0.5}  # top-1
    # One-hot rows are class indices: per unit, wrong on every sample would still score 1 - 2/K.
    softmax = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]])
    assert accuracies({"c": softmax}, {"c": np.array([[0, 1, 0], [0, 0, 1]])}) == {"c": 0.5}


def test_top5_and_macro_f1_read_class_index_outputs_only():
    from pipeline.task_metrics import macro_f1, top5_accuracy

    one_unit = {"p": np.array([[0.9], [0.2]])}
    for metric in (macro_f1, top5_accuracy):  # argmax of one unit is always 0: it would never drop
        with pytest.raises(ValueError, match="needs an output labelled with class indices"):
            metric(one_unit, {"p": np.array([1, 0])})
    assert macro_f1({"c": np.array([[0.2, 0.8], [0.9, 0.1]])}, {"c": np.array([1, 0])}) == 1.0


@pytest.mark.parametrize(("labels", "outputs", "words"), [
    (np.array([[1, 0, 1], [0, 1, 2]]), [None, 3], "labels 0..2 for output 'y', which has a unit per label: 0 or 1"),
    (np.array([[1, 0, 1, 0], [0, 1, 0, 0]]), [None, 3], "4 labels per sample for the 3 units of output 'y'"),
    (np.array([1, 2]), [None, 1], "labels 1..2 for output 'y', which has one unit: 0 or 1 expected"),
    (np.array([0, 3]), [None, 3], "class labels 0..3 for the 3 classes of output 'y'"),
    (np.ones((2, 2, 4), np.int64), [None, 3, 2], "8 labels per sample for the 6 units of output 'y'"),
])
def test_labels_that_cannot_score_their_output_are_an_input_error(labels, outputs, words):
    samples = datasets.Samples({"x": np.zeros((2, 2), np.float32)}, {"y": labels})
    with pytest.raises(InputError) as caught:
        datasets.bind(samples, [datasets.TensorInfo("x", [None, 2], "float32")],
                      [datasets.TensorInfo("y", outputs, "float32")], key="dataset.d", file="d.npz")
    line = caught.value.one_line()
    assert line.startswith("d.npz: dataset.d.labels.y: ") and words in line, line


@pytest.mark.parametrize(("labels", "outputs"), [
    (np.array([[1, 0, 1, 0, 0], [0, 1, 1, 0, 1]]), [None, 5, 1]),
    (np.array([[[1, 0, 1], [0, 1, 0]], [[0, 0, 1], [1, 1, 0]]]), [None, 2, 3]),
    (np.array([True, False]), [None]),
])
def test_multi_label_rows_shaped_as_their_output_are_accepted(labels, outputs):
    samples = datasets.Samples({"x": np.zeros((2, 2), np.float32)}, {"y": labels})
    bound = datasets.bind(samples, [datasets.TensorInfo("x", [None, 2], "float32")],
                          [datasets.TensorInfo("y", outputs, "float32")], key="dataset.d")
    assert bound.labels["y"] is labels
