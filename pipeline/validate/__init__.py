"""Validate a LiteRT model against its TensorFlow source, its size and latency budget, and
its target runtime; every enabled gate is checked and every failure reported.

Needs no TensorFlow: models run in the LiteRT interpreter (`ai_edge_litert`). Outputs are
compared one by one, by name; the gated cosine and SNR are the worst output's.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.build import Build
from pipeline.config import MetadataConfig, RuntimeConfig, ValidationConfig
from pipeline.datasets import Samples
from pipeline.errors import ConfigError, InputError, first_line
from pipeline.evaluate import accuracies, load_reference
from pipeline.io import read_bytes
from pipeline.sources import resolve_factory, served_signature
from pipeline.tflite_model import parse, select_tf_ops
from pipeline.validate.layers import MAX_SAMPLES as LAYER_SAMPLES
from pipeline.validate.layers import LayerError, layer_errors, to_csv
from pipeline.validate.metrics import GATED_METRICS, check_gates, compare, match_outputs
from pipeline.validate.report import to_markdown
from pipeline.validate.clients import image_classifier_check
from pipeline.validate.runner import benchmark_tool, latency_ms, run_samples
from pipeline.validate.runtime import check_runtime, is_version

__all__ = ["LayerError", "Validation", "output_metrics", "payload_size", "to_csv", "to_markdown", "validate", "validate_build"]

WORST_LAYERS = 10
# `verification` in a report: every gate measured, or the model could not run on this host.
VERIFIED, UNVERIFIED = "verified", "unverified"


@dataclass(frozen=True)
class Validation:
    report: dict[str, Any]  # JSON-able: metrics, gate results, runtime checks, failures
    layer_errors: list[LayerError]  # worst first; empty when the comparison does not apply

    @property
    def failures(self) -> list[str]:
        return self.report["failures"]


def payload_size(model: bytes) -> int:
    """The model without TFLITE_METADATA and packed files: what the size gate compares."""
    from pipeline.metadata import (
        strip_metadata,  # slow to import: only validation needs it here
    )

    return len(strip_metadata(model))


def validate(
    model: bytes,
    *,
    float_model: bytes,
    samples: Samples,
    reference: dict[str, np.ndarray],
    gates: ValidationConfig,
    runtime: RuntimeConfig,
    allow_custom_ops: bool = False,
    signature_key: str | None = "serving_default",
    name: str = "model",
    metadata: MetadataConfig | None = None,
    run_benchmark_tool: bool = False,
) -> Validation:
    """Measure `model` on the evaluation `samples` against the source's `reference` outputs.

    A gate whose metric cannot be measured (no labels...) fails: an unchecked model must not
    pass. A model that needs select TF ops cannot run here at all: its execution gates are
    unverifiable and pass only when `gates.accept_unverified`.
    """
    runtime_report = check_runtime(model, runtime, allow_custom_ops=allow_custom_ops)
    payload, float_payload = payload_size(model), payload_size(float_model)
    metrics: dict[str, Any] = {
        "num_samples": len(samples),
        "size_bytes": len(model),
        "payload_bytes": payload,
        "float_payload_bytes": float_payload,
        "size_ratio": payload / float_payload,
    }
    outputs: dict[str, dict[str, float]] = {}
    unmeasured: dict[str, str] = {}
    run_report: dict[str, Any] = {"num_threads": runtime.num_threads}
    flex = select_tf_ops(model)
    unverifiable = None
    clients: list[dict[str, Any]] = []
    if flex:
        unverifiable = (f"select TF ops {', '.join(flex)} need the Flex delegate, which neither ai-edge-litert nor "
                        "TensorFlow's pip wheel ships: not executable on this host")
        run_report["error"] = unverifiable
    else:
        try:
            run = run_samples(model, samples, num_threads=runtime.num_threads, signature_key=signature_key,
                              desc=f"validate {name}", compiled=True)
        except (RuntimeError, ValueError) as exc:  # the interpreter's errors (unresolved ops, shapes...)
            reason = f"the model does not run in the LiteRT interpreter: {first_line(exc)}"
            run_report["error"] = reason
            unmeasured = {metric: reason for metric, _ in GATED_METRICS}
        else:
            run_report.update(
                signature=run.runner.signature,
                batch_size=run.batch_size,
                batch_dependent=run.batch_dependent,
                input_dtypes={n: str(np.dtype(d["dtype"])) for n, d in run.runner.input_details.items()},
            )
            outputs, measured = output_metrics(run.outputs, reference, samples.labels, task_metric=gates.task_metric)
            metrics.update(measured)
            if "accuracy_drop" not in metrics:
                unmeasured["accuracy_drop"] = ("no labels" if not samples.labels
                                               else "no output is labelled with class indices")
            latency = latency_ms(run.runner, samples.sample(0), model=model, num_threads=runtime.num_threads,
                                 runs=gates.latency_runs, warmup=gates.warmup_runs)
            metrics["latency_median_ms"], metrics["latency_p90_ms"] = latency.median_ms, latency.p90_ms
            if run.fallback_reason:
                run_report["outputs_fallback"] = run.fallback_reason
            if run_benchmark_tool:  # LiteRT's own latency numbers, beside ours
                run_report["benchmark_tool"] = benchmark_tool(model, signature=run.runner.signature,
                                                              num_threads=runtime.num_threads,
                                                              runs=gates.latency_runs, warmup=gates.warmup_runs)
            run_report.update(outputs_api=run.api, latency_api=latency.api,
                              **({"latency_fallback": latency.fallback_reason} if latency.fallback_reason else {}))
            if metadata is not None:  # does a real client read the metadata as meant?
                clients.append(image_classifier_check(model, run.runner, samples.inputs, metadata, len(run.outputs)))

    if unverifiable:
        rows, reason = [], unverifiable
    else:
        rows, reason = layer_errors(float_model, model, samples, num_threads=runtime.num_threads)
    gate_results = check_gates(metrics, gates, unmeasured=unmeasured, unverifiable=unverifiable)
    failures = [g["message"] for g in gate_results if not g["passed"]] + runtime_report["violations"]
    failures += [f"{c['client']} disagrees with the pipeline on {c['samples']} raw images (top-1 agreement "
                 f"{c['top1_agreement']:.0%}, score cosine down to {c['min_score_cosine']:.3f}): the metadata's "
                 "normalization misleads it" for c in clients if c["status"] == "failed"]
    report = {
        "model": name,
        "model_sha256": hashlib.sha256(model).hexdigest(),
        "passed": not failures,
        "verification": UNVERIFIED if unverifiable else VERIFIED,
        "failures": failures,
        "metrics": metrics,
        "outputs": outputs,
        "gates": gate_results,
        "run": run_report,
        "runtime": runtime_report,
        "clients": clients,
        "layer_errors": {
            "reason": reason,
            "num_samples": 0 if reason else min(len(samples), LAYER_SAMPLES),
            "num_tensors": len(rows),
            "worst": [asdict(row) for row in rows[:WORST_LAYERS]],
        },
        "versions": {p: version(p) for p in ("ai-edge-litert", "litert-quantizer")},
    }
    return Validation(report, rows)


def output_metrics(run_outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                   labels: dict[str, np.ndarray], *, task_metric: str | None
                   ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Each output's errors against the source's (matched by name), and the model's metrics:
    the worst output's cosine and SNR, accuracies where labelled, the task metric if any."""
    matched = match_outputs(run_outputs, reference)
    model_outputs = {ref: run_outputs[out] for ref, out in matched.items()}
    outputs = {ref: compare(model_outputs[ref], reference[ref]) for ref in matched}
    metrics = {
        "cosine": min(o["cosine"] for o in outputs.values()),
        "snr_db": min(o["snr_db"] for o in outputs.values()),
        "max_abs_error": max(o["max_abs_error"] for o in outputs.values()),
        "non_finite_values": sum(o["non_finite_values"] for o in outputs.values()),
    }
    metrics.update(accuracy_metrics(model_outputs, reference, labels, outputs))
    if task_metric:
        metrics.update(task_metric_scores(task_metric, model_outputs, reference, labels))
    return outputs, metrics


def accuracy_metrics(model_outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                     labels: dict[str, np.ndarray], outputs: dict[str, dict[str, float]]) -> dict[str, float]:
    """Accuracy of each class-labelled output (`evaluate.accuracy`), added to its row in `outputs`; the metrics
    are the worst output's (the largest drop), so one gate covers every head."""
    model_accuracy, source_accuracy = accuracies(model_outputs, labels, reference), accuracies(reference, labels)
    drops = {}
    for output, value in model_accuracy.items():
        outputs[output].update(accuracy=value, source_accuracy=source_accuracy[output],
                               accuracy_drop=source_accuracy[output] - value)
        drops[output] = source_accuracy[output] - value
    if not drops:
        return {}
    worst = max(sorted(drops), key=lambda output: drops[output])
    return {"accuracy": model_accuracy[worst], "source_accuracy": source_accuracy[worst], "accuracy_drop": drops[worst]}


def task_metric_scores(
    reference_name: str,
    outputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
) -> dict[str, float]:
    """The user's metric on the source's and the model's outputs (dicts keyed by output name,
    with the labels keyed the same way), and its drop."""
    metric = resolve_factory(reference_name, trusted=False, key="validation.task_metric")
    try:
        source_score, model_score = float(metric(reference, labels)), float(metric(outputs, labels))
    except Exception as exc:  # a user function: its failure names the metric, not a traceback
        raise ConfigError(f"task metric {reference_name} failed: {type(exc).__name__}: {first_line(exc)}",
                          key="validation.task_metric") from None
    return {"source_task_metric": source_score, "task_metric": model_score,
            "task_metric_drop": source_score - model_score}


def validate_build(build: Build, model_path: str | Path) -> Validation:
    """Validate one build's model file with the model's reference, gates and runtime."""
    model = build.model
    runtime = model.runtime
    if runtime.min_runtime_version and not is_version(runtime.min_runtime_version):
        raise ConfigError(f"'{runtime.min_runtime_version}' is not a version like 2.13.0",
                          key=f"runtime.{model.runtime_name}.min_runtime_version")
    reference_path = model.paths.reference
    if not reference_path.exists():
        raise InputError("missing: run the convert stage first", file=str(reference_path))
    samples, reference = load_reference(reference_path)
    model_bytes, float_bytes = read_bytes(model_path), read_bytes(model.paths.float_model)
    for data, path in ((model_bytes, model_path), (float_bytes, model.paths.float_model)):
        parse(data, file=str(path))  # a corrupt model fails here, naming its file
    result = validate(
        model_bytes,
        float_model=float_bytes,
        samples=samples,
        reference=reference,
        gates=build.gates,
        runtime=runtime,
        allow_custom_ops=model.config.conversion.allow_custom_ops,
        signature_key=served_signature(model.config.source),
        name=model.name,
        metadata=model.config.metadata,
        run_benchmark_tool=True,
    )
    context = {"build": build.name, "variant": build.variant_name, "model_path": str(model_path)}
    return replace(result, report={**context, **result.report})
