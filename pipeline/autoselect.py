"""Auto-selection: the smallest quantization variant of a model within an accuracy budget.

1. Quantize and deliver every candidate variant (`autoselect.<model>.candidates`, by
   default each litert_quantizer and none variant), and order them by delivered size.
2. Validate them from the smallest, with the model's gates overridden by the budget; a
   candidate passes when every gate does (and the target runtime accepts it).
3. A static LiteRT Quantizer candidate that misses is retried with its worst layers in
   float (lowest SNR against the float model, from the validation's per-layer errors of
   the latest try), `layers_per_step` more per step, up to `max_steps` steps. Each such
   layer is kept in float with the layers feeding it: a float op that reads a quantized
   tensor keeps that tensor's error.
4. The smallest passing model wins; candidates not smaller than it are not tried.

Everything is deterministic (fixed samples, stable sort, ties broken by candidate order)
except latency: a budget with `max_latency_ms` may pick differently from run to run.
Needs no TensorFlow unless a candidate uses the converter backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from pipeline import deliver, steps
from pipeline.build import Build, Model, derive
from pipeline.config import AUTO_VARIANT, AutoSelectConfig, Backend, QuantizationConfig, plain
from pipeline.evaluate import load_reference
from pipeline.io import read_bytes
from pipeline.layout import AutoSelectPaths
from pipeline.quantize import QuantizedModel, load_recipe, selective
from pipeline.sources import served_signature
from pipeline.validate import Validation, validate

# Metrics of each attempt kept in the decision trail.
TRAIL_METRICS = ("size_ratio", "accuracy", "accuracy_drop", "cosine", "snr_db", "latency_median_ms")


@dataclass(frozen=True)
class Candidate:
    name: str  # the variant, with "+<n> float" when layers are kept in float
    base: str  # the variant in `quantization` it derives from
    float_tensors: tuple[str, ...]
    model: bytes  # delivered: metadata, labels and provenance, as the metadata stage makes it
    recipe: list[dict[str, Any]] | None  # LiteRT Quantizer recipe, None for other backends


@dataclass(frozen=True)
class Attempt:
    candidate: Candidate
    validation: Validation

    @property
    def passed(self) -> bool:
        return not self.validation.failures

    def record(self) -> dict[str, Any]:
        metrics = self.validation.report["metrics"]
        return {
            "variant": self.candidate.name,
            "base_variant": self.candidate.base,
            "float_tensors": list(self.candidate.float_tensors),
            "size_bytes": len(self.candidate.model),
            **{key: metrics.get(key) for key in TRAIL_METRICS},
            "passed": self.passed,
            "failures": self.validation.failures,
        }


@dataclass(frozen=True)
class Selection:
    report: dict[str, Any]  # the decision trail (JSON): budget, gates, attempts, selected
    selected: Attempt | None


def candidates_of(auto: AutoSelectConfig, quantization: dict[str, QuantizationConfig]) -> list[str]:
    if auto.candidates:
        return list(auto.candidates)
    return [v for v, q in quantization.items() if q.backend in (Backend.litert_quantizer, Backend.none)]


BUDGET_GATES = ("max_accuracy_drop", "max_size_ratio", "max_latency_ms")


class _Search:
    """Quantize, deliver and validate candidates of one model, always from the same inputs."""

    def __init__(self, model: Model, auto: AutoSelectConfig, *, git_commit: str, experiment: str):
        self.model, self.git_commit, self.experiment = model, git_commit, experiment
        self.float_model = read_bytes(model.paths.float_model)
        self.samples, self.reference = load_reference(model.paths.reference)
        self.convert_info = json.loads(read_bytes(model.paths.convert_report))
        self.input_ranges = json.loads(read_bytes(model.paths.evaluate_report)).get("input_ranges", {})
        self.feeders = selective.producers_of_inputs(self.float_model)
        # The budget overrides the model's gates, so the pick passes them too.
        self.budget = {gate: getattr(auto, gate) for gate in BUDGET_GATES if getattr(auto, gate) is not None}
        self.gates = self.build(QuantizationConfig()).gates

    def build(self, variant: QuantizationConfig) -> Build:
        """The model's `auto` build with `variant`, gated by the budget."""
        return derive(self.model, AUTO_VARIANT, variant, self.budget)

    def _delivered(self, build: Build, quantized: QuantizedModel) -> bytes:
        record = deliver.provenance(build, convert_info=self.convert_info, quantize_info=quantized.info,
                                    git_commit=self.git_commit, experiment=self.experiment)
        return deliver.deliver(build, quantized.model, record, input_ranges=self.input_ranges)

    def plain(self, variant_name: str, variant: QuantizationConfig) -> Candidate:
        build = self.build(variant)
        quantized = steps.quantize_build(build)
        recipe = (load_recipe(variant.recipe or "", key=f"quantization.{variant_name}.recipe")
                  if variant.backend is Backend.litert_quantizer else None)
        return Candidate(variant_name, variant_name, (), self._delivered(build, quantized), recipe)

    def keeping_float(self, base: str, variant: QuantizationConfig, tensors: list[str]) -> Candidate:
        build = self.build(variant)
        calibration = steps.reusable_calibration(build)
        samples = steps.representative_samples(build, self.float_model) if calibration is None else None
        quantized, recipe = selective.quantize_keeping_float(self.float_model, variant, tensors, samples=samples,
                                                             calibration=calibration, key=f"quantization.{base}")
        # Provenance names the recipe file the stage writes beside the pick.
        build = self.build(replace(variant, recipe=str(AutoSelectPaths.of(self.model.name).recipe)))
        return Candidate(f"{base}+{len(tensors)} float", base, tuple(tensors), self._delivered(build, quantized), recipe)

    def attempt(self, candidate: Candidate) -> Attempt:
        config = self.model.config
        result = validate(
            candidate.model,
            float_model=self.float_model,
            samples=self.samples,
            reference=self.reference,
            gates=self.gates,
            runtime=self.model.runtime,
            allow_custom_ops=config.conversion.allow_custom_ops,
            signature_key=served_signature(config.source),
            name=self.model.name,
            metadata=config.metadata,
        )
        context = {"build": f"{self.model.name}-{AUTO_VARIANT}", "variant": AUTO_VARIANT,
                   "selected_variant": candidate.name,
                   "model_path": str(self.build(QuantizationConfig()).paths.delivered)}
        return Attempt(candidate, replace(result, report={**context, **result.report}))


def select(model: Model, auto: AutoSelectConfig, quantization: dict[str, QuantizationConfig], *, git_commit: str,
           experiment: str) -> Selection:
    """Search the model's candidates (variants of `quantization`) for the smallest within its
    budget (see the module doc)."""
    search = _Search(model, auto, git_commit=git_commit, experiment=experiment)
    # sorted() is stable: equal sizes keep the candidates' order.
    ordered = sorted((search.plain(v, quantization[v]) for v in candidates_of(auto, quantization)),
                     key=lambda c: len(c.model))
    attempts: list[Attempt] = []
    best: Attempt | None = None

    def worth_trying(candidate: Candidate) -> bool:
        return best is None or len(candidate.model) < len(best.candidate.model)

    for candidate in ordered:
        if not worth_trying(candidate):
            break
        latest = search.attempt(candidate)
        attempts.append(latest)
        if latest.passed:
            best = latest
            continue
        base = quantization[candidate.base]
        if not selective.is_selective_candidate(base, key=f"quantization.{candidate.base}"):
            continue
        kept: list[str] = []
        for _ in range(auto.max_steps):
            # Worst first; equal SNRs in tensor-name order, so the choice is reproducible.
            ranked = sorted(latest.validation.layer_errors, key=lambda row: (row.snr_db, row.tensor))
            worst = [row.tensor for row in ranked if row.tensor not in kept][:auto.layers_per_step]
            if not worst:
                break
            for tensor in worst:
                kept += [t for t in [tensor, *search.feeders.get(tensor, [])] if t not in kept]
            trial = search.keeping_float(candidate.base, base, kept)
            if not worth_trying(trial):
                break
            latest = search.attempt(trial)
            attempts.append(latest)
            if latest.passed:
                best = latest
                break

    report = {
        "model": model.name,
        "budget": plain(auto),
        "gates": plain(search.gates),
        "candidates": [{"variant": c.name, "size_bytes": len(c.model)} for c in ordered],
        "attempts": [a.record() for a in attempts],
        "selected": best.record() if best else None,
    }
    return Selection(report, best)
