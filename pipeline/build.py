"""The units of work, resolved once from the config: a `Model` and its `Build`s.

A stage resolves its model or build at the edge (`resolve_model`, `resolve_build`) and passes
the typed object along; library functions never look names up in the whole config again.
Autoselect and sweeps make their builds with `derive`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.config import (
    PARAMS_FILE,
    DatasetConfig,
    GeneratorConfig,
    ModelConfig,
    PipelineConfig,
    QuantizationConfig,
    RuntimeConfig,
    ValidationConfig,
    merge_gates,
)
from pipeline.errors import ConfigError
from pipeline.layout import BuildPaths, ModelPaths


@dataclass(frozen=True)
class Model:
    """One model: its config, the data it is calibrated and evaluated on, its files."""

    name: str
    config: ModelConfig
    representative_data: DatasetConfig | GeneratorConfig
    evaluation_data: DatasetConfig | GeneratorConfig
    runtime_name: str
    runtime: RuntimeConfig
    gates: ValidationConfig  # the model's gate set, before a build's overrides
    paths: ModelPaths

    @property
    def team(self) -> str:
        return self.config.team

    @property
    def registry_name(self) -> str:
        return self.config.registry_name or f"{self.config.team}.{self.name}"

    def data_key(self, part: str) -> str:
        """The config key of the data `part` ("representative" or "evaluation") draws from."""
        data = self.representative_data if part == "representative" else self.evaluation_data
        group = "generator" if isinstance(data, GeneratorConfig) else "dataset"
        return f"{group}.{getattr(self.config, part).dataset}"

    def data_file(self, part: str) -> str | None:
        """The file the data `part` comes from, for messages (None for a generator)."""
        data = self.representative_data if part == "representative" else self.evaluation_data
        return None if isinstance(data, GeneratorConfig) else data.path

    def key(self, *parts: str) -> str:
        """The config key of a part of this model, for messages: model.<name>.<parts>."""
        return ".".join(["model", self.name, *parts])


@dataclass(frozen=True)
class Build:
    """One model × quantization variant: everything its stages need, and where they write."""

    model: Model
    variant_name: str
    variant: QuantizationConfig
    gates: ValidationConfig  # the model's gate set with the build's overrides
    paths: BuildPaths

    @property
    def name(self) -> str:
        return f"{self.model.name}-{self.variant_name}"

    @property
    def team(self) -> str:
        return self.model.team

    @property
    def variant_key(self) -> str:
        return f"quantization.{self.variant_name}"

    @property
    def runtime(self) -> RuntimeConfig:
        return self.model.runtime


def resolve_model(cfg: PipelineConfig, name: str) -> Model:
    if name not in cfg.model:  # a stage run by hand with a mistyped name
        known = ", ".join(sorted(cfg.model)) or "none"
        raise ConfigError(f"unknown model '{name}' (known: {known})", file=PARAMS_FILE, key=f"model.{name}")
    config = cfg.model[name]
    data = {**cfg.dataset, **cfg.generator}
    return Model(name, config, data[config.representative.dataset], data[config.evaluation.dataset],
                 config.runtime, cfg.runtime[config.runtime], cfg.validation[config.validation], ModelPaths.of(name))


def resolve_build(cfg: PipelineConfig, name: str) -> Build:
    if name not in cfg.build:  # a stage run by hand with a mistyped name
        known = ", ".join(sorted(cfg.build)) or "none"
        raise ConfigError(f"unknown build '{name}' (known: {known})", file=PARAMS_FILE, key=f"build.{name}")
    entry = cfg.build[name]
    model = resolve_model(cfg, entry.model)
    gates = merge_gates(model.gates, entry.validation, key=f"build.{name}.validation")
    return Build(model, entry.variant, cfg.quantization[entry.variant], gates, BuildPaths.of(model.name, entry.variant))


def builds_of(cfg: PipelineConfig, model: str) -> list[Build]:
    return [resolve_build(cfg, name) for name, entry in cfg.build.items() if entry.model == model]


def derive(model: Model, variant_name: str, variant: QuantizationConfig, gate_overrides: dict | None = None) -> Build:
    """A build that is not in the config (an auto-selection candidate, a sweep member)."""
    gates = merge_gates(model.gates, gate_overrides or {}, key=f"build.{model.name}-{variant_name}.validation")
    return Build(model, variant_name, variant, gates, BuildPaths.of(model.name, variant_name))


def with_variant(build: Build, variant: QuantizationConfig) -> Build:
    """The same build with another variant config (e.g. a recipe keeping layers in float)."""
    return replace(build, variant=variant)
