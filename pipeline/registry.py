"""What the model registry holds, decided without MLflow (pipeline/tracking.py makes the calls).

A build that passed validation becomes a version of the registered model `<team>.<model>`
(or `registry_name`). Its lineage tags are read from the delivered `.tflite` itself (the
packed provenance.json) and its validation report, so every tag can be checked against the
model's bytes. MLflow aliases are unique within a registered model, and one registered model
holds every variant, so aliases carry the variant: `candidate-<variant>`, `production-<variant>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.build import Build
from pipeline.config import HIGHER_IS_BETTER
from pipeline.errors import InputError
from pipeline.io import read_bytes, sha256_bytes

CANDIDATE = "candidate"
PRODUCTION = "production"
TAG = "litert."
METRIC_TAG = f"{TAG}metric."
TOOL_TAG = f"{TAG}tool."
SHA256_TAG = f"{TAG}model_sha256"
VALIDATION_TAG = f"{TAG}validation"
UNVERIFIED = "unverified"  # its tag value for a build that could not run on the host

# Provenance fields copied onto a version as `litert.<field>` (representative_sha256 is the
# hash of the calibration data the variant was quantized with).
LINEAGE_FIELDS = (
    "model", "team", "variant", "backend", "config_hash", "git_commit", "source_format", "source_sha256",
    "conversion_path", "representative_sha256", "representative_samples", "mlflow_experiment",
)


@dataclass(frozen=True)
class Registration:
    """A passing build, ready to become a model version."""

    name: str  # the registered model
    variant: str
    model_file: str  # the delivered .tflite; logged with its report to the run's `model/` folder
    report_file: str  # its validation.json
    model_sha256: str  # identical bytes never make a second version
    tags: dict[str, str]
    description: str  # of the version
    model_description: str  # of the registered model, from the model's metadata
    # False: the model could not run on the host and its gate set accepted that; it is
    # registered, tagged litert.validation=unverified, and never aliased automatically.
    verified: bool = True


def variant_alias(alias: str, variant: str) -> str:
    return f"{alias}-{variant}"


def registration(build: Build, model_file: str | Path, report_file: str | Path) -> Registration | None:
    """The registration of one build's delivered model, from its bytes and its validation report;
    None for a model without provenance (not a deliverable: validated before the metadata stage)."""
    from pipeline.metadata import (
        inspect_model,  # slow to import, and not needed to validate configs
    )

    data = read_bytes(model_file)
    sha256 = sha256_bytes(data)
    try:
        report = json.loads(read_bytes(report_file))
    except ValueError as exc:
        raise InputError(f"malformed JSON: {exc}", file=str(report_file)) from None
    if report.get("model_sha256") != sha256:
        raise InputError(f"reports on other bytes than {model_file}: run its validate stage again",
                         file=str(report_file), key="model_sha256")
    if not report.get("passed"):
        raise InputError("the model failed validation: only passing builds are registered",
                         file=str(report_file), key="passed")
    provenance = inspect_model(data)["provenance"]
    if provenance is None:
        return None
    verified = report.get("verification", "verified") == "verified"
    return Registration(
        name=build.model.registry_name,
        variant=build.variant_name,
        model_file=str(model_file),
        report_file=str(report_file),
        model_sha256=sha256,
        tags=lineage_tags(provenance, sha256, report["metrics"], verified=verified),
        description=describe(provenance, report["metrics"], verified=verified),
        model_description=build.model.config.metadata.description,
        verified=verified,
    )


def lineage_tags(provenance: dict[str, Any], model_sha256: str, metrics: dict[str, Any], *,
                 verified: bool = True) -> dict[str, str]:
    tags = {f"{TAG}{key}": str(provenance[key]) for key in LINEAGE_FIELDS if provenance.get(key) is not None}
    tags.update({f"{TOOL_TAG}{tool}": str(version) for tool, version in provenance.get("tools", {}).items()})
    # repr() round-trips a float exactly, so a tag compares equal to the report's value.
    tags.update({f"{METRIC_TAG}{key}": repr(float(metrics[key])) for key in HIGHER_IS_BETTER
                 if isinstance(metrics.get(key), (int, float))})
    tags[SHA256_TAG] = model_sha256
    tags[VALIDATION_TAG] = "passed" if verified else UNVERIFIED
    return tags


def version_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The validation metrics recorded on a version."""
    return {key[len(METRIC_TAG):]: float(value) for key, value in tags.items() if key.startswith(METRIC_TAG)}


def describe(provenance: dict[str, Any], metrics: dict[str, Any], *, verified: bool = True) -> str:
    parts = [f"{provenance.get('model')} / {provenance.get('variant')} ({provenance.get('backend')} backend), "
             f"team {provenance.get('team')}."]
    if not verified:
        parts.append("UNVERIFIED: it needs select TF ops, which could not run where it was validated; only its "
                     "size and op checks were applied.")
    if "accuracy" in metrics:
        parts.append(f"Top-1 accuracy {metrics['accuracy']:.4f} (TensorFlow source {metrics['source_accuracy']:.4f}).")
    if "cosine" in metrics:
        parts.append(f"Cosine to the source {metrics['cosine']:.6f}.")
    parts.append(f"{metrics['size_bytes']:,} bytes ({metrics['size_ratio']:.0%} of the float model).")
    parts.append(f"Built from git {str(provenance.get('git_commit'))[:12]}, config {provenance.get('config_hash')}, "
                 f"source sha256 {str(provenance.get('source_sha256'))[:12]}.")
    return " ".join(parts)


@dataclass(frozen=True)
class Change:
    """One metric of a variant against its production version."""

    metric: str
    production: float
    current: float
    tolerance: float

    @property
    def worse_by(self) -> float:
        """Positive when the current value is worse than production's."""
        difference = self.production - self.current
        return difference if HIGHER_IS_BETTER[self.metric] else -difference

    @property
    def regressed(self) -> bool:
        return self.worse_by > self.tolerance + 1e-12  # float noise is not a regression


def compare(current: dict[str, float], production: dict[str, float], tolerance: dict[str, float]) -> list[Change]:
    """The toleranced metrics that both sides measured."""
    return [
        Change(metric, float(production[metric]), float(current[metric]), float(allowed))
        for metric, allowed in sorted(tolerance.items())
        if isinstance(current.get(metric), (int, float)) and isinstance(production.get(metric), (int, float))
    ]


VERSION_COLUMNS = ("accuracy", "cosine", "size_bytes", "size_ratio", "latency_median_ms")


def format_versions(name: str, versions: list[dict[str, Any]]) -> str:
    """A plain-text table of a registered model's versions, newest first."""
    header = ["version", "variant", "aliases", *VERSION_COLUMNS, "git", "created"]
    rows = [header]
    for version in versions:
        metrics = version_metrics(version["tags"])
        rows.append([
            str(version["version"]),
            version["tags"].get(f"{TAG}variant", ""),
            ",".join(version["aliases"]) or "-",
            *(_short(metrics.get(column)) for column in VERSION_COLUMNS),
            version["tags"].get(f"{TAG}git_commit", "")[:8],
            version["created"],
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"{name}: {len(versions)} version(s)"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _short(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.6g}"
