"""Stage functions: a model converts once, and calibrates once for all its static builds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import datasets, layout, steps
from pipeline.build import resolve_build, resolve_model
from pipeline.config import (
    Backend, BuildConfig, DataRef, DatasetConfig, ModelConfig, PipelineConfig, QuantizationConfig, RuntimeConfig,
    SourceConfig, ValidationConfig,
)
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, write_bytes, write_json
from pipeline.tflite_model import op_uses
from tests.conftest import tiny_keras_model

# The quantizer's calibrator deliberately runs the interpreter with all tensors preserved.
pytestmark = pytest.mark.filterwarnings("ignore:.*experimental_preserve_all_tensors:UserWarning")

CALIBRATION_SAMPLES = 8


def litert(recipe: str, **fields) -> QuantizationConfig:
    return QuantizationConfig(backend=Backend.litert_quantizer, recipe=recipe, **fields)


def pipeline_config(source: str) -> PipelineConfig:
    variants = {
        "ai8": litert("static_wi8_ai8"),
        "ai16": litert("static_wi8_ai16"),
        # Same samples as the model's, but asked for explicitly: calibrates inline.
        "ai8_own": litert("static_wi8_ai8", num_samples=CALIBRATION_SAMPLES),
        "dynamic": litert("dynamic_wi8_afp32"),
    }
    return PipelineConfig(
        model={"m": ModelConfig(
            team="t",
            source=SourceConfig(path=source),
            representative=DataRef(dataset="images", num_samples=CALIBRATION_SAMPLES),
            evaluation=DataRef(dataset="images", num_samples=4, seed=1, allow_overlap=True),
        )},
        build={f"m-{v}": BuildConfig(model="m", variant=v) for v in variants},
        quantization=variants,
        dataset={"images": DatasetConfig(path="unused: materialized below", inputs_key="x")},
        runtime={"litert": RuntimeConfig()},
        validation={"default": ValidationConfig()},
    )


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working folder with the digits-shaped model and its data, as the data stage leaves it."""
    monkeypatch.chdir(tmp_path)
    tiny_keras_model().export(str(tmp_path / "saved_model"), verbose=False)
    images = np.random.default_rng(0).uniform(size=(16, 8, 8, 1)).astype(np.float32)
    with atomic_path(layout.samples("images")) as tmp, open(tmp, "wb") as handle:
        datasets.save(datasets.Samples({datasets.ONLY: images}, {datasets.ONLY: np.arange(16) % 10}), handle)
    return pipeline_config(str(tmp_path / "saved_model"))


def run_representative_stage(cfg: PipelineConfig, float_model: bytes) -> dict:
    model = resolve_model(cfg, "m")
    pool = steps.representative_pool(model)
    with atomic_path(model.paths.representative) as tmp, open(tmp, "wb") as handle:
        datasets.save(pool, handle)
    calibration = json.loads(json.dumps(steps.shared_calibration(model, pool, float_model)))
    write_json(model.paths.calibration, calibration)
    return calibration


def test_convert_model_describes_the_float_model_it_converted(project):
    converted, evaluation = steps.convert_model(resolve_model(project, "m"))
    used = {(op.name, op.kind) for op in op_uses(converted.model)}
    assert {(op["name"], op["kind"]) for op in evaluation.report["ops"]["used"]} == used
    assert evaluation.reference_outputs["output_0"].shape == (4, 10)
    assert set(evaluation.samples.inputs) == {"image"}  # the short-form array, bound to the input's name
    assert converted.info["source_sha256"]


def test_static_builds_reuse_the_models_calibration(project):
    model = resolve_model(project, "m")
    converted, evaluation = steps.convert_model(model)
    write_bytes(model.paths.float_model, converted.model)
    write_json(model.paths.evaluate_report, evaluation.report)
    calibration = run_representative_stage(project, converted.model)
    assert calibration["metadata"]["num_samples_calibrated"] == CALIBRATION_SAMPLES

    results = {v: steps.quantize_build(resolve_build(project, f"m-{v}")) for v in project.quantization}
    assert results["ai8"].info["calibration"] == results["ai16"].info["calibration"] == "reused"
    assert results["ai8_own"].info["calibration"] == "inline"
    assert results["ai8"].model == results["ai8_own"].model  # the same calibration, computed once
    for variant in ("ai8", "ai16", "ai8_own"):  # provenance names the calibration data either way
        assert results[variant].info["representative_samples"] == CALIBRATION_SAMPLES
        assert results[variant].info["representative_sha256"] == calibration["metadata"]["samples_sha256"]
    assert "representative_sha256" not in results["dynamic"].info


def test_a_model_whose_shared_calibration_fails_records_why_and_its_static_builds_fail_under_their_key(project):
    model = resolve_model(project, "m")
    converted, _ = steps.convert_model(model)
    write_bytes(model.paths.float_model, converted.model)
    # Calibration samples of the right shape but NaN-free garbage the quantizer rejects: too few of them.
    cfg = pipeline_config(project.model["m"].source.path)
    cfg.model["m"].representative.num_samples = 64  # the dataset has 16
    calibration = run_representative_stage(cfg, converted.model)  # the stage itself succeeds
    assert "fewer than the 64 requested" in calibration[steps.CALIBRATION_UNAVAILABLE]
    with pytest.raises(PipelineError, match=r"model\.m\.representative\.num_samples: .*fewer than the 64"):
        steps.quantize_build(resolve_build(cfg, "m-ai8"))
