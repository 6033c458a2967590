"""Per-tensor quantization error of static integer models, from LiteRT Quantizer's validator.

`litert_quantizer.model_validator.compare_model` (what `Quantizer.validate()` runs) feeds
the same samples to the float and the quantized model and compares every tensor the two
share by name. It needs no recipe or quantizer object: only both models' bytes.
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
    from litert_quantizer import model_validator
    from litert_quantizer.utils.validation_utils import ValidationErrorMetric as Metric

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
            result = model_validator.compare_model(
                float_model, model, {key: fed}, [Metric.MSE, Metric.SNR, Metric.COSINE_SIMILARITY],
                num_threads=num_threads,
            ).get_signature_comparison_result(key)
    except Exception as exc:  # the validator's own failures: this analysis is optional
        return [], f"LiteRT Quantizer validator failed: {type(exc).__name__}: {first_line(exc)}"
    # Integer shape/index tensors compare trivially equal: keep float activations only.
    float_tensors = {d["name"] for d in float_interpreter.get_tensor_details() if d["dtype"] == np.float32}
    rows = [
        # The validator's SNR is a power ratio (mean over samples): in dB like ours.
        LayerError(name, kind, snr_db(values["snr"], 1.0), values["cosine_similarity"], values["mse"])
        for kind, tensors in (("intermediate", result.intermediate_tensors), ("output", result.output_tensors))
        for name, values in tensors.items()
        if name in float_tensors
    ]
    if not rows:
        return [], "the models share no float activation tensor by name"
    return sorted(rows, key=lambda row: row.snr_db), None


def to_csv(rows: list[LayerError]) -> str:
    """One line per tensor, worst first; only the header when the comparison did not apply."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([f.name for f in fields(LayerError)])
    writer.writerows(astuple(row) for row in rows)
    return text.getvalue()
