"""Describe a converted source model and record its reference outputs.

The report says what the model is (signatures, parameters, size), which ops its float
`.tflite` uses under the conversion flags (conversion itself stops, naming the key, when
the flags do not allow an op), whether this host can run it (select TF ops need the Flex
delegate, which no pip package here ships), and how the source itself scores on the
evaluation set, which later stages must match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.datasets import INPUT, LABEL, Samples
from pipeline.errors import InputError, first_line
from pipeline.io import read_npz, save_npz
from pipeline.sources import LoadedSource
from pipeline.tflite_model import OpUse

BATCH_SIZE = 32
OUTPUT = "output:"

# Where a builtins-only conversion exists for what needs select TF ops, measured with
# TensorFlow 2.21 and Keras 3 (tests/test_sources.py keeps the measurement honest):
# Keras recurrent layers become a while loop over TensorList ops.
BUILTIN_PATHS = {
    "TensorList": "Keras LSTM/GRU/SimpleRNN layers: set unroll=True on the layer (needs a fixed sequence length; "
                  "builtin ops at any batch size), or converter_options._experimental_default_to_single_batch_in_"
                  "tensor_list_ops: true (a builtin WHILE loop, batch size 1 only); "
                  "_experimental_lower_tensor_list_ops alone does not help",
}


@dataclass(frozen=True)
class Evaluation:
    report: dict
    samples: Samples
    reference_outputs: dict[str, np.ndarray]


def run_source(source: LoadedSource, samples: Samples, *, desc: str, data_key: str | None = None,
               data_file: str | None = None) -> dict[str, np.ndarray]:
    """Run the source model over all samples in batches; outputs keyed by signature name. A
    sample the source rejects (a token id outside its vocabulary...) is an input error naming
    the data (`data_key`, `data_file`)."""
    chunks: dict[str, list[np.ndarray]] = {}
    total = -(-len(samples) // BATCH_SIZE)
    for start, batch in enumerate(tqdm(samples.batches(BATCH_SIZE), total=total, desc=desc, unit="batch", leave=False)):
        try:
            outputs = source.call(batch)
        except Exception as exc:  # TensorFlow's own errors, many types: the data did not fit the model
            raise InputError(f"the source model fails on samples {start * BATCH_SIZE}..{start * BATCH_SIZE + BATCH_SIZE - 1}: "
                             f"{type(exc).__name__}: {_tensorflow_reason(exc)}", file=data_file, key=data_key) from None
        for key, value in outputs.items():
            chunks.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in chunks.items()}


def _tensorflow_reason(exc: Exception) -> str:
    """The sentence that says what went wrong: TensorFlow puts "Graph execution error:" first and
    the reason, after a function name, in its `message`."""
    text = getattr(exc, "message", None) or str(exc)
    text = re.sub(r"\{\{[^}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]", " ", text)
    return " ".join(text.split())[:300] or first_line(exc)


def class_labels(labels: np.ndarray) -> bool:
    """Integer (or boolean) labels are classes (accuracy applies); float labels are regression targets."""
    return labels.dtype.kind in "iub"


def indexes_classes(labels: np.ndarray, outputs: np.ndarray) -> bool:
    """Whether `labels` hold one class index per sample for an output of several units (not
    0/1 per unit of a one-unit or multi-label output)."""
    samples = len(labels)
    return labels.reshape(samples, -1).shape[1] == 1 and outputs.reshape(samples, -1).shape[1] > 1


def decision_threshold(values: np.ndarray) -> float:
    """Where a one-unit or multi-label output says yes: 0.5 for probabilities (a sigmoid's), 0
    for logits."""
    return 0.5 if values.size and float(values.min()) >= 0.0 and float(values.max()) <= 1.0 else 0.0


def accuracy(outputs: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Against one class index per sample (or one-hot rows), top-1 accuracy; against 0/1 labels
    for each unit of the output (a binary classifier's one unit, a multi-label output's multi-hot
    rows), the share of units on the right side of `threshold` (`datasets.bind` checked the shapes)."""
    scores, truth = outputs.reshape(len(labels), -1), labels.reshape(len(labels), -1)
    if truth.shape[1] > 1 and (truth.astype(np.int64).sum(axis=1) == 1).all():
        # One-hot rows are class indices written out: per unit, a softmax over 1000 classes
        # wrong on every sample would still score 0.998.
        truth = np.argmax(truth, axis=1)[:, None]
    if indexes_classes(truth, scores):
        return float(np.mean(np.argmax(scores, axis=1) == truth[:, 0]))
    return float(np.mean((scores > threshold) == (truth > 0)))


def accuracies(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
               reference: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Accuracy of each output labelled with classes; a one-unit or multi-label output is read
    at the threshold the `reference` outputs (the source's; default: `outputs`) call for, so a
    quantized model is read as its source is."""
    reference = outputs if reference is None else reference
    return {name: accuracy(outputs[name], values, decision_threshold(reference[name]))
            for name, values in labels.items() if class_labels(values) and name in outputs}


def host_support(uses: list[OpUse]) -> dict:
    """Which ops the host cannot execute, and how to avoid them where a way is known."""
    flex = sorted(u.name for u in uses if u.kind == "select_tf")
    hints = sorted({hint for op in flex for marker, hint in BUILTIN_PATHS.items() if marker in op})
    return {
        "select_tf_ops": flex,
        "executable_on_host": not flex,
        "reason": (f"select TF ops {', '.join(flex)} need the Flex delegate, which neither ai-edge-litert nor "
                   "TensorFlow's pip wheel ships: the model cannot run on this host") if flex else None,
        "builtin_paths": hints,
    }


def evaluate(source: LoadedSource, name: str, samples: Samples, uses: list[OpUse], *, source_path: str,
             flags: dict, data_key: str | None = None, data_file: str | None = None) -> Evaluation:
    """Reference outputs of the source on `samples` (already bound to its inputs), and the
    report; `uses` are the ops of the float model the conversion flags produced."""
    outputs = run_source(source, samples, desc=f"evaluate {name}", data_key=data_key, data_file=data_file)
    metrics: dict[str, float] = {"num_samples": len(samples)}
    per_output = accuracies(outputs, samples.labels)
    if len(per_output) == 1:
        metrics["accuracy"] = next(iter(per_output.values()))
    metrics.update({f"accuracy.{output}": value for output, value in per_output.items() if len(per_output) > 1})
    path = Path(source_path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    report = {
        "model": name,
        "format": source.format.value,
        "conversion_path": source.conversion_path,
        "inputs": [vars(t) for t in source.inputs],
        "outputs": [vars(t) for t in source.outputs],
        "labelled_outputs": sorted(samples.labels),
        "parameter_count": source.parameter_count,
        "source_size_bytes": sum(f.stat().st_size for f in files),
        "evaluation_sha256": samples.sha256,
        "input_ranges": input_ranges(samples),
        "ops": {"used": [vars(u) for u in uses], **flags},
        "host": host_support(uses),
        "metrics": metrics,
    }
    return Evaluation(report, samples, outputs)


def input_ranges(samples: Samples) -> dict[str, dict[str, list[float]]]:
    """Per input, the smallest and largest value of each channel (last axis) of the evaluation
    data: the range the model is validated on, which declared metadata normalization must match."""
    ranges = {}
    for name, array in samples.inputs.items():
        if array.dtype.kind != "f" or array.ndim < 2 or not array.size:
            continue
        channels = array.reshape(-1, array.shape[-1])
        ranges[name] = {"min": [float(v) for v in channels.min(axis=0)], "max": [float(v) for v in channels.max(axis=0)]}
    return ranges


def save_reference(evaluation: Evaluation, handle) -> None:
    """Evaluation inputs and labels, and the source's outputs, by name, for the validate stage."""
    samples = evaluation.samples
    save_npz(handle, {**{INPUT + k: v for k, v in samples.inputs.items()},
                      **{LABEL + k: v for k, v in samples.labels.items()},
                      **{OUTPUT + k: v for k, v in evaluation.reference_outputs.items()}})


def load_reference(path) -> tuple[Samples, dict[str, np.ndarray]]:
    arrays = read_npz(path, what="reference outputs")

    def part(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    inputs, outputs = part(INPUT), part(OUTPUT)
    if not inputs or not outputs:
        raise InputError("holds no inputs or no outputs: run the convert stage again", file=str(path))
    return Samples(inputs, part(LABEL)), outputs
