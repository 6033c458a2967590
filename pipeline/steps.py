"""One function per DVC stage: from a resolved `Model` or `Build` to in-memory results (no writes).

`stages/*.py` resolve the config, call these and write what they return; tests call them directly.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

from pipeline import datasets, layout
from pipeline import quantize as quantize_backends
from pipeline.build import Build, Model
from pipeline.config import Backend
from pipeline.convert import Converted, convert_float, converter_factory, converter_options
from pipeline.errors import InputError, PipelineError, RejectedSample
from pipeline.evaluate import Evaluation, evaluate, load_reference
from pipeline.io import read_bytes, sha256_path
from pipeline.sources import load_source, served_signature
from pipeline.tflite_model import op_uses, select_tf_ops, signature

# calibration.json holds this key instead of a calibration when the model cannot be calibrated.
CALIBRATION_UNAVAILABLE = "unavailable"


def convert_model(model: Model) -> tuple[Converted, Evaluation]:
    """Load the source once and convert it once under its flags (stopping with the config key
    when they leave out an op it needs), then record its reference outputs on the evaluation
    set, bound to the source's inputs by name."""
    config = model.config
    ref = config.evaluation
    samples = datasets.draw(layout.samples(ref.dataset), ref, key=model.key("evaluation"))
    source = load_source(config, model.name)
    samples = datasets.bind(samples, source.inputs, source.outputs, key=model.data_key("evaluation"),
                            file=model.data_file("evaluation"))
    converted = convert_float(source, config, model.name)
    converted.info["source_sha256"] = sha256_path(config.source.path)
    flags = {"allowed": [o.value for o in config.conversion.ops], "allow_custom_ops": config.conversion.allow_custom_ops,
             "converter_options": converter_options(config.conversion)}
    evaluation = evaluate(source, model.name, samples, op_uses(converted.model), source_path=config.source.path,
                          flags=flags, data_key=model.data_key("evaluation"), data_file=model.data_file("evaluation"))
    return converted, evaluation


def representative_pool(model: Model) -> datasets.Samples:
    """The model's representative dataset in seeded order; variants take a prefix of it."""
    ref = model.config.representative
    return datasets.shuffled(datasets.read(layout.samples(ref.dataset), key=model.key("representative")), ref.seed)


def bind_representative(model: Model, samples: datasets.Samples, float_model: bytes) -> datasets.Samples:
    """Calibration samples keyed and typed as the float model's inputs (a data problem is
    reported against the dataset that holds the samples)."""
    served = signature(float_model, served_signature(model.config.source), file=str(model.paths.float_model))
    return datasets.bind(samples, served.inputs, served.outputs, key=model.data_key("representative"),
                         file=model.data_file("representative"))


@contextlib.contextmanager
def naming_the_data(model: Model, part: str = "representative") -> Iterator[None]:
    """A sample the float model rejects is reported against the dataset it came from."""
    try:
        yield
    except RejectedSample as exc:
        raise RejectedSample(exc.message, file=model.data_file(part), key=model.data_key(part)) from None


def check_disjoint(model: Model, pool: datasets.Samples, float_model: bytes) -> None:
    """Evaluation samples must not be calibration samples (unless the config allows it): the
    config check catches one dataset named twice; this catches the same samples in two files."""
    if model.config.evaluation.allow_overlap:
        return
    try:
        calibration = bind_representative(model, pool, float_model)
    except PipelineError:
        return  # data that cannot feed the model: its calibrating builds say so, under their keys
    evaluation, _ = load_reference(model.paths.reference)
    shared = datasets.digests(evaluation) & datasets.digests(calibration)
    if shared:
        raise InputError(f"{len(shared)} of the {len(evaluation)} evaluation samples are also in the calibration data "
                         f"({model.config.representative.dataset}): evaluate on other samples, or set "
                         f"{model.key('evaluation', 'allow_overlap')}: true", file=model.data_file("evaluation"),
                         key=model.key("evaluation", "dataset"))


def shared_calibration(model: Model, pool: datasets.Samples, float_model: bytes) -> dict[str, Any]:
    """The model's calibration, once for every build whose recipe can reuse it, on the samples
    those builds would draw. A model that cannot be calibrated gets the reason instead: its
    static builds then fail under their own key, while its other builds are unaffected."""
    flex = select_tf_ops(float_model)
    if flex:
        return {CALIBRATION_UNAVAILABLE: f"select TF ops {', '.join(flex)} cannot run on this host"}
    ref = model.config.representative
    try:
        samples = datasets.first(pool, ref.num_samples, key=model.key("representative", "num_samples"),
                                 file=str(model.paths.representative))
        samples = bind_representative(model, samples, float_model)
        with naming_the_data(model):
            return quantize_backends.calibrate(float_model, samples, key=model.key("representative"))
    except PipelineError as exc:  # each static build calibrates inline and reports it under its own key
        return {CALIBRATION_UNAVAILABLE: exc.one_line()}


def representative_samples(build: Build, float_model: bytes) -> datasets.Samples:
    model = build.model
    count = build.variant.num_samples or model.config.representative.num_samples
    key = f"{build.variant_key}.num_samples" if build.variant.num_samples else model.key("representative", "num_samples")
    pool = datasets.read(model.paths.representative, key=model.key("representative"))
    return bind_representative(model, datasets.first(pool, count, key=key, file=str(model.paths.representative)),
                               float_model)


def reusable_calibration(build: Build) -> dict[str, Any] | None:
    """The model's shared calibration when this build's recipe can use it, else None."""
    if not quantize_backends.uses_shared_calibration(build.variant, key=build.variant_key):
        return None
    calibration = json.loads(read_bytes(build.model.paths.calibration, key=build.model.key("representative")))
    return None if CALIBRATION_UNAVAILABLE in calibration else calibration


def quantize_build(build: Build) -> quantize_backends.QuantizedModel:
    float_model = read_bytes(build.model.paths.float_model)
    needs_samples = quantize_backends.needs_calibration(build.variant, key=build.variant_key)
    if needs_samples:
        quantize_backends.check_runs_on_host(float_model, key=build.variant_key)  # before any calibration
    calibration = reusable_calibration(build) if needs_samples else None
    samples = representative_samples(build, float_model) if calibration is None and needs_samples else None
    make_converter = None
    if build.variant.backend is Backend.converter:
        config = build.model.config
        make_converter = converter_factory(load_source(config, build.model.name), config)
    with naming_the_data(build.model):
        result = quantize_backends.quantize(float_model, build.variant, samples=samples, calibration=calibration,
                                            make_converter=make_converter, key=build.variant_key)
    if result.info.get("num_calibration_samples") is not None:  # provenance names the calibration data
        result.info.update(representative_sha256=result.info["calibration_samples_sha256"],
                           representative_samples=result.info["num_calibration_samples"])
    return result
