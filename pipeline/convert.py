"""Float conversion: one `.tflite` per model, honouring the model's conversion flags.

A model converts once. Only when that conversion fails does a second, permissive one (every
op set allowed) run, to name the ops the flags leave out and the config key that allows them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pipeline.config import PARAMS_FILE, ConversionConfig, ModelConfig, OpsSet
from pipeline.errors import GateError
from pipeline.evaluate import host_support
from pipeline.sources import LoadedSource
from pipeline.tflite_model import OpUse, op_uses
from pipeline.tensorflow_import import tensorflow


@dataclass(frozen=True)
class Converted:
    model: bytes
    info: dict


@contextlib.contextmanager
def native_stderr_held() -> Iterator[None]:
    """Hold what TensorFlow's C++ code writes to stderr (fd 2) during the block: shown if the
    block succeeds, dropped if it raises. A failed conversion dumps its MLIR diagnostics there,
    many lines that the exception carries too; the one-line error then says it all."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)  # reached only on success
        sys.stderr.buffer.write(held.read())
        sys.stderr.flush()


def configure(converter: Any, conversion: ConversionConfig) -> Any:
    """Apply the config's op sets and flags to a TFLiteConverter."""
    tf = tensorflow()

    ops = {
        OpsSet.builtins: tf.lite.OpsSet.TFLITE_BUILTINS,
        OpsSet.select_tf_ops: tf.lite.OpsSet.SELECT_TF_OPS,
    }
    converter.target_spec.supported_ops = [ops[o] for o in conversion.ops]
    converter.allow_custom_ops = conversion.allow_custom_ops
    for option, value in converter_options(conversion).items():
        setattr(converter, option, value)
    return converter


def converter_options(conversion: ConversionConfig) -> dict[str, bool]:
    """The TFLiteConverter attributes the config sets (the schema allow-lists their names)."""
    return {name: value for name, value in vars(conversion.converter_options).items() if value is not None}


def converter_factory(source: LoadedSource, model: ModelConfig) -> Callable[[], Any]:
    """A zero-argument factory of configured converters (the converter backend needs one)."""
    return lambda: configure(source.make_converter(), model.conversion)


def disallowed_ops(uses: list[OpUse], model: ModelConfig, name: str) -> list[str]:
    """One message per op the conversion flags do not allow, naming the key to change."""
    problems = []
    select = sorted(u.name for u in uses if u.kind == "select_tf")
    custom = sorted(u.name for u in uses if u.kind == "custom")
    if select and OpsSet.select_tf_ops not in model.conversion.ops:
        hints = host_support(uses)["builtin_paths"]
        problems.append(
            f"ops {', '.join(select)} need select TF ops: add select_tf_ops to model.{name}.conversion.ops"
            + "".join(f" (or avoid them: {hint})" for hint in hints)
        )
    if custom and not model.conversion.allow_custom_ops:
        problems.append(f"custom ops {', '.join(custom)} need model.{name}.conversion.allow_custom_ops: true")
    return problems


def convert_float(source: LoadedSource, model: ModelConfig, name: str) -> Converted:
    """The float model under the config's flags; a GateError naming the key when they fall short."""
    tf = tensorflow()

    started = time.perf_counter()
    try:
        with native_stderr_held():
            tflite = bytes(converter_factory(source, model)().convert())
    except Exception as exc:  # ConverterError and friends, with multi-line text
        raise _conversion_failure(source, model, name, exc) from None
    return Converted(
        tflite,
        {
            "conversion_path": source.conversion_path,
            "converter": "tf.lite.TFLiteConverter",
            "tensorflow_version": tf.__version__,
            "ops": [o.value for o in model.conversion.ops],
            "allow_custom_ops": model.conversion.allow_custom_ops,
            "converter_options": converter_options(model.conversion),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )


def _conversion_failure(source: LoadedSource, model: ModelConfig, name: str, exc: Exception) -> GateError:
    """Why the flags' conversion failed: the ops they leave out, found by a permissive
    conversion (each message names its key), else the converter's own words."""
    try:
        problems = disallowed_ops(op_uses(convert_permissive(source)), model, name)
    except Exception:  # not convertible at all: the original error says why
        problems = []
    if problems:
        return GateError("; ".join(problems), file=PARAMS_FILE)
    return GateError(f"conversion failed: {_summarize(exc)}", key=f"model.{name}.conversion")


def convert_permissive(source: LoadedSource) -> bytes:
    """Convert with every op set allowed, to learn which ops the model really needs."""
    tf = tensorflow()

    converter = source.make_converter()
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    converter.allow_custom_ops = True
    converter.exclude_conversion_metadata = True
    return bytes(converter.convert())


def _summarize(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    interesting = [line for line in lines if "error:" in line or "not supported" in line or "Ops" in line]
    return " | ".join((interesting or lines or [type(exc).__name__])[:3])[:600]
