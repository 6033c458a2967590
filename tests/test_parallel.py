"""`run -j 2`: two models built at once by two workers, their lock entries and outputs brought home.

Against a serial rebuild of the same stages in the same project (same prepared examples:
Keras' export is not byte-stable, the builds are): the same delivered bytes and dvc.lock
entries, a clean `dvc status`, and one MLflow run per build with its registry version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess

import pytest
import yaml

from pipeline import parallel, repro
from pipeline.config import ParallelEngine
from tests.conftest import ROOT, copy_project, run_cli

pytestmark = pytest.mark.e2e

MODELS = ["digits_keras", "digits_h5"]
# Two small models, three builds each: float, dynamic and static int8 (no float16, no converter
# build, no auto-selection).
OVERRIDES = [f"model=[{','.join(MODELS)}]", *(f"~autoselect.{m}" for m in MODELS),
             *(f"~build.{m}-{v}" for m in MODELS for v in ("weight_only_wf16_afp32", "converter_int8"))]
ENV = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost", "GIT_COMMITTER_NAME": "ci",
       "GIT_COMMITTER_EMAIL": "ci@localhost", "MLFLOW_TRACKING_URI": ""}
ORDER = ("convert", "representative", "quantize", "metadata", "validate", "report")


def _delivered(project) -> dict[str, bytes]:
    return {str(p.relative_to(project)): p.read_bytes() for p in sorted((project / "models").rglob("*.tflite"))}


def _lock(project) -> dict:
    """dvc.lock's stages and the hashes of their outputs, but reports (JSON records and the
    validation reports hold timings and latencies)."""
    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {name: [(o["path"], o["md5"]) for o in stage.get("outs", [])
                   if not o["path"].startswith(("reports/", "comparison/")) and not o["path"].endswith(".json")]
            for name, stage in stages.items()}


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("parallel") / "project")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fixture"]):
        subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, env={**os.environ, **ENV})
    result = run_cli("litert-pipeline", "run", "-j", "2", *OVERRIDES, "--name", "parallel", cwd=project, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project, result


def test_two_workers_build_and_the_project_takes_their_results_home(parallel_run):
    project, result = parallel_run
    assert "[worker 1] Running stage" in result.stdout and "[worker 2] Running stage" in result.stdout
    # Every per-model stage ran in a worker, none here.
    ran_here = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert all(line.split("'")[1].split("@")[0] in (*parallel.SHARED_STAGES, "track") for line in ran_here), ran_here
    assert "Running stage 'track'" in result.stdout  # here, last, as a serial `dvc repro` ends
    assert "is cached" not in result.stdout  # brought home from the workers, not restored stage by stage
    status = run_cli("dvc", "status", "--json", cwd=project)
    assert status.stdout.strip() == "{}"
    assert not list((project / ".litert" / "deferred").iterdir())


def test_a_run_with_nothing_to_build_opens_no_mlflow_run(parallel_run):
    from mlflow import MlflowClient

    project, _ = parallel_run
    again = run_cli("litert-pipeline", "run", "-j", "2", *OVERRIDES, "--name", "nothing-to-do", cwd=project, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to build" in again.stdout and "builds: 6 of 6 passed" in again.stdout
    assert "Running stage" not in again.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("litert-pipeline")
    assert not client.search_runs([experiment.experiment_id], "attributes.run_name = 'nothing-to-do'")


def test_parallel_builds_are_a_serial_runs_bytes(parallel_run):
    project, _ = parallel_run
    delivered, lock = _delivered(project), _lock(project)
    assert len(delivered) == 6
    stale = [stage for stage in _lock(project) if parallel.model_of(stage, _config(project)) is not None]
    stale.sort(key=lambda stage: ORDER.index(stage.split("@")[0]))
    rebuilt = run_cli("dvc", "repro", "--force", "--single-item", "--no-run-cache", *stale, cwd=project,
                      env={**ENV, "LITERT_TRACKING_DEFER": "1"})
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert rebuilt.stdout.count("Running stage") == len(stale)
    assert _delivered(project) == delivered and _lock(project) == lock


def test_one_mlflow_run_and_registry_version_per_build(parallel_run):
    from mlflow import MlflowClient

    project, _ = parallel_run
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("litert-pipeline")
    runs = client.search_runs([experiment.experiment_id], "tags.`litert.variant` != ''")
    builds = sorted((r.data.tags["litert.model"], r.data.tags["litert.variant"]) for r in runs)
    assert builds == sorted((m, v) for m in MODELS for v in ("float", "dynamic_wi8_afp32", "static_wi8_ai8"))
    parent = client.search_runs([experiment.experiment_id], "attributes.run_name = 'parallel'")[0]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    versions = [v for m in MODELS for v in client.search_model_versions(f"name = 'vision.{m}'")]
    assert len(versions) == 6


def test_one_edited_model_goes_in_pieces_over_both_workers(parallel_run):
    """Fewer models out of date than workers: the model is cut into pieces (its calibration,
    each build, its report), its builds spread over both workers, each given what the other
    built before it. Reverted (the workers restore it from DVC's run-cache), the project is as
    before, byte for byte."""
    project, _ = parallel_run
    before = _delivered(project), _lock(project)
    results = [run_cli("litert-pipeline", "run", "-j", "2", *OVERRIDES, f"model.digits_keras.representative.num_samples={n}",
                       "--name", f"pieces-{n}", cwd=project, env=ENV) for n in (90, 100)]
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "in 5 unit(s)" in result.stderr
    ran = [line.split("] Running stage ") for line in results[0].stdout.splitlines() if "] Running stage" in line]
    assert {stage.strip("':") for _, stage in ran} == {
        "representative@digits_keras", "report@digits_keras",
        *(f"{kind}@digits_keras-{variant}" for kind in ("quantize", "metadata", "validate")
          for variant in ("float", "dynamic_wi8_afp32", "static_wi8_ai8"))}
    assert {worker for worker, _ in ran} == {"[worker 1", "[worker 2"}
    assert run_cli("dvc", "status", "--json", cwd=project).stdout.strip() == "{}"
    assert (_delivered(project), _lock(project)) == before


def test_outputs_a_failed_run_removed_come_home_though_their_lock_entry_is_unchanged(parallel_run):
    """A stage that failed removed its outputs and kept its lock entry; once its input is fixed,
    a worker restores it from the run-cache under that same entry. Its outputs must still come
    home, for the other worker's units and for the project (before: exit 7, every time). Runs
    where the test before it left the project: built with OVERRIDES alone."""
    project, _ = parallel_run
    before = _delivered(project), _lock(project)
    for name in ("convert.json", "float.tflite", "reference.npz"):
        (project / "artifacts" / "digits_keras" / name).unlink()  # as `convert@digits_keras` failing leaves them
    result = run_cli("litert-pipeline", "run", "-j", "2", *OVERRIDES, "--name", "after-a-failure", cwd=project, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (project / "artifacts" / "digits_keras" / "float.tflite").is_file()
    assert run_cli("dvc", "status", "--json", cwd=project).stdout.strip() == "{}"
    assert (_delivered(project), _lock(project)) == before


def test_a_change_rebuilds_its_downstream_stages_in_the_workers(parallel_run):
    """`dvc status` names only the stages whose own inputs changed; the workers must rebuild
    what follows them too, and the project end clean."""
    project, _ = parallel_run
    result = run_cli("litert-pipeline", "run", "-j", "2", *OVERRIDES, "quantization.static_wi8_ai8.num_samples=50",
                     "--name", "parallel-edit", cwd=project, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rebuilt = {line.split("'")[1] for line in result.stdout.splitlines() if "] Running stage" in line}
    assert {f"{kind}@{m}-static_wi8_ai8" for kind in ("quantize", "metadata", "validate") for m in MODELS} <= rebuilt
    assert {f"report@{m}" for m in MODELS} <= rebuilt
    assert not any("float" in stage or "dynamic" in stage for stage in rebuilt), rebuilt
    assert run_cli("dvc", "status", "--json", cwd=project).stdout.strip() == "{}"
    assert not (project / ".litert" / "workers" / "worker-1").exists()  # copies removed, logs kept
    assert (project / ".litert" / "workers" / "worker-1.log").is_file()


def test_ray_tasks_build_an_edit_like_local_workers(parallel_run):
    """`parallel=ray`: the workers are tasks on a local Ray instance; the project ends as after
    local workers: the edited builds rebuilt in workers, brought home, logged and registered."""
    pytest.importorskip("ray")
    from mlflow import MlflowClient

    project, _ = parallel_run
    result = run_cli("litert-pipeline", "run", "-j", "2", *OVERRIDES, "quantization.static_wi8_ai8.num_samples=40",
                     "parallel=ray", "--name", "parallel-ray", cwd=project, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = [(project / ".litert" / "workers" / f"worker-{index}.log").read_text() for index in (1, 2)]
    rebuilt = {line.split("'")[1] for log in logs for line in log.splitlines() if line.startswith("Running stage")}
    assert {f"{kind}@{m}-static_wi8_ai8" for kind in ("quantize", "metadata", "validate") for m in MODELS} <= rebuilt
    assert all(MODELS[0] in stage for stage in rebuilt if MODELS[1] not in stage) and len(logs) == 2
    assert run_cli("dvc", "status", "--json", cwd=project).stdout.strip() == "{}"
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("litert-pipeline")
    (parent,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'parallel-ray'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((r.data.tags["litert.model"], r.data.tags["litert.variant"]) for r in children) == sorted(
        (m, "static_wi8_ai8") for m in MODELS)
    for model in MODELS:
        delivered = (project / "models" / model / "static_wi8_ai8.tflite").read_bytes()
        digest = hashlib.sha256(delivered).hexdigest()
        assert client.search_model_versions(f"name = 'vision.{model}' and tags.`litert.model_sha256` = '{digest}'")


def test_a_serial_run_of_several_models_builds_them_in_one_worker(parallel_run):
    """Without -j, several models still build in a worker, one: its small dvc.lock spares
    DVC's rewrite of the whole lock after every stage. The project ends as after `-j 2`."""
    project, _ = parallel_run
    result = run_cli("litert-pipeline", "run", *OVERRIDES, "quantization.static_wi8_ai8.num_samples=60",
                     "--name", "serial", cwd=project, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[worker 1] Running stage 'quantize@digits_keras-static_wi8_ai8'" in result.stdout
    assert "[worker 2]" not in result.stdout and "workers: 1 built" in result.stderr
    assert run_cli("dvc", "status", "--json", cwd=project).stdout.strip() == "{}"


def test_j_refuses_targets_in_one_line(tmp_path):
    result = run_cli("litert-pipeline", "run", "-j", "2", "--target", "report@digits", cwd=tmp_path, env=ENV)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "cannot be combined with --target" in result.stderr


def _generated_config(models: int):
    """The project's config with `models` copies of the digits model, two builds each."""
    from pipeline import config

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    template = raw["model"]["digits"]
    raw["model"] = {f"m{i}": template for i in range(models)}
    raw["build"] = {f"m{i}-{v}": {**raw["build"]["digits-float"], "model": f"m{i}", "variant": v}
                    for i in range(models) for v in ("float", "static_wi8_ai8")}
    raw["autoselect"] = {}
    return config.validate(raw, file="params.yaml")


def _graph(cfg) -> dict[str, set[str]]:
    """Each model's stages as dvc.yaml wires them: convert → representative → (quantize →
    metadata → validate) per build → report; every model reads a shared dataset."""
    graph: dict[str, set[str]] = {}
    for model in cfg.model:
        graph[f"convert@{model}"] = {"data@digits_evaluation"}
        graph[f"representative@{model}"] = {f"convert@{model}"}
        builds = [key for key, build in cfg.build.items() if build.model == model]
        for build in builds:
            graph[f"quantize@{build}"] = {f"convert@{model}", f"representative@{model}"}
            graph[f"metadata@{build}"] = {f"quantize@{build}"}
            graph[f"validate@{build}"] = {f"metadata@{build}"}
        graph[f"report@{model}"] = {f"validate@{build}" for build in builds}
    return graph


def test_auto_selection_starts_before_the_builds_it_outlasts():
    cfg = _generated_config(1)
    graph = {**_graph(cfg), "autoselect@m0": {"convert@m0", "representative@m0"}}
    graph["report@m0"] = graph["report@m0"] | {"autoselect@m0"}
    units = parallel.plan(parallel.affected_stages(cfg, graph, {"convert@m0"}), graph, cfg, 2)
    assert units["autoselect:m0"].after == {"before:m0"}
    # Counted as one stage it would start after every build (3 stages each), leaving one worker
    # alone with it at the end; it costs several.
    assert units["autoselect:m0"].rank > units["build:m0-float"].rank == 3 + 1


def test_units_are_whole_models_but_for_the_last_ones_which_go_in_pieces():
    cfg = _generated_config(3)
    graph = _graph(cfg)
    stages = parallel.affected_stages(cfg, graph, {"convert@m0", "convert@m1", "convert@m2"})
    assert len(stages) == 3 * 9 and "data@digits_evaluation" not in stages
    units = parallel.plan(stages, graph, cfg, 2)
    # Two models whole (one per worker), the third in pieces: before its builds, each build, after.
    assert set(units) == {"model:m0", "model:m1", "before:m2", "build:m2-float", "build:m2-static_wi8_ai8", "report:m2"}
    assert units["build:m2-float"].stages == ["metadata@m2-float", "quantize@m2-float", "validate@m2-float"]
    assert units["build:m2-float"].after == {"before:m2"} and units["model:m0"].after == set()
    assert units["report:m2"].after == {"before:m2", "build:m2-float", "build:m2-static_wi8_ai8"}
    # The longest chain: a whole model (9 stages), the third model's first piece (2 + 3 + 1).
    assert units["model:m0"].rank == 9 and units["before:m2"].rank == 6 and units["report:m2"].rank == 1
    # But that piece starts first: the third model's builds are then ready to fill both workers
    # when the whole models end, instead of one worker converting it alone.
    order = [unit.name for unit in sorted(units.values(), key=parallel.Unit.start_order)]
    assert order[:3] == ["before:m2", "model:m0", "model:m1"] and order[-1] == "report:m2"
    # The run's bar counts a build done when every unit holding its stages has ended.
    per_build = parallel.units_per_build(units, cfg)
    assert len(per_build) == 6 and per_build["m0-float"] == {"model:m0"}
    assert per_build["m2-float"] == {"build:m2-float"}
    # As many models as workers: all whole; one model alone: all pieces.
    assert set(parallel.plan(stages, graph, cfg, 3)) == {"model:m0", "model:m1", "model:m2"}
    one = parallel.plan(parallel.affected_stages(cfg, graph, {"validate@m1-float"}), graph, cfg, 2)
    assert {name: unit.stages for name, unit in one.items()} == {"build:m1-float": ["validate@m1-float"],
                                                                  "report:m1": ["report@m1"]}
    # Those two run one after the other: nothing for a second worker (they run here, serially).
    assert not parallel._any_independent(one) and parallel._any_independent(units)
    assert parallel.model_of("data@digits_evaluation", cfg) is None and parallel.model_of("validate@m0-float", cfg) == "m0"


def test_a_workers_copy_follows_absolute_links_into_itself(tmp_path, monkeypatch):
    """A committed link naming a project file by its absolute path would make a worker read
    (and the symlink check refuse) the project's file: in the copy it names the copy's file."""
    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text("")
    (root / "labels").mkdir()
    (root / "labels" / "names.txt").write_text("zero\n")
    (root / "names.txt").symlink_to(root / "labels" / "names.txt")
    (root / "cached").symlink_to(root / ".dvc" / "cache" / "files")  # DVC's cache: shared by the copies
    (root / "outside").symlink_to(tmp_path)
    monkeypatch.chdir(root)
    copy = parallel._Copy.make(1, root / ".dvc" / "cache")
    assert (copy.folder / "names.txt").resolve() == (copy.folder / "labels" / "names.txt").resolve()
    assert os.readlink(copy.folder / "cached") == str(root / ".dvc" / "cache" / "files")
    assert os.readlink(copy.folder / "outside") == str(tmp_path)
    local = (copy.folder / ".dvc" / "config.local").read_text()
    assert "no_scm = True" in local and str(root / ".dvc" / "cache") in local


def _config(project):
    from pipeline import config

    return config.load(project / "params.yaml")


def test_an_unreachable_ray_address_is_one_line_at_once(monkeypatch):
    pytest.importorskip("ray")
    import socket

    from pipeline.errors import ConfigError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = _generated_config(2)
    cfg.parallel = dataclasses.replace(cfg.parallel, engine=ParallelEngine.ray, ray_address=f"127.0.0.1:{port}")
    # Asked when the run decides to use workers: before its MLflow parent run opens.
    for jobs in (2, 1):
        with pytest.raises(ConfigError) as caught:
            parallel.through_workers(cfg, jobs)
        assert "parallel.ray_address" in caught.value.one_line() and "nothing answers" in caught.value.one_line()
    # `auto` names the cluster Ray would find (here by RAY_ADDRESS): the same check.
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    cfg.parallel = dataclasses.replace(cfg.parallel, ray_address="auto")
    with pytest.raises(ConfigError, match=rf"nothing answers at 127.0.0.1:{port} \(auto\)"):
        parallel.through_workers(cfg, 2)
    monkeypatch.setenv("RAY_ADDRESS", "garbage")  # the environment is untrusted like the config
    with pytest.raises(ConfigError, match="not a Ray address"):
        parallel.through_workers(cfg, 2)
    # A port that accepts but is no Ray head (another service): refused in seconds, not Ray's minute.
    with socket.socket() as service:
        service.bind(("127.0.0.1", 0))
        service.listen()
        cfg.parallel = dataclasses.replace(cfg.parallel, ray_address=f"127.0.0.1:{service.getsockname()[1]}")
        with pytest.raises(ConfigError, match="not as a Ray head"):
            parallel.through_workers(cfg, 2)


def test_a_gate_failed_in_a_worker_leaves_its_report_home_as_a_serial_run_does(parallel_run):
    """A stage that fails in a worker
    stays out of date, and what it wrote before failing (the report naming the failed gate,
    of the model delivered) comes home; the run exits 4. (Every validate stage fails: a size
    ratio no build reaches.)"""
    from pipeline.io import sha256_path

    project, _ = parallel_run
    result = run_cli("litert-pipeline", "run", "-j", "2", *OVERRIDES, "validation.classifier.max_size_ratio=0.01",
                     "--name", "parallel-failed", cwd=project, env=ENV)
    assert result.returncode == 4, result.stdout[-3000:] + result.stderr[-3000:]
    assert "builds: 0 of 6 passed" in result.stdout
    for model in MODELS:
        report = json.loads((project / "reports" / model / "static_wi8_ai8" / "validation.json").read_text())
        assert not report["passed"] and any("size" in failure for failure in report["failures"])
        assert report["model_sha256"] == sha256_path(project / "models" / model / "static_wi8_ai8.tflite")
    stale = set(json.loads(run_cli("dvc", "status", "--json", cwd=project).stdout))
    assert {f"validate@{m}-static_wi8_ai8" for m in MODELS} <= stale and "track" in stale


def test_a_plain_dvc_repro_is_refused_while_the_workers_build(tmp_path, monkeypatch):
    """The workers' results come home while the run holds DVC's own lock: a `dvc repro` started
    meanwhile is refused, as DVC refuses a second one, instead of building the same stages."""
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hello > hello.txt\n    outs: [hello.txt]\n")
    assert run_cli("dvc", "init", "--no-scm", "-q", cwd=tmp_path).returncode == 0
    monkeypatch.chdir(tmp_path)
    with parallel._dvc_lock():
        blocked = run_cli("dvc", "repro", cwd=tmp_path)
        with pytest.raises(parallel.BusyError, match="another DVC command is running"):
            with parallel._dvc_lock():
                pass
    assert blocked.returncode != 0 and "Unable to acquire lock" in blocked.stderr + blocked.stdout
    assert not (tmp_path / "hello.txt").exists()
    assert run_cli("dvc", "repro", cwd=tmp_path).returncode == 0


@pytest.fixture
def deferring_store(tmp_path, monkeypatch):
    """A real local MLflow store, a parent run, and stages deferring their records (as in a worker)."""
    from pipeline import tracking
    from pipeline.config import TrackingConfig

    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, tracking.OFFLINE_ENV, "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    store = TrackingConfig(experiment="uploads")
    monkeypatch.setenv(tracking.PARENT_ENV, tracking.start_parent_run(store, "run", {"kind": "repro"}))
    monkeypatch.setenv(tracking.DEFER_ENV, "1")
    return store


def _defer(store, variant: str) -> None:
    from pipeline import tracking

    tracking.log_stage(store, tracking.StageRecord(model="m", variant=variant, stage="quantize", team="t",
                                                   metrics={"size_bytes": 10}))


def _runs(store) -> dict[str, str]:
    """Each build run's variant, and its parent."""
    from mlflow import MlflowClient

    from pipeline import tracking

    client = MlflowClient(tracking_uri=tracking.tracking_uri(store))
    experiment = client.get_experiment_by_name(store.experiment).experiment_id
    return {run.data.tags["litert.variant"]: run.data.tags["mlflow.parentRunId"]
            for run in client.search_runs([experiment], "tags.`litert.model` = 'm'")}


def test_each_units_records_go_up_while_the_workers_build(deferring_store):
    import time

    from pipeline import tracking

    _defer(deferring_store, "a")
    with repro.Uploads(deferring_store) as uploads:
        uploads.wake()  # a unit ended and its records came home
        for _ in range(300):  # while the other workers build
            if not tracking.pending(tracking.DEFERRED_DIR):
                break
            time.sleep(0.1)
        assert not tracking.pending(tracking.DEFERRED_DIR)
        _defer(deferring_store, "b")  # the last unit's, home as the workers end
    assert not tracking.pending(tracking.DEFERRED_DIR)  # none left for `track`
    parent = os.environ[tracking.PARENT_ENV]
    assert _runs(deferring_store) == {"a": parent, "b": parent}


def test_records_not_uploaded_while_the_workers_build_wait_for_the_track_stage(deferring_store, monkeypatch, capsys):
    from pipeline import tracking
    from pipeline.config import TrackingConfig

    _defer(deferring_store, "a")
    with pytest.raises(KeyboardInterrupt):  # interrupted before any upload
        with repro.Uploads(deferring_store):
            raise KeyboardInterrupt
    assert len(tracking.pending(tracking.DEFERRED_DIR)) == 1
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    lost = TrackingConfig(uri="http://127.0.0.1:9", experiment="uploads", required=True)
    with repro.Uploads(lost) as uploads:  # MLflow lost: one warning, and the records stay
        uploads.wake()
    assert len(tracking.pending(tracking.DEFERRED_DIR)) == 1
    assert "they are uploaded (or queued) after it" in capsys.readouterr().err
    assert _runs(deferring_store) == {}


def test_a_serial_dvc_repros_records_go_up_as_its_stages_write_them(deferring_store):
    """`run` without workers: the records go up while DVC builds, looked for every `every`
    seconds (the `track` stage then leaves them, `INVOCATION_UPLOADS_ENV`)."""
    import time

    from pipeline import tracking

    with repro.Uploads(deferring_store, every=0.1):
        _defer(deferring_store, "a")  # a stage ended and wrote its record, nothing woke the thread
        for _ in range(300):
            if not tracking.pending(tracking.DEFERRED_DIR):
                break
            time.sleep(0.1)
        assert not tracking.pending(tracking.DEFERRED_DIR)
    assert _runs(deferring_store) == {"a": os.environ[tracking.PARENT_ENV]}
