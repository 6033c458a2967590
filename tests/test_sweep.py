"""Sweeps: members' configs and names, then real sweeps of the digits classifier through Hydra's
basic launcher, Ray and the DVC queue, each ending in one MLflow parent run with a child per member."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from PIL import Image

from pipeline import config, sweep
from pipeline.errors import ConfigError
from tests.conftest import ROOT, copy_project, run_cli

ENV = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost", "GIT_COMMITTER_NAME": "ci",
       "GIT_COMMITTER_EMAIL": "ci@localhost", "MLFLOW_TRACKING_URI": ""}
BASE = ["model=[digits]", "examples=[digits_data,digits_savedmodel]"]
SIX_VARIANTS = ["float", "dynamic_wi8_afp32", "weight_only_wi8_afp32", "weight_only_wi4_afp32", "static_wi8_ai8",
                "static_wi8_ai16"]
SIX_SAMPLE_COUNTS = [25, 50, 75, 100, 150, 200]


# --- members' configs (no DVC, no MLflow) -----------------------------------------------------


def _raw(overrides):
    return sweep._compose_raw(overrides, str(ROOT / "conf"))


def test_member_names_follow_the_swept_values():
    assert sweep.member_label("static_wi8_ai8", ["quantization=static_wi8_ai8"]) == "static_wi8_ai8"
    assert (sweep.member_label("static_wi8_ai8", ["quantization.static_wi8_ai8.num_samples=50"])
            == "static_wi8_ai8__num_samples_50")
    assert (sweep.member_label("float", ["quantization=float", "model.digits.validation=strict"])
            == "float__model_digits_validation_strict")


def test_member_config_builds_one_renamed_variant_per_model():
    member = sweep.member_config(_raw([*BASE, "quantization=static_wi8_ai8", "quantization.static_wi8_ai8.num_samples=50"]),
                                 ["quantization.static_wi8_ai8.num_samples=50"], file="params.yaml")
    assert member.label == "static_wi8_ai8__num_samples_50" and member.models == ["digits"]
    (build,) = member.builds
    assert build.name == "digits-static_wi8_ai8__num_samples_50" and build.variant.num_samples == 50
    assert member.params["build"] == {build.name: {
        "model": "digits", "variant": "static_wi8_ai8__num_samples_50", "validation": config.plain(build.gates)}}
    assert member.params["quantization"][member.label]["num_samples"] == 50
    assert member.params["autoselect"] == {}
    config.validate(member.params, file="params.yaml")


def test_a_member_with_several_variants_is_refused():
    with pytest.raises(ConfigError, match="one variant") as caught:
        sweep.member_config(_raw(BASE), [], file="multirun/x/0/params.yaml")
    assert caught.value.key == "quantization"


def test_sweeps_expand_like_hydra_and_experiments_compose_to_the_member():
    overrides = [*BASE, "quantization=static_wi8_ai8", "quantization.static_wi8_ai8.num_samples=25,50"]
    members = sweep.expand(overrides)
    assert members == [[*BASE, "quantization=static_wi8_ai8", "quantization.static_wi8_ai8.num_samples=25"],
                       [*BASE, "quantization=static_wi8_ai8", "quantization.static_wi8_ai8.num_samples=50"]]
    member = sweep.member_config(_raw(members[1]), [members[1][-1]], file="params.yaml")
    # What DVC composes from the experiment's -S overrides is exactly the member's config.
    composed = _raw(sweep.experiment_overrides(member, members[1]))
    assert composed["build"] == member.params["build"] and composed["autoselect"] == {}
    assert composed["quantization"][member.label] == member.params["quantization"][member.label]
    # Only the data the member uses: DVC would otherwise add stages for examples never built.
    assert set(composed["dataset"]) == set(member.params["dataset"]) and composed["generator"] == {}
    # The shared stages' params exactly as compose spelled them: no member reruns them.
    assert composed["model"] == member.params["model"] and composed["dataset"] == member.params["dataset"]


def test_sweep_configs_declare_their_sweeps():
    overrides = sweep.with_sweeper_params(["+sweep=digits_calibration_size"], str(ROOT / "conf"))
    assert [len(m) for m in sweep.expand(overrides)] == [2, 2, 2, 2]
    assert list(_raw(sweep.expand(overrides)[0])["model"]) == ["digits"]


def test_shared_settings_must_match_the_shared_stages():
    raw = _raw([*BASE, "quantization=float", "model.digits.representative.seed=7"])
    member = sweep.member_config(raw, ["model.digits.representative.seed=7"], file="params.yaml")
    with pytest.raises(ConfigError, match="shares one float model") as caught:
        sweep.check_shared(member, _raw(BASE), file="params.yaml")
    assert caught.value.key == "model.digits"


# --- real sweeps --------------------------------------------------------------------------------


def _git(project, *args):
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, env={**os.environ, **ENV})


@pytest.fixture(scope="module")
def base_project(tmp_path_factory):
    """A git + DVC project whose shared digits stages ran once; tests sweep in copies of it."""
    project = copy_project(tmp_path_factory.mktemp("sweep") / "project")
    _git(project, "init", "-q")
    assert run_cli("litert-pipeline", "compose", *BASE, cwd=project).returncode == 0
    result = run_cli("dvc", "repro", *sweep.DATA_STAGES, "convert@digits", "representative@digits", cwd=project, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "shared stages")
    return project


def _copy(base_project, tmp_path):
    return shutil.copytree(base_project, tmp_path / "project", symlinks=True)


def _sweep(project, *args):
    result = run_cli("litert-pipeline", "sweep", *args, cwd=project, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (directory,) = (project / "multirun").iterdir()
    return directory


def _check_results(project, directory, name, labels):
    """The report, the Pareto PNG and one parent run with one child per member."""
    from mlflow import MlflowClient

    table = (directory / "comparison" / "digits" / "report.csv").read_text().splitlines()
    assert sorted(line.split(",")[1] for line in table[1:]) == sorted(labels)
    with Image.open(directory / "comparison" / "digits" / "pareto.png") as image:
        assert image.format == "PNG"
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("litert-pipeline")
    (parent,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["members"] == len(labels)
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(f"digits/{label}" for label in labels)
    for child in children:  # each child holds its member's whole build: quantize, metadata, validate
        assert {"litert.stage.quantize", "litert.stage.metadata", "litert.stage.validate"} <= set(child.data.tags)
        assert child.data.metrics["size_bytes"] > 0 and "accuracy_drop" in child.data.metrics
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison/digits")}
    assert "comparison/digits/pareto.png" in logged and "comparison/digits/report.md" in logged


@pytest.mark.e2e
def test_hydra_sweep_of_six_variants(base_project, tmp_path):
    project = _copy(base_project, tmp_path)
    directory = _sweep(project, *BASE, f"quantization={','.join(SIX_VARIANTS)}", "--name", "six")
    _check_results(project, directory, "six", SIX_VARIANTS)
    float_model = (project / "artifacts" / "digits" / "float.tflite").resolve()
    for member in json.loads((directory / "members.json").read_text()):
        workdir = directory / str(member["job"])
        # Members share the float model and calibration: linked, never converted again.
        assert (workdir / "artifacts" / "digits" / "float.tflite").resolve() == float_model
        assert "stages.convert" not in (workdir / "stages.log").read_text()
        assert (directory / "models" / "digits" / f"{member['label']}.tflite").is_file()


@pytest.mark.e2e
def test_autoselect_and_report_stages_with_dvc_plots(base_project, tmp_path):
    """`dvc repro report@digits` on two builds: the auto-selection within budget, the comparison
    and its `dvc plots` rendering, offline."""
    import yaml
    from ai_edge_litert.interpreter import Interpreter

    project = _copy(base_project, tmp_path)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["build"] = {b: params["build"][b] for b in ("digits-float", "digits-static_wi8_ai8")}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_cli("dvc", "repro", "report@digits", cwd=project, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    trail = json.loads((project / "reports" / "digits" / "auto" / "autoselect.json").read_text())
    chosen = trail["selected"]
    assert chosen["passed"] and chosen["accuracy_drop"] <= 0.005
    assert chosen["size_bytes"] == min(a["size_bytes"] for a in trail["attempts"] if a["passed"])
    Interpreter(model_path=str(project / "models" / "digits" / "auto.tflite")).allocate_tensors()
    text = (project / "comparison" / "digits" / "report.md").read_text()
    assert "## Auto-selection" in text and "| auto |" in text and "| static_wi8_ai8 |" in text

    shown = run_cli("dvc", "plots", "show", "--json", cwd=project, env=ENV)
    assert shown.returncode == 0, shown.stderr
    assert "digits: quality loss vs. size and latency" in shown.stdout and '"variant": "auto"' in shown.stdout
    html = run_cli("dvc", "plots", "show", "--html-template", "plots/offline.html", "-o", "dvc_plots", cwd=project, env=ENV)
    assert html.returncode == 0, html.stderr
    page = (project / "dvc_plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and '"variant": "auto"' in page
    scripts = [line.split('"')[1] for line in page.splitlines() if "<script src=" in line]
    assert scripts and all(s.startswith("../.plots/node_modules/") for s in scripts)
    if (ROOT / ".plots").is_dir():  # `make install` vendors vega there
        assert all((ROOT / "dvc_plots" / s).resolve().is_file() for s in scripts)


@pytest.mark.slow
def test_dvc_queue_sweep_of_six_sample_counts(base_project, tmp_path):
    project = _copy(base_project, tmp_path)
    counts = ",".join(map(str, SIX_SAMPLE_COUNTS))
    directory = _sweep(project, *BASE, "quantization=static_wi8_ai8", f"quantization.static_wi8_ai8.num_samples={counts}",
                       "--dvc", "-j", "2", "--name", "queue")
    _check_results(project, directory, "queue", [f"static_wi8_ai8__num_samples_{n}" for n in SIX_SAMPLE_COUNTS])
    shown = run_cli("dvc", "exp", "show", "--json", cwd=project, env=ENV)
    assert shown.returncode == 0 and shown.stdout.count("static_wi8_ai8__num_samples_") >= 6


@pytest.mark.slow
def test_ray_sweep_of_six_variants(base_project, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the ray extra: pip install -e '.[ray]'")
    project = _copy(base_project, tmp_path)
    directory = _sweep(project, *BASE, f"quantization={','.join(SIX_VARIANTS)}", "hydra/launcher=ray_local",
                       "--name", "ray")
    _check_results(project, directory, "ray", SIX_VARIANTS)
    hydra_config = (directory / "0" / ".hydra" / "hydra.yaml").read_text()
    assert "hydra_ray_launcher" in hydra_config and "num_cpus: 2" in hydra_config
