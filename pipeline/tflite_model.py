"""Read facts from a `.tflite` flatbuffer without TensorFlow: ops, tensors, signatures."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pipeline.datasets import TensorInfo
from pipeline.errors import InputError


@lru_cache(maxsize=1)
def builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {
        value: name
        for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_") and isinstance(value, int)
    }


@dataclass(frozen=True)
class OpUse:
    name: str  # builtin name, "Flex<TfOp>" for select TF ops, or the custom code
    kind: str  # builtin | select_tf | custom
    version: int


def parse(model: bytes, *, file: str | None = None):
    """The flatbuffer's root `Model` (read-only accessors), or a clear error."""
    from ai_edge_litert import schema_py_generated as schema

    if len(model) < 8 or model[4:8] != b"TFL3":
        raise InputError("not a LiteRT model (missing TFL3 identifier)", file=file)
    try:
        root = schema.Model.GetRootAs(model, 0)
        root.SubgraphsLength()
        return root
    except Exception as exc:  # a truncated flatbuffer fails in many ways
        raise InputError(f"corrupt LiteRT model: {exc}", file=file) from None


def op_uses(model: bytes, *, file: str | None = None) -> list[OpUse]:
    """Every distinct operator code the model uses."""
    from ai_edge_litert import schema_py_generated as schema

    root = parse(model, file=file)
    names = builtin_names()
    used = set()
    for index in range(root.SubgraphsLength()):
        subgraph = root.Subgraphs(index)
        for op_index in range(subgraph.OperatorsLength()):
            used.add(subgraph.Operators(op_index).OpcodeIndex())
    uses = []
    for code_index in sorted(used):
        code = root.OperatorCodes(code_index)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            custom = (code.CustomCode() or b"").decode()
            kind = "select_tf" if custom.startswith("Flex") else "custom"
            uses.append(OpUse(custom, kind, code.Version()))
        else:
            uses.append(OpUse(names.get(builtin, str(builtin)), "builtin", code.Version()))
    return sorted(set(uses), key=lambda u: (u.kind, u.name, u.version))


def select_tf_ops(model: bytes) -> list[str]:
    """The select TF (Flex) ops the model uses: no interpreter on this host can run them."""
    return [u.name for u in op_uses(model) if u.kind == "select_tf"]


# TensorType -> NumPy dtype name, for the types a model input or output can have.
_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8",
           10: "float64"}


@dataclass(frozen=True)
class Signature:
    key: str | None  # None: a model without signature defs (its subgraph 0 by tensor name)
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    # The names in the order of the subgraph's own input (output) list, which TFLITE_METADATA follows.
    input_order: list[str]
    output_order: list[str]


def signature(model: bytes, wanted: str | None = None, *, file: str | None = None) -> Signature:
    """The inputs and outputs of signature `wanted` (or of the only one), read from the flatbuffer:
    no interpreter, so it works for models the host cannot run (select TF ops)."""
    root = parse(model, file=file)
    keys = [root.SignatureDefs(i).SignatureKey().decode() for i in range(root.SignatureDefsLength())]
    if not keys:
        graph = root.Subgraphs(0)
        inputs = [_tensor(graph, graph.Inputs(i), None) for i in range(graph.InputsLength())]
        outputs = [_tensor(graph, graph.Outputs(i), None) for i in range(graph.OutputsLength())]
        return Signature(None, inputs, outputs, [t.name for t in inputs], [t.name for t in outputs])
    if wanted in keys:
        index = keys.index(wanted)
    elif len(keys) == 1:
        index = 0
    else:
        raise InputError(f"no signature '{wanted}' in the model (has: {', '.join(sorted(keys))})", file=file)
    definition = root.SignatureDefs(index)
    graph = root.Subgraphs(definition.SubgraphIndex())
    inputs = {m.TensorIndex(): m.Name().decode() for m in map(definition.Inputs, range(definition.InputsLength()))}
    outputs = {m.TensorIndex(): m.Name().decode() for m in map(definition.Outputs, range(definition.OutputsLength()))}
    input_order = [inputs[graph.Inputs(i)] for i in range(graph.InputsLength()) if graph.Inputs(i) in inputs]
    output_order = [outputs[graph.Outputs(i)] for i in range(graph.OutputsLength()) if graph.Outputs(i) in outputs]
    return Signature(keys[index], [_tensor(graph, i, name) for i, name in inputs.items()],
                     [_tensor(graph, i, name) for i, name in outputs.items()], input_order, output_order)


def _tensor(graph, index: int, name: str | None) -> TensorInfo:
    tensor = graph.Tensors(index)
    shape = [tensor.ShapeSignature(i) for i in range(tensor.ShapeSignatureLength())] or \
        [tensor.Shape(i) for i in range(tensor.ShapeLength())]
    return TensorInfo(name or tensor.Name().decode(), [None if d == -1 else int(d) for d in shape],
                      _DTYPES.get(tensor.Type(), f"type {tensor.Type()}"))
