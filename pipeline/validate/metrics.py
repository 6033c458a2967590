"""Numeric comparison with the TensorFlow source, and the gates applied to the results."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.config import ValidationConfig
from pipeline.errors import InputError

# Identical outputs have an infinite SNR, and JSON has no infinity.
MAX_SNR_DB = 200.0

# (metric, gate): a `max_` gate fails above its threshold, a `min_` gate below it.
GATED_METRICS = (
    ("accuracy_drop", "max_accuracy_drop"),
    ("cosine", "min_cosine"),
    ("snr_db", "min_snr_db"),
    ("size_ratio", "max_size_ratio"),
    ("latency_median_ms", "max_latency_ms"),
    ("task_metric_drop", "max_task_metric_drop"),
)


def match_outputs(actual: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, str]:
    """Reference output name -> model output name: by name, or the only output of each."""
    if set(reference) <= set(actual):
        return {name: name for name in reference}
    if len(reference) == 1 and len(actual) == 1:
        return {next(iter(reference)): next(iter(actual))}
    raise InputError(
        f"model outputs ({', '.join(sorted(actual))}) do not match "
        f"the reference outputs ({', '.join(sorted(reference))})"
    )


def compare(actual: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Errors of one output against the source's, over all samples.

    `cosine` is the mean over samples of each sample's flattened cosine similarity (a
    global cosine would be dominated by the largest-magnitude samples); `cosine_min`
    is the worst sample's. An output of one value per sample (a regression head) has no
    direction per sample (its cosine would be the sign): its cosine is the samples' column
    against the source's. `snr_db` is global: 10·log10(Σ reference² / Σ error²).
    NaN and infinite outputs count as 0 and ±float32 max, so they fail the gates
    while the report stays valid JSON.
    """
    if actual.shape != reference.shape:
        raise InputError(f"output shape {actual.shape} differs from the reference's {reference.shape}")
    limit = float(np.finfo(np.float32).max)
    a = np.nan_to_num(actual.reshape(len(actual), -1).astype(np.float64), nan=0.0, posinf=limit, neginf=-limit)
    r = reference.reshape(len(reference), -1).astype(np.float64)
    error = a - r
    if a.shape[1] == 1:
        a, r = a.T, r.T
    norm_a, norm_r = np.linalg.norm(a, axis=1), np.linalg.norm(r, axis=1)
    norms = norm_a * norm_r
    cosines = np.sum(a * r, axis=1) / np.where(norms == 0, 1.0, norms)  # 0 when one side is all zeros
    cosines[(norm_a == 0) & (norm_r == 0)] = 1.0
    return {
        "non_finite_values": int(np.size(actual) - np.count_nonzero(np.isfinite(actual))),
        "cosine": float(np.mean(cosines)),
        "cosine_min": float(np.min(cosines)),
        "snr_db": snr_db(float(np.sum(r * r)), float(np.sum(error * error))),
        "max_abs_error": float(np.max(np.abs(error))),
        "mean_abs_error": float(np.mean(np.abs(error))),
    }


def snr_db(signal_power: float, noise_power: float) -> float:
    if noise_power == 0:
        return MAX_SNR_DB
    if signal_power == 0:
        return -MAX_SNR_DB
    return float(np.clip(10 * math.log10(signal_power / noise_power), -MAX_SNR_DB, MAX_SNR_DB))


# Metrics measured by running the model: a model the host cannot run leaves them unverifiable.
EXECUTION_METRICS = ("accuracy_drop", "cosine", "snr_db", "latency_median_ms", "task_metric_drop")


def check_gates(
    metrics: dict[str, Any], gates: ValidationConfig, *, unmeasured: dict[str, str], unverifiable: str | None = None
) -> list[dict[str, Any]]:
    """One result per enabled gate; a gate whose metric could not be measured fails.

    `unmeasured` says why a metric is missing (no labels...). `unverifiable` says why the
    model could not run at all: its execution gates are then `unverifiable`, which passes
    only when the gate set accepts unverified builds (`accept_unverified`).
    """
    results = []
    for metric, gate in GATED_METRICS:
        threshold = getattr(gates, gate)
        if threshold is None:
            continue
        value = metrics.get(metric)
        upper = gate.startswith("max_")
        if unverifiable and metric in EXECUTION_METRICS:
            status = "unverifiable"
            passed = gates.accept_unverified
            message = None if passed else (f"{metric} unverifiable ({unverifiable}) for {gate} {threshold:g}: set "
                                           "accept_unverified: true in the gate set to deliver it unverified")
        elif value is None:
            why = unmeasured.get(metric, "unknown reason")
            status, passed, message = "unmeasured", False, f"{metric} not measured ({why}) for {gate} {threshold:g}"
        else:
            passed = value <= threshold if upper else value >= threshold
            status = "passed" if passed else "failed"
            message = None if passed else f"{metric} {value:.4g} {'>' if upper else '<'} {gate} {threshold:g}"
        results.append({"gate": gate, "threshold": threshold, "metric": metric, "value": value,
                        "status": status, "passed": passed, "message": message})
    return results
