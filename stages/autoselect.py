"""DVC stage: pick a model's smallest variant within its budget; write the trail, then the model (exit 4 if none fits)."""

import argparse

from pipeline import autoselect, config, report, tracking
from pipeline.build import resolve_model
from pipeline.config import AUTO_VARIANT
from pipeline.entry import exit_on_error
from pipeline.errors import ConfigError, GateError
from pipeline.io import write_bytes, write_json, write_text
from pipeline.layout import AutoSelectPaths, BuildPaths
from pipeline.validate import to_markdown


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a key of `autoselect` in params.yaml")
    name = parser.parse_args().model
    cfg = config.load(model=name)
    if name not in cfg.autoselect:
        raise ConfigError("no auto-selection budget for this model", file=config.PARAMS_FILE, key=f"autoselect.{name}")
    model, auto = resolve_model(cfg, name), cfg.autoselect[name]
    selection = autoselect.select(model, auto, cfg.quantization, git_commit=tracking.git_commit(),
                                  experiment=cfg.tracking.experiment)

    # The trail is written first, so a model with no variant within budget still explains itself.
    trail, files, build_files = selection.report, AutoSelectPaths.of(name), BuildPaths.of(name, AUTO_VARIANT)
    outputs = [
        write_json(files.trail_json, trail),
        write_text(files.trail_markdown, "\n".join([f"# Auto-selection for {name}", "", *report.trail_markdown(trail)])),
        report.plot_sensitivity(trail["sensitivity"], files.sensitivity_png, model=name),
        write_json(files.model_explorer, autoselect.model_explorer_overlay(
            next((a for a in trail["sensitivity"] if a.get("layers")), {"layers": []}))),
    ]
    chosen = selection.selected
    if chosen is not None:
        outputs += [
            write_json(build_files.validation_json, chosen.validation.report),
            write_text(build_files.validation_markdown, to_markdown(chosen.validation.report)),
            write_json(files.recipe, chosen.candidate.recipe),
            write_bytes(build_files.delivered, chosen.candidate.model),
        ]
    metrics = chosen.validation.report["metrics"] if chosen else {}
    tracking.log_stage(
        cfg.tracking,
        tracking.StageRecord(
            model=name,
            variant=AUTO_VARIANT,
            stage="autoselect",
            team=model.team,
            params={"budget": config.plain(auto), "candidates": autoselect.candidates_of(auto, cfg.quantization)},
            metrics={**{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                     "attempts": len(trail["attempts"]), "float_layers": len(chosen.candidate.float_tensors) if chosen else 0,
                     "passed": float(chosen is not None)},
            tags={"selected_variant": chosen.candidate.name if chosen else "none",
                  "trail": "; ".join(f"{a['variant']}: {'within budget' if a['passed'] else 'missed'}"
                                     for a in trail["attempts"])},
            artifacts=outputs,
        ),
    )
    if chosen is None:
        raise GateError(f"no candidate of {name} is within its autoselect budget", file=str(outputs[0]))


if __name__ == "__main__":
    main()
