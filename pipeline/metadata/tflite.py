"""Access to the LiteRT model flatbuffer (TFLite `schema.fbs`, file identifier "TFL3").

Reads go through the generated accessors (only the touched fields are decoded). Rewrites
unpack and repack the whole model with the generated object API: about 0.04 s for a 14 MB
model. Repacking is deterministic and aligns every buffer's data to 16 bytes, as the schema
asks (the converter's and the quantizer's output do not always): a model stripped of its
metadata compares equal to any other repack of the same model.
"""

from __future__ import annotations

import functools
import struct
from typing import Callable, TypeVar

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as tfl

from pipeline.errors import InputError
from pipeline.tflite_model import parse

METADATA_NAME = "TFLITE_METADATA"  # the model `metadata` entry naming the M001 buffer

_Result = TypeVar("_Result")


def _malformed_is_input_error(function: Callable[..., _Result]) -> Callable[..., _Result]:
    """Report a truncated or corrupt flatbuffer (offsets out of range) as an InputError."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (struct.error, IndexError) as exc:
            raise InputError(f"malformed LiteRT model: {exc}") from exc

    return wrapper


@_malformed_is_input_error
def io_shapes(model: bytes) -> tuple[list[list[int]], list[list[int]]]:
    """Shapes of subgraph 0's inputs and outputs, in order; -1 marks a dynamic dimension."""
    root = parse(model)
    if root.SubgraphsLength() == 0:
        raise InputError("the model has no subgraph")
    graph = root.Subgraphs(0)

    def shape(tensor_index: int) -> list[int]:
        tensor = graph.Tensors(tensor_index)
        signature = [tensor.ShapeSignature(i) for i in range(tensor.ShapeSignatureLength())]
        return signature or [tensor.Shape(i) for i in range(tensor.ShapeLength())]

    return ([shape(graph.Inputs(i)) for i in range(graph.InputsLength())],
            [shape(graph.Outputs(i)) for i in range(graph.OutputsLength())])


@_malformed_is_input_error
def metadata_buffer(model: bytes) -> bytes | None:
    """The data of the buffer named TFLITE_METADATA, or None if the model has none."""
    root = parse(model)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            if not 0 <= entry.Buffer() < root.BuffersLength():
                raise InputError(f"{METADATA_NAME} names buffer {entry.Buffer()}, "
                                 "which does not exist")
            data = root.Buffers(entry.Buffer()).DataAsNumpy()
            return data.tobytes() if isinstance(data, np.ndarray) else b""
    return None


@_malformed_is_input_error
def with_metadata_buffer(model: bytes, data: bytes | None) -> bytes:
    """Repack `model` with `data` as its only TFLITE_METADATA buffer (none if `data` is None).

    The previous TFLITE_METADATA entry and its buffer are removed first, so that writing the
    same data twice gives the same bytes. Anything after the flatbuffer (a packed ZIP) is dropped.
    """
    parse(model)  # a clear error for what is not a model
    tree = tfl.ModelT.InitFromPackedBuf(model, 0)
    _inline_external_buffers(tree, model)
    _remove_metadata(tree)
    if data is not None:
        tree.buffers = (tree.buffers or []) + [tfl.BufferT(data=np.frombuffer(data, np.uint8))]
        entry = tfl.MetadataT(name=METADATA_NAME, buffer=len(tree.buffers) - 1)
        tree.metadata = (tree.metadata or []) + [entry]
    for buffer in tree.buffers or []:
        buffer.__class__ = _AlignedBufferT
    builder = flatbuffers.Builder(len(model) + len(data or b"") + 1024)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# The schema asks for buffer data aligned to 16 bytes (`force_align: 16`), which kernels may
# read in place; the generated Python packer aligns it to 1.
BUFFER_ALIGNMENT = 16


class _AlignedBufferT(tfl.BufferT):
    def Pack(self, builder: flatbuffers.Builder) -> int:
        data = None
        if self.data is not None:
            payload = np.asarray(self.data, np.uint8).tobytes()
            builder.StartVector(1, len(payload), BUFFER_ALIGNMENT)
            builder.head -= len(payload)
            builder.Bytes[builder.head:builder.head + len(payload)] = payload
            data = builder.EndVector()
        tfl.BufferStart(builder)
        if data is not None:
            tfl.BufferAddData(builder, data)
        tfl.BufferAddOffset(builder, self.offset)
        tfl.BufferAddSize(builder, self.size)
        return tfl.BufferEnd(builder)


def misaligned_buffers(model: bytes) -> list[int]:
    """Indices of buffers whose data does not start at a multiple of BUFFER_ALIGNMENT."""
    root = parse(model)
    misaligned = []
    for index in range(root.BuffersLength()):
        buffer = root.Buffers(index)
        field = buffer._tab.Offset(4)  # `data`, the buffer table's first field
        start = buffer._tab.Vector(field) if field and buffer.DataLength() else buffer.Offset()
        if start % BUFFER_ALIGNMENT:
            misaligned.append(index)
    return misaligned


# Flatbuffers address at most 2 GB; larger models must keep their buffers outside.
_FLATBUFFER_LIMIT = 2**31 - 1


def _inline_external_buffers(tree: tfl.ModelT, model: bytes) -> None:
    """Move buffers stored after the flatbuffer (offset/size) into it.

    LiteRT Quantizer writes weights that way even for small models; a repack would move
    the bytes the absolute offsets point at, so they are copied inside first.
    """
    external = [buffer for buffer in tree.buffers or [] if buffer.offset > 1]
    if not external:
        return
    if len(model) >= _FLATBUFFER_LIMIT:
        raise InputError("models over 2 GB with external buffers are not supported")
    for buffer in external:
        if buffer.offset + buffer.size > len(model):
            raise InputError("malformed LiteRT model: a buffer points past the end of the file")
        buffer.data = np.frombuffer(model, np.uint8, count=buffer.size, offset=buffer.offset)
        buffer.offset, buffer.size = 0, 0


def _remove_metadata(tree: tfl.ModelT) -> None:
    entries = tree.metadata or []
    ours = [entry for entry in entries if _name(entry) == METADATA_NAME]
    # None, not [], when nothing is left: an empty vector would serialize differently from none.
    tree.metadata = [entry for entry in entries if _name(entry) != METADATA_NAME] or None
    buffers = tree.buffers or []
    used = _used_buffers(tree)
    for index in sorted({entry.buffer for entry in ours} - used, reverse=True):
        if index == len(buffers) - 1:
            buffers.pop()
        elif 0 <= index < len(buffers):
            buffers[index] = tfl.BufferT()  # emptied, not removed: later buffer indices stay valid
    tree.buffers = buffers or None


def _used_buffers(tree: tfl.ModelT) -> set[int]:
    """Buffer indices referenced by tensors and remaining metadata entries."""
    used = {entry.buffer for entry in tree.metadata or []}
    used.update(tree.metadataBuffer if tree.metadataBuffer is not None else [])
    for graph in tree.subgraphs or []:
        used.update(tensor.buffer for tensor in graph.tensors or [])
    return used


def _name(entry: tfl.MetadataT) -> str:
    name = entry.name or b""
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else name

