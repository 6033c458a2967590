"""Quantize a converted float .tflite model into one variant.

Backends (`QuantizationConfig.backend`):
  none              the float model unchanged;
  litert_quantizer  LiteRT Quantizer recipes applied to the float .tflite (the recommended
                    path; static recipes calibrate, or reuse the model's `calibrate` result);
  converter         TFLiteConverter post-training quantization (deprecated upstream, but the
                    only source of float16 models).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from pipeline.config import Backend, QuantizationConfig
from pipeline.datasets import Samples
from pipeline.errors import ConfigError
from pipeline.quantize import converter, litert
from pipeline.quantize.litert import calibrate, load_recipe, uses_shared_calibration
from pipeline.tflite_model import select_tf_ops

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["QuantizedModel", "calibrate", "check_runs_on_host", "load_recipe", "needs_calibration", "quantize", "uses_shared_calibration"]


@dataclass(frozen=True)
class QuantizedModel:
    model: bytes
    info: dict[str, Any]  # JSON-able provenance: backend, recipe/mode, calibration, sizes, versions


def check_runs_on_host(float_model: bytes, *, key: str) -> None:
    """Calibration runs the model: refuse, before any work, one that needs select TF ops."""
    flex = select_tf_ops(float_model)
    if flex:
        raise ConfigError(f"calibrates by running the model, whose select TF ops ({', '.join(flex)}) this host "
                          "cannot run (no Flex delegate): build this model with a variant that does not calibrate "
                          "(float, dynamic, weight-only, float16)", key=key)


def needs_calibration(variant: QuantizationConfig, *, key: str = "quantization") -> bool:
    """Whether quantizing `variant` calibrates: it then needs representative samples, or the
    model's `calibrate` result when `uses_shared_calibration`."""
    if variant.backend is Backend.litert_quantizer:
        return litert.needs_calibration(variant, key=key)
    return variant.backend is Backend.converter and variant.mode in converter.INTEGER_MODES


def quantize(
    float_model: bytes,
    variant: QuantizationConfig,
    *,
    samples: Samples | None,
    make_converter: Callable[[], "tf.lite.TFLiteConverter"] | None,
    calibration: dict[str, Any] | None = None,
    key: str = "quantization",
    statistics: litert.Statistics | None = None,
) -> QuantizedModel:
    """Quantize `float_model` as `variant` describes; `key` names the variant in errors.

    `samples` calibrate static recipes and integer converter modes; `calibration` (from
    `calibrate`) replaces them for recipes that can share it, as `statistics` (in memory) do
    for any static recipe they were calibrated for. `make_converter` builds the
    model's configured TFLiteConverter (converter backend only).
    """
    start = time.perf_counter()
    if needs_calibration(variant, key=key):
        check_runs_on_host(float_model, key=key)
    if variant.backend is Backend.none:
        model, info = float_model, {}
    elif variant.backend is Backend.litert_quantizer:
        model, info = litert.quantize(float_model, variant, samples=samples, calibration=calibration, key=key,
                                      statistics=statistics)
    else:
        model, info = converter.quantize(variant, make_converter=make_converter, samples=samples, key=key)
    return QuantizedModel(
        model,
        {
            "backend": variant.backend.value,
            **info,
            "seconds": round(time.perf_counter() - start, 3),
            "float_bytes": len(float_model),
            "bytes": len(model),
            "size_ratio": round(len(model) / len(float_model), 4),
        },
    )
