"""Tests for pipeline.metadata: TFLITE_METADATA written, read and packed to the published format."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from dataclasses import replace

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as tfl
from ai_edge_litert.interpreter import Interpreter
from flatbuffers import number_types as N
from flatbuffers.table import Table

from pipeline.errors import ConfigError, InputError
from pipeline.metadata import (
    ModelSpec,
    TensorSpec,
    attach_metadata,
    check_spec,
    extract_packed_files,
    inspect_model,
    packed_files,
    read_metadata,
    strip_metadata,
)

LABELS = "".join(f"class_{i}\n" for i in range(10)).encode()
PROVENANCE = {"source": "tests/test_metadata.py", "commit": "0123abc"}
FILES = {"labels.txt": LABELS, "provenance.json": json.dumps(PROVENANCE).encode()}
# Values exactly representable as float32, so they read back unchanged.
SPEC = ModelSpec(
    name="tiny-classifier",
    description="Classifies 8x8 grayscale images into 10 classes.",
    version="1.2.0",
    author="litert-pipeline tests",
    license="Apache-2.0",
    inputs=(TensorSpec("image", "An 8x8 grayscale image.", content="image", color_space="GRAYSCALE",
                       mean=(127.5,), std=(127.5,), min=(0.0,), max=(255.0,)),),
    outputs=(TensorSpec("probabilities", "Probability of each class.", min=(0.0,),
                        max=(1.0,), labels="labels.txt"),),
    model_files=("provenance.json",),
)


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    """A tiny classifier converted once to float and to full-integer int8 LiteRT models."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    keras_model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        tf.keras.layers.Conv2D(4, 3, activation="relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(10, activation="softmax"),
    ])
    float_model = tf.lite.TFLiteConverter.from_keras_model(keras_model).convert()

    def representative_data():
        rng = np.random.default_rng(0)
        for _ in range(8):
            yield [rng.uniform(-1, 1, (1, 8, 8, 1)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_data
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    with warnings.catch_warnings():  # TF asks for input statistics the calibration provides
        warnings.filterwarnings("ignore", "Statistics for quantized inputs")
        int8_model = converter.convert()
    return {"float": float_model, "int8": int8_model}


@pytest.fixture(params=["float", "int8"])
def model(request, models) -> bytes:
    return models[request.param]


@pytest.fixture
def float_model(models) -> bytes:
    return models["float"]


def _metadata_entries(model: bytes) -> list[tuple[bytes, int]]:
    root = tfl.Model.GetRootAs(model, 0)
    entries = [root.Metadata(i) for i in range(root.MetadataLength())]
    return [(entry.Name(), entry.Buffer()) for entry in entries]


def _buffer_count(model: bytes) -> int:
    return tfl.Model.GetRootAs(model, 0).BuffersLength()


# -- round trip ---------------------------------------------------------------------------------

def test_read_metadata_returns_every_written_field(float_model):
    metadata = read_metadata(attach_metadata(float_model, SPEC, FILES))

    assert metadata == {
        "name": "tiny-classifier",
        "description": "Classifies 8x8 grayscale images into 10 classes.",
        "version": "1.2.0",
        "author": "litert-pipeline tests",
        "license": "Apache-2.0",
        "min_parser_version": "1.0.0",
        "associated_files": [
            {"name": "provenance.json", "description": "", "type": "DESCRIPTIONS", "locale": "",
             "version": ""},
        ],
        "subgraphs": [{
            "name": "",
            "description": "",
            "associated_files": [],
            "inputs": [{
                "name": "image", "description": "An 8x8 grayscale image.", "content": "image",
                "color_space": "GRAYSCALE", "mean": [127.5], "std": [127.5],
                "min": [0.0], "max": [255.0], "associated_files": [],
            }],
            "outputs": [{
                "name": "probabilities", "description": "Probability of each class.",
                "content": "feature", "color_space": None, "mean": [], "std": [],
                "min": [0.0], "max": [1.0],
                "associated_files": [{
                    "name": "labels.txt",
                    "description": "Class labels, one per line, in the order of the output's "
                                   "last axis.",
                    "type": "TENSOR_AXIS_LABELS", "locale": "", "version": "",
                }],
            }],
        }],
    }
    json.dumps(metadata)  # JSON-able


def test_min_parser_version_follows_the_features_used(float_model):
    plain = read_metadata(attach_metadata(float_model, SPEC, FILES))
    versioned = read_metadata(attach_metadata(float_model, replace(SPEC, file_version="7"), FILES))

    assert plain["min_parser_version"] == "1.0.0"
    # AssociatedFile.version was added in schema 1.4.1.
    assert versioned["min_parser_version"] == "1.4.1"
    label_file = versioned["subgraphs"][0]["outputs"][0]["associated_files"][0]
    assert (versioned["associated_files"][0]["version"], label_file["version"]) == ("7", "7")


def test_labels_and_provenance_are_packed_as_a_zip(float_model):
    attached = attach_metadata(float_model, SPEC, FILES)

    assert packed_files(attached) == FILES
    with zipfile.ZipFile(io.BytesIO(attached)) as archive:  # a plain ZIP reader finds them
        assert archive.read("labels.txt") == LABELS
    report = inspect_model(attached)
    assert report["provenance"] == PROVENANCE
    assert [(f["name"], f["size"]) for f in report["packed_files"]] == [
        ("labels.txt", len(LABELS)), ("provenance.json", len(FILES["provenance.json"]))]
    assert report["metadata"] == read_metadata(attached)


def test_model_without_metadata(float_model):
    assert read_metadata(float_model) is None
    assert packed_files(float_model) == {}
    assert inspect_model(float_model) == {"metadata": None, "packed_files": [], "provenance": None}
    with pytest.raises(InputError, match="TFL3"):
        read_metadata(b"not a model at all")


# -- idempotence and the model itself -------------------------------------------------------------

def test_attaching_twice_gives_identical_bytes(model):
    once = attach_metadata(model, SPEC, FILES)

    assert attach_metadata(once, SPEC, FILES) == once
    assert [name for name, _ in _metadata_entries(once)].count(b"TFLITE_METADATA") == 1
    assert _buffer_count(once) == _buffer_count(model) + 1
    assert once.count(b"PK\x05\x06") == 1  # a single end-of-central-directory: one ZIP
    assert strip_metadata(once) == strip_metadata(model)


def test_attaching_replaces_previous_metadata_and_files(float_model):
    other = replace(SPEC, name="older", model_files=())
    first = attach_metadata(float_model, other, {"labels.txt": b"x\n" * 10})

    assert attach_metadata(first, SPEC, FILES) == attach_metadata(float_model, SPEC, FILES)


def test_metadata_written_by_others_is_replaced_not_duplicated(float_model):
    # Another writer's layout: its TFLITE_METADATA buffer is followed by a buffer still in use.
    tree = tfl.ModelT.InitFromPackedBuf(float_model, 0)
    foreign = len(tree.buffers)
    tree.buffers += [tfl.BufferT(data=np.frombuffer(b"old metadata", np.uint8)),
                     tfl.BufferT(data=np.frombuffer(b"kept", np.uint8))]
    tree.metadata += [tfl.MetadataT(name="TFLITE_METADATA", buffer=foreign),
                      tfl.MetadataT(name="other", buffer=foreign + 1)]
    builder = flatbuffers.Builder(0)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")

    attached = attach_metadata(bytes(builder.Output()), SPEC, FILES)

    entries = dict(_metadata_entries(attached))
    root = tfl.Model.GetRootAs(attached, 0)
    assert [name for name, _ in _metadata_entries(attached)].count(b"TFLITE_METADATA") == 1
    assert root.Buffers(foreign).DataLength() == 0  # emptied: the later index stays valid
    assert root.Buffers(entries[b"other"]).DataAsNumpy().tobytes() == b"kept"
    assert read_metadata(attached)["name"] == SPEC.name


def test_metadata_buffer_without_the_m001_identifier_is_an_input_error(float_model):
    from pipeline.metadata.tflite import with_metadata_buffer

    with pytest.raises(InputError, match="M001"):
        read_metadata(with_metadata_buffer(float_model, b"\0" * 16))


def _io_details(interpreter: Interpreter) -> list[tuple]:
    return [(d["name"], tuple(d["shape"]), d["dtype"], d["quantization"])
            for d in interpreter.get_input_details() + interpreter.get_output_details()]


def test_model_runs_identically_with_metadata(model):
    plain = Interpreter(model_content=model)
    described = Interpreter(model_content=attach_metadata(model, SPEC, FILES))

    assert described.get_signature_list() == plain.get_signature_list()
    assert _io_details(described) == _io_details(plain)
    for interpreter in (plain, described):
        interpreter.allocate_tensors()
    detail = plain.get_input_details()[0]
    rng = np.random.default_rng(1)
    for _ in range(3):
        if detail["dtype"] == np.int8:
            value = rng.integers(-128, 128, detail["shape"], dtype=np.int8)
        else:
            value = rng.uniform(-1, 1, detail["shape"]).astype(np.float32)
        outputs = []
        for interpreter in (plain, described):
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], value)
            interpreter.invoke()
            outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
        np.testing.assert_array_equal(outputs[0], outputs[1])


# -- checks before writing ------------------------------------------------------------------------

def _with_input(**changes) -> ModelSpec:
    return replace(SPEC, inputs=(replace(SPEC.inputs[0], **changes),))


def _with_output(**changes) -> ModelSpec:
    return replace(SPEC, outputs=(replace(SPEC.outputs[0], **changes),))


@pytest.mark.parametrize("spec, files, key", [
    pytest.param(SPEC, {**FILES, "labels.txt": LABELS * 2}, "metadata.outputs[0].labels",
                 id="label-count"),
    pytest.param(_with_input(mean=(1.0, 2.0), std=(1.0, 2.0)), FILES, "metadata.inputs[0].mean",
                 id="mean-length"),
    pytest.param(_with_input(std=(0.0,)), FILES, "metadata.inputs[0].std", id="std-zero"),
    pytest.param(_with_input(std=()), FILES, "metadata.inputs[0].std", id="mean-without-std"),
    pytest.param(_with_input(max=(1.0, 2.0, 3.0)), FILES, "metadata.inputs[0].max",
                 id="stats-length"),
    pytest.param(_with_input(color_space="RGB"), FILES, "metadata.inputs[0].color_space",
                 id="rgb-on-one-channel"),
    pytest.param(_with_output(content="text"), FILES, "metadata.outputs[0].content",
                 id="unknown-content"),
    pytest.param(replace(SPEC, outputs=()), FILES, "metadata.outputs", id="output-count"),
    pytest.param(replace(SPEC, model_files=("../provenance.json",)),
                 {**FILES, "../provenance.json": b"{}"}, "metadata.model_files[0]",
                 id="file-parent"),
    pytest.param(replace(SPEC, model_files=("conf/provenance.json",)),
                 {**FILES, "conf/provenance.json": b"{}"}, "metadata.model_files[0]",
                 id="file-slash"),
    pytest.param(replace(SPEC, model_files=("",)), {**FILES, "": b"{}"},
                 "metadata.model_files[0]", id="file-empty"),
    pytest.param(_with_output(labels="C:\\labels.txt"), {**FILES, "C:\\labels.txt": LABELS},
                 "metadata.outputs[0].labels", id="label-file-backslash"),
    pytest.param(SPEC, {"provenance.json": FILES["provenance.json"]},
                 "metadata.outputs[0].labels", id="label-file-missing"),
    pytest.param(SPEC, {**FILES, "extra.txt": b""}, "metadata", id="file-not-named"),
])
def test_check_spec_rejects_with_the_config_key(float_model, spec, files, key):
    with pytest.raises(ConfigError) as raised:
        check_spec(float_model, spec, files)
    assert raised.value.key == key
    with pytest.raises(ConfigError):
        attach_metadata(float_model, spec, files)


def test_check_spec_accepts_valid_specs(models):
    check_spec(models["int8"], _with_input(mean=(127.5,), std=(64.0,)), FILES)
    check_spec(models["float"], replace(SPEC, model_files=(), description=""),
               {"labels.txt": LABELS})


# -- extraction ---------------------------------------------------------------------------------

def _with_zip(model: bytes, members: dict[str, bytes]) -> bytes:
    out = io.BytesIO(model)
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return out.getvalue()


def test_extract_writes_the_packed_files(float_model, tmp_path):
    paths = extract_packed_files(attach_metadata(float_model, SPEC, FILES), tmp_path / "out")

    assert paths == [tmp_path / "out" / "labels.txt", tmp_path / "out" / "provenance.json"]
    assert {path.name: path.read_bytes() for path in paths} == FILES


@pytest.mark.parametrize("evil", ["../evil.txt", "/ABSOLUTE/evil.txt", "sub/evil.txt",
                                  "..\\evil.txt", ".."])
def test_extract_refuses_names_that_leave_the_directory(float_model, tmp_path, evil):
    evil = evil.replace("/ABSOLUTE", str(tmp_path))  # an absolute path, kept inside tmp_path
    crafted = _with_zip(float_model, {"fine.txt": b"ok", evil: b"gotcha"})
    assert evil in packed_files(crafted)

    with pytest.raises(InputError, match="refusing"):
        extract_packed_files(crafted, tmp_path / "out" / "nested")
    assert list(tmp_path.rglob("*")) == []  # nothing written, not even the harmless file


def test_duplicate_zip_members_are_refused(float_model):
    out = io.BytesIO(float_model)
    out.seek(0, io.SEEK_END)
    with pytest.warns(UserWarning, match="Duplicate"), zipfile.ZipFile(out, "w") as archive:
        archive.writestr("a.txt", b"1")
        archive.writestr("a.txt", b"2")

    with pytest.raises(InputError, match="more than once"):
        packed_files(out.getvalue())


# -- independent check of the flatbuffer layout -------------------------------------------------
# A second decoder, sharing nothing with pipeline.metadata.reader: field slots are the numbers of
# metadata_schema.fbs (declaration order; a union takes a type slot then a value slot).

def _slot(table: Table, slot: int) -> int:
    return table.Offset(4 + 2 * slot)


def _text(table: Table, slot: int) -> str | None:
    offset = _slot(table, slot)
    return table.String(table.Pos + offset).decode() if offset else None


def _byte(table: Table, slot: int) -> int:
    offset = _slot(table, slot)
    return table.Get(N.Uint8Flags, table.Pos + offset) if offset else 0


def _child(table: Table, slot: int) -> Table:
    offset = _slot(table, slot)
    assert offset, f"slot {slot} is empty"
    return Table(table.Bytes, table.Indirect(table.Pos + offset))


def _children(table: Table, slot: int) -> list[Table]:
    offset = _slot(table, slot)
    start = table.Vector(offset)
    count = table.VectorLen(offset)
    return [Table(table.Bytes, table.Indirect(start + 4 * i)) for i in range(count)]


def _float_list(table: Table, slot: int) -> list[float]:
    offset = _slot(table, slot)
    count = table.VectorLen(offset)
    return list(struct.unpack_from(f"<{count}f", table.Bytes, table.Vector(offset)))


def _raw_metadata(model: bytes) -> bytes:
    root = tfl.Model.GetRootAs(model, 0)
    [index] = [buffer for name, buffer in _metadata_entries(model) if name == b"TFLITE_METADATA"]
    return root.Buffers(index).DataAsNumpy().tobytes()


def test_metadata_flatbuffer_fields_sit_in_the_schema_slots(float_model):
    attached = attach_metadata(float_model, replace(SPEC, file_version="7"), FILES)
    data = _raw_metadata(attached)

    assert data[4:8] == b"M001"
    assert attached.index(data) % 4 == 0  # flatbuffer readers may verify alignment
    model = Table(data, struct.unpack_from("<I", data, 0)[0])  # ModelMetadata
    assert [_text(model, slot) for slot in (0, 1, 2, 4, 5, 7)] == [
        "tiny-classifier", SPEC.description, "1.2.0", "litert-pipeline tests", "Apache-2.0",
        "1.4.1"]
    [provenance] = _children(model, 6)  # AssociatedFile: name, description, type, locale, version
    assert (_text(provenance, 0), _byte(provenance, 2), _text(provenance, 4)) == (
        "provenance.json", 1, "7")  # 1 = DESCRIPTIONS

    [subgraph] = _children(model, 3)  # SubGraphMetadata: inputs slot 2, outputs slot 3
    [image] = _children(subgraph, 2)  # TensorMetadata
    assert _text(image, 0) == "image"
    content = _child(image, 3)  # Content: type slot 0, value slot 1
    assert _byte(content, 0) == 2  # ContentProperties.ImageProperties
    assert _byte(_child(content, 1), 0) == 2  # ImageProperties.color_space = GRAYSCALE
    [unit] = _children(image, 4)  # ProcessUnit: type slot 0, value slot 1
    assert _byte(unit, 0) == 1  # ProcessUnitOptions.NormalizationOptions
    assert (_float_list(_child(unit, 1), 0), _float_list(_child(unit, 1), 1)) == ([127.5], [127.5])
    stats = _child(image, 5)  # Stats: max slot 0, min slot 1
    assert (_float_list(stats, 0), _float_list(stats, 1)) == ([255.0], [0.0])

    [probabilities] = _children(subgraph, 3)
    assert _text(probabilities, 0) == "probabilities"
    assert _byte(_child(probabilities, 3), 0) == 1  # ContentProperties.FeatureProperties
    [labels] = _children(probabilities, 6)
    assert (_text(labels, 0), _byte(labels, 2)) == ("labels.txt", 2)  # TENSOR_AXIS_LABELS


def _with_external_buffer(model: bytes) -> bytes:
    """The layout LiteRT Quantizer writes: the largest buffer after the flatbuffer (offset/size)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as tfl

    tree = tfl.ModelT.InitFromPackedBuf(model, 0)
    largest = max(tree.buffers, key=lambda b: 0 if b.data is None else len(b.data))
    data = bytes(largest.data)
    largest.data, largest.offset, largest.size = None, 1, len(data)  # placeholder, fixed below
    builder = flatbuffers.Builder(len(model))
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    head = bytes(builder.Output())
    padded = head + b"\0" * (-len(head) % 16)
    largest.offset = len(padded)  # same width as 1, so the flatbuffer's size does not change
    builder = flatbuffers.Builder(len(model))
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    head = bytes(builder.Output())
    assert len(head) + (-len(head) % 16) == largest.offset
    return head + b"\0" * (-len(head) % 16) + data


def test_external_buffers_are_inlined_and_outputs_unchanged(float_model):
    external = _with_external_buffer(float_model)
    spec = ModelSpec(name="m", inputs=(TensorSpec("image"),), outputs=(TensorSpec("scores"),))
    delivered = attach_metadata(external, spec, {})
    assert attach_metadata(delivered, spec, {}) == delivered
    sample = np.random.default_rng(0).uniform(size=(1, 8, 8, 1)).astype(np.float32)
    results = []
    for model in (external, delivered):
        runner = Interpreter(model_content=model).get_signature_runner()
        (name,) = runner.get_input_details()
        results.append(list(runner(**{name: sample}).values())[0])
    np.testing.assert_array_equal(results[0], results[1])


def test_every_buffer_is_16_byte_aligned_after_attaching(model):
    """The schema asks for 16-byte aligned buffer data; the converter's own output (and the
    quantizer's) does not always have it, the delivered model does, with or without files."""
    from pipeline.metadata.tflite import misaligned_buffers

    for files in ({}, FILES):
        spec = SPEC if files else replace(SPEC, outputs=(replace(SPEC.outputs[0], labels=None),), model_files=())
        delivered = attach_metadata(model, spec, files)
        assert misaligned_buffers(delivered) == []
        assert misaligned_buffers(strip_metadata(delivered)) == []
    assert misaligned_buffers(attach_metadata(_with_external_buffer(model), SPEC, FILES)) == []
