"""Where every output lives: the one module that knows the project's file layout.

Stages, the library, reports and tests take their paths from here, and `tests/test_layout.py`
holds `dvc.yaml` to it: each stage's declared data inputs and outputs must be what
`stage_files` says, so a path changes in one place and DVC tracks what the code writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

PARAMS_FILE = "params.yaml"  # composed from conf/ (`litert-pipeline compose`)
ARTIFACTS = Path("artifacts")  # intermediate outputs (DVC outs)
# Each model's part of params.yaml (config.stage_part) as JSON, written by the `params` stage:
# the file the DVC `params` of the model's stages name. DVC loads a params file once for every
# stage that lists it, and params.yaml grows with every model: at 50 models those loads took
# 1-2 minutes of a no-op `dvc repro`, against 2 s from the parts (bench/noop.md). No model is named `_params` (names start with a
# letter or digit), so no model's artifacts folder is this one.
MODEL_PARAMS = ARTIFACTS / "_params"
# What each stage module runs (pipeline/fingerprint.py): the one code dependency of its stages
# (like `_params`, no model's artifacts folder).
CODE_FINGERPRINTS = ARTIFACTS / "_code"
MODELS = Path("models")  # delivered models
REPORTS = Path("reports")  # validation reports and auto-selection trails
COMPARISON = Path("comparison")  # per-model comparison of the variants
EXAMPLES = Path("examples")  # bundled example models and data, built by `prepare`
LABELS = Path("conf/labels")  # label files named by metadata configs (tracked as a dependency)
RECIPES = Path("conf/recipes")  # JSON recipes named by quantization variants (tracked as a dependency)
# The `track` stage's output: each build's verdict and model hash as of the stage's last upload.
TRACKED = Path("tracked.json")
AUTO_VARIANT = "auto"  # the variant name of a model's auto-selected build
VALIDATION_JSON = "validation.json"
AUTOSELECT_JSON = "autoselect.json"


def example(name: str) -> Path:
    return EXAMPLES / name


def model_params(model: str) -> Path:
    return MODEL_PARAMS / f"{model}.json"


def code_fingerprint(stage_module: str) -> Path:
    return CODE_FINGERPRINTS / f"{stage_module}.json"


def samples(dataset: str) -> Path:
    """A dataset or generator, materialized and checked."""
    return ARTIFACTS / "data" / f"{dataset}.npz"


@dataclass(frozen=True)
class ModelPaths:
    """The per-model files: the float model, what the source said about itself, calibration."""

    float_model: Path
    convert_report: Path
    evaluate_report: Path
    reference: Path  # evaluation samples, labels and the source's outputs
    representative: Path  # calibration samples in seeded order
    calibration: Path  # the calibration static recipes share

    @classmethod
    def of(cls, model: str) -> "ModelPaths":
        folder = ARTIFACTS / model
        return cls(folder / "float.tflite", folder / "convert.json", folder / "evaluate.json",
                   folder / "reference.npz", folder / "representative.npz", folder / "calibration.json")


@dataclass(frozen=True)
class BuildPaths:
    """One build's files, from its quantized model to its validation report."""

    quantized: Path
    quantize_report: Path
    delivered: Path
    validation_json: Path
    validation_markdown: Path
    layer_errors: Path

    @classmethod
    def of(cls, model: str, variant: str) -> "BuildPaths":
        reports = report_dir(model, variant)
        return cls(ARTIFACTS / model / "quantized" / f"{variant}.tflite",
                   ARTIFACTS / model / "quantized" / f"{variant}.json",
                   MODELS / model / f"{variant}.tflite",
                   reports / VALIDATION_JSON, reports / "validation.md", reports / "layer_errors.csv")


def report_dir(model: str, variant: str, root: Path = REPORTS) -> Path:
    """A build's reports; `root` is another reports folder (a sweep's) laid out the same way."""
    return root / model / variant


@dataclass(frozen=True)
class AutoSelectPaths:
    """The auto-selected build's files besides its BuildPaths: the decision trail and recipe."""

    trail_json: Path
    trail_markdown: Path
    recipe: Path  # the pick's LiteRT Quantizer recipe (null for other backends): reusable as `recipe:`
    sensitivity_png: Path  # per-layer sensitivity of the smallest static variant (and of those that missed)
    model_explorer: Path  # the same as Model Explorer node data, to colour the graph

    @classmethod
    def of(cls, model: str, root: Path = REPORTS) -> "AutoSelectPaths":
        folder = report_dir(model, AUTO_VARIANT, root)
        return cls(folder / AUTOSELECT_JSON, folder / "autoselect.md", folder / "recipe.json",
                   folder / "sensitivity.png", folder / "sensitivity_model_explorer.json")


@dataclass(frozen=True)
class ComparisonPaths:
    folder: Path
    markdown: Path
    csv: Path
    json: Path  # a DVC metrics file, committed by DVC experiments
    pareto_png: Path
    pareto_json: Path  # `dvc plots` data

    @classmethod
    def of(cls, model: str, root: Path = COMPARISON) -> "ComparisonPaths":
        folder = root / model
        return cls(folder, folder / "report.md", folder / "report.csv", folder / "report.json",
                   folder / "pareto.png", folder / "pareto.json")


def output_folders(cfg: "PipelineConfig") -> list[Path]:
    """Every folder the stages of `cfg` write a file into."""
    files = [samples(name) for name in [*cfg.dataset, *cfg.generator]] + [model_params(model) for model in cfg.model]
    for model in cfg.model:
        files += [*vars(ModelPaths.of(model)).values(), *vars(ComparisonPaths.of(model)).values()]
        files += vars(AutoSelectPaths.of(model)).values()
    for build in [*((b.model, b.variant) for b in cfg.build.values()), *((m, AUTO_VARIANT) for m in cfg.autoselect)]:
        files += vars(BuildPaths.of(*build)).values()
    return sorted({CODE_FINGERPRINTS} | {Path(file).parent for file in files})


def stage_files(stage: str, key: str, cfg: "PipelineConfig") -> tuple[set[str], set[str]]:
    """(data inputs, outputs) of the DVC stage `stage@key`, as dvc.yaml must declare them.

    Inputs named by the config (sources, dataset files) are included; code dependencies are
    not (tests/test_layout.py checks those against the modules each stage imports).
    """
    def strings(*paths: Path | str | None) -> set[str]:
        return {Path(p).as_posix() for p in paths if p is not None}

    if stage == "prepare":
        return set(), strings(example(key))
    if stage == "params":
        return strings(PARAMS_FILE), strings(MODEL_PARAMS)
    if stage == "code":
        return set(), strings(CODE_FINGERPRINTS)
    if stage == "track":
        return strings(REPORTS, COMPARISON), strings(TRACKED)
    if stage in ("data", "generate"):
        data = {**cfg.dataset, **cfg.generator}[key]
        return strings(getattr(data, "path", None)), strings(samples(key))
    if stage in ("convert", "representative", "autoselect", "report"):
        model = cfg.model[key]
        files = ModelPaths.of(key)
        if stage == "convert":
            return (strings(model.source.path, samples(model.evaluation.dataset)),
                    strings(files.float_model, files.reference, files.convert_report, files.evaluate_report))
        if stage == "representative":
            return (strings(samples(model.representative.dataset), files.float_model, files.reference),
                    strings(files.representative, files.calibration))
        if stage == "report":
            comparison = ComparisonPaths.of(key)
            return (strings(REPORTS / key),
                    strings(comparison.markdown, comparison.csv, comparison.json, comparison.pareto_png,
                            comparison.pareto_json))
        auto, build = AutoSelectPaths.of(key), BuildPaths.of(key, AUTO_VARIANT)
        return (strings(LABELS, RECIPES, *vars(files).values()),
                strings(build.delivered, build.validation_json, build.validation_markdown, auto.trail_json,
                        auto.trail_markdown, auto.recipe, auto.sensitivity_png, auto.model_explorer))
    build = cfg.build[key]
    files, out = ModelPaths.of(build.model), BuildPaths.of(build.model, build.variant)
    if stage == "quantize":
        return (strings(RECIPES, files.float_model, files.representative, files.calibration, files.evaluate_report),
                strings(out.quantized, out.quantize_report))
    if stage == "metadata":
        return (strings(LABELS, out.quantized, out.quantize_report, files.convert_report, files.evaluate_report),
                strings(out.delivered))
    if stage == "validate":
        return (strings(out.delivered, files.float_model, files.reference),
                strings(out.validation_json, out.validation_markdown, out.layer_errors))
    raise KeyError(f"no stage {stage!r} in the layout")


# dvc.yaml ends with the delivered models as DVC artifacts (`dvc artifacts get`, model registry
# views), written below this line by `compose` from the same builds the stages deliver, and
# again at the end of `run` with their verdicts.
ARTIFACTS_MARKER = "# --- artifacts: written by `litert-pipeline compose` from the builds (pipeline/layout.py); do not edit"


def dvc_artifacts(cfg: "PipelineConfig", verdicts: dict[str, str] | None = None) -> dict[str, dict]:
    """One DVC artifact per delivered model, named after its build (`<model>-<variant>`), with
    its validation verdict when known (`verdicts` by build name)."""
    entries = [(entry.model, entry.variant) for entry in cfg.build.values()]
    entries += [(model, AUTO_VARIANT) for model in cfg.autoselect]
    artifacts = {}
    for model, variant in sorted(entries):
        config = cfg.model[model]
        described = config.metadata.description or model
        artifacts[f"{model}-{variant}"] = {
            "path": BuildPaths.of(model, variant).delivered.as_posix(),
            "type": "model",
            "desc": f"{described} LiteRT model, variant {variant}.",
            "labels": sorted({"litert", config.team, model, variant}),
            "meta": {
                "model": model,
                "variant": variant,
                "team": config.team,
                "registered_model": config.registry_name or f"{config.team}.{model}",
                "gates": config.validation,
                # The verdict of the model in the workspace when dvc.yaml was last written (by
                # `compose` and at the end of `run`); the report holds the details.
                "validation": (verdicts or {}).get(f"{model}-{variant}", "not built"),
                "validation_report": BuildPaths.of(model, variant).validation_json.as_posix(),
            },
        }
    return artifacts


def with_dvc_artifacts(dvc_yaml: str, cfg: "PipelineConfig", verdicts: dict[str, str] | None = None) -> str:
    """`dvc_yaml`'s text with the artifacts section (after ARTIFACTS_MARKER) rewritten for `cfg`."""
    import yaml

    stages = dvc_yaml.partition(ARTIFACTS_MARKER)[0]
    artifacts = dvc_artifacts(cfg, verdicts)
    section = (yaml.safe_dump({"artifacts": artifacts}, sort_keys=False, width=120, default_flow_style=None)
               if artifacts else "")
    return f"{stages.rstrip()}\n\n{ARTIFACTS_MARKER}\n{section}"
