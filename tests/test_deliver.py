"""The metadata stage's logic: config -> metadata spec, provenance, checks, idempotence."""

from __future__ import annotations

import json

import pytest

from pipeline.build import resolve_build
from pipeline import config, deliver
from pipeline.errors import ConfigError
from pipeline.metadata import inspect_model, strip_metadata
from tests.conftest import ROOT

BUILD = "digits-static_wi8_ai8"
INFO = {"convert": {"source_sha256": "ab" * 32, "conversion_path": "from_saved_model"},
        "quantize": {"representative_sha256": "cd" * 32, "representative_samples": 200}}
# The digits evaluation data: pixels scaled to [0, 1].
PIXELS_0_1 = {"image": {"min": [0.0], "max": [1.0]}}


@pytest.fixture
def cfg(monkeypatch):
    monkeypatch.chdir(ROOT)  # label files are relative to the project
    return config.load(ROOT / "params.yaml")


def _record(cfg):
    return deliver.provenance(resolve_build(cfg, BUILD), convert_info=INFO["convert"], quantize_info=INFO["quantize"],
                              git_commit="abc", experiment="litert-pipeline")


def test_delivered_model_carries_metadata_labels_and_provenance(cfg, tiny_float_tflite):
    delivered = deliver.deliver(resolve_build(cfg, BUILD), tiny_float_tflite, _record(cfg), input_ranges=PIXELS_0_1)
    shown = inspect_model(delivered)
    meta = shown["metadata"]
    assert meta["name"] == "digits" and meta["license"] == "Apache-2.0"
    output = meta["subgraphs"][0]["outputs"][0]
    assert output["associated_files"][0]["name"] == "digits.txt"
    assert {f["name"] for f in shown["packed_files"]} == {"digits.txt", "provenance.json"}
    provenance = shown["provenance"]
    assert provenance["variant"] == "static_wi8_ai8" and provenance["source_sha256"] == "ab" * 32
    assert provenance["config_hash"] == deliver.build_hash(resolve_build(cfg, BUILD))
    assert set(provenance["tools"]) >= {"tensorflow", "ai-edge-litert", "litert-quantizer", "litert-pipeline"}
    assert strip_metadata(delivered) == strip_metadata(tiny_float_tflite)


def test_delivering_twice_is_idempotent(cfg, tiny_float_tflite):
    once = deliver.deliver(resolve_build(cfg, BUILD), tiny_float_tflite, _record(cfg), input_ranges=PIXELS_0_1)
    assert deliver.deliver(resolve_build(cfg, BUILD), once, _record(cfg), input_ranges=PIXELS_0_1) == once


def test_label_count_mismatch_names_the_full_key(cfg, tiny_float_tflite, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    cfg.model["digits"].metadata.outputs[0].labels = str(labels)
    with pytest.raises(ConfigError) as caught:
        deliver.deliver(resolve_build(cfg, BUILD), tiny_float_tflite, _record(cfg), input_ranges=PIXELS_0_1)
    assert caught.value.key == "model.digits.metadata.outputs[0].labels"
    assert "3 labels" in caught.value.message


def test_normalization_length_mismatch_names_the_full_key(cfg, tiny_float_tflite):
    cfg.model["digits"].metadata.inputs[0].mean = [0.0, 0.0]
    with pytest.raises(ConfigError) as caught:
        deliver.deliver(resolve_build(cfg, BUILD), tiny_float_tflite, _record(cfg), input_ranges=PIXELS_0_1)
    assert caught.value.key == "model.digits.metadata.inputs[0].mean"


def test_provenance_has_no_run_specific_values(cfg):
    text = json.dumps(_record(cfg))
    assert "time" not in text and "run_id" not in text


def test_normalization_must_map_raw_pixels_onto_the_validated_range(cfg, tiny_float_tflite):
    """digits once shipped std 1 for a model trained on [0, 1]: a client feeding 8-bit pixels
    gave it 0..255. The check names the key and the values that fit."""
    image = cfg.model["digits"].metadata.inputs[0]
    image.std = [1.0]
    with pytest.raises(ConfigError) as caught:
        deliver.deliver(resolve_build(cfg, BUILD), tiny_float_tflite, _record(cfg), input_ranges=PIXELS_0_1)
    assert caught.value.key == "model.digits.metadata.inputs[0].std"
    assert "onto [0, 255]" in caught.value.message and "mean: [0], std: [255] would fit" in caught.value.message
    image.std, image.mean = [127.5], [127.5]  # MobileNet's [-1, 1] is not digits' [0, 1] either
    with pytest.raises(ConfigError, match=r"onto \[-1, 1\]"):
        deliver.deliver(resolve_build(cfg, BUILD), tiny_float_tflite, _record(cfg), input_ranges=PIXELS_0_1)
    mobilenet_range = {"image": {"min": [-0.998, -1.0, -0.999], "max": [1.0, 0.997, 1.0]}}
    image.min, image.max = [-1.0], [1.0]
    deliver.deliver(resolve_build(cfg, BUILD), tiny_float_tflite, _record(cfg), input_ranges=mobilenet_range)


def test_min_max_stats_must_be_the_normalized_range(cfg, tiny_float_tflite):
    cfg.model["digits"].metadata.inputs[0].max = [255.0]
    with pytest.raises(ConfigError) as caught:
        deliver.deliver(resolve_build(cfg, BUILD), tiny_float_tflite, _record(cfg), input_ranges=PIXELS_0_1)
    assert caught.value.key == "model.digits.metadata.inputs[0].max"
    assert "min: [0], max: [1] would fit" in caught.value.message
