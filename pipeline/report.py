"""Compare a model's variants side by side and mark the Pareto front: which variant to ship.

Input: the validate stage's reports (`reports/<model>/<variant>/validation.json`) and, when
the model has an auto-selection, its decision trail (`reports/<model>/auto/autoselect.json`).
Output per model, in `<out>/<model>/`: `report.md`, `report.csv`, `pareto.png` (accuracy
drop vs. size and vs. latency), `pareto.json` (the data `dvc plots` renders) and
`report.json` (the rows by variant: a DVC metrics file, so `dvc exp show` has them, and DVC
experiments carry them back to a sweep).

Models without labels have no accuracy: their quality axis is 1 − cosine to the source.
Needs no TensorFlow: matplotlib only, with the Agg backend.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.io import atomic_path, write_json, write_text
from pipeline.layout import AUTO_VARIANT, VALIDATION_JSON, AutoSelectPaths, ComparisonPaths, report_dir

# The pipeline's default int8 (LiteRT Quantizer, as Google recommends) and the deprecated
# converter int8 it must not be worse than: compared whenever a model builds both.
DEFAULT_INT8, CONVERTER_INT8 = "static_wi8_ai8", "converter_int8"
WORST_LAYERS_SHOWN = 3
# Metrics compared, and whether higher is better.
INT8_METRICS = (("snr_db", "SNR (dB)", True), ("accuracy_drop", "accuracy drop (pt)", False),
                ("task_metric_drop", "task metric drop", False), ("size_bytes", "size (bytes)", False))

CSV_COLUMNS = (
    "model", "variant", "size_bytes", "size_ratio", "accuracy", "accuracy_drop", "cosine", "snr_db",
    "latency_median_ms", "latency_p90_ms", "gates_passed", "gates_total", "passed", "pareto_size", "pareto_latency",
)


@dataclass
class Row:
    """One variant of one model, from its validation report."""

    model: str
    variant: str
    metrics: dict[str, Any]
    gates_passed: int
    gates_total: int
    passed: bool
    failures: list[str] = field(default_factory=list)
    pareto_size: bool = False
    pareto_latency: bool = False
    # The validation's lowest-SNR layers (static integer models); not in report.json.
    worst_layers: list[dict[str, Any]] = field(default_factory=list)

    def quality_loss(self, metric: str) -> float | None:
        if metric == "accuracy_drop":
            return self.metrics.get("accuracy_drop")
        cosine = self.metrics.get("cosine")
        return None if cosine is None else 1.0 - cosine


@dataclass
class ModelReport:
    model: str
    rows: list[Row]  # sorted by size, smallest first
    quality_metric: str  # accuracy_drop, or cosine_loss for models without labels
    autoselect: dict[str, Any] | None = None  # the decision trail, when the model has one

    @property
    def quality_label(self) -> str:
        return "accuracy drop (points)" if self.quality_metric == "accuracy_drop" else "1 − cosine to the source"

    def quality_value(self, row: Row) -> float | None:
        """The quality loss as plotted: accuracy drop in points, or 1 − cosine."""
        value = row.quality_loss(self.quality_metric)
        if value is None or self.quality_metric != "accuracy_drop":
            return value
        return 100.0 * value


def row_from_validation(model: str, variant: str, report: dict[str, Any], *, file: str = "") -> Row:
    try:
        gates = report["gates"]
        return Row(
            model=model,
            variant=variant,
            metrics=dict(report["metrics"]),
            gates_passed=sum(1 for gate in gates if gate["passed"]),
            gates_total=len(gates),
            passed=bool(report["passed"]),
            failures=list(report["failures"]),
            worst_layers=list((report.get("layer_errors") or {}).get("worst") or [])[:WORST_LAYERS_SHOWN],
        )
    except (KeyError, TypeError) as exc:
        raise InputError(f"not a validation report (missing {exc})", file=file) from None


def to_json(report: ModelReport) -> dict[str, Any]:
    """The rows by variant (what `rows_from_json` reads back)."""
    return {row.variant: {k: v for k, v in asdict(row).items() if k not in ("model", "variant", "worst_layers")}
            for row in report.rows}


def rows_from_json(model: str, data: dict[str, Any], *, file: str = "") -> list[Row]:
    try:
        return [Row(model=model, variant=variant, **fields) for variant, fields in data.items()]
    except TypeError as exc:
        raise InputError(f"not a comparison report.json ({exc})", file=file) from None


def pareto_front(points: list[tuple[float, float] | None]) -> list[bool]:
    """Which points no other point beats: as small or smaller in both coordinates and
    smaller in one. Missing points (None) are never on the front."""
    def dominated(p: tuple[float, float]) -> bool:
        return any(q is not None and q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)

    return [p is not None and not dominated(p) for p in points]


def build_model_report(model: str, rows: list[Row], autoselect: dict[str, Any] | None = None) -> ModelReport:
    """Sort by size and mark both Pareto fronts (quality loss vs. size, vs. median latency)."""
    rows = sorted(rows, key=lambda r: (r.metrics.get("size_bytes", float("inf")), r.variant))
    metric = "accuracy_drop" if rows and all("accuracy_drop" in r.metrics for r in rows) else "cosine_loss"

    def points(x_metric: str) -> list[tuple[float, float] | None]:
        out: list[tuple[float, float] | None] = []
        for row in rows:
            x, y = row.metrics.get(x_metric), row.quality_loss(metric)
            out.append(None if x is None or y is None else (float(x), float(y)))
        return out

    for row, on_front in zip(rows, pareto_front(points("size_bytes"))):
        row.pareto_size = on_front
    for row, on_front in zip(rows, pareto_front(points("latency_median_ms"))):
        row.pareto_latency = on_front
    return ModelReport(model, rows, metric, autoselect)


# --- reading ---------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", file=str(path)) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc}", file=str(path)) from None


def collect(reports_dir: Path, builds: dict[str, list[str]]) -> list[ModelReport]:
    """Model reports from `<reports_dir>/<model>/<variant>/validation.json` for each model's
    variants (those missing are skipped: a build that did not finish), plus `auto/` when present."""
    reports = []
    for model, variants in builds.items():
        rows = []
        for variant in variants:
            file = report_dir(model, variant, reports_dir) / VALIDATION_JSON
            if file.exists():
                rows.append(row_from_validation(model, variant, read_json(file), file=str(file)))
        trail_file = AutoSelectPaths.of(model, reports_dir).trail_json
        trail = read_json(trail_file) if trail_file.exists() else None
        auto_validation = report_dir(model, AUTO_VARIANT, reports_dir) / VALIDATION_JSON
        if trail is not None and auto_validation.exists() and AUTO_VARIANT not in variants:
            rows.append(row_from_validation(model, AUTO_VARIANT, read_json(auto_validation), file=str(auto_validation)))
        if rows:
            reports.append(build_model_report(model, rows, trail))
    return reports


# --- writing ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def to_csv(report: ModelReport) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in report.rows:
        values = {**row.metrics, "model": row.model, "variant": row.variant, "gates_passed": row.gates_passed,
                  "gates_total": row.gates_total, "passed": row.passed, "pareto_size": row.pareto_size,
                  "pareto_latency": row.pareto_latency}
        writer.writerow(["" if values.get(c) is None else values[c] for c in CSV_COLUMNS])
    return text.getvalue()


def plot_data(report: ModelReport) -> list[dict[str, Any]]:
    """One record per measured variant, as the `dvc plots` template reads them."""
    return [
        {
            "model": report.model,
            "variant": row.variant,
            "size_kb": row.metrics["size_bytes"] / 1024,
            "latency_median_ms": row.metrics.get("latency_median_ms"),
            "quality_loss": report.quality_value(row),
            "front_size": "Pareto front" if row.pareto_size else "dominated",
            "front_latency": "Pareto front" if row.pareto_latency else "dominated",
            "passed": row.passed,
        }
        for row in report.rows
        if "size_bytes" in row.metrics and report.quality_value(row) is not None
    ]


def trail_markdown(trail: dict[str, Any]) -> list[str]:
    """The auto-selection's decision trail: budget, every attempt in order, the pick."""
    budget = trail["budget"]
    caps = [f"accuracy drop ≤ {100 * budget['max_accuracy_drop']:.3g} pt" if budget.get("max_accuracy_drop") is not None else None,
            f"task metric drop ≤ {budget['max_task_metric_drop']:g}" if budget.get("max_task_metric_drop") is not None else None,
            f"SNR ≥ {budget['min_snr_db']:g} dB" if budget.get("min_snr_db") is not None else None,
            f"size ratio ≤ {budget['max_size_ratio']:g}" if budget.get("max_size_ratio") is not None else None,
            f"median latency ≤ {budget['max_latency_ms']:g} ms" if budget.get("max_latency_ms") is not None else None]
    algorithms = ", ".join(budget.get("algorithms", []))
    lines = [f"Budget: {', '.join(c for c in caps if c) or 'the model gates only'} "
             "(with the model's own gates). Candidates (every variant; static LiteRT Quantizer ones also with "
             f"{algorithms or 'their own algorithm'}) are tried from the smallest; a static one that misses keeps up "
             f"to {budget['max_steps']} × {budget['layers_per_step']} of its most sensitive layers in float.", ""]
    lines += ["| # | variant | layers in float | size (bytes) | size ratio | accuracy drop (pt) | cosine | "
              "latency median (ms) | result |", "|---|---|---|---|---|---|---|---|---|"]
    for index, attempt in enumerate(trail["attempts"], 1):
        drop = attempt.get("accuracy_drop")
        result = "within budget" if attempt["passed"] else "missed: " + "; ".join(attempt["failures"])
        lines.append(f"| {index} | {attempt['variant']} | {len(attempt['float_tensors'])} | {attempt['size_bytes']} | "
                     f"{_fmt(attempt.get('size_ratio'))} | {_fmt(None if drop is None else 100 * drop)} | "
                     f"{_fmt(attempt.get('cosine'), 6)} | {_fmt(attempt.get('latency_median_ms'))} | "
                     f"{result.replace('|', '/')} |")
    selected = trail.get("selected")
    lines.append("")
    for failed in trail.get("unbuildable", []):
        lines.append(f"- `{failed['variant']}` could not be built: {failed['reason']}")
    if trail.get("unbuildable"):
        lines.append("")
    lines += sensitivity_markdown(trail.get("sensitivity", []))
    if selected is None:
        lines.append("**No candidate is within the budget.**")
    else:
        lines.append(f"**Selected: `{selected['variant']}`** ({selected['size_bytes']} bytes).")
        if selected["float_tensors"]:
            lines += ["", "Layers kept in float (by output tensor):", ""]
            lines += [f"- `{tensor}`" for tensor in selected["float_tensors"]]
    return lines + [""]


SENSITIVITY_ROWS = 15


def sensitivity_markdown(analyses: list[dict[str, Any]]) -> list[str]:
    """Each sensitivity analysis of the search as a table, most sensitive layer first."""
    lines = []
    for analysis in analyses:
        lines += [f"### Layer sensitivity of `{analysis['variant']}`", ""]
        if analysis.get("reason"):
            lines += [f"Not measured: {analysis['reason']}.", ""]
            continue
        metric = analysis["metric"]
        drop = {"accuracy_drop": "accuracy drop alone (pt)", "task_metric_drop": "task metric drop alone"}.get(metric)
        layers = analysis["layers"]
        lines += [f"Each layer quantized alone (every other op in float), on {analysis['num_samples']} evaluation "
                  f"samples; {len(layers)} layers measured"
                  + (f", chosen in {analysis['preselection']}" if analysis.get("preselection") else "")
                  + (f", {analysis['layers_not_measured']} more not measured" if analysis.get("layers_not_measured")
                     else "")
                  + f". Most sensitive first (the {min(len(layers), SENSITIVITY_ROWS)} worst shown; all in "
                  "`autoselect.json`).", ""]
        lines += ["| # | layer (output tensor) | op | " + (f"{drop} | " if drop else "")
                  + "output SNR alone (dB) | its SNR in the full model (dB) |",
                  "|---|---|---|" + ("---|" if drop else "") + "---|---|"]
        for rank, row in enumerate(layers[:SENSITIVITY_ROWS], 1):
            value = "" if not drop else f"{_fmt(None if row['drop'] is None else (100 if metric == 'accuracy_drop' else 1) * row['drop'])} | "
            alone = f"does not run: {row['error']}".replace("|", "/") if row.get("error") else _fmt(row["snr_db_alone"])
            lines.append(f"| {rank} | `{row['tensor']}` | {row['op']} | {value}{alone} | {_fmt(row['snr_db_in_model'])} |")
        lines.append("")
    return lines


def plot_sensitivity(analyses: list[dict[str, Any]], path: Path, *, model: str) -> Path:
    """The first analysis's layers as bars: output SNR with each layer alone quantized."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis = next((a for a in analyses if a.get("layers")), None)
    layers = [] if analysis is None else analysis["layers"][:SENSITIVITY_ROWS]
    figure, axis = plt.subplots(figsize=(9, 1.2 + 0.35 * max(len(layers), 3)))
    if not layers:
        reason = (analysis or next(iter(analyses), {})).get("reason") or "no static LiteRT Quantizer candidate"
        axis.text(0.5, 0.5, f"No layer sensitivity measured:\n{reason}", ha="center", va="center", wrap=True)
        axis.set_axis_off()
    else:
        layers = [row for row in layers if row["snr_db_alone"] is not None]  # a model that does not run: in the table
        labels = [f"{row['op']} {row['tensor'][-40:]}" for row in layers][::-1]
        values = [row["snr_db_alone"] for row in layers][::-1]
        colours = ["tab:red" if (row["drop"] or 0) > 0 else "tab:blue" for row in layers][::-1]
        axis.barh(range(len(layers)), values, color=colours)
        axis.set_yticks(range(len(layers)), labels, fontsize=7)
        axis.set_xlabel("output SNR with this layer alone quantized (dB; lower = more sensitive)")
        axis.grid(True, axis="x", alpha=0.3)
        axis.set_title(f"{model}: layer sensitivity of {analysis['variant']} (red: drops "
                       f"{analysis['metric'] or 'the metric'} alone)", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return path


def int8_comparison(report: ModelReport) -> tuple[list[dict[str, Any]], list[str]]:
    """The default int8 against the converter's, metric by metric: (rows, what is worse)."""
    rows = {row.variant: row for row in report.rows}
    ours, theirs = rows.get(DEFAULT_INT8), rows.get(CONVERTER_INT8)
    if ours is None or theirs is None:
        return [], []
    table, worse = [], []
    for metric, label, higher_is_better in INT8_METRICS:
        a, b = ours.metrics.get(metric), theirs.metrics.get(metric)
        if a is None or b is None:
            continue
        if metric == "accuracy_drop":
            a, b = 100.0 * a, 100.0 * b
        table.append({"metric": metric, "label": label, "ours": a, "converter": b})
        # Size is shown, not judged: both are int8 models of the same graph.
        if metric != "size_bytes" and (a < b if higher_is_better else a > b):
            worse.append(f"{label} {_fmt(a)} vs. {_fmt(b)}")
    return table, worse


def int8_markdown(report: ModelReport) -> list[str]:
    table, worse = int8_comparison(report)
    if not table:
        return []
    lines = [f"## Default int8 (`{DEFAULT_INT8}`, LiteRT Quantizer) vs. the converter's (`{CONVERTER_INT8}`)", "",
             f"| metric | {DEFAULT_INT8} | {CONVERTER_INT8} |", "|---|---|---|"]
    lines += [f"| {row['label']} | {_fmt(row['ours'])} | {_fmt(row['converter'])} |" for row in table]
    lines.append("")
    if not worse:
        lines += [f"`{DEFAULT_INT8}` is at least as good as the converter's int8 on every measured metric.", ""]
        return lines
    ours = next(row for row in report.rows if row.variant == DEFAULT_INT8)
    lines += [f"**`{DEFAULT_INT8}` is worse than the converter's int8**: {'; '.join(worse)}."]
    if ours.worst_layers:
        lines.append("Its layers with the lowest SNR against the float model (validation, where the error enters): "
                     + ", ".join(f"`{layer['tensor']}` {_fmt(layer['snr_db'])} dB" for layer in ours.worst_layers)
                     + ".")
    if report.autoselect is not None:
        lines.append("The auto-selection below measures each layer's sensitivity alone and keeps the worst in float.")
    return lines + [""]


def to_markdown(report: ModelReport, *, image: str | None = "pareto.png") -> str:
    axis = "accuracy drop (pt)" if report.quality_metric == "accuracy_drop" else "1 − cosine"
    lines = [
        f"# Variants of `{report.model}`",
        "",
        f"{len(report.rows)} variants, smallest first. Front: on the Pareto front of {axis} vs. size (S) and "
        "vs. median latency (L): no other variant is both smaller (faster) and at least as accurate. "
        "Latency is measured on this machine.",
        "",
        f"| variant | size (bytes) | size ratio | accuracy | {axis} | cosine | SNR dB | latency median (ms) | "
        "latency p90 (ms) | gates | front |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        m = row.metrics
        front = "".join(flag for flag, on in (("S", row.pareto_size), ("L", row.pareto_latency)) if on) or "—"
        gates = f"{row.gates_passed}/{row.gates_total}" + ("" if row.passed else " **FAIL**")
        lines.append(
            f"| {row.variant} | {_fmt(m.get('size_bytes'))} | {_fmt(m.get('size_ratio'))} | {_fmt(m.get('accuracy'))} | "
            f"{_fmt(report.quality_value(row))} | {_fmt(m.get('cosine'), 6)} | {_fmt(m.get('snr_db'))} | "
            f"{_fmt(m.get('latency_median_ms'))} | {_fmt(m.get('latency_p90_ms'))} | {gates} | {front} |"
        )
    lines.append("")
    if image:
        lines += [f"![{axis} vs. size and latency]({image})", ""]
    lines += int8_markdown(report)
    failed = [row for row in report.rows if row.failures]
    if failed:
        lines += ["## Failed gates", ""] + [f"- **{row.variant}**: {'; '.join(row.failures)}" for row in failed] + [""]
    if report.autoselect is not None:
        plot = Path(os.path.relpath(AutoSelectPaths.of(report.model).sensitivity_png,
                                    ComparisonPaths.of(report.model).folder)).as_posix()
        lines += ["## Auto-selection", ""] + trail_markdown(report.autoselect)
        lines += [f"![layer sensitivity]({plot})", ""]
    return "\n".join(lines)


def plot_pareto(report: ModelReport, path: Path) -> Path:
    """Quality loss vs. size and vs. median latency; the Pareto front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    data = plot_data(report)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, x_key, front_key, x_label in (
        (axes[0], "size_kb", "front_size", "size (KiB)"),
        (axes[1], "latency_median_ms", "front_latency", "median latency (ms)"),
    ):
        points = [d for d in data if d[x_key] is not None]
        front = sorted((d for d in points if d[front_key] == "Pareto front"), key=lambda d: d[x_key])
        others = [d for d in points if d[front_key] != "Pareto front"]
        axis.scatter([d[x_key] for d in others], [d["quality_loss"] for d in others], color="tab:gray",
                     label="dominated", zorder=2)
        axis.plot([d[x_key] for d in front], [d["quality_loss"] for d in front], "o-", color="tab:red",
                  label="Pareto front", zorder=3)
        for d in points:
            axis.annotate(d["variant"], (d[x_key], d["quality_loss"]), textcoords="offset points", xytext=(4, 4),
                          fontsize=8)
        axis.set_xlabel(x_label)
        axis.set_ylabel(report.quality_label)
        axis.grid(True, alpha=0.3)
        axis.legend(loc="best", fontsize=8)
    figure.suptitle(f"{report.model}: quality loss vs. size and latency (lower left is better)")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return path


def write(reports: list[ModelReport], out_dir: Path) -> list[Path]:
    """Every model's report.md, report.csv, pareto.png and pareto.json under `out_dir/<model>/`."""
    written = []
    for report in reports:
        files = ComparisonPaths.of(report.model, out_dir)
        written += [
            write_text(files.markdown, to_markdown(report)),
            write_text(files.csv, to_csv(report)),
            plot_pareto(report, files.pareto_png),
            write_json(files.pareto_json, plot_data(report)),
            write_json(files.json, to_json(report)),
        ]
    return written
