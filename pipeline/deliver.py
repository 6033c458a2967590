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


def deliver(build: Build, quantized: bytes, record: dict) -> bytes:
    """The deliverable: `quantized` with metadata, labels and `record` as provenance.json."""
    spec, files = metadata_spec(build, quantized)
    files[PROVENANCE_FILE] = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    try:
        check_spec(quantized, spec, files)
    except ConfigError as exc:
        # The metadata package names keys relative to the model's config entry, with tensors in
        # the model's order: name the entry where the config has it.
        key = build.model.key(_config_key(exc.key, spec, build))
        raise ConfigError(exc.message, file=exc.file or PARAMS_FILE, key=key) from None
    return attach_metadata(quantized, spec, files)
