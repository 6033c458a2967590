"""DVC stage: validate one build's model; write its reports, register it if it passed, else fail (exit 4)."""

import argparse

from pipeline import config, registry, tracking, validate
from pipeline.build import resolve_build
from pipeline.entry import exit_on_error
from pipeline.errors import GateError
from pipeline.io import write_json, write_text


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("build", help="<model>-<variant>, a key of `build` in params.yaml")
    parser.add_argument("--model", help="the .tflite to validate (default: the delivered models/<m>/<variant>.tflite)")
    args = parser.parse_args()
    cfg = config.load(build=args.build)
    build = resolve_build(cfg, args.build)
    model_path = args.model or build.paths.delivered
    result = validate.validate_build(build, model_path)

    # Reports are written before failing, so a failed build still explains itself.
    outputs = [
        write_json(build.paths.validation_json, result.report),
        write_text(build.paths.validation_markdown, validate.to_markdown(result.report)),
        write_text(build.paths.layer_errors, validate.to_csv(result.layer_errors)),
    ]
    numeric = {k: v for k, v in result.report["metrics"].items() if isinstance(v, (int, float))}
    status = "failed" if result.failures else "passed" if result.report["verification"] == "verified" else "unverified"
    tracking.log_stage(
        cfg.tracking,
        tracking.StageRecord(
            model=build.model.name,
            variant=build.variant_name,
            stage="validate",
            team=build.team,
            config=tracking.build_config(build),
            metrics={**numeric, "passed": float(not result.failures)},
            tags={"validation": status, "model_path": str(model_path),
                  "model_sha256": result.report["model_sha256"], "backend": build.variant.backend.value},
            artifacts=outputs,
            # A passing build becomes a model version (once per distinct model bytes).
            registration=None if result.failures else registry.registration(build, model_path, outputs[0]),
        ),
    )
    if result.failures:
        raise GateError(f"{build.name} failed validation: {'; '.join(result.failures)}", file=str(outputs[0]))


if __name__ == "__main__":
    main()
