"""Bad configuration: `conf/` through `litert-pipeline compose`, `params.yaml` through a stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.errors import EXIT_CONFIG
from tests.bad_inputs.conftest import fails, fails_cleanly, run, set_params, snapshot, stage

COMPOSE = ["litert-pipeline", "compose"]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("model: {digits: [\n", "malformed YAML"),
        (b"\xff\xfemodel: {}\n", "not UTF-8 text"),
        ("- a list\n- not a mapping\n", "a mapping of keys to values is expected"),
        ("model: {digits: {seed: " + "9" * 5000 + "}}\n", "line 1, column 24: an integer of 5,000 characters"),
    ],
    ids=["malformed_yaml", "not_utf8", "not_a_mapping", "huge_integer"],
)
def test_unreadable_params(tiny_project, text, words):
    path = tiny_project / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert words in fails_cleanly(tiny_project, stage("quantize", "digits-float"), EXIT_CONFIG, "params.yaml")


def test_missing_params(tiny_project):
    (tiny_project / "params.yaml").unlink()
    line = fails_cleanly(tiny_project, stage("convert", "digits"), EXIT_CONFIG, "params.yaml")
    assert "cannot read" in line


def test_unknown_key_names_the_conf_file(tiny_project):
    edit(tiny_project / "conf/model/digits.yaml", "    team: vision\n", "    team: vision\n    colour: blue\n")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/digits.yaml", "model.digits.colour")
    assert "unknown key" in line


def test_terminal_escapes_in_a_value_do_not_reach_the_terminal(tiny_project):
    """A value echoed in an error cannot clear or retitle the operator's terminal."""
    edit(tiny_project / "conf/model/digits.yaml", "    runtime: play_services", '    runtime: "x\\e[2J\\e]0;owned\\a"')
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/digits.yaml", "model.digits.runtime")
    assert "unknown runtime 'x0;owned?'" in line and "\x1b" not in line


def test_a_bad_model_name_names_the_file_that_declares_it(tiny_project):
    """Dots that start a name are the name's: the error named the first model file instead."""
    text = (tiny_project / "conf/model/digits.yaml").read_text()
    (tiny_project / "conf/model/zz.yaml").write_text(
        text.replace("  digits:", "  ../x:").replace("model: digits", "model: ../x").replace("digits-", "../x-")
        .replace("  digits: {max", "  ../x: {max"))
    fails_cleanly(tiny_project, [*COMPOSE, "model=[digits,zz]"], EXIT_CONFIG, "conf/model/zz.yaml: model.../x: names use")


def test_numbers_out_of_range_are_shown_as_written(tiny_project):
    edit(tiny_project / "conf/model/digits.yaml", "seed: 0}", "seed: 100000000000000000000000}")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/digits.yaml", "model.digits.representative.seed")
    assert line.endswith("must be between 0 and 4294967295, not 100000000000000000000000")
    edit(tiny_project / "conf/model/digits.yaml", "seed: 100000000000000000000000}", "seed: " + "9" * 5000 + "}")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/digits.yaml")
    assert "an integer of 5,000 characters" in line
    for digits in (401, 5000):  # a float overflow, and Python's int() limit, on the command line
        line = fails_cleanly(tiny_project, [*COMPOSE, "model.digits.evaluation.seed=1" + "0" * (digits - 1)], EXIT_CONFIG)
        assert line == f"error: command line: model.digits.evaluation.seed: an integer of {digits:,} digits"


def test_wrong_type(tiny_project):
    set_params(tiny_project, {"model.digits.representative.num_samples": "many"})
    fails_cleanly(tiny_project, stage("representative", "digits"), EXIT_CONFIG, "params.yaml",
                  "model.digits.representative.num_samples", "many")


def test_unknown_quantization_variant(tiny_project):
    edit(tiny_project / "conf/model/digits.yaml", "variant: static_wi8_ai8}", "variant: static_wi8_ai9}")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/digits.yaml",
                         "build.digits-static_wi8_ai8.variant")
    assert "unknown quantization variant 'static_wi8_ai9'" in line


def test_unknown_recipe(tiny_project):
    edit(tiny_project / "conf/quantization/static_wi8_ai8.yaml", "recipe: static_wi8_ai8", "recipe: static_wi9_ai8")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/quantization/static_wi8_ai8.yaml",
                         "quantization.static_wi8_ai8.recipe")
    assert "unknown recipe 'static_wi9_ai8'" in line


def test_hydra_target_is_an_unknown_key_in_conf(tiny_project):
    edit(tiny_project / "conf/model/digits.yaml", "    team: vision\n", "    team: vision\n    _target_: os.system\n")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/digits.yaml", "model.digits._target_")
    assert "unknown key" in line


def test_hydra_target_is_refused_even_in_free_form_factory_args(tiny_project):
    set_params(tiny_project, {"model.digits.source.factory_args": {"_target_": "os.system", "_args_": ["id"]}})
    line = fails_cleanly(tiny_project, stage("convert", "digits"), EXIT_CONFIG, "params.yaml",
                         "model.digits.source.factory_args._target_")
    assert "unknown key" in line


def test_malformed_tracking_uri_in_conf(tiny_project):
    edit(tiny_project / "conf/tracking/local.yaml", 'uri: ""', 'uri: "htp://nowhere"')
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/tracking/local.yaml", "tracking.uri")
    assert "malformed tracking URI 'htp://nowhere'" in line


def test_malformed_tracking_uri_fails_before_any_work(tiny_project):
    set_params(tiny_project, {"tracking.enabled": True, "tracking.uri": "127.0.0.1:5000"})
    fails_cleanly(tiny_project, stage("convert", "digits"), EXIT_CONFIG, "params.yaml", "tracking.uri")


def test_malformed_tracking_uri_from_the_environment(tiny_project):
    set_params(tiny_project, {"tracking.enabled": True})
    fails_cleanly(tiny_project, stage("quantize", "digits-float"), EXIT_CONFIG, "$MLFLOW_TRACKING_URI",
                  "tracking.uri", env={"MLFLOW_TRACKING_URI": "mlflow.example.org"})


def test_unknown_build_on_the_command_line(tiny_project):
    line = fails_cleanly(tiny_project, stage("quantize", "digits-nosuch"), EXIT_CONFIG, "params.yaml",
                         "build.digits-nosuch")
    assert "digits-float" in line  # lists the known builds


def test_yaml_anchors_that_expand_to_billions_of_values_are_refused(tiny_project):
    rows = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    rows += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(9)]
    (tiny_project / "params.yaml").write_text("\n".join(rows) + "\n")
    line = fails_cleanly(tiny_project, stage("data", "digits_calibration"), EXIT_CONFIG, "params.yaml")
    assert "expands to more than 1,000,000 values" in line


def test_a_yaml_alias_inside_the_node_it_names_is_refused(tiny_project):
    """Every reader would recurse without end (it was a RecursionError traceback)."""
    digits = tiny_project / "conf" / "model" / "digits.yaml"
    digits.write_text(digits.read_text() + "\nloop: &loop\n  inner: [*loop]\n")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/digits.yaml")
    assert "an alias inside the node it refers to" in line
    (tiny_project / "params.yaml").write_text("model: &m\n  digits: *m\n")
    line = fails_cleanly(tiny_project, stage("quantize", "digits-float"), EXIT_CONFIG, "params.yaml")
    assert "line 1, column 8: an alias inside the node it refers to" in line  # the node the alias names


def test_a_nightly_summary_outside_the_project_is_refused(tiny_project):
    set_params(tiny_project, {"nightly.summary": "/tmp/elsewhere/nightly"})
    line = fails_cleanly(tiny_project, stage("data", "digits_calibration"), EXIT_CONFIG, "params.yaml",
                         "nightly.summary")
    assert "outside the project" in line


def test_a_normalization_that_misleads_image_clients_is_refused(tiny_project):
    """The tiny digits model is validated on pixels in [0, 1]: std 1 would have a client feed it
    0..255. The metadata stage refuses it, naming the values that fit, and delivers nothing."""
    set_params(tiny_project, {"model.digits.metadata.inputs": [
        {"name": "image", "content": "image", "color_space": "GRAYSCALE", "mean": [0.0], "std": [1.0]}]})
    line = fails_cleanly(tiny_project, stage("metadata", "digits-float"), EXIT_CONFIG, "params.yaml",
                         "model.digits.metadata.inputs[0].std")
    assert "mean: [0], std: [255] would fit" in line
    assert not (tiny_project / "models/digits/float.tflite").exists()


@pytest.mark.parametrize(("field", "value", "words"), [
    ("std", [0.0], "must not be 0"),
    ("mean", [float("nan")], "finite"),
    ("max", [-1.0], "must not be below min"),
], ids=["zero_std", "nan_mean", "max_below_min"])
def test_metadata_numbers_are_checked_when_the_config_loads(tiny_project, field, value, words):
    entry = {"name": "image", "content": "image", "color_space": "GRAYSCALE", "mean": [0.0], "std": [255.0],
             "min": [0.0], "max": [1.0], field: value}
    set_params(tiny_project, {"model.digits.metadata.inputs": [entry]})
    line = fails_cleanly(tiny_project, stage("quantize", "digits-float"), EXIT_CONFIG, "params.yaml",
                         f"model.digits.metadata.inputs[0].{field}")
    assert words in line


def test_a_defaults_entry_hydra_cannot_compose_names_the_defaults_list(tiny_project):
    """`- override generator: [...]` in config.yaml: Hydra raised a bare AssertionError, shown
    as "malformed YAML: AssertionError" with no key."""
    config_yaml = tiny_project / "conf/config.yaml"
    config_yaml.write_text(config_yaml.read_text().replace("  - generator:", "  - override generator:", 1))
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/config.yaml", "defaults")
    assert "Hydra could not compose the defaults list" in line


def test_metadata_text_is_bounded_when_the_config_loads(tiny_project):
    """A 7 MB description passed every gate and made each delivered model 650 times larger (the
    size gate compares payloads without metadata): refused before anything is built."""
    set_params(tiny_project, {"model.digits.metadata.description": "x" * 20_000})
    line = fails_cleanly(tiny_project, stage("quantize", "digits-float"), EXIT_CONFIG, "params.yaml",
                         "model.digits.metadata.description")
    assert "the limit is 16,384" in line


def test_a_conf_file_cannot_silently_override_another_teams_key(tiny_project):
    """Hydra merges conf files in order, so a team's model file could loosen the shared gate set
    every other team's models use. Each key has one owner: compose refuses, naming both files."""
    (tiny_project / "conf/model/team_b.yaml").write_text(
        "# @package _global_\nvalidation:\n  classifier:\n    max_accuracy_drop: 1.0\n")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/team_b.yaml",
                         "validation.classifier.max_accuracy_drop")
    assert "also set by conf/validation/classifier.yaml" in line


@pytest.mark.parametrize(("body", "key", "model"), [
    ("build:\n  digits-loose: {model: digits, variant: float, validation: {min_cosine: -1.0}}\n",
     "build.digits-loose.model", "digits"),
    ("autoselect:\n  mobilenet_v2: {max_accuracy_drop: 1.0}\n", "autoselect.mobilenet_v2", "mobilenet_v2")],
    ids=["build", "autoselect"])
def test_a_conf_file_cannot_build_another_teams_model(tiny_project, body, key, model):
    """A new build or auto-selection of another file's model, under gates of the intruder's
    choosing, would be delivered and registered under the owner's name: compose refuses it."""
    (tiny_project / "conf/model/team_b.yaml").write_text(
        "# @package _global_\nmodel:\n  team_b_model:\n    team: b\n" + body)
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/team_b.yaml", key)
    assert f"builds model '{model}', which this file does not declare" in line


def test_a_key_of_a_one_choice_group_names_the_group_not_one_option(tiny_project):
    """`parallel` is chosen on the command line (`parallel=ray`): naming local.yaml could be wrong."""
    (tiny_project / "conf/model/team_b.yaml").write_text("# @package _global_\nparallel:\n  ray_address: auto\n")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/team_b.yaml", "parallel.ray_address")
    assert "also set by the options of conf/parallel/:" in line


@pytest.mark.parametrize(("body", "key", "owner"), [
    ("nightly: 1.0", "nightly", "the options of conf/nightly/"),  # a scalar where conf/nightly/ sets a mapping
    ("validation:\n  classifier: loose", "validation.classifier", "conf/validation/classifier.yaml")])
def test_a_value_over_another_files_mapping_is_refused_not_dropped(tiny_project, body, key, owner):
    """Hydra kept the group's mapping and dropped the team file's value without a word."""
    (tiny_project / "conf/model/team_b.yaml").write_text(f"# @package _global_\n{body}\n")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/team_b.yaml", f"{key}:")
    assert f"also set by {owner}:" in line


def test_a_one_choice_group_left_to_its_defaults_is_not_a_conflict_of_its_options(tiny_project):
    """Without `parallel: local` in config.yaml, the schema's defaults hold; its two options
    set the same keys as alternatives, as when one is chosen."""
    edit(tiny_project / "conf/config.yaml", "  - parallel: local\n", "")
    result = run(tiny_project, *COMPOSE)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((tiny_project / "params.yaml").read_text())["parallel"]["engine"] == "local"


def test_a_model_file_without_a_model_is_refused(tiny_project):
    """Selected, it added nothing: `compose` wrote `model: {}` and exit 0."""
    (tiny_project / "conf/model/empty.yaml").write_text("# @package _global_\n# nothing yet\n")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/empty.yaml", "model:")
    assert "declares no model" in line


def test_resolvers_cannot_copy_the_environment_into_the_config(tiny_project):
    edit(tiny_project / "conf/model/digits.yaml", "    team: vision\n", "    team: vision\n    registry_name: ${oc.env:HOME}\n")
    line = fails_cleanly(tiny_project, COMPOSE, EXIT_CONFIG, "conf/model/digits.yaml", "model.digits.registry_name")
    assert "resolvers" in line


@pytest.mark.parametrize("command", ["run", "nightly", "compose"])
def test_a_selection_of_no_model_is_refused_before_anything_is_written(tiny_project, command):
    """A nightly of nothing would pass: `model=[]` is a one-line error, params.yaml and dvc.yaml
    (its artifacts) untouched."""
    before = {name: (tiny_project / name).read_bytes() for name in ("params.yaml", "dvc.yaml")}
    result = run(tiny_project, "litert-pipeline", command, "model=[]")
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.strip().splitlines() == [
        "error: command line: model: no model selected: nothing would be built (name one, e.g. 'model=[digits]')"]
    # conf/config.yaml selecting none is named instead.
    edit(tiny_project / "conf/config.yaml", "  - model: [digits]\n", "  - model: []\n")
    result = run(tiny_project, "litert-pipeline", command)
    assert result.returncode == EXIT_CONFIG and result.stderr.strip().splitlines()[-1].startswith(
        "error: conf/config.yaml: model: no model selected")
    assert {name: (tiny_project / name).read_bytes() for name in before} == before


def test_a_dvc_sweep_checks_its_members_before_building_or_opening_a_run(tiny_project):
    """A member of several variants (no `quantization=` chosen) is refused before the shared
    stages run or an MLflow parent run opens (it used to stay RUNNING after the error)."""
    before = snapshot(tiny_project)
    line = fails(run(tiny_project, "litert-pipeline", "sweep", "--dvc", "model=[digits]", "--name", "probe"),
                 EXIT_CONFIG, "quantization")
    assert "one variant" in line
    after = snapshot(tiny_project)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    # Only DVC's own temp folder (asking whether queue workers run); no params.yaml, no MLflow store, no sweep folder.
    assert all(k.startswith(".dvc/tmp") for k in changed), changed


@pytest.mark.parametrize("arguments", [["run", "-j", "0"], ["nightly", "-j", "abc"], ["sweep", "--dvc", "-j", "65"],
                                       ["run", "--no-such-flag"]])
def test_a_usage_error_is_one_line(tiny_project, arguments):
    line = fails_cleanly(tiny_project, ["litert-pipeline", *arguments], EXIT_CONFIG, "litert-pipeline")
    assert line.endswith("(see --help)") and "usage:" not in line


@pytest.mark.parametrize("made", ["fifo", "folder"])
def test_a_dataset_that_is_no_regular_file_is_one_line_before_dvc_hashes_it(tmp_path, monkeypatch, made):
    """`dvc status` hashes every dependency: a FIFO would block it (and the run) forever."""
    import os

    from pipeline import config
    from pipeline.errors import InputError
    from tests.conftest import ROOT

    cfg = config.load(ROOT / "params.yaml")
    monkeypatch.chdir(tmp_path)
    name, dataset = next(iter(cfg.dataset.items()))
    (tmp_path / dataset.path).parent.mkdir(parents=True)
    if made == "fifo":
        os.mkfifo(tmp_path / dataset.path)
    else:
        (tmp_path / dataset.path).mkdir()
    with pytest.raises(InputError, match="FIFO" if made == "fifo" else "is a folder") as caught:
        config.check_inputs_exist(cfg, conf_dir=ROOT / "conf")
    assert caught.value.key == f"dataset.{name}.path"


def test_a_loop_of_symbolic_links_is_one_line(tmp_path, monkeypatch):
    from pipeline import config
    from pipeline.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    with pytest.raises(ConfigError, match="cannot be resolved") as caught:
        config._check_inside_project("loop1", "conf/model/x.yaml", "model.x.source.path")
    assert caught.value.key == "model.x.source.path"
