"""P1 alone: cold `dvc repro` of MobileNetV2 × 4 builds (metadata, validation and tracking
included) against the bare four-conversion converter script, as `bench/run.py` measures it,
without the rest of that benchmark (about 12 minutes on 2 cores).

    .venv/bin/python bench/p1.py            # results: bench/p1.json and bench/p1.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import run as bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3)
    options = parser.parse_args()
    args = argparse.Namespace(project=bench.ROOT, baseline=None, repetitions=options.repetitions)
    work = Path(tempfile.mkdtemp(prefix="litert-p1-"))
    try:
        examples = bench.build_examples(args.project, ["mobilenet_v2"], work / "examples")
        p1 = bench.p1_cold(work, args, examples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=bench.ROOT, capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "repetitions": options.repetitions, **p1}
    (bench.BENCH / "p1.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [f"P1 at commit {commit}, {options.repetitions} repetitions in rotating order (medians):", "",
             "| run | median s | × bare |", "| --- | ---: | ---: |"]
    for name, seconds in p1["median_seconds"].items():
        lines.append(f"| {name} | {seconds} | {p1['ratio_to_bare'].get(name, 1.0)} |")
    contenders = list(p1["stage_medians"])
    lines += ["", "Stage wall times (median s, with DVC's bookkeeping):", "",
              "| stage | " + " | ".join(contenders) + " |", "| --- |" + " ---: |" * len(contenders)]
    for stage in dict.fromkeys(s for name in contenders for s in p1["stage_medians"][name]):
        lines.append(f"| {stage} | " + " | ".join(str(p1["stage_medians"][n].get(stage, "")) for n in contenders) + " |")
    (bench.BENCH / "p1.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
