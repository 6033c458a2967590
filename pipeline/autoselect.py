"""Auto-selection: the smallest model of a model's quantization space within a budget.

1. Candidates: every variant in `autoselect.<model>.candidates` (by default every variant in
   `quantization`, both backends), and every static LiteRT Quantizer variant once more per
   calibration algorithm in `algorithms`. Each is quantized and delivered, then ordered by
   delivered size.
2. Validate them from the smallest, with the model's gates overridden by the budget; a
   candidate passes when every gate does (and the target runtime accepts it).
3. Sensitivity, as NNCF ranks layers: for a static LiteRT Quantizer candidate, each layer
   alone is quantized (every other op in float, the candidate's own calibration) and the
   budget metric's drop and the output SNR are measured on a bounded subset of the
   evaluation samples. A candidate that misses is retried with its most sensitive layers in
   float (largest drop first, then lowest SNR), `layers_per_step` more per step, up to
   `max_steps` steps. Each such layer is kept in float with the layers feeding it: a float
   op that reads a quantized tensor keeps that tensor's error. The smallest static variant's
   sensitivity (with its own recipe) is measured even when nothing misses: the report shows
   where the error comes from.
4. The smallest passing model wins; candidates not smaller than it are not tried.

Everything is deterministic (fixed samples, stable sort, ties broken by candidate and
tensor order) except latency: a budget with `max_latency_ms` may pick differently from run
to run. Needs no TensorFlow unless a candidate uses the converter backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import deliver, steps
from pipeline.build import Build, Model, derive
from pipeline.config import AUTO_VARIANT, AutoSelectConfig, Backend, QuantizationConfig, plain
from pipeline.errors import InputError, PipelineError, first_line
from pipeline.evaluate import load_reference
from pipeline.io import read_bytes, sha256_path
from pipeline.layout import AutoSelectPaths
from pipeline.quantize import QuantizedModel, load_recipe, selective
from pipeline.quantize.litert import Recipe, Statistics, calibrate_recipe, calibrating_algorithms, statistics_from
from pipeline.sources import served_signature
from pipeline.validate import Validation, output_metrics, validate
from pipeline.validate.layers import LayerError, layer_errors
from pipeline.validate.runner import run_samples

# Metrics of each attempt kept in the decision trail.
TRAIL_METRICS = ("size_ratio", "accuracy", "accuracy_drop", "task_metric_drop", "cosine", "snr_db",
                 "latency_median_ms")
BUDGET_GATES = ("max_accuracy_drop", "max_task_metric_drop", "min_snr_db", "max_size_ratio", "max_latency_ms")


@dataclass(frozen=True)
class Spec:
    """A point of the search space before any layer is kept in float."""

    base: str  # the variant in `quantization`
    algorithm: str | None = None  # replaces the recipe's calibration algorithm (static LiteRT Quantizer)

    @property
    def name(self) -> str:
        return self.base if self.algorithm is None else f"{self.base}+{self.algorithm}"


@dataclass(frozen=True)
class Candidate:
    spec: Spec
    float_tensors: tuple[str, ...]
    model: bytes  # delivered: metadata, labels and provenance, as the metadata stage makes it
    recipe: Recipe | None  # LiteRT Quantizer recipe, None for other backends

    @property
    def name(self) -> str:
        return self.spec.name + (f"+{len(self.float_tensors)} float" if self.float_tensors else "")


@dataclass(frozen=True)
class Attempt:
    candidate: Candidate
    validation: Validation

    @property
    def passed(self) -> bool:
        return not self.validation.failures

    def record(self) -> dict[str, Any]:
        metrics = self.validation.report["metrics"]
        spec = self.candidate.spec
        return {
            "variant": self.candidate.name,
            "base_variant": spec.base,
            "algorithm": spec.algorithm,
            "float_tensors": list(self.candidate.float_tensors),
            "size_bytes": len(self.candidate.model),
            **{key: metrics.get(key) for key in TRAIL_METRICS},
            "passed": self.passed,
            "failures": self.validation.failures,
        }


@dataclass(frozen=True)
class Selection:
    report: dict[str, Any]  # the decision trail (JSON): budget, gates, attempts, sensitivity, selected
    selected: Attempt | None


def candidates_of(auto: AutoSelectConfig, quantization: dict[str, QuantizationConfig]) -> list[str]:
    return list(auto.candidates) if auto.candidates else list(quantization)


def drop_metric(auto: AutoSelectConfig) -> str | None:
    """The metric whose drop ranks layers: the budget's (accuracy first), else none (SNR ranks)."""
    if auto.max_accuracy_drop is not None:
        return "accuracy_drop"
    return "task_metric_drop" if auto.max_task_metric_drop is not None else None


class _Search:
    """Quantize, deliver and validate candidates of one model, always from the same inputs."""

    def __init__(self, model: Model, auto: AutoSelectConfig, quantization: dict[str, QuantizationConfig], *,
                 git_commit: str, experiment: str):
        self.model, self.auto, self.quantization = model, auto, quantization
        self.git_commit, self.experiment = git_commit, experiment
        self.float_model = read_bytes(model.paths.float_model)
        self.samples, self.reference = load_reference(model.paths.reference)
        self.convert_info = json.loads(read_bytes(model.paths.convert_report))
        self.input_ranges = json.loads(read_bytes(model.paths.evaluate_report)).get("input_ranges", {})
        self.ops = selective.ops_by_output(self.float_model)
        # The budget overrides the model's gates, so the pick passes them too.
        self.budget = {gate: getattr(auto, gate) for gate in BUDGET_GATES if getattr(auto, gate) is not None}
        self.gates = self.build(QuantizationConfig()).gates
        self._statistics: dict[Spec, Statistics] = {}

    def build(self, variant: QuantizationConfig) -> Build:
        """The model's `auto` build with `variant`, gated by the budget."""
        return derive(self.model, AUTO_VARIANT, variant, self.budget)

    def variant(self, spec: Spec) -> QuantizationConfig:
        return self.quantization[spec.base]

    def is_static(self, spec: Spec) -> bool:
        return selective.is_selective_candidate(self.variant(spec), key=f"quantization.{spec.base}")

    def specs(self) -> tuple[list[Spec], list[dict[str, str]]]:
        """Every candidate variant, and each static LiteRT Quantizer one with each algorithm;
        a point that another one already is (same recipe, I/O types and samples) only once.
        Also the variants whose recipe cannot be read, with why (one team's broken recipe
        must not stop the others' candidates)."""
        names = candidates_of(self.auto, self.quantization)
        points, unreadable = [Spec(name) for name in names], []  # named variants first: they keep their names
        for name in names:
            try:
                if self.is_static(Spec(name)):
                    own = calibrating_algorithms(self.recipe(Spec(name)))
                    points += [Spec(name, algorithm) for algorithm in self.auto.algorithms if {algorithm} != own]
            except PipelineError as exc:
                unreadable.append({"variant": name, "reason": exc.one_line()})
        broken = {entry["variant"] for entry in unreadable}
        specs, seen = [], set()
        for spec in points:
            variant = self.variant(spec)
            if spec.base in broken:
                continue
            if variant.backend is Backend.litert_quantizer:
                point = (json.dumps(self.recipe(spec), sort_keys=True), variant.inference_input_type,
                         variant.inference_output_type, variant.num_samples)
                if point in seen:
                    continue
                seen.add(point)
            specs.append(spec)
        return specs, unreadable

    def recipe(self, spec: Spec) -> Recipe:
        recipe = load_recipe(self.variant(spec).recipe or "", key=f"quantization.{spec.base}.recipe")
        return recipe if spec.algorithm is None else selective.with_algorithm(recipe, spec.algorithm)

    def statistics(self, spec: Spec) -> Statistics:
        """The spec's calibration, once: the model's shared one where its recipe can use it."""
        if spec not in self._statistics:
            build, recipe = self.build(self.variant(spec)), self.recipe(spec)
            key = f"quantization.{spec.base}"
            calibration = steps.reusable_calibration(build) if spec.algorithm is None else None
            if calibration is not None:
                self._statistics[spec] = statistics_from(calibration, self.float_model, recipe, key=key)
            else:
                samples = steps.representative_samples(build, self.float_model)
                with steps.naming_the_data(build.model):
                    self._statistics[spec] = calibrate_recipe(self.float_model, recipe, build.variant, samples, key=key)
        return self._statistics[spec]

    def _delivered(self, build: Build, quantized: QuantizedModel) -> bytes:
        record = deliver.provenance(build, convert_info=self.convert_info, quantize_info=quantized.info,
                                    git_commit=self.git_commit, experiment=self.experiment)
        return deliver.deliver(build, quantized.model, record, input_ranges=self.input_ranges)

    def quantize(self, spec: Spec, float_tensors: list[str]) -> QuantizedModel:
        """The spec's model with the ops producing `float_tensors` in float."""
        variant = self.variant(spec)
        if spec.algorithm is None and not float_tensors:  # exactly what the variant's own build delivers
            return steps.quantize_build(self.build(variant))
        recipe = selective.keep_in_float(self.recipe(spec), float_tensors)
        return selective.quantize_with_recipe(self.float_model, variant, recipe, statistics=self.statistics(spec),
                                              key=f"quantization.{spec.base}")

    def candidate(self, spec: Spec, float_tensors: list[str] = ()) -> Candidate:
        variant = self.variant(spec)
        quantized = self.quantize(spec, list(float_tensors))
        recipe = None
        build = self.build(variant)
        if variant.backend is Backend.litert_quantizer:
            recipe = selective.keep_in_float(self.recipe(spec), float_tensors)
            if spec.algorithm is not None or float_tensors:
                # Provenance names the recipe file the stage writes beside the pick.
                build = self.build(replace(variant, recipe=str(AutoSelectPaths.of(self.model.name).recipe)))
        return Candidate(spec, tuple(float_tensors), self._delivered(build, quantized), recipe)

    def check_source_unchanged(self) -> None:
        """Converter candidates convert the source again: it must be the one the float model
        came from (the convert stage's record, a dependency of this stage, holds its hash)."""
        if all(self.quantization[name].backend is not Backend.converter
               for name in candidates_of(self.auto, self.quantization)):
            return
        source = self.model.config.source.path
        if sha256_path(source) != self.convert_info.get("source_sha256"):
            raise InputError("changed since the convert stage ran: run the pipeline again", file=source,
                             key=self.model.key("source", "path"))

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

    def sensitivity(self, spec: Spec) -> dict[str, Any]:
        """Each layer's effect alone (see the module doc), most sensitive first."""
        count = min(self.auto.sensitivity_samples, len(self.samples))
        subset = self.samples.take(slice(0, count))
        reference = {name: values[:count] for name, values in self.reference.items()}
        metric = drop_metric(self.auto)
        analysis: dict[str, Any] = {"variant": spec.name, "metric": metric, "num_samples": count, "layers": []}
        full = self.quantize(spec, []).model
        errors, reason = layer_errors(self.float_model, full, subset, num_threads=self.model.runtime.num_threads)
        if reason:  # e.g. the full model does not run: every layer is a suspect, those of the op
            # kind the error names ("... Node number 55 (DIV) failed to invoke") first, in graph order
            named = [tensor for tensor, node in self.ops.items() if f"({node.op})" in reason]
            suspects = named + [tensor for tensor in self.ops if tensor not in named]
            analysis["preselection"] = f"graph order, ops named by the error first ({reason})"
            errors = [LayerError(tensor, "intermediate", float("nan"), float("nan"), float("nan")) for tensor in suspects]
        # Bounded: the layers with the lowest SNR in the full model are measured first.
        candidates = [row for row in errors if row.tensor in self.ops]
        measured = candidates[:self.auto.sensitivity_layers]
        analysis["layers_not_measured"] = len(candidates) - len(measured)
        signature = served_signature(self.model.config.source)
        rows = []
        for row in tqdm(measured, desc=f"sensitivity of {spec.name}", unit="layer", leave=False):
            others = [tensor for tensor in self.ops if tensor != row.tensor]
            measured_row = {"tensor": row.tensor, "op": self.ops[row.tensor].op, "drop": None, "snr_db_alone": None,
                            "snr_db_in_model": row.snr_db if np.isfinite(row.snr_db) else None}
            try:
                alone = self.quantize(spec, others).model
                run = run_samples(alone, subset, num_threads=self.model.runtime.num_threads, signature_key=signature,
                                  desc=None)
            except (PipelineError, RuntimeError, ValueError) as exc:  # this layer alone in int8 breaks the model
                measured_row["error"] = exc.one_line() if isinstance(exc, PipelineError) else first_line(exc)
            else:
                _, metrics = output_metrics(run.outputs, reference, subset.labels, task_metric=self.gates.task_metric)
                measured_row.update(drop=metrics.get(metric) if metric else None, snr_db_alone=metrics["snr_db"])
            rows.append(measured_row)
        analysis["layers"] = sorted(rows, key=sensitivity_rank)
        return analysis


def sensitivity_rank(row: dict[str, Any]) -> tuple:
    """Most sensitive first: a layer that stops the model alone, then the largest drop, then the
    lowest SNR; ties in tensor-name order."""
    if row.get("error"):
        return (0, 0.0, 0.0, row["tensor"])
    return (1, -(row["drop"] or 0.0), row["snr_db_alone"], row["tensor"])


def select(model: Model, auto: AutoSelectConfig, quantization: dict[str, QuantizationConfig], *, git_commit: str,
           experiment: str) -> Selection:
    """Search the model's candidates for the smallest within its budget (see the module doc)."""
    search = _Search(model, auto, quantization, git_commit=git_commit, experiment=experiment)
    search.check_source_unchanged()
    specs, unbuildable = search.specs()
    built = []
    for spec in specs:
        try:
            built.append(search.candidate(spec))
        except PipelineError as exc:  # e.g. a recipe the quantizer refuses for this model: the others still compete
            unbuildable.append({"variant": spec.name, "reason": exc.one_line()})
    # sorted() is stable: equal sizes keep the candidates' order.
    ordered = sorted(built, key=lambda c: len(c.model))
    attempts: list[Attempt] = []
    analyses: dict[Spec, dict[str, Any]] = {}
    best: Attempt | None = None

    def worth_trying(candidate: Candidate) -> bool:
        return best is None or len(candidate.model) < len(best.candidate.model)

    def sensitivity(spec: Spec) -> dict[str, Any]:
        if spec not in analyses:
            try:
                analyses[spec] = search.sensitivity(spec)
            except PipelineError as exc:  # optional analysis: its failure is reported, not fatal
                analyses[spec] = {"variant": spec.name, "metric": drop_metric(auto), "layers": [],
                                  "reason": exc.one_line()}
        return analyses[spec]

    for candidate in ordered:
        if not worth_trying(candidate):
            break
        latest = search.attempt(candidate)
        attempts.append(latest)
        if latest.passed:
            best = latest
            continue
        spec = candidate.spec
        if not search.is_static(spec):
            continue
        ranked = [row["tensor"] for row in sensitivity(spec)["layers"]]
        kept: list[str] = []
        for _ in range(auto.max_steps):
            worst = [tensor for tensor in ranked if tensor not in kept][:auto.layers_per_step]
            if not worst:
                break
            for tensor in worst:
                kept += [t for t in [tensor, *search.ops[tensor].feeders] if t not in kept]
            try:
                trial = search.candidate(spec, kept)
            except PipelineError as exc:
                unbuildable.append({"variant": f"{spec.name}+{len(kept)} float", "reason": exc.one_line()})
                break
            if not worth_trying(trial):
                break
            latest = search.attempt(trial)
            attempts.append(latest)
            if latest.passed:
                best = latest
                break

    # The report shows where the error comes from even when no static candidate missed: in the
    # smallest static variant with its own recipe (the pipeline's default int8, usually).
    static = [c.spec for c in ordered if search.is_static(c.spec)]
    shown = next((spec for spec in static if spec.algorithm is None), next(iter(static), None))
    if shown is not None:
        sensitivity(shown)
    # The analysis the plot and the overlay show first: the shown variant's.
    ordered_analyses = ([analyses[shown]] if shown in analyses else []) + [a for spec, a in analyses.items()
                                                                           if spec != shown]
    report = {
        "model": model.name,
        "budget": plain(auto),
        "gates": plain(search.gates),
        "candidates": [{"variant": c.name, "size_bytes": len(c.model)} for c in ordered],
        "unbuildable": unbuildable,
        "attempts": [a.record() for a in attempts],
        "sensitivity": ordered_analyses,
        "selected": best.record() if best else None,
    }
    return Selection(report, best)


def model_explorer_overlay(analysis: dict[str, Any]) -> dict[str, Any]:
    """Model Explorer node data (its `GraphNodeData` JSON) for one sensitivity analysis: each
    measured op, keyed by its output tensor name, valued by the output SNR with that op alone
    quantized (low = sensitive, coloured red). Load it on the float or the quantized model."""
    results = {row["tensor"]: {"value": round(float(row["snr_db_alone"]), 3)}
               for row in analysis["layers"] if row["snr_db_alone"] is not None and np.isfinite(row["snr_db_alone"])}
    return {"results": results,
            "gradient": [{"stop": 0, "bgColor": "#d7191c"}, {"stop": 0.5, "bgColor": "#ffffbf"},
                         {"stop": 1, "bgColor": "#1a9641"}]}

