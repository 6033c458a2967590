"""Per-tensor quantization error of static integer models, as LiteRT Quantizer's validator
measures it.

`litert_quantizer.model_validator.compare_model` (what `Quantizer.validate()` runs) feeds the
same samples to the float and the quantized model and compares every intermediate and output
tensor the two share by name: MSE, SNR and cosine per sample, averaged over the samples. It
builds two interpreters per sample and computes each metric of each tensor apart (flattening
and cleaning both arrays four times): 3.8 s of a MobileNetV2 validation at 32 samples. Here
the same measures come from two interpreters kept for all samples and one pass per tensor,
with the quantizer's own interpreter helpers (a test checks the values against
`compare_model`'s).
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import astuple, dataclass, fields

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from pipeline.datasets import Samples
from pipeline.errors import first_line
from pipeline.tflite_model import parse
from pipeline.validate.metrics import snr_db

# compare_model builds two interpreters per sample that keep every tensor: bound the cost.
MAX_SAMPLES = 32
INTEGER_ACTIVATIONS = (schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT16)


@dataclass(frozen=True)
class LayerError:
    tensor: str
    kind: str  # intermediate | output
    snr_db: float
    cosine: float
    mse: float


def has_integer_activations(model: bytes) -> bool:
    """Whether some op produces an int8/uint8/int16 tensor: a static (full-integer) model."""
    root = parse(model)
    for index in range(root.SubgraphsLength()):
        subgraph = root.Subgraphs(index)
        for op_index in range(subgraph.OperatorsLength()):
            op = subgraph.Operators(op_index)
            for output in range(op.OutputsLength()):
                if subgraph.Tensors(op.Outputs(output)).Type() in INTEGER_ACTIVATIONS:
                    return True
    return False


def layer_errors(
    float_model: bytes, model: bytes, samples: Samples, *, num_threads: int
) -> tuple[list[LayerError], str | None]:
    """Float tensors' errors, worst (lowest SNR) first, or why the comparison does not apply."""
    if not has_integer_activations(model):
        return [], "not a static integer model: its activations are float"
    signatures = Interpreter(model_content=model).get_signature_list()
    float_interpreter = Interpreter(model_content=float_model)
    common = sorted(set(signatures) & set(float_interpreter.get_signature_list()))
    if not common:
        return [], "the models share no signature (models converted from concrete functions have none)"
    key = common[0]
    if set(float_interpreter.get_signature_runner(key).get_input_details()) != set(samples.inputs):
        return [], f"signature '{key}' does not take the evaluation inputs ({', '.join(sorted(samples.inputs))})"
    fed = [samples.sample(index) for index in range(min(len(samples), MAX_SAMPLES))]
    try:
        with warnings.catch_warnings():  # keeping every tensor is the point here, not a debugging slip
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
            rows = _compare_tensors(float_model, model, key, fed, num_threads=num_threads)
    except Exception as exc:  # the interpreters' or the quantizer's failures: this analysis is optional
        return [], f"LiteRT Quantizer validator failed: {type(exc).__name__}: {first_line(exc)}"
    if not rows:
        return [], "the models share no float activation tensor by name"
    return sorted(rows, key=lambda row: row.snr_db), None


def _compare_tensors(float_model: bytes, model: bytes, key: str, fed: list[dict[str, np.ndarray]], *,
                     num_threads: int) -> list[LayerError]:
    """`compare_model`'s intermediate and output tensors and their mean MSE, SNR and cosine, for
    the float activations (integer shape and index tensors compare trivially equal)."""
    from litert_quantizer.utils import tfl_interpreter_utils as tfl

    interpreters = [tfl.create_tfl_interpreter(m, num_threads=num_threads) for m in (float_model, model)]
    subgraphs = [tfl.get_signature_main_subgraph_index(i, key) for i in interpreters]
    signature = interpreters[0].get_signature_runner(key)  # names as the quantizer's helpers read them
    inputs, outputs = ({d["name"] for d in details.values()}
                       for details in (signature.get_input_details(), signature.get_output_details()))
    reference_details = target_details = {}
    totals: dict[str, np.ndarray] = {}
    for index, sample in enumerate(fed):
        for interpreter in interpreters:
            tfl.invoke_interpreter_signature(interpreter, sample, key)
        if index == 0:  # shapes are known once the signature ran
            reference_details, target_details = (tfl.get_tensor_name_to_details_map(i, subgraph)
                                                 for i, subgraph in zip(interpreters, subgraphs))
            # The validator leaves out the signature's inputs and the constants (weights)...
            left_out = inputs | set(tfl.get_constant_tensor_names(float_model, subgraphs[0]))
            left_out -= outputs  # ...but never an output
            totals = {name: np.zeros(3) for name, detail in reference_details.items()
                      if name in target_details and name not in left_out
                      and detail["dtype"] == np.float32 and np.all(detail["shape"])}
        for name, total in totals.items():
            total += _errors(tfl.get_tensor_data(interpreters[1], target_details[name], subgraphs[1]),
                             tfl.get_tensor_data(interpreters[0], reference_details[name], subgraphs[0]))
    return [
        # The validator's SNR is a power ratio (mean over samples): in dB like ours.
        LayerError(name, "output" if name in outputs else "intermediate", snr_db(snr, 1.0), cosine, mse)
        for name, (mse, snr, cosine) in ((name, total / len(fed)) for name, total in totals.items())
    ]


def _errors(target: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """MSE, SNR (a power ratio) and cosine of one sample's tensor, as `validation_utils` defines
    them (non-finite values replaced alike, an all-zero pair fully similar)."""
    a, b = (np.nan_to_num(np.ravel(np.asarray(x, dtype=np.float32)), nan=1e-9, neginf=-1e9, posinf=1e9)
            for x in (target, reference))
    if a.shape != b.shape:
        raise ValueError(f"a tensor has {b.size} values in the float model and {a.size} in the quantized one")
    if a.size == 0:
        return np.zeros(3)
    mse = float(np.square(a - b).mean())
    norms = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cosine = (1.0 if norms == (0.0, 0.0) else 0.0 if 0.0 in norms else float(np.dot(a, b)) / (norms[0] * norms[1]))
    return np.array([mse, float(np.square(b).mean()) / (mse + 1e-9), cosine])


def to_csv(rows: list[LayerError]) -> str:
    """One line per tensor, worst first; only the header when the comparison did not apply."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([f.name for f in fields(LayerError)])
    writer.writerows(astuple(row) for row in rows)
    return text.getvalue()
