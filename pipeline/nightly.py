"""`litert-pipeline nightly`: rebuild, register, compare with production, summarize, fail loudly.

1. compose conf/ and `dvc repro --keep-going` under one parent run (every build gets a verdict);
2. classify each build as `run`'s summary does (`repro.build_verdicts`: its validation report,
   delivered model, `dvc status` and `dvc dag`): passed, failed (a gate), not built (a stage
   its validate stage depends on did not finish, or its report is of another model);
3. register every passing build (a no-op for bytes already registered);
4. compare each passing variant with its `production-<variant>` version, by `nightly.tolerance`;
5. write `<nightly.summary>.md` and `.json`, log them to the parent run, exit non-zero on any
   failure (4) or regression (6).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import parallel, registry, repro, tracking
from pipeline.build import Build, resolve_build
from pipeline.config import PipelineConfig
from pipeline.errors import EXIT_GATE, EXIT_OK, TrackingError, most_severe
from pipeline.io import write_json, write_text

EXIT_REGRESSION = 6  # a variant got worse than its production version beyond nightly.tolerance
SUMMARY_METRICS = ("accuracy", "cosine", "size_ratio", "latency_median_ms")


@dataclass
class BuildResult:
    build: str
    model: str
    variant: str
    status: str  # passed | unverified | failed | not_built | regressed
    registered_model: str
    metrics: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    version: int | None = None
    production_version: int | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""


def classify(build: Build, verdict: repro.Verdict) -> BuildResult:
    """A build's nightly result from its verdict, by the rules `run`'s summary uses
    (`repro.build_verdicts`: its validation report, its delivered model, and the stages
    `dvc status` left out of date among those its validation depends on)."""
    result = BuildResult(build.name, build.model.name, build.variant_name, "not_built", build.model.registry_name)
    report = verdict.report or {}
    if verdict.verdict == "out of date":
        result.note = f"did not build: {', '.join(verdict.unfinished)} not up to date after dvc repro"
    elif verdict.verdict == "not built":
        missing = build.paths.delivered if verdict.delivered_sha256 is None else build.paths.validation_json
        result.note = f"did not build: no {missing}"
    elif verdict.verdict == "not validated":
        result.note = f"not validated: {build.paths.validation_json} is of another model than {build.paths.delivered}"
    else:
        result.metrics = report.get("metrics") or {}
        if verdict.verdict == "failed":
            result.status, result.failures = "failed", list(report.get("failures") or [])
        elif verdict.verdict == "passed (unverified)":
            result.status, result.note = "unverified", "delivered unverified: it cannot run on this host (select TF ops)"
        else:
            result.status = "passed"
    return result


def register(cfg: PipelineConfig, build: Build, result: BuildResult) -> None:
    """Register a passing build; the validate stage did if it ran, and then this is a no-op."""
    model_file = build.paths.delivered
    registration = registry.registration(build, model_file, build.paths.validation_json)
    if registration is None:
        result.note = f"not registered: {model_file} has no provenance"
        return
    tracking.log_stage(cfg.tracking, tracking.StageRecord(
        model=result.model, variant=result.variant, stage="register", team=build.team,
        config=tracking.build_config(build), registration=registration,
        metrics={k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    ))


def compare_with_production(cfg: PipelineConfig, builds: dict[str, Build], results: list[BuildResult]) -> None:
    """Find each passing build's version and its variant's production version; flag regressions."""
    passing = [r for r in results if r.status == "passed"]
    for name in sorted({r.registered_model for r in passing}):
        try:
            versions = tracking.list_versions(cfg.tracking, name)
        except TrackingError as exc:
            if cfg.tracking.required:
                raise
            for result in passing:
                result.note = f"not compared: {exc.message}"
            return
        by_sha = {v["tags"].get(registry.SHA256_TAG): v for v in versions}
        by_alias = {alias: v for v in versions for alias in v["aliases"]}
        for result in (r for r in passing if r.registered_model == name):
            sha = json.loads(builds[result.build].paths.validation_json.read_text())["model_sha256"]
            result.version = by_sha[sha]["version"] if sha in by_sha else None
            alias = registry.variant_alias(registry.PRODUCTION, result.variant)
            production = by_alias.get(alias)
            if production is None:
                result.note = result.note or f"no {alias} version yet"
                continue
            result.production_version = production["version"]
            changes = registry.compare(result.metrics, registry.version_metrics(production["tags"]),
                                       cfg.nightly.tolerance)
            result.changes = [{**asdict(c), "worse_by": c.worse_by, "regressed": c.regressed} for c in changes]
            if any(c.regressed for c in changes):
                result.status = "regressed"


def exit_code(results: list[BuildResult], repro_code: int) -> int:
    """The failing stages' most severe code (`repro_code`, as `run` reports it), else 4 for a
    failed gate, else 6 for a regression."""
    codes = [repro_code] if repro_code != EXIT_OK else []
    if any(r.status in ("failed", "not_built") for r in results):
        codes.append(EXIT_GATE)
    if codes:
        return most_severe(codes)
    if any(r.status == "regressed" for r in results):
        return EXIT_REGRESSION
    return EXIT_OK


def to_markdown(summary: dict[str, Any]) -> str:
    verdict = "passed" if summary["exit_code"] == 0 else f"FAILED (exit {summary['exit_code']})"
    lines = [
        f"# {summary['name']} {summary['started']}: {verdict}",
        "",
        f"git `{summary['git_commit'][:12]}` · stages exit {summary['stages_exit_code']} · "
        f"MLflow parent run `{summary['parent_run_id']}` at {summary['tracking_uri']}",
        "",
        "| build | status | version | production | " + " | ".join(SUMMARY_METRICS) + " | notes |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in SUMMARY_METRICS) + " | --- |",
    ]
    for build in summary["builds"]:
        notes = [f"{c['metric']} {c['current']:.4g} vs {c['production']:.4g} (worse by {c['worse_by']:.4g} "
                 f"> {c['tolerance']:.4g})" for c in build["changes"] if c["regressed"]]
        notes += build["failures"] + ([build["note"]] if build["note"] else [])
        version = f"{build['registered_model']} v{build['version']}" if build["version"] else "—"
        production = f"v{build['production_version']}" if build["production_version"] else "—"
        cells = [build["build"], build["status"], version, production]
        cells += [_cell(build["metrics"].get(m)) for m in SUMMARY_METRICS]
        cells.append("; ".join(notes).replace("|", "\\|") or "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float)) else "—"


def run_nightly(overrides: list[str], conf_dir: str, name: str, *, verbose: bool = False, jobs: int = 1) -> int:
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cfg, stale = repro.compose_with_status(overrides, conf_dir)
    workers = parallel.through_workers(cfg, jobs)
    # The shared stages (datasets, example models) build while MLflow opens the parent run.
    invocation, shared = parallel.start_sharing(cfg, name, "nightly", stale, workers, verbose=verbose)
    with repro.ended_on_failure(invocation):
        # --keep-going: every build gets a verdict, not just the first failure
        reproduced = parallel.build_rest(cfg, jobs, workers, stale, shared, verbose=verbose)
        return _nightly(invocation, name, started, reproduced)


def _nightly(invocation: repro.Invocation, name: str, started: str, reproduced: repro.Reproduced) -> int:
    cfg = invocation.cfg
    repro.upload_deferred(invocation)  # the stages' runs and registrations, before comparing with production
    verdicts = repro.build_verdicts(cfg, *reproduced.state())
    repro.declare_artifacts(cfg, verdicts)  # dvc.yaml's artifacts: this run's verdicts
    builds = {name: resolve_build(cfg, name) for name in cfg.build}
    by_build = {verdict.build: verdict for verdict in verdicts}
    results = [classify(build, by_build[name]) for name, build in builds.items()]
    if cfg.tracking.enabled:
        for result in results:
            if result.status in ("passed", "unverified"):
                register(cfg, builds[result.build], result)
        if invocation.parent:
            compare_with_production(cfg, builds, results)
        else:  # tracking.required is false and MLflow was unreachable: registrations were queued
            for result in (r for r in results if r.status == "passed"):
                result.note = "not compared: MLflow was unreachable (run `litert-pipeline sync` later)"
    code = exit_code(results, reproduced.code)
    summary = {
        "name": name,
        "started": started,
        "exit_code": code,
        "stages_exit_code": reproduced.code,
        "git_commit": tracking.git_commit(),
        "parent_run_id": invocation.parent,
        "tracking_uri": tracking.shown(tracking.tracking_uri(cfg.tracking)) if cfg.tracking.enabled else None,
        "tolerance": cfg.nightly.tolerance,
        "builds": [asdict(r) for r in results],
    }
    markdown = to_markdown(summary)
    files = [write_json(Path(f"{cfg.nightly.summary}.json"), summary),
             write_text(Path(f"{cfg.nightly.summary}.md"), markdown)]
    counts = {f"builds_{status}": sum(r.status == status for r in results)
              for status in ("passed", "unverified", "failed", "not_built", "regressed")}
    per_build = {f"{r.build}/{m}": r.metrics[m] for r in results for m in SUMMARY_METRICS
                 if isinstance(r.metrics.get(m), (int, float))}
    repro.finish(invocation, succeeded=code == EXIT_OK, metrics={**counts, **per_build}, artifacts=files)
    print(markdown)
    return code
