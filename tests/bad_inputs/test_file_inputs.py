"""Bad metadata inputs, recipes, `.tflite` files and outputs that cannot be written."""

from __future__ import annotations

import pytest

from pipeline.errors import EXIT_CONFIG, EXIT_INPUT, EXIT_OUTPUT
from tests.bad_inputs.conftest import fails_cleanly, run, set_params, stage

METADATA = stage("metadata", "digits-float")
OUTPUT = "model.digits.metadata.outputs[0]"


def test_label_file_with_the_wrong_count(tiny_project):
    (tiny_project / "conf/labels/three.txt").write_text("zero\none\ntwo\n")
    set_params(tiny_project, {"model.digits.metadata.outputs": [{"name": "scores", "labels": "conf/labels/three.txt"}]})
    line = fails_cleanly(tiny_project, METADATA, EXIT_CONFIG, "params.yaml", f"{OUTPUT}.labels")
    assert "3 labels" in line and "10" in line


def test_label_file_missing(tiny_project):
    set_params(tiny_project, {"model.digits.metadata.outputs": [{"name": "scores", "labels": "conf/labels/none.txt"}]})
    fails_cleanly(tiny_project, METADATA, EXIT_INPUT, "conf/labels/none.txt", f"{OUTPUT}.labels")


@pytest.mark.parametrize(("labels", "words"), [
    ("tiny/labels.txt", "must live in conf/labels/"),  # edited there, it would not rebuild the model
    ("/etc/passwd", "outside the project"),
    ("conf/labels/../../../secret.txt", "outside the project"),
])
def test_label_files_come_from_conf_labels_only(tiny_project, labels, words):
    set_params(tiny_project, {"model.digits.metadata.outputs": [{"name": "scores", "labels": labels}]})
    line = fails_cleanly(tiny_project, METADATA, EXIT_CONFIG, "params.yaml", f"{OUTPUT}.labels")
    assert words in line


def test_normalization_length_mismatch(tiny_project):
    image = {"name": "image", "content": "image", "color_space": "GRAYSCALE", "mean": [0.1, 0.2], "std": [1.0]}
    set_params(tiny_project, {"model.digits.metadata.inputs": [image]})
    line = fails_cleanly(tiny_project, METADATA, EXIT_CONFIG, "params.yaml", "model.digits.metadata.inputs[0].mean")
    assert "has 2 values" in line


def test_missing_upstream_artifact(tiny_project):
    (tiny_project / "artifacts/digits/quantized/float.tflite").unlink()
    fails_cleanly(tiny_project, METADATA, EXIT_INPUT, "artifacts/digits/quantized/float.tflite")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('[{"regex": ', "malformed JSON"),
        ('{"regex": ".*"}', "non-empty JSON list"),
        ('[{"regex": ".*", "operation": "FULLY_CONNECTED"}]', "invalid recipe"),
        ('[{"regex": ".*", "operation": "*", "algorithm_key": "SECRET_SAUCE", "op_config": {}}]', "unknown algorithm"),
        ('[{"regex": "(", "operation": "*", "algorithm_key": "MSE", "op_config": {}}]', "regex"),
    ],
    ids=["malformed_json", "not_a_list", "invalid_entry", "unknown_algorithm", "bad_regex"],
)
def test_invalid_custom_recipe(tiny_project, content, words):
    """Refused by the builds that use it (one team's broken recipe does not stop the others)."""
    (tiny_project / "conf/recipes/recipe.json").write_text(content)
    set_params(tiny_project, {"quantization.dynamic_wi8_afp32.recipe": "conf/recipes/recipe.json"})
    line = fails_cleanly(tiny_project, stage("quantize", "digits-dynamic_wi8_afp32"), EXIT_CONFIG,
                         "conf/recipes/recipe.json", "quantization.dynamic_wi8_afp32.recipe")
    assert words in line


def test_a_recipe_outside_conf_recipes_is_refused(tiny_project):
    set_params(tiny_project, {"quantization.dynamic_wi8_afp32.recipe": "tiny/recipe.json"})
    line = fails_cleanly(tiny_project, stage("quantize", "digits-dynamic_wi8_afp32"), EXIT_CONFIG, "params.yaml",
                         "quantization.dynamic_wi8_afp32.recipe")
    assert "must live in conf/recipes/" in line


def _corrupt_model(project) -> str:
    model = (project / "artifacts/digits/float.tflite").read_bytes()
    (project / "corrupt.tflite").write_bytes(model[: len(model) // 3])
    return "corrupt.tflite"


def test_corrupt_tflite_given_to_inspect(tiny_project):
    path = _corrupt_model(tiny_project)
    line = fails_cleanly(tiny_project, ["litert-pipeline", "inspect", path, "--extract", "out"], EXIT_INPUT, path)
    assert "corrupt LiteRT model" in line
    assert not (tiny_project / "out").exists()


def test_file_that_is_not_a_tflite_given_to_inspect(tiny_project):
    (tiny_project / "notes.tflite").write_text("these are not the weights you are looking for")
    line = fails_cleanly(tiny_project, ["litert-pipeline", "inspect", "notes.tflite"], EXIT_INPUT, "notes.tflite")
    assert "not a LiteRT model" in line


def test_corrupt_tflite_given_to_validate(tiny_project):
    path = _corrupt_model(tiny_project)
    fails_cleanly(tiny_project, [*stage("validate", "digits-float"), "--model", path], EXIT_INPUT, path)


def test_output_whose_parent_is_a_file(tiny_project):
    # Tests run as root, for whom a read-only folder is still writable; a parent that is a regular
    # file fails for everyone, as a full or read-only disk would: the write fails, no output appears.
    quantized = tiny_project / "artifacts/digits/quantized"
    for file in quantized.iterdir():
        file.unlink()
    quantized.rmdir()
    quantized.write_text("a file where the folder should be")
    line = fails_cleanly(tiny_project, stage("quantize", "digits-dynamic_wi8_afp32"), EXIT_OUTPUT,
                         "artifacts/digits/quantized/dynamic_wi8_afp32.tflite")
    assert "cannot write" in line


def test_a_file_where_a_stage_writes_a_folder_is_named_before_dvc_runs(tiny_project):
    """DVC fails before the stage starts, which `run` could only report as exit 1 (DVC could
    not run it): the run names the file, exit 7, before anything is built."""
    import shutil

    shutil.rmtree(tiny_project / "models/digits", ignore_errors=True)
    (tiny_project / "models").mkdir(exist_ok=True)
    (tiny_project / "models/digits").write_text("a file where the folder should be")
    result = run(tiny_project, "litert-pipeline", "run", "model=[digits]")
    assert result.returncode == EXIT_OUTPUT, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: models/digits: a file where the pipeline writes")
    assert (tiny_project / "models/digits").read_text() == "a file where the folder should be"


def test_write_that_fails_half_way_leaves_the_previous_output(tiny_project):
    # A file size limit (RLIMIT_FSIZE binds root too) makes write() fail with EFBIG once the output
    # reaches 1 KiB: a disk filling up mid-write. Python ignores SIGXFSZ, so the write raises.
    output = "artifacts/data/digits_calibration.npz"
    assert (tiny_project / output).stat().st_size > 1024
    line = fails_cleanly(tiny_project, [*with_file_size_limit(1024), *stage("data", "digits_calibration")],
                         EXIT_OUTPUT, output)
    assert "File too large" in line  # and the previous samples are there, byte for byte


def with_file_size_limit(size: int) -> list[str]:
    """A command prefix that runs the rest of the command under RLIMIT_FSIZE = `size` bytes."""
    setup = f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({size}, {size})); " \
            "os.execvp(sys.argv[1], sys.argv[1:])"
    return ["python", "-c", setup]


@pytest.mark.parametrize(("param", "value", "key"), [
    ("model.digits.metadata.outputs", [{"name": "scores", "labels": "conf/labels/link"}], f"{OUTPUT}.labels"),
    ("model.digits.source.path", "tiny/link", "model.digits.source.path"),
], ids=["label_file", "source"])
def test_a_symbolic_link_leading_out_of_the_project_is_refused(tiny_project, tmp_path, param, value, key):
    """A team can commit a symlink: the path is checked as it resolves, not as it is spelt."""
    outside = tmp_path / "outside"
    outside.write_text("".join(f"{digit}\n" for digit in range(10)))
    link = value[0]["labels"] if isinstance(value, list) else value
    (tiny_project / link).symlink_to(outside)
    set_params(tiny_project, {param: value})
    line = fails_cleanly(tiny_project, METADATA, EXIT_CONFIG, "params.yaml", key)
    assert "leads outside the project through a symbolic link" in line
