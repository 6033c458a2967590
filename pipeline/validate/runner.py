"""Run a `.tflite` model over samples with the LiteRT interpreter (XNNPACK, no TensorFlow).

Inputs go in by name and outputs come back by name. Float samples feeding a quantized
(int8/uint8/int16) input are quantized with the tensor's scale and zero point, and quantized
outputs are dequantized; native integer and bool inputs (token ids, masks) pass unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from tqdm import tqdm

from pipeline.datasets import Samples
from pipeline.errors import InputError, first_line
from pipeline.tflite_model import signature as signature_of

BATCH_SIZE = 32
# Batched and single-sample outputs must agree to this fraction of the output's range;
# XNNPACK's float rounding stays orders of magnitude below it.
BATCH_TOLERANCE = 1e-3

Feed = dict[str, np.ndarray]


class ModelRunner:
    """One model signature, called on batches of named samples."""

    def __init__(self, model: bytes, *, num_threads: int, signature_key: str | None, input_order: list[str]):
        self._interpreter = Interpreter(model_content=model, num_threads=num_threads)
        signatures = self._interpreter.get_signature_list()
        if signatures:
            self.signature = _pick_signature(signatures, signature_key)
            runner = self._interpreter.get_signature_runner(self.signature)
            self.input_details, self.output_details = runner.get_input_details(), runner.get_output_details()
            self._invoke: Callable[[Feed], Feed] = lambda feed: runner(**feed)
        else:  # a model without SignatureDef (legacy conversions): tensors in the source's order
            self.signature = None
            details = self._interpreter.get_input_details()
            if len(details) != len(input_order):
                raise InputError(f"the model has {len(details)} inputs and no signature naming them; the source "
                                 f"has {len(input_order)}")
            self.input_details = dict(zip(input_order, details))
            self.output_details = {d["name"]: d for d in self._interpreter.get_output_details()}
            self._invoke = self._invoke_tensors

    @property
    def batch_resizable(self) -> bool:
        return all(len(d["shape_signature"]) > 0 and d["shape_signature"][0] == -1 for d in self.input_details.values())

    def to_inputs(self, feed: Feed) -> Feed:
        """Samples in each input's type (float samples quantized for quantized inputs)."""
        missing = sorted(set(self.input_details) - set(feed))
        if missing:
            raise InputError(f"no samples for the model input '{missing[0]}' (samples: {', '.join(sorted(feed))})")
        return {name: _to_input(feed[name], detail) for name, detail in self.input_details.items()}

    def invoke(self, model_inputs: Feed) -> Feed:
        """Raw outputs for inputs already in the model's types (what latency measures)."""
        return self._invoke(model_inputs)

    def __call__(self, feed: Feed) -> Feed:
        """Float outputs, by output name, for a batch of named samples."""
        outputs = self.invoke(self.to_inputs(feed))
        return {name: _dequantize(value, self.output_details[name]) for name, value in outputs.items()}

    def run(self, samples: Samples, batch_size: int, *, desc: str | None = None) -> Feed:
        """Float outputs of every sample; a progress bar when `desc` is given."""
        chunks: dict[str, list[np.ndarray]] = {}
        total = -(-len(samples) // batch_size)
        for batch in tqdm(samples.batches(batch_size), total=total, desc=desc, unit="batch", leave=False,
                          disable=desc is None):
            for name, value in self(batch).items():
                chunks.setdefault(name, []).append(value)
        return {name: np.concatenate(values) for name, values in chunks.items()}

    def _invoke_tensors(self, model_inputs: Feed) -> Feed:
        for name, detail in self.input_details.items():
            self._interpreter.resize_tensor_input(detail["index"], model_inputs[name].shape)
        self._interpreter.allocate_tensors()
        for name, detail in self.input_details.items():
            self._interpreter.set_tensor(detail["index"], model_inputs[name])
        self._interpreter.invoke()
        return {name: self._interpreter.get_tensor(d["index"]) for name, d in self.output_details.items()}


def _to_input(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if scale and dtype.kind in "iu" and values.dtype.kind == "f":
        limits = np.iinfo(dtype)
        return np.clip(np.round(values / scale + zero_point), limits.min, limits.max).astype(dtype)
    return values.astype(dtype, copy=False)


def _pick_signature(signatures: dict, wanted: str | None) -> str:
    if wanted in signatures:
        return wanted
    if len(signatures) == 1:
        return next(iter(signatures))
    raise InputError(f"no signature '{wanted}' in the model (has: {', '.join(sorted(signatures))})")


def _dequantize(value: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if scale and value.dtype.kind in "iu":
        return (value.astype(np.float32) - zero_point) * np.float32(scale)
    return value


@dataclass(frozen=True)
class Run:
    outputs: Feed
    runner: ModelRunner
    batch_size: int
    # Outputs depend on the other samples in the batch (e.g. BatchNormalization run in
    # training mode): such a model was evaluated one sample at a time, as on device.
    batch_dependent: bool
    api: str = "Interpreter"  # what computed the outputs: "CompiledModel" or "Interpreter"
    fallback_reason: str | None = None  # why not the CompiledModel, when it was asked for


def run_samples(model: bytes, samples: Samples, *, num_threads: int, signature_key: str | None,
                desc: str | None = "validate", compiled: bool = False) -> Run:
    """Run every sample: through LiteRT's CompiledModel on CPU, one sample at a time, when
    `compiled` and it runs the model with the interpreter's outputs on the first sample; else
    through the interpreter, batched when every input's batch dimension is dynamic."""
    order = list(samples.inputs)

    def new_runner() -> ModelRunner:
        return ModelRunner(model, num_threads=num_threads, signature_key=signature_key, input_order=order)

    runner = new_runner()
    fallback = None
    if compiled:
        try:
            outputs = _compiled_outputs(model, runner, samples, num_threads, desc=desc)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # what the LiteRT bindings raise
            fallback = first_line(exc)
        else:
            return Run(outputs, runner, 1, False, "CompiledModel")
    batch_size = min(BATCH_SIZE, len(samples)) if runner.batch_resizable else 1
    batch_dependent = False
    if batch_size > 1:
        probe = samples.take(slice(0, batch_size))
        try:
            batched = runner(next(iter(probe.batches(batch_size))))
        except (RuntimeError, ValueError):  # a graph that only allocates with its converted batch
            runner = new_runner()
            batch_size = 1
        else:
            single = runner.run(probe, 1)
            batch_dependent = not all(_close(batched[name], single[name]) for name in batched)
            batch_size = 1 if batch_dependent else batch_size
    outputs = runner.run(samples, batch_size, desc=desc)
    return Run(outputs, runner, batch_size, batch_dependent, "Interpreter", fallback)


def _compiled_outputs(model: bytes, runner: ModelRunner, samples: Samples, num_threads: int, *,
                      desc: str | None) -> Feed:
    """Every sample's float outputs through one CompiledModel (CPU), a sample at a time at the
    buffers' own shapes (resizing them is not safe in ai-edge-litert 2.3)."""
    first = runner.to_inputs(samples.sample(0))
    invoke = _compiled_invoke(model, runner.signature, first, runner.invoke(first), num_threads)
    chunks: dict[str, list[np.ndarray]] = {}
    for index in tqdm(range(len(samples)), desc=desc, unit="sample", leave=False, disable=desc is None):
        for name, value in invoke(runner.to_inputs(samples.sample(index))).items():
            chunks.setdefault(name, []).append(_dequantize(value, runner.output_details[name]))
    return {name: np.concatenate(values) for name, values in chunks.items()}


def _close(batched: np.ndarray, single: np.ndarray) -> bool:
    batched, single = batched.astype(np.float64), single.astype(np.float64)
    scale = float(np.max(np.abs(single))) if single.size else 0.0
    return bool(np.max(np.abs(batched - single), initial=0.0) <= BATCH_TOLERANCE * max(scale, 1e-12))


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    api: str  # what ran the invokes: "CompiledModel" or "Interpreter"
    fallback_reason: str | None = None  # why not the CompiledModel


def latency_ms(runner: ModelRunner, sample: Feed, *, model: bytes, num_threads: int, runs: int,
               warmup: int) -> Latency:
    """Median and 90th percentile of single-sample invokes, in milliseconds: through LiteRT's
    CompiledModel API on CPU where it runs the model and gives the interpreter's outputs for
    the sample, else through the interpreter (maintenance mode), with the reason."""
    model_inputs = runner.to_inputs(sample)
    expected = runner.invoke(model_inputs)  # also the reallocation at batch size 1
    try:
        compiled = _compiled_invoke(model, runner.signature, model_inputs, expected, num_threads)
        invoke, api, reason = (lambda: compiled(read=False)), "CompiledModel", None
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # what the LiteRT bindings raise
        invoke, api, reason = (lambda: runner.invoke(model_inputs)), "Interpreter", first_line(exc)
    for _ in range(max(warmup, 1)):
        invoke()
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        invoke()
        times.append((time.perf_counter() - start) * 1000.0)
    return Latency(float(np.median(times)), float(np.percentile(times, 90)), api, reason)


def _compiled_invoke(model: bytes, signature: str | None, model_inputs: Feed, expected: Feed,
                     num_threads: int) -> Callable[..., Feed]:
    """A CompiledModel (CPU) call, once checked against `expected` on `model_inputs`: it writes
    the inputs it is given (none: the last ones again), runs, and reads the outputs (unless
    `read=False`, for timing the run alone)."""
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.cpu_options import CpuOptions
    from ai_edge_litert.options import Options

    if signature is None:
        raise ValueError("the model has no signature to run by name")
    compiled = CompiledModel.from_buffer(model, options=Options(cpu_options=CpuOptions(num_threads=num_threads)))
    names = compiled.get_signature_list()[signature]
    inputs = {name: compiled.create_input_buffer_by_name(signature, name) for name in names["inputs"]}
    outputs = {name: compiled.create_output_buffer_by_name(signature, name) for name in names["outputs"]}
    for name, buffer in inputs.items():
        wanted = buffer.get_tensor_details()
        if list(wanted["shape"]) != list(model_inputs[name].shape):
            raise ValueError(f"input '{name}' has shape {wanted['shape']}, the sample {list(model_inputs[name].shape)}")
    for name, buffer in outputs.items():
        if list(buffer.get_tensor_details()["shape"]) != list(expected[name].shape):
            raise ValueError(f"output '{name}' has shape {buffer.get_tensor_details()['shape']}, the "
                             f"interpreter's {list(expected[name].shape)}")
    layout = {name: (value.shape, value.dtype) for name, value in expected.items()}

    def invoke(feed: Feed | None = None, *, read: bool = True) -> Feed:
        if feed is not None:
            for name, buffer in inputs.items():
                buffer.write(np.ascontiguousarray(feed[name]))
        compiled.run_by_name(signature, inputs, outputs)
        if not read:
            return {}
        return {name: outputs[name].read(int(np.prod(shape)), dtype).reshape(shape)
                for name, (shape, dtype) in layout.items()}

    got = invoke(model_inputs)
    for name, want in expected.items():
        if not np.allclose(got[name].astype(np.float64), want.astype(np.float64), rtol=1e-4,
                           atol=1e-5 * max(float(np.max(np.abs(want), initial=0.0)), 1.0)):
            raise ValueError(f"output '{name}' differs from the interpreter's")
    return invoke  # its closure keeps the model and its buffers alive


BENCHMARK_TOOL = "ai_edge_litert.tools.benchmark_litert_model"
BENCHMARK_TIMEOUT_SECONDS = 300


def benchmark_tool(model: bytes, *, signature: str | None, num_threads: int, runs: int, warmup: int) -> dict[str, Any]:
    """LiteRT's own benchmark tool from the ai-edge-litert wheel (CompiledModel on CPU, its
    own input values), in a child process: its JSON results, or why there are none."""
    with tempfile.TemporaryDirectory(prefix="litert-benchmark-") as folder:
        model_file, result_file = Path(folder) / "model.tflite", Path(folder) / "result.json"
        model_file.write_bytes(model)
        command = [sys.executable, "-m", BENCHMARK_TOOL, f"--model={model_file}", f"--num_threads={num_threads}",
                   f"--num_runs={max(runs, 1)}", f"--warmup_runs={max(warmup, 1)}", f"--result_json={result_file}"]
        if signature:
            command.append(f"--signature={signature}")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=BENCHMARK_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            return {"tool": BENCHMARK_TOOL, "error": f"timed out after {BENCHMARK_TIMEOUT_SECONDS} s"}
        if done.returncode != 0 or not result_file.exists():
            lines = [line for line in (done.stderr + done.stdout).splitlines() if "ERROR" in line or "Error" in line]
            error = (lines[-1] if lines else f"exit code {done.returncode}")[:500]
            try:
                integers = [t.name for t in signature_of(model, signature).inputs if t.dtype.startswith(("int", "uint"))]
            except InputError:  # not a model the tool could read at all
                integers = []
            if integers and "Unsupported dtype" not in error:  # ids (an embedding's, say) out of range fail the invoke
                error += (f" (the tool feeds integer inputs ({', '.join(integers)}) random values in -128..127, "
                          "which this model may not accept; the latency gates are measured on the evaluation samples)")
            return {"tool": BENCHMARK_TOOL, "error": error}
        try:
            result = json.loads(result_file.read_text())
            result.pop("model", None)  # the temporary file's path
        except (OSError, ValueError, AttributeError) as exc:
            return {"tool": BENCHMARK_TOOL, "error": f"unreadable results: {first_line(exc)}"}
    return {"tool": BENCHMARK_TOOL, **result}
