"""DVC stage: load one source model once, convert it to a float .tflite and record its reference outputs."""

import argparse

from pipeline import config, steps, tracking
from pipeline.build import resolve_model
from pipeline.entry import exit_on_error
from pipeline.evaluate import save_reference
from pipeline.io import atomic_path, write_bytes, write_json


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    name = parser.parse_args().model
    cfg = config.load(model=name)
    model = resolve_model(cfg, name)
    config.check_source_exists(model.config, model.name)
    converted, evaluation = steps.convert_model(model)
    files = model.paths
    out = write_bytes(files.float_model, converted.model)
    info = {**converted.info, "size_bytes": len(converted.model)}
    write_json(files.convert_report, info)
    write_json(files.evaluate_report, evaluation.report)
    with atomic_path(files.reference) as tmp, open(tmp, "wb") as handle:
        save_reference(evaluation, handle)
    report = evaluation.report
    tracking.log_stage(
        cfg.tracking,
        tracking.StageRecord(
            model=model.name,
            variant="float",
            stage="convert",
            team=model.team,
            params={**config.plain(model.config.conversion), "format": report["format"],
                    "parameter_count": report["parameter_count"]},
            metrics={"float_size_bytes": len(converted.model), "convert_seconds": info["seconds"],
                     **{f"source_{k}": v for k, v in report["metrics"].items()}},
            tags={"conversion_path": info["conversion_path"], "source_sha256": info["source_sha256"],
                  "select_tf_ops": ",".join(report["host"]["select_tf_ops"]) or "none"},
            artifacts=[out, files.convert_report, files.evaluate_report],
        ),
    )


if __name__ == "__main__":
    main()
