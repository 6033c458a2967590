"""What ml_dtypes' version costs every stage process that imports it, side by side.

    .venv/bin/python bench/import_ml_dtypes.py [--rounds 5]      # results: bench/import_ml_dtypes.{json,md}

TensorFlow, LiteRT Quantizer and LiteRT's CompiledModel (`ai_edge_litert.tensor_buffer`) all
import ml_dtypes. Both versions' wheels are fetched from the package index into a temporary
folder and put first on PYTHONPATH in turn, so the two differ in ml_dtypes alone; each
import runs in a fresh interpreter, the versions alternating within every round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("0.6.0", "0.7.0")
IMPORTS = ("ml_dtypes", "ai_edge_litert.compiled_model", "litert_quantizer", "tensorflow")


def unpacked_wheel(version: str, folder: Path) -> Path:
    target = folder / version
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                    f"ml_dtypes=={version}", "-d", str(target)], check=True)
    (wheel,) = target.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def import_seconds(module: str, path: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as folder:
        paths = {version: unpacked_wheel(version, Path(folder)) for version in VERSIONS}
        times: dict[str, dict[str, list[float]]] = {m: {v: [] for v in VERSIONS} for m in IMPORTS}
        for _ in range(rounds):
            for module in IMPORTS:
                for version in VERSIONS:
                    times[module][version].append(import_seconds(module, paths[version]))
    medians = {m: {v: round(statistics.median(t), 3) for v, t in by_version.items()} for m, by_version in times.items()}
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "rounds": rounds,
              "medians_s": medians, "times_s": times}
    (ROOT / "bench/import_ml_dtypes.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [f"| `import {m}` | {medians[m][VERSIONS[0]]} | {medians[m][VERSIONS[1]]} | "
            f"{medians[m][VERSIONS[1]] - medians[m][VERSIONS[0]]:+.2f} |" for m in IMPORTS]
    (ROOT / "bench/import_ml_dtypes.md").write_text("\n".join([
        f"Fresh interpreter per import, medians of {rounds} rounds, versions alternating "
        f"(`bench/import_ml_dtypes.py`, {os.cpu_count()} CPUs):", "",
        f"| import | ml_dtypes {VERSIONS[0]} (s) | ml_dtypes {VERSIONS[1]} (s) | difference (s) |",
        "|---|---|---|---|", *rows, ""]))
    print((ROOT / "bench/import_ml_dtypes.md").read_text())


if __name__ == "__main__":
    main()
