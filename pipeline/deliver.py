"""The metadata stage: turn a quantized model into the deliverable, with provenance.

The delivered `.tflite` carries TFLITE_METADATA (from the model's `metadata` config),
its label files and a `provenance.json` naming everything it came from, including how to
find its MLflow run (by tags), so a model found on a device is traceable from its bytes.
"""

from __future__ import annotations

import json
import re
from importlib import metadata as distributions
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.build import Build
from pipeline.config import PARAMS_FILE, config_hash, plain
from pipeline.errors import ConfigError
from pipeline.io import read_regular_file
from pipeline.metadata import PROVENANCE_FILE, ModelSpec, TensorSpec, attach_metadata, check_spec
from pipeline.sources import served_signature
from pipeline.tflite_model import signature


def tool_versions() -> dict[str, str]:
    """Installed versions, read without importing the (slow) packages themselves."""
    versions = {"litert-pipeline": __version__}
    for name in ("tensorflow", "ai-edge-litert", "litert-quantizer", "keras"):
        try:
            versions[name] = distributions.version(name)
        except distributions.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_hash(build: Build) -> str:
    """Hash of everything in the config that shapes the delivered model's bytes."""
    config = build.model.config
    return config_hash(config.source, config.conversion, config.representative, config.metadata, build.variant)


def provenance(build: Build, *, convert_info: dict, quantize_info: dict, git_commit: str, experiment: str) -> dict:
    """Everything the model came from. No timestamps or run ids: rebuilds stay byte-identical;
    the MLflow run is found by the tags model, variant and config_hash."""
    config = build.model.config
    return {
        "model": build.model.name,
        "team": build.team,
        "variant": build.variant_name,
        "backend": build.variant.backend.value,
        "config_hash": build_hash(build),
        "git_commit": git_commit,
        "source_format": config.source.format.value,
        "source_sha256": convert_info["source_sha256"],
        "conversion_path": convert_info["conversion_path"],
        "representative_sha256": quantize_info.get("representative_sha256"),
        "representative_samples": quantize_info.get("representative_samples"),
        "tools": tool_versions(),
        "mlflow_experiment": experiment,
    }


def metadata_spec(build: Build, quantized: bytes) -> tuple[ModelSpec, dict[str, bytes]]:
    """The metadata spec and the files it packs (label files, by their base name).

    Metadata lists tensors in the model's own order. A model with several inputs (outputs)
    names each entry after the signature input (output) it describes, in any order; a model
    with one keeps a free display name.
    """
    model = build.model
    files: dict[str, bytes] = {}

    def tensor(entry, key: str) -> TensorSpec:
        labels = None
        if entry.labels:
            files[Path(entry.labels).name] = read_regular_file(entry.labels, key=f"{key}.labels", what="labels")
            labels = Path(entry.labels).name
        fields = plain(entry)
        fields.update(labels=labels, mean=tuple(entry.mean), std=tuple(entry.std), min=tuple(entry.min), max=tuple(entry.max))
        return TensorSpec(**fields)

    meta = model.config.metadata
    served = signature(quantized, served_signature(model.config.source))
    entries = {}
    for role, configured, tensors in (("inputs", meta.inputs, served.inputs), ("outputs", meta.outputs, served.outputs)):
        key = model.key("metadata", role)
        order = served.input_order if role == "inputs" else served.output_order
        ordered = _in_model_order(list(configured), tensors, order, key)
        entries[role] = tuple(tensor(entry, f"{key}[{index}]") for index, entry in ordered)
    spec = ModelSpec(
        name=model.name,
        description=meta.description,
        version=meta.version,
        author=meta.author,
        license=meta.license,
        inputs=entries["inputs"],
        outputs=entries["outputs"],
        model_files=(PROVENANCE_FILE,),
    )
    return spec, files


# What an image client feeds: 8-bit pixels, normalized by the metadata's (x - mean) / std.
RAW_PIXELS = (0.0, 255.0)
# How far the normalized pixel range may miss the validated range (a fraction of its width),
# and how much of it the evaluation data must span for the mapping to be the one trained on.
RANGE_TOLERANCE = 0.02
MIN_RANGE_SPAN = 0.8
# What a fix usually is: [0, 1], [-1, 1], raw [0, 255], [-0.5, 0.5].
COMMON_NORMALIZATIONS = ((0.0, 255.0), (127.5, 127.5), (0.0, 1.0), (127.5, 255.0))


def check_input_normalization(build: Build, quantized: bytes, input_ranges: dict[str, dict[str, list[float]]]) -> None:
    """Each float image input's normalization against `input_ranges`, the evaluation report's
    ranges the model was validated on (see `check_normalization`)."""
    model = build.model
    served = signature(quantized, served_signature(model.config.source))
    key = model.key("metadata", "inputs")
    ordered = _in_model_order(list(model.config.metadata.inputs), served.inputs, served.input_order, key)
    by_name = {t.name: t for t in served.inputs}
    for (index, entry), name in zip(ordered, served.input_order):
        # A model without signatures names its one input after the tensor, not the source.
        validated = input_ranges.get(name) or (next(iter(input_ranges.values()))
                                               if len(served.inputs) == len(input_ranges) == 1 else None)
        if validated and by_name[name].dtype == "float32":
            check_normalization(entry, validated, f"{key}[{index}]")


def check_normalization(entry: Any, validated: dict[str, list[float]], key: str) -> None:
    """An image input's declared normalization must map raw pixels onto the range its
    evaluation data has (a client applying it feeds the model what it was validated on), and
    its min/max stats must be that normalized range; otherwise a ConfigError with values
    that would fit. Without mean/std a client feeds raw pixels (mean 0, std 1)."""
    if entry.content.value != "image":
        return
    means, stds = list(entry.mean) or [0.0], list(entry.std) or [1.0]
    per_channel = max(len(means), len(stds)) > 1 and len(validated["min"]) > 1
    channels = range(len(validated["min"])) if per_channel else [None]
    for channel in channels:
        def pick(values: list[float]) -> float:
            return values[min(channel or 0, len(values) - 1)]

        low, high = ((validated["min"][channel], validated["max"][channel]) if per_channel
                     else (min(validated["min"]), max(validated["max"])))
        mean, std = pick(means), pick(stds)
        mapped = _normalized_range(mean, std)
        if not _fits(mean, std, low, high):
            fit = next((f"mean: [{m:g}], std: [{s:g}]" for m, s in COMMON_NORMALIZATIONS if _fits(m, s, low, high)),
                       f"mean: [{-low * _pixel_scale(low, high) + 0.0:.4g}], std: [{_pixel_scale(low, high):.4g}]"
                       if high > low else "a mean and std that do")
            raise ConfigError(f"maps raw pixels {RAW_PIXELS[0]:g}..{RAW_PIXELS[1]:g} onto [{mapped[0]:.6g}, "
                              f"{mapped[1]:.6g}], but the model was validated on inputs in [{low:.6g}, {high:.6g}]"
                              f" (its evaluation data): {fit} would fit", file=PARAMS_FILE,
                              key=f"{key}.{'std' if entry.std else 'mean'}")
        for stat, bound in (("min", mapped[0]), ("max", mapped[1])):
            values = getattr(entry, stat)
            if values and abs(pick(values) - bound) > RANGE_TOLERANCE * (mapped[1] - mapped[0]):
                raise ConfigError(f"the normalized input range is [{mapped[0]:.6g}, {mapped[1]:.6g}]: min: "
                                  f"[{mapped[0]:.6g}], max: [{mapped[1]:.6g}] would fit", file=PARAMS_FILE,
                                  key=f"{key}.{stat}")


def _normalized_range(mean: float, std: float) -> list[float]:
    return sorted([(RAW_PIXELS[0] - mean) / std, (RAW_PIXELS[1] - mean) / std])


def _fits(mean: float, std: float, low: float, high: float) -> bool:
    """Whether pixels normalized by mean and std cover the validated `low..high` (and not much more)."""
    mapped = _normalized_range(mean, std)
    slack = RANGE_TOLERANCE * (mapped[1] - mapped[0])
    return (low >= mapped[0] - slack and high <= mapped[1] + slack
            and high - low >= MIN_RANGE_SPAN * (mapped[1] - mapped[0]))


def _pixel_scale(low: float, high: float) -> float:
    """The std that stretches `low..high` over the raw pixel range."""
    return (RAW_PIXELS[1] - RAW_PIXELS[0]) / (high - low)


def _in_model_order(entries: list, tensors: list, order: list[str], key: str) -> list[tuple[int, Any]]:
    """(config index, entry) pairs in the model's tensor order."""
    if len(tensors) <= 1 or not entries:
        return list(enumerate(entries))  # one tensor: check_spec compares the counts
    names = [t.name for t in tensors]
    by_name = {entry.name: index for index, entry in enumerate(entries)}
    for index, entry in enumerate(entries):
        if entry.name not in names:
            raise ConfigError(f"'{entry.name}' is not one of the model's {len(names)} signature names "
                              f"({', '.join(names)}): with several tensors, each entry is named after the one it "
                              "describes", file=PARAMS_FILE, key=f"{key}[{index}].name")
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ConfigError(f"no entry for '{missing[0]}': describe every tensor or none", file=PARAMS_FILE, key=key)
    return [(by_name[name], entries[by_name[name]]) for name in order]


def _config_key(key: str, spec: ModelSpec, build: Build) -> str:
    """`metadata.outputs[<model position>]...` as `metadata.outputs[<config position>]...`."""
    match = re.match(r"metadata\.(inputs|outputs)\[(\d+)\](.*)", key or "")
    if not match:
        return key
    role, position, rest = match.group(1), int(match.group(2)), match.group(3)
    name = getattr(spec, role)[position].name
    configured = [entry.name for entry in getattr(build.model.config.metadata, role)]
    return f"metadata.{role}[{configured.index(name) if name in configured else position}]{rest}"


def deliver(build: Build, quantized: bytes, record: dict, *, input_ranges: dict[str, dict[str, list[float]]]
            ) -> bytes:
    """The deliverable: `quantized` with metadata, labels and `record` as provenance.json;
    `input_ranges` are the evaluation report's (see `check_input_normalization`)."""
    spec, files = metadata_spec(build, quantized)
    files[PROVENANCE_FILE] = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    try:
        check_spec(quantized, spec, files)
    except ConfigError as exc:
        # The metadata package names keys relative to the model's config entry, with tensors in
        # the model's order: name the entry where the config has it.
        key = build.model.key(_config_key(exc.key, spec, build))
        raise ConfigError(exc.message, file=exc.file or PARAMS_FILE, key=key) from None
    check_input_normalization(build, quantized, input_ranges)  # once the values fit the tensors
    return attach_metadata(quantized, spec, files)
