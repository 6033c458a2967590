"""DVC stage: write metadata, labels and provenance into one build's deliverable model."""

import argparse
import json

from pipeline import config, deliver, tracking
from pipeline.build import resolve_build
from pipeline.entry import exit_on_error
from pipeline.io import read_bytes, write_bytes


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("build", help="<model>-<variant>, a key of `build` in params.yaml")
    name = parser.parse_args().build
    cfg = config.load(build=name)
    build = resolve_build(cfg, name)
    record = deliver.provenance(
        build,
        convert_info=json.loads(read_bytes(build.model.paths.convert_report)),
        quantize_info=json.loads(read_bytes(build.paths.quantize_report)),
        git_commit=tracking.git_commit(),
        experiment=cfg.tracking.experiment,
    )
    validated = json.loads(read_bytes(build.model.paths.evaluate_report))
    delivered = deliver.deliver(build, read_bytes(build.paths.quantized), record,
                                input_ranges=validated.get("input_ranges", {}))
    out = write_bytes(build.paths.delivered, delivered)
    tracking.log_stage(
        cfg.tracking,
        tracking.StageRecord(
            model=build.model.name,
            variant=build.variant_name,
            stage="metadata",
            team=build.team,
            params=config.plain(build.model.config.metadata),
            metrics={"delivered_size_bytes": len(delivered)},
            tags={"config_hash": record["config_hash"], "git_commit": record["git_commit"],
                  "source_sha256": record["source_sha256"], "conversion_path": record["conversion_path"]},
            artifacts=[out],
        ),
    )


if __name__ == "__main__":
    main()
