"""Selective quantization: a static LiteRT Quantizer recipe with some ops kept in float.

The quantizer matches each recipe entry's `regex` against an op's scope, the op's output
tensor names joined as "a;b;" (`litert_quantizer.utils.tfl_flatbuffer_utils.get_op_scope`),
and the last matching entry wins. Appending a `no_quantize` entry per tensor therefore keeps
the ops producing those tensors in float; the quantizer puts (de)quantize ops around them.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from pipeline.config import Backend, QuantizationConfig
from pipeline.quantize import QuantizedModel, needs_calibration, quantize
from pipeline.quantize.litert import FLOAT_CASTING, NO_QUANTIZE, Recipe, Statistics
from pipeline.tflite_model import builtin_names, parse


def is_selective_candidate(variant: QuantizationConfig, *, key: str) -> bool:
    """Whether keeping layers in float can help: a LiteRT Quantizer recipe that quantizes activations."""
    return variant.backend is Backend.litert_quantizer and needs_calibration(variant, key=key)


def scope_regex(tensor: str) -> str:
    """Matches the scope of the op that outputs `tensor`, and of no op with a longer name."""
    return f"(^|;){re.escape(tensor)};"


def keep_in_float(recipe: Recipe, tensors: Iterable[str]) -> Recipe:
    """`recipe` followed by one no_quantize entry per tensor (later entries win)."""
    return [*recipe, *({"regex": scope_regex(t), "operation": "*", "algorithm_key": NO_QUANTIZE, "op_config": {}}
                       for t in tensors)]


@dataclass(frozen=True)
class OpNode:
    op: str  # the builtin operator's name
    # The op-produced tensors the op reads (not weights, not model inputs). An op kept in float
    # still reads quantized inputs when the ops feeding it are quantized, so the error a
    # quantized input carries stays: keeping a layer in float keeps its feeders too.
    feeders: list[str]


def ops_by_output(float_model: bytes) -> dict[str, OpNode]:
    """Output tensor name -> the op producing it, in graph order."""
    root = parse(float_model)
    names = builtin_names()
    nodes: dict[str, OpNode] = {}
    for index in range(root.SubgraphsLength()):
        subgraph = root.Subgraphs(index)
        name = lambda tensor: subgraph.Tensors(tensor).Name().decode()
        ops = [subgraph.Operators(i) for i in range(subgraph.OperatorsLength())]
        produced = {op.Outputs(o) for op in ops for o in range(op.OutputsLength())}
        for op in ops:
            code = root.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            inputs = [name(op.Inputs(i)) for i in range(op.InputsLength()) if op.Inputs(i) in produced]
            for output in range(op.OutputsLength()):
                nodes[name(op.Outputs(output))] = OpNode(names.get(builtin, str(builtin)), inputs)
    return nodes


def with_algorithm(recipe: Recipe, algorithm: str) -> Recipe:
    """`recipe` calibrating with `algorithm`: every entry that quantizes takes it (entries that
    keep ops in float or cast them to float16 keep theirs)."""
    return [entry if entry["algorithm_key"] in (NO_QUANTIZE, FLOAT_CASTING) else {**entry, "algorithm_key": algorithm}
            for entry in recipe]


def quantize_with_recipe(float_model: bytes, variant: QuantizationConfig, recipe: Recipe, *,
                         statistics: Statistics | None, key: str) -> QuantizedModel:
    """Quantize as `variant` does (its I/O types), but with `recipe` instead of its own; a static
    recipe takes the `statistics` calibrated for it."""
    with tempfile.TemporaryDirectory(prefix="litert-selective-") as folder:
        # The quantize API takes recipes by name or file; the file lives only for this call.
        recipe_file = Path(folder) / "recipe.json"
        recipe_file.write_text(json.dumps(recipe), encoding="utf-8")
        result = quantize(float_model, replace(variant, recipe=str(recipe_file)), samples=None,
                          statistics=statistics, make_converter=None, key=key)
    info = {**result.info, "recipe": variant.recipe}
    info.pop("recipe_sha256", None)  # of the temporary file: the recipe itself is written beside the model
    return QuantizedModel(result.model, info)
