"""`litert-pipeline nightly`: a verdict per build, the exit code, the summary; and end to end:
unchanged twice (exit 0), then a variant that loses accuracy against production (exit 6)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from pipeline import config, nightly, registry, repro
from pipeline.build import resolve_build
from pipeline.errors import EXIT_CONFIG, EXIT_GATE, EXIT_INTERNAL, EXIT_OK, EXIT_OUTPUT
from pipeline.io import write_json
from pipeline.metadata import inspect_model
from pipeline.layout import BuildPaths
from tests.conftest import ROOT, copy_project, only_builds, run_cli

VARIANTS = ("float", "dynamic_wi8_afp32")


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return config.load(ROOT / "params.yaml")


def _report(variant: str, passed: bool = True, validated: bytes = b"model") -> None:
    """A delivered model (b"model") and a validation report of the model `validated`."""
    paths = BuildPaths.of("digits", variant)
    paths.delivered.parent.mkdir(parents=True, exist_ok=True)
    paths.delivered.write_bytes(b"model")
    write_json(paths.validation_json, {
        "passed": passed, "failures": [] if passed else ["accuracy_drop 0.1 > 0.02"],
        "model_sha256": hashlib.sha256(validated).hexdigest(), "metrics": {"accuracy": 0.9, "size_ratio": 0.5}})


def _classified(cfg, stale: set[str]) -> nightly.BuildResult:
    (verdict,) = [v for v in repro.build_verdicts(cfg, stale, GRAPH) if v.build == "digits-float"]
    return nightly.classify(resolve_build(cfg, "digits-float"), verdict)


# What `dvc dag` says validate@digits-float depends on.
GRAPH = {
    "data@digits_calibration": {"prepare@digits_data"}, "data@digits_evaluation": {"prepare@digits_data"},
    "convert@digits": {"prepare@digits_savedmodel", "data@digits_evaluation"},
    "representative@digits": {"data@digits_calibration", "convert@digits"},
    "quantize@digits-float": {"convert@digits", "representative@digits"},
    "metadata@digits-float": {"quantize@digits-float", "convert@digits"},
    "validate@digits-float": {"metadata@digits-float", "convert@digits"},
    "report@digits": {"validate@digits-float"},
}
UPSTREAM = repro.ancestors(GRAPH, "validate@digits-float")


def test_ancestors_follow_the_graph_to_its_roots():
    assert UPSTREAM == set(GRAPH) - {"validate@digits-float", "report@digits"} | {
        "prepare@digits_data", "prepare@digits_savedmodel"}


@pytest.mark.parametrize(("stale", "passed", "status", "note"), [
    (set(), True, "passed", ""),
    (set(), False, "failed", ""),
    ({"validate@digits-float"}, False, "failed", ""),  # failed its gates this run
    ({"validate@digits-float"}, True, "not_built", "validate@digits-float not up to date"),
    ({"convert@digits"}, True, "not_built", "convert@digits not up to date"),  # the report is stale
    ({"quantize@digits-float"}, True, "not_built", "quantize@digits-float"),
    ({"prepare@digits_data"}, True, "not_built", "prepare@digits_data"),
    ({"report@digits", "autoselect@digits", "quantize@digits-static_wi8_ai8"}, True, "passed", ""),  # not upstream
])
def test_each_build_gets_a_verdict_from_its_report_and_the_stages_it_depends_on(cfg, stale, passed, status, note):
    _report("float", passed)
    result = _classified(cfg, stale)
    assert (result.status, result.registered_model) == (status, "vision.digits")
    assert note in result.note
    assert result.failures == ([] if passed or status == "not_built" else ["accuracy_drop 0.1 > 0.02"])


def test_a_build_without_a_report_or_with_a_report_of_another_model_did_not_build(cfg):
    result = _classified(cfg, set())
    assert (result.status, result.note) == ("not_built", f"did not build: no {BuildPaths.of('digits', 'float').delivered}")
    _report("float", validated=b"an earlier model")
    result = _classified(cfg, set())
    assert result.status == "not_built" and result.note.startswith("not validated: ")


def test_exit_codes_put_the_most_severe_stage_failure_before_gates_before_regressions(cfg):
    def results(*statuses):
        return [nightly.BuildResult(f"b{i}", "m", "v", s, "t.m") for i, s in enumerate(statuses)]

    assert nightly.exit_code(results("passed", "passed", "unverified"), 0) == EXIT_OK
    assert nightly.exit_code(results("passed", "regressed"), 0) == nightly.EXIT_REGRESSION
    assert nightly.exit_code(results("regressed", "not_built"), EXIT_GATE) == EXIT_GATE
    assert nightly.exit_code(results("regressed", "failed"), 0) == EXIT_GATE
    assert nightly.exit_code(results("regressed", "not_built"), EXIT_CONFIG) == EXIT_CONFIG  # a config beats a gate
    assert nightly.exit_code(results("failed"), EXIT_OUTPUT) == EXIT_OUTPUT
    assert nightly.exit_code(results("regressed"), EXIT_INTERNAL) == EXIT_INTERNAL


def test_the_summary_names_each_regressed_metric():
    change = registry.Change("accuracy", production=0.98, current=0.97, tolerance=0.005)
    changes = [{**dataclasses.asdict(change), "worse_by": change.worse_by, "regressed": True}]
    build = nightly.BuildResult("digits-float", "digits", "float", "regressed", "vision.digits",
                                metrics={"accuracy": 0.97}, version=3, production_version=1, changes=changes)
    summary = {"name": "nightly", "started": "2026-01-01 02:30 UTC", "exit_code": nightly.EXIT_REGRESSION,
               "stages_exit_code": 0, "git_commit": "c0ffee", "parent_run_id": "r1",
               "tracking_uri": "sqlite:///m.db", "builds": [dataclasses.asdict(build)]}
    markdown = nightly.to_markdown(summary)
    assert markdown.startswith("# nightly 2026-01-01 02:30 UTC: FAILED (exit 6)\n")
    assert ("| digits-float | regressed | vision.digits v3 | v1 | 0.97 | — | — | — | "
            "accuracy 0.97 vs 0.98 (worse by 0.01 > 0.005) |") in markdown


# --- end to end ---------------------------------------------------------------------------------

OVERRIDES = ["model=[digits]", "examples=[digits_data,digits_savedmodel]", *only_builds("digits", *VARIANTS),
             "~autoselect.digits",
             "nightly.tolerance.accuracy=0.001"]  # one evaluation sample in 360 is a regression


@pytest.mark.e2e
def test_nightly_passes_unchanged_and_fails_when_a_variant_loses_accuracy(tmp_path):
    from mlflow import MlflowClient

    from tests.test_e2e import ENV, _git

    project = copy_project(tmp_path / "project")
    for args in (("init", "-q"), ("add", "-A"), ("commit", "-qm", "fixture")):
        _git(project, *args)

    def run_nightly(*extra):
        result = run_cli("litert-pipeline", "nightly", *OVERRIDES, *extra, cwd=project, env=ENV)
        summary = json.loads((project / "nightly" / "summary.json").read_text())
        return result, {b["variant"]: b for b in summary["builds"]}

    first, builds = run_nightly()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert {b["status"] for b in builds.values()} == {"passed"}
    assert builds["float"]["note"] == "no production-float version yet"
    for build in builds.values():
        promoted = run_cli("litert-pipeline", "promote", "vision.digits", str(build["version"]), cwd=project, env=ENV)
        assert promoted.returncode == 0, promoted.stderr

    second, builds = run_nightly()
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    production = builds["dynamic_wi8_afp32"]["version"]
    for build in builds.values():
        assert build["production_version"] == build["version"]
        assert build["changes"] and all(c["worse_by"] == 0 for c in build["changes"])

    # Two nightlies, one version per passing variant, tagged with what the model itself says.
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    versions = {v.tags["litert.variant"]: v for v in client.search_model_versions("name = 'vision.digits'")}
    assert sorted(versions) == sorted(VARIANTS) and len(client.search_model_versions("name = 'vision.digits'")) == 2
    for variant, version in versions.items():
        provenance = inspect_model((project / "models" / "digits" / f"{variant}.tflite").read_bytes())["provenance"]
        assert all(version.tags[f"litert.{f}"] == str(provenance[f])
                   for f in registry.LINEAGE_FIELDS if provenance.get(f) is not None)

    # The dynamic build now quantizes its weights to 4 bits: still within its gates, but
    # less accurate than its production version.
    third, builds = run_nightly("quantization.dynamic_wi8_afp32.recipe=weight_only_wi4_afp32")
    assert third.returncode == nightly.EXIT_REGRESSION, third.stdout[-3000:] + third.stderr[-3000:]
    assert builds["float"]["status"] == "passed"
    regressed = builds["dynamic_wi8_afp32"]
    assert regressed["status"] == "regressed" and regressed["production_version"] == production
    assert regressed["version"] == 3  # the new bytes are registered, as a candidate
    (accuracy,) = [c for c in regressed["changes"] if c["metric"] == "accuracy"]
    assert accuracy["regressed"] and accuracy["worse_by"] > 0.001
    markdown = (project / "nightly" / "summary.md").read_text()
    assert "FAILED (exit 6)" in markdown and "| digits-dynamic_wi8_afp32 | regressed |" in markdown

    experiment = client.get_experiment_by_name("litert-pipeline").experiment_id
    parents = client.search_runs([experiment], "tags.`litert.kind` = 'nightly'", order_by=["attributes.start_time ASC"])
    assert [p.info.status for p in parents] == ["FINISHED", "FINISHED", "FAILED"]
    assert parents[-1].data.metrics["builds_regressed"] == 1
    assert {"summary.json", "summary.md"} <= {a.path for a in client.list_artifacts(parents[-1].info.run_id)}
