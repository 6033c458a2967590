"""`litert-pipeline run` end to end: one failing build does not stop the others, and the run exits
with the most severe documented code among the stages that failed (never DVC's 255).

One project, four builds that each fail a different way, fixed one at a time: each rerun
runs only what failed, and the exit code steps down the severity order 7 > 2 > 3 > 4 > 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.errors import EXIT_CONFIG, EXIT_GATE, EXIT_INPUT, EXIT_OK, EXIT_OUTPUT, EXIT_TRACKING
from pipeline import repro
from pipeline.errors import EXIT_INTERNAL
from tests.bad_inputs.test_file_inputs import with_file_size_limit
from tests.conftest import copy_project, run_cli, tiny_keras_model

pytestmark = pytest.mark.e2e

ENV = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost", "GIT_COMMITTER_NAME": "ci",
       "GIT_COMMITTER_EMAIL": "ci@localhost", "MLFLOW_TRACKING_URI": ""}
OVERRIDES = ["model=[tiny,broken,wide]", "quantization=[float,dynamic_wi8_afp32,bad_recipe]",
             "generator=[tiny_calibration,tiny_evaluation]", "tracking.enabled=false"]

# Conf files as a team would write them (README, "Add a model").
MODEL = """\
# @package _global_
model:
  {name}:
    team: tests
    source: {{format: saved_model, path: {path}}}
    representative: {{dataset: tiny_calibration, num_samples: 8}}
    evaluation: {{dataset: tiny_evaluation, num_samples: 8}}
    runtime: litert
    validation: default
    metadata:
      inputs: [{{name: image}}]
      outputs: [{{name: scores}}]
build:
  {name}-float: {{model: {name}, variant: float}}
"""
EXTRA_BUILDS = """\
  tiny-dynamic_wi8_afp32: {model: tiny, variant: dynamic_wi8_afp32, validation: {max_size_ratio: 0.01}}
  tiny-bad_recipe: {model: tiny, variant: bad_recipe}
"""
GENERATOR = "# @package generator.{name}\nshape: [8, 8, 1]\nsize: 16\nseed: {seed}\n"


# Every file the run writes (DVC's databases included) stays below this, but the wide model's
# float .tflite (~9 MB).
FILE_SIZE_LIMIT = 4_000_000


def _run(project, *prefix: str):
    return run_cli(*prefix, "litert-pipeline", "run", *OVERRIDES, cwd=project, env=ENV)


def _wide_model():
    import keras

    inputs = keras.Input((8, 8, 1), name="image")
    hidden = keras.layers.Dense(2048, activation="relu")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Dense(1024)(hidden)))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("exit_codes") / "project")
    tiny_keras_model().export(str(project / "tiny" / "saved_model"), verbose=False)
    shutil.copytree(project / "tiny" / "saved_model", project / "broken" / "saved_model")
    _wide_model().export(str(project / "wide" / "saved_model"), verbose=False)
    protobuf = project / "broken" / "saved_model" / "saved_model.pb"
    protobuf.write_bytes(protobuf.read_bytes()[:100])  # a truncated SavedModel: exit 3
    conf = project / "conf"
    (conf / "model" / "tiny.yaml").write_text(MODEL.format(name="tiny", path="tiny/saved_model") + EXTRA_BUILDS)
    (conf / "model" / "broken.yaml").write_text(MODEL.format(name="broken", path="broken/saved_model"))
    (conf / "model" / "wide.yaml").write_text(MODEL.format(name="wide", path="wide/saved_model"))
    (conf / "quantization" / "bad_recipe.yaml").write_text(
        "# @package quantization.bad_recipe\nbackend: litert_quantizer\nrecipe: conf/recipes/bad.json\n")
    (project / "conf" / "recipes" / "bad.json").write_text("[{not json")  # read when the build quantizes: exit 2
    for seed, name in enumerate(("tiny_calibration", "tiny_evaluation")):
        (conf / "generator" / f"{name}.yaml").write_text(GENERATOR.format(name=name, seed=seed))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fixture"]):
        subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, env={**os.environ, **ENV})
    return project


def test_failures_exit_with_the_most_severe_code_and_spare_the_other_builds(project):
    # A file size limit stands for a full disk: the wide model's float .tflite cannot be written.
    first = _run(project, *with_file_size_limit(FILE_SIZE_LIMIT))
    assert first.returncode == EXIT_OUTPUT, first.stderr[-3000:]
    summary = first.stderr[first.stderr.index("stage(s) failed:"):]
    for stage, code in (("convert@wide", EXIT_OUTPUT), ("quantize@tiny-bad_recipe", EXIT_CONFIG),
                        ("convert@broken", EXIT_INPUT), ("validate@tiny-dynamic_wi8_afp32", EXIT_GATE)):
        assert f"{stage} (exit {code})" in summary, summary
    assert "Traceback" not in first.stderr
    verdicts = {line.split()[0]: line for line in first.stdout.splitlines() if line.startswith("  ")}
    assert " failed " in verdicts["tiny-dynamic_wi8_afp32"] and " passed " in verdicts["tiny-float"]
    assert "not built" in verdicts["broken-float"] and "not built" in verdicts["wide-float"]
    # --keep-going: the same model's float build was delivered and validated despite its siblings.
    assert (project / "models/tiny/float.tflite").is_file()
    assert json.loads((project / "reports/tiny/float/validation.json").read_text())["passed"]

    assert _run(project).returncode == EXIT_CONFIG
    assert (project / "models/wide/float.tflite").is_file()

    (project / "conf" / "recipes" / "bad.json").write_text(json.dumps([]))  # still invalid (empty): still exit 2
    assert _run(project).returncode == EXIT_CONFIG
    (project / "conf" / "model" / "tiny.yaml").write_text(
        MODEL.format(name="tiny", path="tiny/saved_model") + EXTRA_BUILDS.splitlines(keepends=True)[0])
    assert _run(project).returncode == EXIT_INPUT

    (project / "conf" / "model" / "broken.yaml").unlink()
    OVERRIDES[0] = "model=[tiny,wide]"
    assert _run(project).returncode == EXIT_GATE
    (project / "conf" / "model" / "tiny.yaml").write_text(MODEL.format(name="tiny", path="tiny/saved_model"))
    last = _run(project)
    assert last.returncode == EXIT_OK, last.stderr[-2000:]

    # The source breaks: its conversion fails, and what the model delivered before is an
    # earlier run's, not a pass of this one.
    protobuf = project / "tiny" / "saved_model" / "saved_model.pb"
    intact = protobuf.read_bytes()
    protobuf.write_bytes(intact[:100])
    try:
        broken = _run(project)
    finally:
        protobuf.write_bytes(intact)
    assert broken.returncode == EXIT_INPUT, broken.stderr[-2000:]
    verdicts = {line.split()[0]: line for line in broken.stdout.splitlines() if line.startswith("  ")}
    assert "out of date" in verdicts["tiny-float"] and (project / "models/tiny/float.tflite").is_file()
    assert "builds: 1 of 2 passed" in broken.stdout  # wide's float build, up to date


def test_an_unreachable_required_tracking_server_exits_5(project):
    overrides = [o for o in OVERRIDES if not o.startswith("tracking.")]
    # A gate edit: something to build and log (with nothing to do, `run` opens no MLflow run).
    result = run_cli("litert-pipeline", "run", *overrides, "tracking.http_retries=0", "tracking.http_timeout_seconds=2",
                     "validation.default.min_cosine=0.5", cwd=project, env={**ENV, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert result.returncode == EXIT_TRACKING, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: tracking.uri: MLflow at http://127.0.0.1:9")


def test_run_prepares_only_the_examples_the_selected_models_use(project):
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["examples"] == [] and set(params["generator"]) == {"tiny_calibration", "tiny_evaluation"}
    assert not (project / "examples" / "digits_savedmodel").exists()


def test_the_samples_are_what_the_generators_say(project):
    samples = np.load(project / "artifacts/data/tiny_calibration.npz")
    assert samples["input:*"].shape == (16, 8, 8, 1)


def test_a_stage_that_recorded_nothing_counts_as_internal(capsys):
    gate = {"stage": "validate@m-float", "exit_code": EXIT_GATE, "message": "m-float failed validation"}
    assert repro.summarize_failures([gate], {"validate@m-float"}) == EXIT_GATE
    assert repro.summarize_failures([gate], {"validate@m-float", "metadata@m-int8"}) == EXIT_INTERNAL
    assert "metadata@m-int8 (exit 1): DVC could not run it" in capsys.readouterr().err
    assert repro.summarize_failures([], set()) == EXIT_INTERNAL  # DVC failed before any stage


def test_the_failed_stages_are_those_left_with_nothing_left_upstream():
    """`dvc status` names the stages whose own inputs changed: after convert failed, quantize's
    own input is unchanged (convert wrote nothing), but a validate edited too is stale: DVC
    skipped it, and it did not fail."""
    graph = {"quantize@m-float": {"convert@m"}, "validate@m-float": {"quantize@m-float"}, "convert@m": set()}
    assert repro.first_left({"convert@m", "validate@m-float"}, graph) == {"convert@m"}
    assert repro.first_left({"validate@m-float"}, graph) == {"validate@m-float"}


def test_a_missing_source_fails_before_dvc_naming_the_conf_file(project):
    (project / "conf" / "model" / "ghost.yaml").write_text(MODEL.format(name="ghost", path="nowhere/saved_model"))
    result = run_cli("litert-pipeline", "run", "model=[ghost]", *OVERRIDES[1:], cwd=project, env=ENV)
    (project / "conf" / "model" / "ghost.yaml").unlink()
    assert result.returncode == EXIT_INPUT
    assert result.stderr.strip().splitlines()[-1] == (
        "error: conf/model/ghost.yaml: model.ghost.source.path: 'nowhere/saved_model' does not exist")


def test_an_interrupted_run_ends_its_parent_run_killed_and_exits_130(project):
    # A setting no earlier run used: the convert stage must really run (not be restored from DVC's run-cache).
    _interrupt(project, "model.tiny.evaluation.num_samples=7", at="Running stage 'convert@", name="interrupted",
               wait=1)


def test_a_run_interrupted_while_the_shared_stages_build_ends_its_parent_run_killed(project):
    """The shared stages (here a generated dataset) build while MLflow opens the parent run in a
    thread: interrupted then, the run waits for it and ends it KILLED."""
    _interrupt(project, "generator.tiny_evaluation.seed=77", at="Running stage 'generate@tiny_evaluation'",
               name="interrupted-early")


def _interrupt(project, override: str, at: str, name: str, wait: float = 0) -> None:
    """A `run` with `override` gets a SIGTERM `wait` seconds after DVC prints `at` (a stage it
    starts): it exits 130 with one line, and its MLflow parent run ends KILLED."""
    import signal
    import time

    from mlflow import MlflowClient

    overrides = [o for o in OVERRIDES if not o.startswith("tracking.")] + [override]
    process = subprocess.Popen(["litert-pipeline", "run", *overrides, "--name", name], cwd=project,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **ENV, "PATH": f"{os.path.dirname(os.sys.executable)}:{os.environ['PATH']}"})
    for line in process.stdout:
        if at in line:
            break
    time.sleep(wait)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("litert-pipeline")
    (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    assert run.info.status == "KILLED"
