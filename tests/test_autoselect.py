"""Auto-selection on a digits classifier built so that plain static int8 misses the budget.

Four hidden units are scaled up 1000× on the way in and down 1000× on the way out: the float
model is unchanged (ReLU is positive-homogeneous), but static int8's per-tensor activation
range then swamps the other units, so only keeping those layers in float recovers accuracy.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from pipeline import autoselect, config, datasets, layout
from pipeline.build import resolve_model
from pipeline.config import AutoSelectConfig, DatasetConfig, SourceConfig, SourceFormat
from pipeline.errors import ConfigError
from pipeline.io import atomic_path
from pipeline.quantize.selective import keep_in_float, scope_regex
from tests.conftest import ROOT, run_model_stages

BUDGET = 0.005  # half a point of accuracy
SCALE = 1000.0


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()  # shipped with scikit-learn: no download
    return (digits.images / 16.0).astype(np.float32)[..., np.newaxis], digits.target


def _outlier_classifier(path) -> None:
    import keras

    inputs, labels = _digits()
    keras.utils.set_random_seed(0)
    # Most weights sit in the first dense layer; the small second one gets the outliers, so
    # keeping it (and what follows) in float still leaves a model far smaller than float.
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(10),
        keras.layers.Softmax(),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.005), loss="sparse_categorical_crossentropy")
    model.fit(inputs[:1400], labels[:1400], epochs=15, batch_size=64, verbose=0)
    outliers, after = model.layers[3], model.layers[4]
    (w_in, b_in), (w_out, b_out) = outliers.get_weights(), after.get_weights()
    w_in[:, :4] *= SCALE
    b_in[:4] *= SCALE
    w_out[:4] /= SCALE
    outliers.set_weights([w_in, b_in])
    after.set_weights([w_out, b_out])
    model.save(path)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder holding what the convert and representative stages write for model `outlier`,
    made by the same pipeline functions; yields (folder, config)."""
    folder = tmp_path_factory.mktemp("autoselect")
    _outlier_classifier(folder / "outlier.keras")
    base = config.load(ROOT / "params.yaml")
    model = base.model["digits"]
    model.source = SourceConfig(format=SourceFormat.keras, path=str(folder / "outlier.keras"))
    model.metadata.outputs[0].labels = str(ROOT / "conf" / "labels" / "digits.txt")
    model.representative = replace(model.representative, dataset="outlier_calibration", num_samples=200)
    model.evaluation = replace(model.evaluation, dataset="outlier_evaluation", num_samples=397)
    datasets_used = {name: DatasetConfig(path="unused", inputs_key="x", labels_key="y")
                     for name in ("outlier_calibration", "outlier_evaluation")}
    cfg = replace(base, model={"outlier": model}, build={}, dataset=datasets_used,
                  autoselect={"outlier": AutoSelectConfig(max_accuracy_drop=BUDGET)})

    shutil.copytree(ROOT / "conf" / "recipes", folder / "conf" / "recipes")  # JSON recipes a variant names
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        inputs, labels = _digits()
        for name, part in (("outlier_calibration", slice(0, 1400)), ("outlier_evaluation", slice(1400, None))):
            with atomic_path(layout.samples(name)) as tmp, open(tmp, "wb") as handle:
                datasets.save(datasets.Samples({datasets.ONLY: inputs[part]}, {datasets.ONLY: labels[part]}), handle)
        run_model_stages(cfg, "outlier")
    return folder, cfg


def _select(project, monkeypatch, **budget):
    folder, cfg = project
    monkeypatch.chdir(folder)
    auto = AutoSelectConfig(**{"max_accuracy_drop": BUDGET, **budget})
    return autoselect.select(resolve_model(cfg, "outlier"), auto, cfg.quantization, git_commit="test",
                             experiment="test")


def test_static_int8_misses_so_most_sensitive_layers_stay_float_until_within_budget(project, monkeypatch):
    selection = _select(project, monkeypatch, candidates=["static_wi8_ai8", "float"],
                        algorithms=["min_max_uniform_quantize"])
    attempts = selection.report["attempts"]
    plain = attempts[0]
    assert plain["variant"] == "static_wi8_ai8" and not plain["passed"]
    assert plain["accuracy_drop"] > 10 * BUDGET  # the outliers really break plain int8

    chosen = selection.report["selected"]
    assert chosen["base_variant"] == "static_wi8_ai8" and chosen["float_tensors"]
    assert chosen["accuracy_drop"] <= BUDGET and chosen["passed"]
    assert chosen == attempts[-1]
    # The most sensitive layer is kept in float with the layer feeding it; one of the two is
    # the one with the outliers: one step suffices, and the pick is far smaller than the float model.
    assert len(attempts) == 2 and len(chosen["float_tensors"]) == 2
    assert any("Relu" in tensor for tensor in chosen["float_tensors"])
    [analysis] = selection.report["sensitivity"]
    assert analysis["variant"] == "static_wi8_ai8" and analysis["metric"] == "accuracy_drop"
    assert chosen["float_tensors"][0] == analysis["layers"][0]["tensor"]
    float_size = next(c["size_bytes"] for c in selection.report["candidates"] if c["variant"] == "float")
    assert chosen["size_bytes"] < float_size
    assert all(a["variant"] != "float" for a in attempts)  # larger than the pick: never tried

    # The delivered model really is that selective model: it runs, and its recipe keeps those layers.
    recipe = selection.selected.candidate.recipe
    assert [e["regex"] for e in recipe[-len(chosen["float_tensors"]):]] == [scope_regex(t) for t in chosen["float_tensors"]]
    assert selection.selected.validation.report["metrics"]["accuracy_drop"] == chosen["accuracy_drop"]


def test_selection_is_deterministic(project, monkeypatch):
    first = _select(project, monkeypatch, candidates=["static_wi8_ai8", "float"])
    second = _select(project, monkeypatch, candidates=["static_wi8_ai8", "float"])
    assert first.selected.candidate.model == second.selected.candidate.model
    strip = lambda report: [{k: v for k, v in a.items() if k != "latency_median_ms"} for a in report["attempts"]]
    assert strip(first.report) == strip(second.report)
    assert first.report["sensitivity"] == second.report["sensitivity"]


def test_default_candidates_pick_the_smallest_within_budget(project, monkeypatch):
    selection = _select(project, monkeypatch)
    names = [c["variant"] for c in selection.report["candidates"]]
    # Both backends, every algorithm; a point two ways (static_wi8_ai8 with MSE is the variant
    # static_wi8_ai8_mse) is tried once, under the variant's name.
    assert {"converter_int8", "static_wi8_ai16+GPTQ", "static_wi8_ai8_mse", "float"} <= set(names)
    assert "static_wi8_ai8+MSE" not in names and len(names) == len(set(names))
    passing = [a for a in selection.report["attempts"] if a["passed"]]
    chosen = selection.report["selected"]
    assert chosen is not None and chosen["size_bytes"] == min(a["size_bytes"] for a in passing)
    # Every candidate smaller than the pick was tried and missed.
    tried = {a["variant"] for a in selection.report["attempts"]}
    smaller = [c["variant"] for c in selection.report["candidates"] if c["size_bytes"] < chosen["size_bytes"]]
    assert set(smaller) <= tried and all(not a["passed"] for a in selection.report["attempts"]
                                         if a["size_bytes"] < chosen["size_bytes"])


def test_the_search_spans_algorithms_and_both_backends_and_measures_sensitivity(project, monkeypatch):
    selection = _select(project, monkeypatch, candidates=["static_wi8_ai8", "static_wi8_ai16", "converter_int8"],
                        algorithms=["min_max_uniform_quantize", "MSE"], max_steps=0)
    names = {c["variant"] for c in selection.report["candidates"]}
    assert names == {"static_wi8_ai8", "static_wi8_ai8+MSE", "static_wi8_ai16", "static_wi8_ai16+MSE", "converter_int8"}
    attempts = {a["variant"]: a for a in selection.report["attempts"]}
    if "static_wi8_ai8+MSE" in attempts:  # MSE clips the outliers' range: it must be measured like any other
        assert attempts["static_wi8_ai8+MSE"]["algorithm"] == "MSE"
    # Sensitivity of each static candidate that missed (at least the first one), most sensitive first.
    analysis = selection.report["sensitivity"][0]
    layers = analysis["layers"]
    assert layers and analysis["num_samples"] == 100
    keys = [(-(row["drop"] or 0), row["snr_db_alone"]) for row in layers]
    assert keys == sorted(keys)
    # The outlier layer (the first Dense's ReLU output) or the one it feeds is the most sensitive.
    assert layers[0]["op"] in ("FULLY_CONNECTED", "SOFTMAX") and layers[0]["drop"] > BUDGET
    overlay = autoselect.model_explorer_overlay(analysis)
    float_model = (project[0] / "artifacts" / "outlier" / "float.tflite").read_bytes()
    from pipeline.quantize.selective import ops_by_output

    assert set(overlay["results"]) <= set(ops_by_output(float_model)) and overlay["results"]
    assert {"stop": 0, "bgColor": "#d7191c"} in overlay["gradient"]


def test_no_candidate_within_budget_selects_none(project, monkeypatch):
    selection = _select(project, monkeypatch, candidates=["static_wi8_ai8"], max_steps=0,
                        algorithms=["min_max_uniform_quantize"])
    assert selection.selected is None and selection.report["selected"] is None
    assert [a["variant"] for a in selection.report["attempts"]] == ["static_wi8_ai8"]


def test_keep_in_float_appends_entries_that_win():
    recipe = [{"regex": ".*", "operation": "*", "algorithm_key": "min_max_uniform_quantize", "op_config": {}}]
    kept = keep_in_float(recipe, ["dense/MatMul;dense/BiasAdd"])
    assert kept[0] == recipe[0] and kept[1]["algorithm_key"] == "no_quantize"
    import re

    regex = kept[1]["regex"]
    assert re.search(regex, "dense/MatMul;dense/BiasAdd;") and re.search(regex, "x;dense/MatMul;dense/BiasAdd;")
    assert not re.search(regex, "dense/MatMul;dense/BiasAdd_1;")


@pytest.mark.parametrize("autoselect_entry, key", [
    ({"nomodel": {}}, "autoselect.nomodel"),
    ({"digits": {"candidates": ["nope"]}}, "autoselect.digits.candidates[0]"),
    ({"digits": {"layers_per_step": 0}}, "autoselect.digits.layers_per_step"),
    ({"digits": {"algorithms": ["min_max_uniform_quantize", "no_quantize"]}}, "autoselect.digits.algorithms[1]"),
    ({"digits": {"sensitivity_samples": 0}}, "autoselect.digits.sensitivity_samples"),
])
def test_bad_autoselect_config_names_the_key(tmp_path, autoselect_entry, key):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["autoselect"] = autoselect_entry
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as caught:
        config.load(tmp_path / "params.yaml")
    assert caught.value.key == key


def test_a_task_metric_budget_needs_a_gate_set_with_a_task_metric(tmp_path):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["digits"]["validation"] = "default"  # no task_metric
    params["autoselect"] = {"digits": {"max_task_metric_drop": 0.1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as caught:
        config.load(tmp_path / "params.yaml")
    assert caught.value.key == "autoselect.digits.max_task_metric_drop"


def test_model_explorer_reads_the_sensitivity_overlay_on_the_float_graph(project, monkeypatch):
    """Model Explorer's own TFLite adapter and node-data classes: every overlay key names an op's
    output tensor in the graph it draws, so the colours land on the ops that were measured."""
    adapter = pytest.importorskip("model_explorer.builtin_tflite_flatbuffer_adapter",
                                  reason="the clients extra (make test installs it)")
    from model_explorer import node_data_builder as nd

    selection = _select(project, monkeypatch, candidates=["static_wi8_ai8"], algorithms=["min_max_uniform_quantize"],
                        max_steps=0)
    overlay = autoselect.model_explorer_overlay(selection.report["sensitivity"][0])
    data = nd.GraphNodeData(results={k: nd.NodeDataResult(**v) for k, v in overlay["results"].items()},
                            gradient=[nd.GradientItem(**g) for g in overlay["gradient"]])
    written = json.loads(data.to_json_string())  # the classes write our JSON (plus their defaults)
    assert written["results"] == overlay["results"] and written["gradient"] == overlay["gradient"]

    [collection] = adapter.BuiltinTfliteFlatbufferAdapter().convert(str(project[0] / "artifacts/outlier/float.tflite"),
                                                                     {})["graphCollections"]
    names = {attr["value"] for graph in collection.graphs for node in graph["nodes"]
             if node["label"] not in ("GraphInputs", "GraphOutputs", "pseudo_const")
             for output in node["outputsMetadata"] for attr in output["attrs"] if attr["key"] == "tensor_name"}
    assert overlay["results"] and set(overlay["results"]) <= names


def test_a_broken_recipe_is_listed_and_the_other_candidates_still_compete(project, monkeypatch):
    from pipeline.config import Backend, QuantizationConfig

    folder, cfg = project
    monkeypatch.chdir(folder)
    (folder / "conf" / "recipes" / "broken.json").write_text("[{")
    quantization = {**cfg.quantization,
                    "broken": QuantizationConfig(backend=Backend.litert_quantizer, recipe="conf/recipes/broken.json")}
    auto = AutoSelectConfig(max_accuracy_drop=BUDGET, candidates=["broken", "float", "dynamic_wi8_afp32"],
                            algorithms=["min_max_uniform_quantize"])
    selection = autoselect.select(resolve_model(cfg, "outlier"), auto, quantization, git_commit="test", experiment="test")
    [broken] = selection.report["unbuildable"]
    assert broken["variant"] == "broken" and "conf/recipes/broken.json" in broken["reason"]
    assert selection.selected is not None and selection.report["selected"]["variant"] in ("float", "dynamic_wi8_afp32")
