"""Backend `converter`: post-training quantization inside TFLiteConverter.

Deprecated upstream in favour of LiteRT Quantizer, but still the only source of float16
models. The converter re-converts from the source model, so it needs TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from pipeline.config import ConverterMode, IoType, QuantizationConfig
from pipeline.datasets import Samples
from pipeline.errors import ConfigError, GateError, PipelineError, first_line
from pipeline.tensorflow_import import tensorflow

if TYPE_CHECKING:
    import tensorflow as tf

# Modes that quantize activations, so calibrate on representative samples.
INTEGER_MODES = (ConverterMode.int8, ConverterMode.int16x8)
# Model input/output types each mode can produce.
IO_TYPES = {
    ConverterMode.dynamic: {IoType.float32},
    ConverterMode.float16: {IoType.float32},
    ConverterMode.int8: {IoType.float32, IoType.int8, IoType.uint8},
    ConverterMode.int16x8: {IoType.float32, IoType.int16},
}


def quantize(
    variant: QuantizationConfig,
    *,
    make_converter: Callable[[], "tf.lite.TFLiteConverter"] | None,
    samples: Samples | None,
    key: str,
) -> tuple[bytes, dict[str, Any]]:
    """Convert again from the source with the variant's mode; integer modes calibrate on `samples`."""
    mode = variant.mode
    if mode is None:
        raise ConfigError("the converter backend needs a mode", key=f"{key}.mode")
    for io in ("inference_input_type", "inference_output_type"):
        allowed = IO_TYPES[mode]
        if getattr(variant, io) not in allowed:
            names = ", ".join(sorted(t.value for t in allowed))
            raise ConfigError(f"mode {mode.value} supports {names}", key=f"{key}.{io}")
    integer = mode in INTEGER_MODES
    if integer and samples is None:
        raise ConfigError(f"mode {mode.value} needs representative samples to calibrate", key=key)
    if make_converter is None:
        raise PipelineError("the converter backend needs the model's converter", key=key)

    tf = tensorflow()  # ~3 s to import: only this backend needs it

    converter = make_converter()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode is ConverterMode.float16:
        converter.target_spec.supported_types = [tf.float16]
    if integer:
        converter.representative_dataset = lambda: _representative_dataset(samples)
        integer_ops = (
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8
            if mode is ConverterMode.int8
            else tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        )
        # Replace the float builtins but keep Select TF ops if the model needs them.
        select_ops = [ops for ops in converter.target_spec.supported_ops if ops is tf.lite.OpsSet.SELECT_TF_OPS]
        converter.target_spec.supported_ops = [integer_ops, *select_ops]
        converter.inference_input_type = tf.as_dtype(variant.inference_input_type.value)
        converter.inference_output_type = tf.as_dtype(variant.inference_output_type.value)
    from pipeline.convert import (
        native_stderr_held,  # a failed conversion's MLIR dump: the one line says it
    )

    try:
        with native_stderr_held():
            model = converter.convert()
    except Exception as exc:  # ConverterError, ValueError, RuntimeError... with multi-line text
        raise GateError(f"TFLiteConverter failed: {type(exc).__name__}: {first_line(exc)}", key=key) from exc

    info = {
        "mode": mode.value,
        "inference_input_type": variant.inference_input_type.value,
        "inference_output_type": variant.inference_output_type.value,
        "calibration": "inline" if integer else None,
        "num_calibration_samples": len(samples) if integer else None,
        "calibration_samples_sha256": samples.sha256 if integer else None,
        "versions": {"tensorflow": tf.__version__},
    }
    return model, info


def _representative_dataset(samples: Samples) -> Iterator[dict[str, np.ndarray]]:
    """Samples by input name, in the dtypes the model takes (token ids stay integers)."""
    for index in tqdm(range(len(samples)), desc="calibrating (converter)", unit="sample"):
        yield samples.sample(index)
