"""The typed schema: composition, validation and one-line errors."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest

from pipeline import config, layout
from pipeline.build import resolve_build
from pipeline.errors import ConfigError, InputError
from tests.conftest import ROOT, all_examples_params, run_cli


def test_committed_params_equal_a_fresh_composition():
    assert (ROOT / "params.yaml").read_text() == config.compose(conf_dir=ROOT / "conf")


def test_the_composed_typed_config_is_what_loading_the_composed_text_gives(tmp_path):
    """`run` takes the typed config from the composition instead of loading params.yaml again:
    both must be the same, for the default selection and for every bundled example."""
    models = re.search(r"^ALL_MODELS := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1).strip()
    for overrides in ([], [f"model=[{models}]"], ["model=[digits_h5]"]):
        text, typed = config.compose_typed(overrides, conf_dir=ROOT / "conf")
        (tmp_path / "params.yaml").write_text(text)
        assert typed == config.load(tmp_path / "params.yaml"), overrides


def test_composition_validates_and_resolves_references():
    cfg = config.load(ROOT / "params.yaml")
    for name, build in cfg.build.items():
        assert build.model in cfg.model and build.variant in cfg.quantization
        assert name == f"{build.model}-{build.variant}"
    assert cfg.gates("digits-float").max_accuracy_drop == pytest.approx(0.02)


def test_build_overrides_gates(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace(
        "  digits-float:\n    model: digits\n    variant: float\n    validation: {}\n",
        "  digits-float:\n    model: digits\n    variant: float\n    validation:\n      min_cosine: 0.5\n",
    )
    (tmp_path / "params.yaml").write_text(text)
    cfg = config.load(tmp_path / "params.yaml")
    assert cfg.gates("digits-float").min_cosine == 0.5
    assert cfg.gates("digits-float").max_accuracy_drop == pytest.approx(0.02)


def _write_params(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "params.yaml").read_text()
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        ("    team: vision\n", "    team: vision\n    colour: blue\n", "model.digits.colour", "unknown key"),
        ("    team: vision\n", "    team: ../evil\n", "model.digits.team", "team names use"),
        ("    team: vision\n", "    team: \"a\\nb; rm -rf x\"\n", "model.digits.team", "team names use"),
        ("num_samples: 200", "num_samples: many", "model.digits.representative.num_samples", "many"),
        ("      allow_custom_ops: false", "      allow_custom_ops: perhaps", "allow_custom_ops", "perhaps"),
        ("    recipe: static_wi8_ai8", "    recipe: static_wi9", "quantization.static_wi8_ai8.recipe", "unknown recipe"),
        ("    variant: float\n", "    variant: float99\n", "build.digits-float.variant", "unknown quantization"),
        ("    runtime: play_services", "    runtime: toaster", "model.digits.runtime", "unknown runtime"),
        ("      format: saved_model", "      format: onnx", "model.digits.source.format", "onnx"),
        ("  engine: local", "  engine: slurm", "parallel.engine", "slurm"),
        ("  engine: local\n  ray_address: ''", "  engine: ray\n  ray_address: 'head:1; rm -rf /'",
         "parallel.ray_address", "not a Ray address"),
        ("  ray_address: ''", "  ray_address: auto", "parallel.ray_address", "needs engine: ray"),
        ("  engine: local\n  ray_address: ''", "  engine: ray\n  ray_address: 'head:70000'", "parallel.ray_address",
         "not a Ray address"),
    ],
)
def test_bad_params_fail_with_file_and_key(tmp_path, old, new, key, words):
    path = _write_params(tmp_path, old, new)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    line = caught.value.one_line()
    assert str(path) in line and key in line and words in line
    assert "\n" not in line


def test_malformed_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  digits: {source: [\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert "malformed YAML: line 3, column 1: " in str(caught.value) and "\n" not in str(caught.value)
    # PyYAML would keep the second of two equal keys silently (a gate written twice).
    path.write_text("model:\n  digits: {}\nbuild: {}\nmodel: {}\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert "malformed YAML: line 4, column 1: duplicate key 'model'" in str(caught.value)


def test_a_stage_loads_its_own_part_of_the_config_as_the_whole_file_has_it(tmp_path):
    """A stage validates only its model (or build, or dataset): its start-up must not grow
    with the number of models, and what it gets is exactly what the whole file says."""
    import yaml

    params = _params()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    whole = config.load(path)
    assert len(whole.model) > 2
    for name, model in whole.model.items():
        part = config.load(path, model=name)
        assert part.model == {name: model}
        assert part.build == {key: build for key, build in whole.build.items() if build.model == name}
        assert part.autoselect == {key: auto for key, auto in whole.autoselect.items() if key == name}
        assert set(part.dataset) | set(part.generator) == {model.representative.dataset, model.evaluation.dataset}
        # Of the shared groups, what the model uses: its stages (which list these groups whole)
        # then rerun for an edit of their own gate set or variant, not another model's.
        assert part.validation == {model.validation: whole.validation[model.validation]}
        assert part.runtime == {model.runtime: whole.runtime[model.runtime]}
        auto = whole.autoselect.get(name)
        variants = ({build.variant for build in part.build.values()} | set(auto.candidates if auto else [])
                    if not auto or auto.candidates else set(whole.quantization))
        assert part.quantization == {key: whole.quantization[key] for key in variants}
        assert part.tracking == whole.tracking
        for key in part.build:
            assert config.load(path, build=key) == part
    assert any(len(config.load(path, model=name).quantization) < len(whole.quantization) for name in whole.model)
    data = next(iter(whole.generator))
    part = config.load(path, data=data)
    assert part.generator == {data: whole.generator[data]} and not part.dataset and not part.model

    # Another model's broken entry is that model's stages' problem; a broken entry of its own,
    # or a name the file lacks, gets the whole file validated (and the same error as before).
    other, mine = sorted(whole.model)[:2]
    params["model"][other]["colour"] = "blue"
    path.write_text(yaml.safe_dump(params))
    assert list(config.load(path, model=mine).model) == [mine]
    for kwargs in ({"model": other}, {"model": "nope"}, {"build": "nope-float"}, {}):
        with pytest.raises(ConfigError, match=f"model.{other}.colour"):
            config.load(path, **kwargs)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="a mapping of keys to values is expected"):
        config.load(path, model=mine)


def test_a_models_part_changes_only_with_the_shared_entries_it_uses(tmp_path):
    """Stages list the `validation` and `runtime` groups whole: an edit of a gate set or variant
    no build of the model uses leaves its part (what DVC compares) as it was; a name the group
    lacks keeps the group whole, so validating reports it as for the whole file."""
    import yaml

    params = _params()
    name = next(key for key in params["model"] if key not in params.get("autoselect", {}))
    entry = params["model"][name]
    before = copy.deepcopy(config.stage_part(params, model=name))  # the part shares params' objects
    unused_gates = next(key for key in params["validation"] if key != entry.get("validation", "default"))
    unused_variant = next(key for key in params["quantization"]
                          if all(b["variant"] != key for b in params["build"].values() if b["model"] == name))
    params["validation"][unused_gates]["min_cosine"] = 0.5
    params["quantization"][unused_variant]["num_samples"] = 7
    assert config.stage_part(params, model=name) == before
    params["validation"][entry.get("validation", "default")]["min_cosine"] = 0.5
    assert config.stage_part(params, model=name) != before
    path = tmp_path / "params.yaml"
    for wrong in ("no_such_gates", ["classifier"], {"a": 1}):  # unvalidated yet: any value
        entry["validation"] = wrong
        assert config.stage_part(params, model=name)["validation"] == params["validation"]
        path.write_text(yaml.safe_dump(params))
        with pytest.raises(ConfigError, match=f"model.{name}.validation"):
            config.load(path, model=name)
    entry["validation"] = "default"
    params["build"][next(key for key, b in params["build"].items() if b["model"] == name)]["variant"] = [["x"]]
    assert config.stage_part(params, model=name)["quantization"] == params["quantization"]


def test_each_models_params_part_is_what_its_stages_load(tmp_path):
    """The `params` stage writes each model's part of params.yaml, the file DVC reads for that
    model's stages: it holds the same values at the same keys, so DVC compares what the stage
    loads; and a file that does not validate as a whole is refused, naming the key."""
    import yaml

    params = _params()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    parts = config.model_parts(path)
    assert set(parts) == set(params["model"])
    for name, part in parts.items():
        assert part.pop(config.PART_OF) == hashlib.sha256(path.read_bytes()).hexdigest()
        assert json.loads(json.dumps(part)) == config.stage_part(params, model=name)
        assert config.validate(part, file="params.yaml") == config.load(path, model=name)
    params["model"][name]["colour"] = "blue"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=f"model.{name}.colour"):
        config.model_parts(path)


def test_a_stage_loads_its_models_part_only_if_cut_from_this_params_yaml(tmp_path):
    """A stage reads its model's part (a few KB of JSON) instead of all of params.yaml, but only
    a part whose recorded SHA-256 is that of params.yaml as it is now."""
    import yaml

    params = _params()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    name, build = next((b["model"], key) for key, b in params["build"].items())
    written = config.write_model_parts(path)
    assert sorted(written) == sorted(tmp_path / layout.model_params(key) for key in params["model"])
    part_file = tmp_path / layout.model_params(name)
    part = json.loads(part_file.read_text())
    part["model"][name]["team"] = "from-the-part"  # tells which file the stage read
    part_file.write_text(json.dumps(part))
    assert config.load(path, model=name).model[name].team == "from-the-part"
    assert config.load(path, build=build).model[name].team == "from-the-part"
    assert config.load(path).model[name].team != "from-the-part"  # the whole file is params.yaml
    # A build argument outside the model-name grammar never names a file: params.yaml decides.
    (tmp_path / "x.json").write_text(part_file.read_text())
    for hostile in ("../../x", "../x-float", "/x-float", "x-float"):
        cfg = config.load(path, build=hostile)
        assert cfg.model[name].team != "from-the-part"
        with pytest.raises(ConfigError, match="unknown build"):
            resolve_build(cfg, hostile)
    path.write_text(path.read_text() + "\n")  # no longer the params.yaml the part was cut from
    assert config.load(path, model=name).model[name].team == params["model"][name]["team"]
    # A key that JSON would turn into a string: the part is for DVC only, the stage reads params.yaml.
    params["model"][name]["source"]["factory_args"] = {"by_index": {1: "one"}}
    path.write_text(yaml.safe_dump(params))
    assert config.PART_OF not in config.model_parts(path)[name]


def test_missing_source_path_names_the_key(tmp_path):
    path = _write_params(tmp_path, "path: examples/digits_savedmodel/saved_model", "path: nowhere/model")
    cfg = config.load(path)
    with pytest.raises(InputError) as caught:
        config.check_source_exists(cfg.model["digits"], "digits", file=str(path))
    assert "model.digits.source.path" in caught.value.one_line()


def test_compose_error_names_the_conf_file(tmp_path):
    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(ROOT / "conf", conf)
    model_file = conf / "model" / "digits.yaml"
    model_file.write_text(model_file.read_text().replace("    team: vision\n", "    team: vision\n    colour: blue\n"))
    with pytest.raises(ConfigError) as caught:
        config.compose(conf_dir=conf)
    assert caught.value.key == "model.digits.colour"
    assert caught.value.file.endswith("conf/model/digits.yaml")
    # Choosing the model on the command line, as the README runs one model, sets no key of it.
    with pytest.raises(ConfigError) as caught:
        config.compose(["model=[digits]"], conf_dir=conf)
    assert caught.value.file.endswith("conf/model/digits.yaml") and caught.value.key == "model.digits.colour"
    # A model file leaving its metadata out is refused here, not after its conversion.
    text = (ROOT / "conf" / "model" / "digits.yaml").read_text()
    metadata = text[text.index("    metadata:\n"):text.index("# `autoselect")]
    model_file.write_text(text.replace(metadata, ""))
    with pytest.raises(ConfigError) as caught:
        config.compose(conf_dir=conf)
    assert caught.value.file.endswith("conf/model/digits.yaml") and caught.value.key == "model.digits.metadata.inputs"
    assert "every delivered model carries metadata" in caught.value.message


def test_cli_exits_non_zero_with_one_line_and_writes_nothing(project):
    model_file = project / "conf" / "model" / "digits.yaml"
    model_file.write_text(model_file.read_text().replace("    team: vision\n", "    team: 7\n    tem: x\n"))
    before = (project / "params.yaml").read_text()
    result = run_cli("litert-pipeline", "compose", cwd=project)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "conf/model/digits.yaml" in lines[0] and "model.digits.tem" in lines[0]
    assert (project / "params.yaml").read_text() == before
    assert not list(project.glob(".params.yaml*"))


def test_cli_help_does_not_import_tensorflow():
    result = run_cli(
        "python", "-c",
        "import sys; from pipeline import cli; import contextlib, io\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()): cli.main(['--help'])\n"
        "print('tensorflow' in sys.modules)",
        cwd=ROOT,
    )
    assert result.stdout.strip() == "False", result.stderr


# --- named tensors, converter options, labels and overlap ---------------------------------------

def _params() -> dict:
    """Every bundled example's config (a fresh copy)."""
    return all_examples_params()


def _refused(params: dict) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config.validate(params, file="params.yaml")
    return caught.value


def test_converter_options_are_an_allow_list_of_typed_attributes():
    params = _params()
    options = params["model"]["digits"]["conversion"]["converter_options"]
    options["_experimental_lower_tensor_list_ops"] = False
    cfg = config.validate(params, file="params.yaml")
    assert cfg.model["digits"].conversion.converter_options._experimental_lower_tensor_list_ops is False
    options["optimizations"] = ["DEFAULT"]  # a converter attribute, but not one a config may set
    assert _refused(params).key == "model.digits.conversion.converter_options.optimizations"
    del options["optimizations"]
    options["unfold_batchmatmul"] = "sometimes"
    assert _refused(params).key == "model.digits.conversion.converter_options.unfold_batchmatmul"


def test_every_allowed_converter_option_is_a_real_converter_attribute(tmp_path):
    import tensorflow as tf

    from tests.conftest import tiny_keras_model

    tiny_keras_model().export(str(tmp_path / "sm"), verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm"))
    for option in config.ConverterOptions.__dataclass_fields__:
        assert hasattr(converter, option), option


def test_a_gate_set_needing_labels_on_unlabeled_data_is_refused_at_load_time():
    params = _params()
    params["model"]["mobilenet_v2"]["validation"] = "classifier"  # a generator: no labels
    error = _refused(params)
    assert error.key == "model.mobilenet_v2.validation" and "needs labels" in error.message
    params["validation"]["classifier"]["max_accuracy_drop"] = None
    params["validation"]["classifier"]["task_metric_uses_labels"] = False
    config.validate(params, file="params.yaml")  # a label-free task metric is fine
    params["build"]["mobilenet_v2-float"]["validation"] = {"max_accuracy_drop": 0.01}
    assert _refused(params).key == "build.mobilenet_v2-float.validation"


def test_evaluation_on_the_calibration_samples_is_refused_unless_allowed():
    params = _params()
    model = params["model"]["digits"]
    model["evaluation"]["dataset"] = model["representative"]["dataset"]
    error = _refused(params)
    assert error.key == "model.digits.evaluation.dataset" and "allow_overlap" in error.message
    model["evaluation"]["allow_overlap"] = True
    config.validate(params, file="params.yaml")
    # Two dataset entries naming the same file are the same samples too.
    model["evaluation"].update(dataset="digits_evaluation", allow_overlap=False)
    params["dataset"]["digits_evaluation"]["path"] = "./" + params["dataset"]["digits_calibration"]["path"]
    assert _refused(params).key == "model.digits.evaluation.dataset"


@pytest.mark.parametrize(("dataset", "key"), [
    ({"path": "d.npz"}, "dataset.d.inputs"),  # neither inputs nor inputs_key
    ({"path": "d.npz", "inputs_key": "x", "inputs": {"a": "x"}}, "dataset.d.inputs"),
    ({"path": "d.npz", "inputs": {"a/../b": "x"}}, "dataset.d.inputs.a/../b"),
    ({"path": "d.npz", "inputs_key": "x", "labels_key": "y", "labels": {"o": "y"}}, "dataset.d.labels"),
    ({"type": "images", "path": "folder", "inputs": {"a": "x"}}, "dataset.d.inputs"),
])
def test_dataset_entries_name_their_arrays_one_way(dataset, key):
    assert _refused({"dataset": {"d": dataset}}).key == key


@pytest.mark.parametrize(("generator", "key"), [
    ({"shape": [3], "inputs": {"a": {"shape": [3]}}}, "generator.g"),
    ({"shape": [0]}, "generator.g.shape"),
    ({"shape": [3], "dtype": "uint8", "high": 1000}, "generator.g.high"),
    ({"inputs": {"ids": {"shape": [4], "dtype": "int32", "low": 0.2, "high": 0.5}}}, "generator.g.inputs.ids.high"),
    ({"shape": [100000, 100000], "size": 100}, "generator.g.size"),  # 10^12 values
    ({"shape": [3], "low": float("nan")}, "generator.g.low"),
])
def test_generators_are_bounded_and_typed(generator, key):
    assert _refused({"generator": {"g": generator}}).key == key


# An entry of each named group to copy under a bad name.
NAMED = {"model": "digits", "quantization": "float", "dataset": "digits_evaluation",
         "generator": "imagenet_like", "runtime": "litert", "validation": "default", "autoselect": "digits"}


@pytest.mark.parametrize("group", sorted(NAMED))
@pytest.mark.parametrize("name", ["../../escape", "/abs/path", "a.b", "_hidden", "trailing_", "a b", "ü"])
def test_names_that_reach_paths_are_plain(group, name):
    params = _params()
    params[group][name] = params[group][NAMED[group]]
    error = _refused(params)
    assert error.key == f"{group}.{name}", error


@pytest.mark.parametrize("name", ["team/../../x", "a'b", ".hidden", "-dash"])
def test_registry_names_are_plain(name):
    params = _params()
    params["model"]["digits"]["registry_name"] = name
    assert _refused(params).key == "model.digits.registry_name"


def test_a_stage_error_names_the_conf_file_that_set_the_value(tmp_path, monkeypatch):
    from pipeline.entry import name_the_conf_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "team_b.yaml").write_text(
        "# @package _global_\nmodel:\n  team_b:\n    metadata:\n      outputs:\n        - {name: p, labels: conf/labels/x.txt}\n")
    params = {"model": {"team_b": {"metadata": {"outputs": [{"name": "p", "labels": "conf/labels/x.txt"}]}}}}
    (tmp_path / "params.yaml").write_text(__import__("yaml").safe_dump(params))
    key = "model.team_b.metadata.outputs[0].labels"
    error = InputError("cannot read labels", file="params.yaml", key=key)
    name_the_conf_file(error)
    assert error.one_line() == f"conf/model/team_b.yaml: {key}: cannot read labels"
    params["model"]["team_b"]["metadata"]["outputs"][0]["labels"] = "conf/labels/edited_by_hand.txt"
    (tmp_path / "params.yaml").write_text(__import__("yaml").safe_dump(params))
    error = InputError("cannot read labels", file="params.yaml", key=key)
    name_the_conf_file(error)  # params.yaml holds a value no conf file set: it stays named
    assert error.file == "params.yaml"


def test_function_references_and_generator_sizes_are_checked_when_the_config_loads():
    params = _params()
    params["validation"]["classifier"]["task_metric"] = "os:system"
    assert _refused(params).key == "validation.classifier.task_metric"
    params = _params()
    params["model"]["mobilenet_v2"]["evaluation"]["num_samples"] = 33
    error = _refused(params)
    assert error.key == "model.mobilenet_v2.evaluation.num_samples" and "makes 32 samples" in error.message


def _numbers(node, path=()):
    """(path, value) of every number in a params tree."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _numbers(value, (*path, name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _numbers(value, (*path, index))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def _key(path) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


def test_every_number_of_the_examples_is_range_checked():
    """Each number the bundled config holds, set to NaN, infinity or far out of range, is refused
    with its own key: the schema's RANGES leave none unbounded."""
    import copy

    params = _params()
    fields = {}  # one number per schema field: model.*.representative.seed stands for every model's
    for path, value in _numbers(params):
        fields.setdefault(tuple("*" if i == 1 or isinstance(p, int) else p for i, p in enumerate(path)), (path, value))
    assert len(fields) >= 30
    for path, value in fields.values():
        wrong = [float("nan"), -1e300] if isinstance(value, float) else [10**13]
        for bad in wrong:
            edited = copy.deepcopy(params)
            node = edited
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = bad
            key = _key(path)
            error = _refused(edited)
            assert error.key == key or key.startswith(f"{error.key}["), (key, bad, error)  # or the whole list
            assert any(word in error.message for word in ("finite", "between", " to ")), (key, error.message)


def test_every_ranged_field_exists_in_the_schema():
    for (kind, name), (low, high) in config.RANGES.items():
        assert name in kind.__dataclass_fields__ and low < high


def test_a_bad_value_from_the_command_line_is_not_blamed_on_a_conf_file():
    with pytest.raises(ConfigError) as caught:
        config.compose(["validation.classifier.max_accuracy_drop=nan"], conf_dir=ROOT / "conf")
    assert caught.value.file == "command line" and caught.value.key == "validation.classifier.max_accuracy_drop"
    with pytest.raises(ConfigError) as caught:
        config.compose(["model=[digits"], conf_dir=ROOT / "conf")  # not Hydra's grammar
    assert caught.value.file == "command line"


def test_plain_is_omegaconfs_container_of_every_example(tmp_path):
    """`plain` walks the dataclasses itself (OmegaConf's walk took 1.5 s of `compose` at 50
    models): the same data, so config hashes and tracked params are unchanged."""
    import yaml
    from omegaconf import OmegaConf

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(all_examples_params()))
    cfg = config.load(path)
    for part in [cfg, *cfg.model.values(), *cfg.quantization.values(), *cfg.validation.values()]:
        assert config.plain(part) == OmegaConf.to_container(OmegaConf.structured(part), enum_to_str=True)
