"""Bad representative and evaluation data, through the stages that read it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import EXIT_INPUT
from tests.bad_inputs.conftest import fails_cleanly, run, set_params, stage, tiny_samples

CALIBRATION = "tiny/calibration.npz"
DATASET = "dataset.digits_calibration"


def test_dataset_file_missing(tiny_project):
    (tiny_project / CALIBRATION).unlink()
    fails_cleanly(tiny_project, stage("data", "digits_calibration"), EXIT_INPUT, CALIBRATION, f"{DATASET}.path")


def test_dataset_file_that_is_not_an_npz(tiny_project):
    path = tiny_project / CALIBRATION
    path.write_bytes(path.read_bytes()[:300])  # a truncated archive
    line = fails_cleanly(tiny_project, stage("data", "digits_calibration"), EXIT_INPUT, CALIBRATION, DATASET)
    assert "cannot read .npz" in line


def _write(project, **arrays) -> None:
    np.savez(project / CALIBRATION, **arrays)


def _bad_values(value: float) -> np.ndarray:
    inputs, _ = tiny_samples(8, 0)
    inputs[3, 4, 4, 0] = value
    return inputs


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"x": np.zeros((0, 8, 8, 1), np.float32), "y": np.zeros(0, np.int64)}, "dataset is empty"),
        ({"x": np.array(["a", "b"]), "y": np.zeros(2, np.int64)}, "unsupported dtype"),
        ({"x": _bad_values(np.nan), "y": np.zeros(8, np.int64)}, "NaN or Inf"),
        ({"x": _bad_values(np.inf), "y": np.zeros(8, np.int64)}, "NaN or Inf"),
        ({"x": np.float32(1.0), "y": np.zeros(2, np.int64)}, "single value"),
        ({"x": tiny_samples(8, 0)[0], "y": np.zeros(5, np.int64)}, "differ in their number of samples (inputs_key: 8, labels_key: 5)"),
        ({"x": np.array([{"evil": "pickle"}] * 2, dtype=object)}, "allow_pickle=False"),  # never unpickled
    ],
    ids=["empty", "wrong_dtype", "nan", "inf", "scalar", "label_count", "pickled_objects"],
)
def test_bad_dataset_contents(tiny_project, arrays, words):
    _write(tiny_project, **arrays)
    line = fails_cleanly(tiny_project, stage("data", "digits_calibration"), EXIT_INPUT, CALIBRATION, DATASET)
    assert words in line


def test_dataset_without_the_inputs_key(tiny_project):
    _write(tiny_project, images=tiny_samples(8, 0)[0])
    line = fails_cleanly(tiny_project, stage("data", "digits_calibration"), EXIT_INPUT, CALIBRATION,
                         f"{DATASET}.inputs_key")
    assert "has: images" in line


def _materialized(project, name: str, inputs: np.ndarray) -> str:
    """Replace the checked samples of dataset `name` (as its data stage would write them)."""
    path = f"artifacts/data/{name}.npz"
    np.savez(project / path, **{"input:*": inputs, "label:*": np.zeros(len(inputs), np.int64)})
    return path


def test_evaluation_samples_of_the_wrong_shape(tiny_project):
    _materialized(tiny_project, "digits_evaluation", np.zeros((30, 9, 9, 1), np.float32))
    line = fails_cleanly(tiny_project, stage("convert", "digits"), EXIT_INPUT, "tiny/evaluation.npz",
                         "dataset.digits_evaluation.inputs_key")
    assert "(9, 9, 1)" in line and "(8, 8, 1)" in line


def test_fewer_evaluation_samples_than_requested(tiny_project):
    set_params(tiny_project, {"model.digits.evaluation.num_samples": 1000})
    line = fails_cleanly(tiny_project, stage("convert", "digits"), EXIT_INPUT, "artifacts/data/digits_evaluation.npz",
                         "model.digits.evaluation.num_samples")
    assert "fewer than the 1000 requested" in line


def test_fewer_representative_samples_than_a_variant_requests(tiny_project):
    set_params(tiny_project, {"quantization.converter_int8.num_samples": 1000})
    line = fails_cleanly(tiny_project, stage("quantize", "digits-converter_int8"), EXIT_INPUT,
                         "artifacts/digits/representative.npz", "quantization.converter_int8.num_samples")
    assert "fewer than the 1000 requested" in line


@pytest.mark.parametrize("build", ["digits-static_wi8_ai8", "digits-converter_int8"])
def test_representative_samples_of_the_wrong_shape(tiny_project, build):
    _materialized(tiny_project, "digits_calibration", np.zeros((30, 9, 9, 1), np.float32))
    # As DVC would: the representative stage reruns on the new samples (it records that the
    # shared calibration is unavailable), then the calibrating builds fail naming the data.
    assert run(tiny_project, *stage("representative", "digits")).returncode == 0
    line = fails_cleanly(tiny_project, stage("quantize", build), EXIT_INPUT, CALIBRATION,
                         "dataset.digits_calibration.inputs_key")
    assert "(9, 9, 1)" in line


def test_corrupt_reference_outputs(tiny_project):
    reference = tiny_project / "artifacts/digits/reference.npz"
    reference.write_bytes(b"PK\x03\x04 not really a zip")
    line = fails_cleanly(tiny_project, stage("validate", "digits-float"), EXIT_INPUT, "artifacts/digits/reference.npz")
    assert "cannot read reference outputs" in line


def test_an_npz_declaring_a_huge_array_is_refused_before_allocating(tiny_project):
    """A 200-byte member whose header claims 8 TB: refused from the header, in bounded time and memory."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(tiny_project / CALIBRATION, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * 64)
        archive.writestr("y.npy", header.getvalue())
    line = fails_cleanly(tiny_project, stage("data", "digits_calibration"), EXIT_INPUT, CALIBRATION, DATASET)
    assert "declares 16,000,000,000,000 bytes" in line


def test_a_fifo_named_as_a_dataset_does_not_block(tiny_project):
    import os

    (tiny_project / CALIBRATION).unlink()
    os.mkfifo(tiny_project / CALIBRATION)
    fails_cleanly(tiny_project, stage("data", "digits_calibration"), EXIT_INPUT, CALIBRATION, f"{DATASET}.path")


def test_class_labels_outside_the_outputs_classes_are_refused(tiny_project):
    inputs, labels = tiny_samples(20, 1)
    labels[3] = 17  # a 10-class output
    np.savez(tiny_project / "tiny/evaluation.npz", x=inputs, y=labels)
    assert run(tiny_project, *stage("data", "digits_evaluation")).returncode == 0
    line = fails_cleanly(tiny_project, stage("convert", "digits"), EXIT_INPUT, "tiny/evaluation.npz",
                         "dataset.digits_evaluation.labels_key")
    assert "class labels 0..17 for the 10 classes" in line


def test_evaluation_samples_copied_from_the_calibration_file_are_refused(tiny_project):
    """Two dataset entries, two files, the same samples: found by content in the representative stage."""
    calibration = np.load(tiny_project / CALIBRATION)
    np.savez(tiny_project / "tiny/evaluation.npz", x=calibration["x"][:20], y=calibration["y"][:20])
    assert run(tiny_project, *stage("data", "digits_evaluation")).returncode == 0
    assert run(tiny_project, *stage("convert", "digits")).returncode == 0
    line = fails_cleanly(tiny_project, stage("representative", "digits"), EXIT_INPUT, "tiny/evaluation.npz",
                         "model.digits.evaluation.dataset")
    assert "20 of the 20 evaluation samples are also in the calibration data" in line


def test_an_image_whose_header_claims_too_many_pixels_is_refused_unread(tiny_project):
    """A 70-byte PNG declaring 10000 x 10000 pixels: refused from its header, naming the file."""
    import struct
    import zlib

    from PIL import Image

    folder = tiny_project / "tiny/images"
    folder.mkdir()
    Image.new("L", (1, 1)).save(folder / "bomb.png")
    data = bytearray((folder / "bomb.png").read_bytes())
    struct.pack_into(">II", data, 16, 10_000, 10_000)  # IHDR width, height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # IHDR's CRC
    (folder / "bomb.png").write_bytes(bytes(data))
    set_params(tiny_project, {DATASET: {"type": "images", "path": "tiny/images", "image_size": [8, 8]}})
    line = fails_cleanly(tiny_project, stage("data", "digits_calibration"), EXIT_INPUT, "tiny/images/bomb.png", DATASET)
    assert "10000x10000 pixels is over the limit" in line
