"""A small MLflow pyfunc flavour for LiteRT models (MLflow has none: mlflow#5035).

Every registered version is a LoggedModel whose folder holds the delivered `.tflite`, its
validation report and this file, which MLflow loads from the model's `code/` folder as the
module `mlflow_tflite`. So a consumer needs MLflow, NumPy and ai-edge-litert, not this project:

    model = mlflow.pyfunc.load_model("models:/vision.digits@production-float")
    outputs = model.predict({"image": images})   # input name -> array; output name -> array

Inputs are fed by signature name in the model's own dtypes (a one-input model also takes a
bare array), one sample at a time, as the pipeline's validation runs them; integer inputs and
outputs of fully quantized models are passed as they are (no scaling).
"""

from __future__ import annotations

from typing import Any

import numpy as np

MODEL_FILE_KEY = "tflite"  # the flavour's entry in MLmodel (where the file is)


class LiteRTModel:
    """The delivered model in the LiteRT interpreter (its only signature)."""

    def __init__(self, path: str) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=path)
        keys = list(self._interpreter.get_signature_list())
        self._runner = self._interpreter.get_signature_runner(keys[0] if keys else None)
        self.inputs = {name: detail["dtype"] for name, detail in self._runner.get_input_details().items()}

    def predict(self, model_input: Any, params: dict | None = None) -> dict[str, np.ndarray]:  # noqa: ARG002
        if not isinstance(model_input, dict):
            if len(self.inputs) != 1:
                raise ValueError(f"this model has {len(self.inputs)} inputs: pass a dict keyed by {sorted(self.inputs)}")
            model_input = {next(iter(self.inputs)): model_input}
        missing = sorted(set(self.inputs) - set(model_input))
        if missing:
            raise ValueError(f"missing inputs {missing} (the model takes {sorted(self.inputs)})")
        feed = {name: np.asarray(model_input[name], dtype) for name, dtype in self.inputs.items()}
        count = len(next(iter(feed.values())))
        results: dict[str, list[np.ndarray]] = {}
        for index in range(count):
            outputs = self._runner(**{name: array[index:index + 1] for name, array in feed.items()})
            for name, value in outputs.items():
                results.setdefault(name, []).append(value)
        return {name: np.concatenate(values) for name, values in results.items()}


def _load_pyfunc(data_path: str) -> LiteRTModel:
    """MLflow's entry point for `loader_module` flavours: `data_path` is the `.tflite`."""
    return LiteRTModel(data_path)
