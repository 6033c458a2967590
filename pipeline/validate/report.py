"""The Markdown rendering of a validation report."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines + [""]


def to_markdown(report: dict[str, Any]) -> str:
    metrics, run, runtime = report["metrics"], report["run"], report["runtime"]
    title = report.get("build", report["model"])
    lines = [
        f"# Validation of {title}: {'PASSED' if report['passed'] else 'FAILED'}",
        "",
        f"Model `{report.get('model_path', report['model'])}` (sha256 `{report['model_sha256'][:16]}`), "
        f"{metrics['num_samples']} evaluation samples, runtime `{runtime['kind']}` with {run['num_threads']} threads.",
        "",
    ]
    if report.get("verification") == "unverified":
        lines += [f"**Unverified:** {run.get('error')}. Execution gates were not measured; "
                  + ("the gate set accepts unverified builds." if report["passed"] else "the gate set does not accept "
                     "unverified builds (accept_unverified).") , ""]
    if report["failures"]:
        lines += ["**Failed:**", ""] + [f"- {failure}" for failure in report["failures"]] + [""]

    lines += ["## Gates", ""]
    gates = [[g["gate"], g["threshold"], g["metric"], g["value"],
              g.get("status", "passed") if g["passed"] else f"**FAIL** ({g.get('status', 'failed')})"]
             for g in report["gates"]]
    lines += _table(["gate", "threshold", "metric", "value", "result"], gates) if gates else ["No gate is enabled.", ""]

    lines += ["## Outputs vs. the TensorFlow source", ""]
    if run.get("error"):
        lines += [f"Not measured: {run['error']}.", ""]
    else:
        lines += [
            f"Outputs through LiteRT's {run.get('outputs_api', 'Interpreter')}"
            + (f" (CompiledModel: {run['outputs_fallback']})" if run.get("outputs_fallback") else "")
            + f", signature `{run['signature']}`, batch size {run['batch_size']}"
            + (" (outputs depend on the batch: evaluated one sample at a time, as on device)"
               if run["batch_dependent"] else "")
            + ". Cosine is the mean of per-sample cosines (worst sample alongside); SNR is global. Accuracy is "
            "top-1 against class indices, and the share of units right at the source's threshold against 0/1 labels "
            "(a one-unit or multi-label output).",
            "",
        ]
        lines += _table(
            ["output", "cosine", "worst-sample cosine", "SNR dB", "max abs error", "mean abs error", "NaN/Inf",
             "accuracy", "source accuracy"],
            [[name, o["cosine"], o["cosine_min"], o["snr_db"], o["max_abs_error"], o["mean_abs_error"],
              o["non_finite_values"], o.get("accuracy"), o.get("source_accuracy")]
             for name, o in report["outputs"].items()],
        )
        if "task_metric" in metrics:
            lines += [f"Task metric {metrics['task_metric']:.4f} vs. source {metrics['source_task_metric']:.4f} "
                      f"(drop {metrics['task_metric_drop']:+.4f}).", ""]

    lines += ["## Size and latency", ""]
    lines += ["The size ratio compares payloads: the models without metadata and packed files.", ""]
    lines += _table(
        ["delivered (bytes)", "payload (bytes)", "float payload (bytes)", "size ratio", "latency median (ms)",
         "latency p90 (ms)"],
        [[metrics["size_bytes"], metrics.get("payload_bytes"), metrics.get("float_payload_bytes"),
          metrics["size_ratio"], metrics.get("latency_median_ms"), metrics.get("latency_p90_ms")]],
    )
    if run.get("latency_api"):
        lines += [f"Latency: single-sample runs through {run['latency_api']}"
                  + (f" (CompiledModel: {run['latency_fallback']})" if run.get("latency_fallback") else "") + ".", ""]
    tool = run.get("benchmark_tool")
    if tool:
        timing = tool.get("latency") if isinstance(tool.get("latency"), dict) else None
        lines += ([f"LiteRT's benchmark tool (`{tool.get('tool')}`): " + (
            f"median {timing.get('median_ms')} ms, p95 {timing.get('p95_ms')} ms over {timing.get('num_runs')} runs "
            f"on {', '.join(map(str, tool.get('accelerators') or []))}; init {timing.get('init_ms')} ms (all in "
            "`validation.json`)." if timing else f"did not run: {tool.get('error')}."), ""])

    lines += [f"## Target runtime `{runtime['kind']}`", ""]
    lines += _table(["op", "kind", "version"], [[op["name"], op["kind"], op["version"]] for op in runtime["ops"]])
    versions = runtime["op_versions"]
    lines += [f"Required runtime (op versions): {_fmt(versions['required'])}"
              f" (model metadata: {_fmt(versions['metadata'])}"
              + (f"; versions not in the table: {', '.join(versions['unknown'])}" if versions["unknown"] else "")
              + ").", ""]
    if "gpu" in runtime:
        gpu = runtime["gpu"]
        lines += [f"GPU delegate: analyzer says {'compatible' if gpu['analyzer_says_compatible'] else 'incompatible'}"
                  " (its per-op check is gone from this LiteRT build; the op allowlist decides).", ""]
        lines += _table(["incompatible op", "source", "reason"],
                        [[entry["op"], entry["source"], entry["reason"]] for entry in gpu["incompatible"]])
    lines += [f"- {violation}" for violation in runtime["violations"]] or ["No runtime violation."]
    lines += [""]

    layers = report["layer_errors"]
    lines += ["## Per-layer quantization error", ""]
    if layers["reason"]:
        lines += [f"Not applicable: {layers['reason']}.", ""]
    else:
        lines += [f"Worst {len(layers['worst'])} of {layers['num_tensors']} float tensors vs. the float model, "
                  f"over {layers['num_samples']} samples (all in `layer_errors.csv`).", ""]
        lines += _table(["tensor", "kind", "SNR dB", "cosine", "MSE"],
                        [[f"`{row['tensor']}`", row["kind"], row["snr_db"], row["cosine"], row["mse"]]
                         for row in layers["worst"]])
    return "\n".join(lines)
