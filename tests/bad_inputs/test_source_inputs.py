"""Bad model sources, through the convert stage (the one that loads the source)."""

from __future__ import annotations

import struct
import zipfile

import numpy as np

from pipeline.errors import EXIT_CONFIG, EXIT_GATE, EXIT_INPUT
from tests.bad_inputs.conftest import fails_cleanly, set_params, stage

CONVERT = stage("convert", "digits")
SOURCE = "model.digits.source"


def test_missing_source_path(tiny_project):
    set_params(tiny_project, {f"{SOURCE}.path": "tiny/nothing"})
    fails_cleanly(tiny_project, CONVERT, EXIT_INPUT, "params.yaml", f"{SOURCE}.path", "tiny/nothing")


def test_unreadable_source_a_folder_where_a_keras_file_belongs(tiny_project):
    # Tests run as root, for whom file permissions do not stop reads: a folder is what cannot be read as a file.
    (tiny_project / "tiny/folder.keras").mkdir()
    set_params(tiny_project, {f"{SOURCE}.format": "keras", f"{SOURCE}.path": "tiny/folder.keras"})
    fails_cleanly(tiny_project, CONVERT, EXIT_INPUT, "tiny/folder.keras", f"{SOURCE}.path")


def test_a_symbolic_link_inside_a_source_folder_leading_out_is_refused(tiny_project, tmp_path):
    """The source path resolves inside the project, but a folder within it links out: the
    converter would read (and embed) whatever it points at."""
    variables = tiny_project / "tiny/saved_model/variables"
    outside = tmp_path / "outside_variables"
    variables.rename(outside)
    variables.symlink_to(outside)
    line = fails_cleanly(tiny_project, CONVERT, EXIT_INPUT, "params.yaml", f"{SOURCE}.path")
    assert "tiny/saved_model/variables' in the source folder leads outside the project" in line


def test_truncated_saved_model(tiny_project):
    protobuf = tiny_project / "tiny/saved_model/saved_model.pb"
    protobuf.write_bytes(protobuf.read_bytes()[:100])
    line = fails_cleanly(tiny_project, CONVERT, EXIT_INPUT, "tiny/saved_model", f"{SOURCE}.path")
    assert "cannot load SavedModel" in line


def test_keras_file_that_is_not_a_zip(tiny_project):
    (tiny_project / "tiny/model.keras").write_text("not a zip archive")
    set_params(tiny_project, {f"{SOURCE}.format": "keras", f"{SOURCE}.path": "tiny/model.keras"})
    line = fails_cleanly(tiny_project, CONVERT, EXIT_INPUT, "tiny/model.keras", f"{SOURCE}.path")
    assert "not a Keras archive" in line and "File not found" not in line


def _archive_declaring(path, sizes: list[int]) -> None:
    """A ZIP whose directory declares members of `sizes` bytes (patched: a bomb need not be built)."""
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(len(sizes)):
            archive.writestr(f"m{index}", b"")
    data = bytearray(path.read_bytes())
    start = 0
    for size in sizes:  # central directory entries: uncompressed size at offset 24
        start = data.index(b"PK\x01\x02", start)
        struct.pack_into("<I", data, start + 24, size)
        start += 4
    path.write_bytes(bytes(data))


def test_keras_archive_that_unpacks_to_too_much_is_refused_unopened(tiny_project):
    _archive_declaring(tiny_project / "tiny/bomb.keras", [0xFFFFFFF0] * 3)  # 12.9 GB declared
    set_params(tiny_project, {f"{SOURCE}.format": "keras", f"{SOURCE}.path": "tiny/bomb.keras"})
    line = fails_cleanly(tiny_project, CONVERT, EXIT_INPUT, "tiny/bomb.keras", f"{SOURCE}.path")
    assert "unpacks to 12,884,901,840 bytes" in line


def test_keras_archive_of_too_many_files_is_refused_unopened(tiny_project):
    _archive_declaring(tiny_project / "tiny/many.keras", [0] * 10_001)
    set_params(tiny_project, {f"{SOURCE}.format": "keras", f"{SOURCE}.path": "tiny/many.keras"})
    line = fails_cleanly(tiny_project, CONVERT, EXIT_INPUT, "tiny/many.keras", f"{SOURCE}.path")
    assert "10,001 files" in line


def test_h5_file_without_a_model(tiny_project):
    import h5py

    with h5py.File(tiny_project / "tiny/weights_only.h5", "w") as handle:
        handle["x"] = np.zeros(3)
    set_params(tiny_project, {f"{SOURCE}.format": "h5", f"{SOURCE}.path": "tiny/weights_only.h5"})
    line = fails_cleanly(tiny_project, CONVERT, EXIT_INPUT, "tiny/weights_only.h5", f"{SOURCE}.path")
    assert "No model config" in line


def test_wrong_signature_key(tiny_project):
    set_params(tiny_project, {f"{SOURCE}.signature_key": "predict"})
    line = fails_cleanly(tiny_project, CONVERT, EXIT_CONFIG, "tiny/saved_model", f"{SOURCE}.signature_key")
    assert "serving_default" in line  # names the signatures there are


def _factory(project, reference: str, **source) -> None:
    set_params(project, {f"{SOURCE}.format": "concrete_function", f"{SOURCE}.factory": reference,
                         **{f"{SOURCE}.{key}": value for key, value in source.items()}})


def test_factory_function_that_does_not_exist(tiny_project):
    _factory(tiny_project, "pipeline.examples:no_such_factory", trusted=True)
    line = fails_cleanly(tiny_project, CONVERT, EXIT_CONFIG, "params.yaml", f"{SOURCE}.factory")
    assert "has no function 'no_such_factory'" in line


def test_factory_module_that_does_not_exist(tiny_project):
    _factory(tiny_project, "pipeline.no_such_module:factory", trusted=True)
    line = fails_cleanly(tiny_project, CONVERT, EXIT_CONFIG, "params.yaml", f"{SOURCE}.factory")
    assert "cannot import 'pipeline.no_such_module'" in line


def test_factory_outside_the_project_needs_trust(tiny_project):
    _factory(tiny_project, "os:system")
    line = fails_cleanly(tiny_project, CONVERT, EXIT_CONFIG, "params.yaml", f"{SOURCE}.factory")
    assert "without trust" in line and "trusted: true" in line


def test_factory_that_returns_the_wrong_thing(tiny_project):
    _factory(tiny_project, "os.path:basename", trusted=True)  # returns a string
    line = fails_cleanly(tiny_project, CONVERT, EXIT_CONFIG, "tiny/saved_model", f"{SOURCE}.factory")
    assert "list of concrete functions" in line


def test_factory_called_with_arguments_it_does_not_take(tiny_project):
    _factory(tiny_project, "pipeline.examples:digits_concrete_functions", factory_args={"colour": "blue"})
    line = fails_cleanly(tiny_project, CONVERT, EXIT_CONFIG, "params.yaml", f"{SOURCE}.factory_args")
    assert "colour" in line


def test_factory_that_fails_on_its_weights_file(tiny_project):
    _factory(tiny_project, "pipeline.examples:digits_concrete_functions", path="tiny/calibration.npz")
    line = fails_cleanly(tiny_project, CONVERT, EXIT_INPUT, "tiny/calibration.npz", f"{SOURCE}.factory")
    assert "factory failed" in line


def test_ops_outside_the_allowed_op_sets(tiny_project):
    import tensorflow as tf

    class Determinant(tf.Module):  # MatrixDeterminant has no builtin LiteRT kernel: select TF ops only
        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="image")])
        def __call__(self, image):
            # Ten units, as the digits labels of the project's data want (one unit takes 0/1 labels).
            return {"det": tf.tile(tf.linalg.det(image[..., 0])[:, None], [1, 10])}

    module = Determinant()
    tf.saved_model.save(module, str(tiny_project / "tiny/det"), signatures={"serving_default": module.__call__})
    set_params(tiny_project, {f"{SOURCE}.path": "tiny/det"})
    line = fails_cleanly(tiny_project, CONVERT, EXIT_GATE, "params.yaml")
    assert "FlexMatrixDeterminant need select TF ops: add select_tf_ops to model.digits.conversion.ops" in line


def test_a_project_function_that_writes_files_is_not_a_factory(tiny_project, tmp_path):
    """Issue 12's reproduction: `pipeline.io:write_text` as a factory, aimed at a file."""
    victim = tmp_path / "VICTIM"
    victim.write_text("precious")
    _factory(tiny_project, "pipeline.io:write_text", path=str(victim), factory_args={"text": "owned"})
    line = fails_cleanly(tiny_project, CONVERT, EXIT_CONFIG, "params.yaml", f"{SOURCE}.factory")
    assert "pipeline.io:write_text" in line  # refused when the config loads...
    _factory(tiny_project, "pipeline.examples:digits_concrete_functions", path=str(victim))
    line = fails_cleanly(tiny_project, CONVERT, EXIT_CONFIG, "params.yaml", f"{SOURCE}.path")
    assert "outside the project" in line  # ...a path outside the project too, whatever the factory...
    inside = tiny_project / "tiny" / "victim.txt"
    inside.write_text("precious")
    _factory(tiny_project, "pipeline.io:write_text", path="tiny/victim.txt", factory_args={"text": "owned"})
    line = fails_cleanly(tiny_project, CONVERT, EXIT_CONFIG, "params.yaml", f"{SOURCE}.factory")
    assert "pipeline.io:write_text" in line  # ...and the function, wherever it points
    assert victim.read_text() == inside.read_text() == "precious"
