"""float16 weights two ways, on every bundled example, side by side in one run: the converter's
float16 (`converter_float16`: TFLiteConverter from the model's source, so TensorFlow in the
quantize stage) and LiteRT Quantizer's float casting of the float model
(`weight_only_wf16_afp32`: no TensorFlow).

    .venv/bin/python bench/float16.py                      # clone, run every example (~40 min)
    .venv/bin/python bench/float16.py --project DIR        # a project that already ran them

Both models are quantized here, each in a fresh process (the time is that process's: imports,
reading the source or the float model, quantizing), and measured as the validate stage
measures (each example's reference.npz; sizes are payloads without metadata). Results:
bench/float16.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = ("converter_float16", "weight_only_wf16_afp32")
METRICS = ("payload_bytes", "snr_db", "max_abs_error", "accuracy_drop", "task_metric_drop")


def quantize_one(project: Path, model_name: str, variant: str, out: Path) -> None:
    """In this process: quantize one build and write its bytes to `out` (the timed part)."""
    os.chdir(project)
    from pipeline import config, steps
    from pipeline.build import derive, resolve_model

    cfg = config.load(project / "params.yaml")
    build = derive(resolve_model(cfg, model_name), variant, cfg.quantization[variant])
    out.write_bytes(steps.quantize_build(build).model)


def timed_quantize(project: Path, model_name: str, variant: str, out: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--project", str(project), "--one", model_name, variant, str(out)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1][:300])
    return seconds


def measure(project: Path, repetitions: int) -> dict[str, Any]:
    from quantization import _measured

    os.chdir(project)
    from pipeline import config
    from pipeline.build import derive, resolve_model

    cfg = config.load(project / "params.yaml")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="litert-bench-f16-") as folder:
        for name in cfg.model:
            model = resolve_model(cfg, name)
            row: dict[str, Any] = {}
            for variant in VARIANTS:  # alternate so that both see the same machine
                out = Path(folder) / f"{name}-{variant}.tflite"
                try:
                    seconds = [timed_quantize(project, name, variant, out) for _ in range(repetitions)]
                    metrics = _measured(derive(model, variant, cfg.quantization[variant]), out.read_bytes())
                    row[variant] = {m: metrics.get(m) for m in METRICS} | {"seconds": statistics.median(seconds),
                                                                           "ops": _ops(out.read_bytes())}
                except Exception as exc:  # a bench cell says why it is empty
                    row[variant] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            results[name] = row
            print(name, json.dumps(row), flush=True)
    return results


def _ops(model: bytes) -> list[str]:
    """The operators a model uses: where the two float16 models differ in what they run."""
    from pipeline.tflite_model import op_uses

    return sorted({use.name for use in op_uses(model)})


def fmt(value: Any, scale: float = 1.0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{scale * value:.3g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(results: dict[str, Any]) -> str:
    lines = ["| example | converter float16: bytes / SNR dB / drop pt / s | quantizer float casting: bytes / SNR dB "
             "/ drop pt / s | size ratio | SNR difference (dB) |", "|---|---|---|---|---|"]
    for name, row in results.items():
        cells = []
        for variant in VARIANTS:
            cell = row.get(variant) or {}
            cells.append("does not run" if "error" in cell else " / ".join(
                [fmt(cell.get("payload_bytes")), fmt(cell.get("snr_db")), fmt(cell.get("accuracy_drop"), 100.0),
                 fmt(cell.get("seconds"))]))
        converter, quantizer = (row.get(v) or {} for v in VARIANTS)
        both = "error" not in converter and "error" not in quantizer
        ratio = fmt(quantizer["payload_bytes"] / converter["payload_bytes"]) if both else "—"
        snr = (fmt(quantizer["snr_db"] - converter["snr_db"])
               if both and None not in (quantizer.get("snr_db"), converter.get("snr_db")) else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} | {snr} |")
    errors = [f"- {name}, {variant}: {row[variant]['error']}" for name, row in results.items() for variant in VARIANTS
              if "error" in (row.get(variant) or {})]
    ops = [f"- {name}: converter {row[VARIANTS[0]]['ops']}; quantizer {row[VARIANTS[1]]['ops']}"
           for name, row in results.items()
           if all("ops" in (row.get(v) or {}) for v in VARIANTS) and row[VARIANTS[0]]["ops"] != row[VARIANTS[1]]["ops"]]
    return ("\n".join(lines) + "\n"
            + ("\nWhy a cell says \"does not run\":\n\n" + "\n".join(errors) + "\n" if errors else "")
            + ("\nWhere the operators differ:\n\n" + "\n".join(ops) + "\n" if ops else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="a project where every example already ran")
    parser.add_argument("--repetitions", type=int, default=3, help="timed quantizations per cell (median)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        quantize_one(args.project.resolve(), args.one[0], args.one[1], Path(args.one[2]))
        return
    from quantization import project_with_every_example

    with tempfile.TemporaryDirectory(prefix="litert-bench-f16-") as folder:
        project = project_with_every_example(args.project, folder)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        results = {"commit": commit, "project": str(project), "repetitions": args.repetitions,
                   "models": measure(project, args.repetitions)}
    (ROOT / "bench" / "float16.json").write_text(json.dumps(results, indent=2) + "\n")
    text = (f"Commit `{results['commit']}`; each time is the median of {args.repetitions} fresh processes.\n\n"
            + markdown(results["models"]))
    (ROOT / "bench" / "float16.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
