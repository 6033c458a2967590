"""Backend `litert_quantizer`: quantize the float .tflite with LiteRT Quantizer.

Needs no TensorFlow: the quantizer reads and rewrites the flatbuffer and calibrates
with the LiteRT interpreter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from litert_quantizer import calibrator, recipe_manager
from litert_quantizer import recipe as named_recipes
from litert_quantizer.quantizer import Quantizer
from tqdm import tqdm

from pipeline.config import LITERT_RECIPES, Backend, IoType, QuantizationConfig, check_recipe_entries
from pipeline.datasets import Samples
from pipeline.errors import ConfigError, GateError, InputError, RejectedSample, first_line
from pipeline.io import read_regular_file

Recipe = list[dict[str, Any]]

# Min/max statistics do not depend on the bit widths, so one calibration serves every
# recipe that calibrates only with this algorithm (static_wi8_ai8 and static_wi8_ai16).
MIN_MAX = "min_max_uniform_quantize"
NO_QUANTIZE = "no_quantize"
FLOAT_CASTING = "float_casting"


def load_recipe(recipe: str, *, key: str) -> Recipe:
    """A built-in recipe by name, or a JSON recipe file the quantizer's parser accepts."""
    if recipe in LITERT_RECIPES:
        return getattr(named_recipes, recipe)()
    try:
        loaded = json.loads(read_regular_file(recipe, key=key, what="recipe").decode("utf-8"))
    except InputError as exc:
        raise ConfigError(exc.message, file=recipe, key=key) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"malformed JSON: {exc}", file=recipe, key=key) from None
    check_recipe_entries(loaded, file=recipe, key=key)
    try:
        _recipe_manager(loaded)
    except Exception as exc:  # the parser raises KeyError, ValueError, TypeError... for bad entries
        raise ConfigError(f"invalid recipe: {_describe(exc)}", file=recipe, key=key) from None
    return loaded


@dataclass(frozen=True)
class Statistics:
    """One calibration held in memory, to quantize with the same recipe again (e.g. with ops
    kept in float): keeping ops in float changes which statistics are used, not the statistics."""

    qsvs: dict[str, Any]
    num_samples: int
    samples_sha256: str


def calibrate_recipe(float_model: bytes, recipe: Recipe, variant: QuantizationConfig, samples: Samples, *,
                     key: str) -> Statistics:
    """Calibrate `recipe` (with the variant's input/output types) on `samples`."""
    qsvs = _run_calibration(float_model, samples, recipe + _io_entries(variant), key=key)
    return Statistics(qsvs, len(samples), samples.sha256)


def statistics_from(calibration: dict[str, Any], float_model: bytes, recipe: Recipe, *, key: str) -> Statistics:
    """The shared calibration (from `calibrate`) as in-memory statistics for `recipe`."""
    qsvs, provenance = _qsvs_from_json(calibration, float_model, recipe, key=key)
    return Statistics(qsvs, provenance["num_calibration_samples"], provenance["calibration_samples_sha256"])


def needs_calibration(variant: QuantizationConfig, *, key: str) -> bool:
    """Whether the variant's recipe is static (quantizes activations)."""
    return _recipe_manager(load_recipe(variant.recipe or "", key=f"{key}.recipe")).need_calibration()


def uses_shared_calibration(variant: QuantizationConfig, *, key: str) -> bool:
    """Whether the variant can reuse the model's calibration from `calibrate` (static min/max
    recipes on the model's own sample count); other variants calibrate inline, if at all."""
    if variant.backend is not Backend.litert_quantizer:
        return False
    recipe = load_recipe(variant.recipe or "", key=f"{key}.recipe")
    return variant.num_samples is None and _is_static_min_max(recipe)


def calibrate(
    float_model: bytes, samples: Samples, recipe: str = "static_wi8_ai8", *, key: str = "calibration"
) -> dict[str, Any]:
    """Calibrate for a min/max static recipe; the result is JSON-serializable.

    The layout is the quantizer's own calibration file ({"model_qsvs", "metadata"}) and the
    metadata ties it to the float model and the samples, so a stale file is detected.
    """
    loaded = load_recipe(recipe, key=f"{key}.recipe")
    if not _is_static_min_max(loaded):
        raise ConfigError(f"'{recipe}' is not a static {MIN_MAX} recipe: nothing to share", key=f"{key}.recipe")
    qsvs = _run_calibration(float_model, samples, loaded, key=key)
    return {
        "model_qsvs": {
            tensor: {stat: np.asarray(value).tolist() for stat, value in qsv.items()}
            for tensor, qsv in sorted(qsvs.items())
        },
        "metadata": {
            "num_samples_calibrated": len(samples),
            "samples_sha256": samples.sha256,
            "float_model_sha256": hashlib.sha256(float_model).hexdigest(),
            "recipe": recipe,
            "algorithm": MIN_MAX,
            "statistics": "running min/max over every sample",
            "litert_quantizer": version("litert-quantizer"),
        },
    }


def quantize(
    float_model: bytes,
    variant: QuantizationConfig,
    *,
    samples: Samples | None,
    calibration: dict[str, Any] | None,
    key: str,
    statistics: Statistics | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Apply the variant's recipe; static recipes also get its I/O types and calibrate from
    `samples` unless a shared `calibration` or in-memory `statistics` are given."""
    recipe_name = variant.recipe or ""
    recipe = load_recipe(recipe_name, key=f"{key}.recipe")
    static = _recipe_manager(recipe).need_calibration()
    if static:
        recipe = recipe + _io_entries(variant)
    else:
        for io in ("inference_input_type", "inference_output_type"):
            if getattr(variant, io) is not IoType.float32:
                raise ConfigError("only static recipes have integer inputs and outputs", key=f"{key}.{io}")
    info: dict[str, Any] = {
        "recipe": recipe_name,
        "calibration": None,
        "num_calibration_samples": None,
        "calibration_samples_sha256": None,
        "versions": {"litert-quantizer": version("litert-quantizer"), "ai-edge-litert": version("ai-edge-litert")},
    }
    if recipe_name not in LITERT_RECIPES:
        info["recipe_sha256"] = hashlib.sha256(Path(recipe_name).read_bytes()).hexdigest()

    qsvs = None
    if static and statistics is not None:
        qsvs = statistics.qsvs
        info.update(calibration="inline", num_calibration_samples=statistics.num_samples,
                    calibration_samples_sha256=statistics.samples_sha256)
    elif static and calibration is not None:
        qsvs, provenance = _qsvs_from_json(calibration, float_model, recipe, key=key)
        info.update(calibration="reused", **provenance)
    elif static:
        if samples is None:
            raise ConfigError(f"recipe '{recipe_name}' needs representative samples to calibrate", key=key)
        qsvs = _run_calibration(float_model, samples, recipe, key=key)
        info.update(
            calibration="inline", num_calibration_samples=len(samples), calibration_samples_sha256=samples.sha256
        )

    try:
        result = Quantizer(float_model, recipe).quantize(qsvs, enable_progress_report=False)
    except Exception as exc:  # the quantizer reports unsupported models/configs in many types
        raise GateError(f"LiteRT Quantizer failed: {_describe(exc)}", key=key) from exc
    return bytes(result.quantized_model), info


def _io_entries(variant: QuantizationConfig) -> Recipe:
    """Recipe entries giving the model inputs and outputs the variant's types.

    Static recipes alone quantize them to the activation type (int8 or int16); the later
    entries win over the recipe's own.
    """

    def entry(operation: str, io: IoType) -> dict[str, Any]:
        if io is IoType.float32:  # keep float: the quantizer inserts quantize/dequantize ops
            return {"regex": ".*", "operation": operation, "algorithm_key": NO_QUANTIZE, "op_config": {}}
        bits = 16 if io is IoType.int16 else 8
        activation = {
            "num_bits": bits,
            "symmetric": bits == 16,  # as the static recipes: int16 symmetric, int8 asymmetric
            "granularity": "TENSORWISE",
            "dtype": "UINT" if io is IoType.uint8 else "INT",
        }
        # The parser requires a weight config even though inputs and outputs have no weights.
        weight = {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"}
        op_config = {
            "activation_tensor_config": activation,
            "weight_tensor_config": weight,
            "compute_precision": "INTEGER",
            "explicit_dequantize": False,
        }
        return {"regex": ".*", "operation": operation, "algorithm_key": MIN_MAX, "op_config": op_config}

    return [entry("INPUT", variant.inference_input_type), entry("OUTPUT", variant.inference_output_type)]


def _run_calibration(float_model: bytes, samples: Samples, recipe: Recipe, *, key: str) -> dict[str, Any]:
    """Run every sample (a batch of one, by input name) through each signature it feeds,
    accumulating min/max per tensor."""
    signatures = _signatures_fed(float_model, samples, key=key)
    # The quantizer's default keeps an exponential moving average (0.95) of each sample's
    # min/max, for every algorithm: after a few dozen samples a range is the recent samples'
    # typical one, not the calibration set's (a regression output collapses to one value).
    # Every recipe gets the range of every sample, as TFLiteConverter calibrates; the
    # algorithms' own statistics (GPTQ's Hessian, OSCAR's moments) merge as they define.
    manager = _recipe_manager(recipe)
    # For min/max the interpreter's own profiler can track each tensor's range as it runs,
    # where the default mode keeps every tensor and reduces each in Python, after checking the
    # recipe again per op and sample: 1.4 s instead of 4.6 s for MobileNetV2's 100 samples
    # here, and the same quantized model (tested). The other algorithms need the tensors.
    profiled = _is_static_min_max(recipe)
    mode = (calibrator.CalibrationMode.CALIBRATION_PROFILER_BASED if profiled
            else calibrator.CalibrationMode.CALIBRATION_PRESERVE_ALL_TENSORS)
    index = 0
    try:
        model_calibrator = calibrator.Calibrator(float_model, qsv_update_func=full_range_update, mode=mode)
        for index in tqdm(range(len(samples)), desc="calibrating", unit="sample"):
            model_calibrator.calibrate({signature: [samples.sample(index)] for signature in signatures}, manager)
    except Exception as exc:  # interpreter errors (shape mismatch...) come as RuntimeError/ValueError
        rejected = _float_model_error(float_model, samples.sample(index), signatures) if len(samples) else None
        if rejected and _runs_some_sample(float_model, samples, signatures, index):  # the data's fault, not the model's
            raise RejectedSample(f"calibration sample {index} (of the {len(samples)} drawn) does not run through the "
                                 f"float model: {rejected}") from None
        neither = "; the float model itself runs none of the samples tried (the model, or all of the data)" if rejected else ""
        # The plain interpreter's words, when it fails too: the profiler's wrap them in its own.
        raise GateError(f"LiteRT Quantizer calibration failed: {rejected or _describe(exc)}{neither}", key=key) from exc
    qsvs = model_calibrator.get_model_qsvs()
    return _as_tensor_ranges(float_model, qsvs) if profiled else qsvs


def _as_tensor_ranges(float_model: bytes, qsvs: dict[str, Any]) -> dict[str, Any]:
    """The profiler's ranges shaped as the tensor-keeping mode reports them: float32, one
    element per tensor dimension. The quantizer derives scales from them in their own dtype,
    so float64 ranges round to other scales (other bytes, for the same ranges)."""
    interpreter = Interpreter(model_content=float_model)
    ranks = {}
    for index in range(interpreter.num_subgraphs()):
        for tensor in interpreter.get_tensor_details(index):
            ranks.setdefault(tensor["name"], len(tensor["shape"]))
    return {
        name: {stat: np.asarray(value, dtype=np.float32).reshape((1,) * ranks.get(name, 1)) for stat, value in qsv.items()}
        for name, qsv in qsvs.items()
    }


def _runs_some_sample(float_model: bytes, samples: Samples, signatures: list[str], failed: int) -> bool:
    """Whether the float model runs other samples than `failed`: the samples before it (they
    calibrated), else one of the next few (a model that runs none, e.g. with an unresolved
    custom op, is not the data's fault)."""
    if failed > 0:
        return True
    return any(_float_model_error(float_model, samples.sample(index), signatures) is None
               for index in range(1, min(len(samples), 8)))


def _float_model_error(float_model: bytes, sample: dict[str, np.ndarray], signatures: list[str]) -> str | None:
    """Why the float model cannot run `sample` in the plain interpreter, or None if it can."""
    try:
        interpreter = Interpreter(model_content=float_model)
        for signature in signatures:
            interpreter.get_signature_runner(signature)(**sample)
    except Exception as exc:  # the interpreter's errors: RuntimeError, ValueError
        return _describe(exc)
    return None


def full_range_update(qsv: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Calibration statistics over every sample so far: the smallest min and the largest max,
    with the statistics of the algorithms that keep more (GPTQ's Hessian, OSCAR's moments)
    merged by the quantizer's own rules (a custom update replaces the per-algorithm ones)."""
    from litert_quantizer.utils import qsv_utils

    if not qsv:
        return new
    if "hessian" in qsv:
        merged = qsv_utils.gptq_and_moving_average_update(qsv, new)
    elif "mu2" in qsv:
        merged = qsv_utils.oscar_and_moving_average_update(qsv, new)
    else:
        merged = dict(qsv)
    return {**merged, "min": np.minimum(qsv["min"], new["min"]), "max": np.maximum(qsv["max"], new["max"])}


def _signatures_fed(float_model: bytes, samples: Samples, *, key: str) -> list[str]:
    """The signatures whose inputs are exactly the samples' inputs."""
    try:
        interpreter = Interpreter(model_content=float_model)
    except ValueError as exc:
        raise InputError(f"the float model does not load: {_describe(exc)}", key=key) from None
    names = set(samples.inputs)
    fed = [signature for signature, io in interpreter.get_signature_list().items() if set(io["inputs"]) == names]
    if not fed:
        raise InputError(f"no signature of the float model takes the inputs {', '.join(sorted(names))}", key=key)
    return fed


def _qsvs_from_json(
    calibration: dict[str, Any], float_model: bytes, recipe: Recipe, *, key: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The quantizer's calibration result from `calibrate`'s JSON form, and its provenance."""
    try:
        metadata = calibration["metadata"]
        model_sha256, algorithm = metadata["float_model_sha256"], metadata["algorithm"]
        provenance = {
            "num_calibration_samples": metadata["num_samples_calibrated"],
            "calibration_samples_sha256": metadata["samples_sha256"],
        }
        # Calibration values are float32; JSON keeps them exactly, so this restores them bit for bit.
        qsvs = {
            tensor: {stat: np.asarray(value, dtype=np.float32) for stat, value in qsv.items()}
            for tensor, qsv in calibration["model_qsvs"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"malformed calibration: {_describe(exc)}", key=key) from None
    if model_sha256 != hashlib.sha256(float_model).hexdigest():
        raise InputError("the calibration was computed for a different float model: recalibrate", key=key)
    if calibrating_algorithms(recipe) != {algorithm}:
        raise ConfigError(f"the recipe does not calibrate with {algorithm} only: calibrate inline", key=key)
    return qsvs, provenance


def _recipe_manager(recipe: Recipe) -> recipe_manager.RecipeManager:
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe)
    return manager


def _is_static_min_max(recipe: Recipe) -> bool:
    return _recipe_manager(recipe).need_calibration() and calibrating_algorithms(recipe) == {MIN_MAX}


def calibrating_algorithms(recipe: Recipe) -> set[str]:
    return {entry["algorithm_key"] for entry in recipe if entry["algorithm_key"] != NO_QUANTIZE}


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"
