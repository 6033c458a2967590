"""DVC stage: build one quantization variant of a model from its float .tflite."""

import argparse
import json

from pipeline import config, steps, tracking
from pipeline.build import resolve_build
from pipeline.entry import exit_on_error
from pipeline.io import write_bytes, write_json


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("build", help="<model>-<variant>, a key of `build` in params.yaml")
    name = parser.parse_args().build
    cfg = config.load(build=name)
    build = resolve_build(cfg, name)
    result = steps.quantize_build(build)
    out = write_bytes(build.paths.quantized, result.model)
    write_json(build.paths.quantize_report, result.info)
    evaluation = json.loads(build.model.paths.evaluate_report.read_text())
    tracking.log_stage(
        cfg.tracking,
        tracking.StageRecord(
            model=build.model.name,
            variant=build.variant_name,
            stage="quantize",
            team=build.team,
            params={"variant": config.plain(build.variant),
                    "representative": config.plain(build.model.config.representative)},
            metrics={
                "size_bytes": result.info["bytes"],
                "float_size_bytes": result.info["float_bytes"],
                "size_ratio": result.info["size_ratio"],
                **{f"source_{k}": v for k, v in evaluation["metrics"].items()},
            },
            tags={"backend": build.variant.backend.value,
                  "representative_sha256": result.info.get("representative_sha256") or ""},
            artifacts=[out, build.paths.quantize_report, build.model.paths.evaluate_report],
        ),
    )


if __name__ == "__main__":
    main()
