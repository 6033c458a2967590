"""Int8 quality per bundled example, side by side in one run: what the pipeline delivers by
default (`static_wi8_ai8`, full-range calibration), its auto-selection's pick, the converter's
full int8, and LiteRT Quantizer's own default calibration (moving average) of the same recipe.

    .venv/bin/python bench/quantization.py                      # clone, run every example (~40 min)
    .venv/bin/python bench/quantization.py --project DIR        # a project that already ran them

Every number comes from the same evaluation samples (each model's reference.npz) and the same
calibration samples; the quantizer-default row is quantized here from the run's float model.
Sizes are payloads (without metadata). Results: bench/quantization.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

COLUMNS = ("static_wi8_ai8", "quantizer_default", "converter_int8", "auto")
METRICS = ("snr_db", "accuracy_drop", "task_metric_drop", "payload_bytes")


def run_every_example(project: Path) -> int:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    makefile = (ROOT / "Makefile").read_text()
    models = next(line.split(":=", 1)[1].strip() for line in makefile.splitlines() if line.startswith("ALL_MODELS"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": ""}
    return subprocess.run([str(BIN / "litert-pipeline"), "run", f"model=[{models}]"], cwd=project, env=env).returncode


def project_with_every_example(given: Path | None, folder: str) -> Path:
    """`given` (a project that already ran every example), or a fresh clone under `folder`
    that runs them now."""
    if given is not None:
        return given.resolve()
    project = Path(folder) / "clone"
    print(f"run exit code: {run_every_example(project)}", flush=True)
    return project


def _static(build, recipe: list, *, samples=None, default_calibration: bool = False) -> dict[str, Any]:
    """`recipe` (with the pipeline's float inputs and outputs) calibrated on the build's
    representative samples (or `samples`), measured as the validate stage measures."""
    from litert_quantizer.quantizer import Quantizer

    from pipeline import steps
    from pipeline.io import read_bytes
    from pipeline.quantize.litert import _io_entries, _signatures_fed, calibrate_recipe
    from pipeline.quantize.selective import quantize_with_recipe

    model = build.model
    float_model = read_bytes(model.paths.float_model)
    samples = samples if samples is not None else steps.representative_samples(build, float_model)
    if default_calibration:  # the quantizer's own Calibrator: a moving average of each sample's range
        quantizer = Quantizer(float_model, recipe + _io_entries(build.variant))
        signatures = _signatures_fed(float_model, samples, key="bench")
        qsvs = quantizer.calibrate({s: [samples.sample(i) for i in range(len(samples))] for s in signatures})
        quantized = bytes(quantizer.quantize(qsvs).quantized_model)
    else:
        statistics = calibrate_recipe(float_model, recipe, build.variant, samples, key="bench")
        quantized = quantize_with_recipe(float_model, build.variant, recipe, statistics=statistics, key="bench").model
    return _measured(build, quantized)


def _measured(build, quantized: bytes) -> dict[str, Any]:
    """The validate stage's metrics of `quantized` (its error when it does not run)."""
    from pipeline.evaluate import load_reference
    from pipeline.io import read_bytes
    from pipeline.sources import served_signature
    from pipeline.validate import validate

    model = build.model
    evaluation, reference = load_reference(model.paths.reference)
    result = validate(quantized, float_model=read_bytes(model.paths.float_model), samples=evaluation,
                      reference=reference, gates=build.gates, runtime=model.runtime,
                      signature_key=served_signature(model.config.source), name=model.name)
    if result.report["run"].get("error"):
        raise RuntimeError(result.report["run"]["error"])
    return result.report["metrics"]


def recipe_choices(build) -> dict[str, dict[str, Any]]:
    """`static_wi8_ai8` changed one choice at a time: what each costs on this model."""
    import copy

    from litert_quantizer import recipe as recipes

    from pipeline import steps
    from pipeline.io import read_bytes
    from pipeline.quantize.selective import with_algorithm

    base = recipes.static_wi8_ai8()

    def changed(**activation_or_weight) -> list:
        recipe = copy.deepcopy(base)
        for entry in recipe:
            for key, value in activation_or_weight.items():
                tensor, field_name = key.split("__")
                entry["op_config"][f"{tensor}_tensor_config"][field_name] = value
        return recipe

    float_model = read_bytes(build.model.paths.float_model)
    few = steps.representative_samples(build, float_model).take(slice(0, 25))
    choices = {
        "default (full-range min/max)": lambda: _static(build, base),
        "quantizer's moving-average calibration": lambda: _static(build, base, default_calibration=True),
        "25 calibration samples": lambda: _static(build, base, samples=few),
        "symmetric activations": lambda: _static(build, changed(activation__symmetric=True)),
        "per-tensor weights": lambda: _static(build, changed(weight__granularity="TENSORWISE")),
        "MSE": lambda: _static(build, with_algorithm(base, "MSE")),
        "GPTQ": lambda: _static(build, with_algorithm(base, "GPTQ")),
    }
    results = {}
    for name, measure_choice in choices.items():
        try:
            metrics = measure_choice()
            results[name] = {m: metrics.get(m) for m in METRICS}
        except Exception as exc:  # a bench row says why it is missing
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return results


def measure(project: Path) -> dict[str, Any]:
    os.chdir(project)
    from pipeline import config, steps
    from pipeline.build import derive, resolve_model

    cfg = config.load(project / "params.yaml")
    results = {}
    for name in cfg.model:
        model = resolve_model(cfg, name)
        row: dict[str, Any] = {}
        for column in ("static_wi8_ai8", "converter_int8", "auto"):
            path = project / "reports" / name / column / "validation.json"
            if path.exists():  # the run's own validation of the delivered model
                report = json.loads(path.read_text())
                row[column] = {m: report["metrics"].get(m) for m in METRICS}
                if column == "auto":
                    row[column]["pick"] = report.get("selected_variant")
            elif column != "auto":  # not a build of this example: quantized and measured here
                try:
                    build = derive(model, column, cfg.quantization[column])
                    metrics = _measured(build, steps.quantize_build(build).model)
                    row[column] = {m: metrics.get(m) for m in METRICS} | {"measured_by": "bench"}
                except Exception as exc:  # a bench cell says why it is empty
                    row[column] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        row["choices"] = recipe_choices(derive(model, "static_wi8_ai8", cfg.quantization["static_wi8_ai8"]))
        row["quantizer_default"] = row["choices"]["quantizer's moving-average calibration"]
        results[name] = row
        print(name, json.dumps(row), flush=True)
    return results


def fmt(value: Any, scale: float = 1.0) -> str:
    return "—" if value is None else f"{scale * value:.3g}" if isinstance(value, float) else str(value)


def markdown(results: dict[str, Any]) -> str:
    header = ("| model | metric | pipeline default `static_wi8_ai8` | LiteRT Quantizer default calibration | "
              "converter `converter_int8` | auto-selection pick |")
    lines = [header, "|---|---|---|---|---|---|"]
    labels = {"snr_db": "SNR (dB)", "accuracy_drop": "accuracy drop (pt)", "task_metric_drop": "task metric drop",
              "payload_bytes": "size (bytes)"}
    for name, row in results.items():
        pick = (row.get("auto") or {}).get("pick")
        for metric in METRICS:
            scale = 100.0 if metric == "accuracy_drop" else 1.0
            cells = [fmt((row.get(c) or {}).get(metric), scale) if "error" not in (row.get(c) or {}) else "does not run"
                     for c in COLUMNS]
            if metric == "snr_db" and pick:
                cells[3] += f" (`{pick}`)"
            lines.append(f"| {name} | {labels[metric]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def errors_markdown(results: dict[str, Any]) -> str:
    """Why a cell is empty, per model and column."""
    lines = [f"- {name}, {column}: {cell['error']}" for name, row in results.items()
             for column, cell in [*((c, row.get(c) or {}) for c in COLUMNS), *(row.get("choices") or {}).items()]
             if "error" in cell]
    return "\n".join(lines) + "\n" if lines else ""


def choices_markdown(results: dict[str, Any]) -> str:
    """SNR (dB) and accuracy drop (pt) of each recipe choice, one row per model."""
    names = next((list(row["choices"]) for row in results.values() if "choices" in row), [])
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, row in results.items():
        if "choices" not in row:
            continue
        cells = []
        for name in names:
            choice = row["choices"][name]
            if "error" in choice:
                cells.append("does not run")
            else:
                drop = choice.get("accuracy_drop")
                cells.append(f"{fmt(choice.get('snr_db'))} dB" + (f", {fmt(drop, 100.0)} pt" if drop is not None else ""))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="a project where every example already ran")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="litert-bench-quant-") as folder:
        project = project_with_every_example(args.project, folder)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True,
                                text=True).stdout.strip()
        results = {"commit": commit, "models": measure(project)}
    (ROOT / "bench" / "quantization.json").write_text(json.dumps(results, indent=2) + "\n")
    text = (f"Commit `{results['commit']}`.\n\n" + markdown(results["models"])
            + "\nWhat each recipe choice costs (`static_wi8_ai8` with one choice changed; SNR, accuracy drop):\n\n"
            + choices_markdown(results["models"])
            + "\nWhy a cell says \"does not run\":\n\n" + errors_markdown(results["models"]))
    (ROOT / "bench" / "quantization.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
