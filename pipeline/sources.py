"""Load a model source (SavedModel, .keras, H5, concrete functions, JAX) for TensorFlow.

Every format ends as a `LoadedSource`: callable on NumPy inputs keyed by input name (for
reference outputs), returning outputs keyed by output name, and able to build a
`TFLiteConverter`. Keras models are exported to a SavedModel whose serving signature names
each input and output after the model's own (Keras' plain `model.export()` would name
list outputs `output_0`, `output_1`...), then converted with `from_saved_model`, the
robust path across Keras versions; the path taken is recorded.
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.config import PARAMS_FILE, ModelConfig, SourceConfig, SourceFormat, check_function_reference
from pipeline.datasets import TensorInfo
from pipeline.errors import ConfigError, InputError, first_line
from pipeline.io import check_archive
from pipeline.tensorflow_import import tensorflow

SERVING = "serving_default"


@dataclass
class LoadedSource:
    format: SourceFormat
    conversion_path: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    call: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    make_converter: Callable[[], Any]
    parameter_count: int | None = None
    # Keeps temporary export folders alive as long as the source is in use.
    _keep: list = field(default_factory=list, repr=False)


def served_signature(source: SourceConfig) -> str:
    """The signature key of the float model: the SavedModel's chosen one, else the one this
    loader exports (Keras) or names (concrete functions)."""
    return source.signature_key if source.format in (SourceFormat.saved_model, SourceFormat.jax) else SERVING


def load_source(model: ModelConfig, name: str, *, file: str = "params.yaml") -> LoadedSource:
    key = f"model.{name}.source"
    path = Path(model.source.path)
    if not path.exists():
        raise InputError(f"source path '{path}' does not exist", file=file, key=f"{key}.path")
    fmt = model.source.format
    if fmt in (SourceFormat.keras, SourceFormat.h5) and not path.is_file():  # a FIFO or device would block
        raise InputError(f"'{path}' is not a regular file", file=str(path), key=f"{key}.path")
    if fmt in (SourceFormat.saved_model, SourceFormat.jax):
        path_name = "jax2tf_saved_model" if fmt is SourceFormat.jax else "from_saved_model"
        return _from_saved_model(path, model, key, path_name)
    if fmt in (SourceFormat.keras, SourceFormat.h5):
        if fmt is SourceFormat.keras and not zipfile.is_zipfile(path):  # Keras would say "File not found"
            raise InputError("not a Keras archive: format keras takes a `.keras` file, a ZIP as model.save() "
                             "writes it (a legacy H5 file is format h5)", file=str(path), key=f"{key}.path")
        if zipfile.is_zipfile(path):  # the Keras 3 format; H5 files are not archives
            check_archive(path, key=f"{key}.path", what="Keras archive")
        return _from_keras(path, model, key)
    return _from_concrete_functions(path, model, key)


def _tensor_info(name: str, spec: Any) -> TensorInfo:
    return TensorInfo(name, [None if d is None else int(d) for d in spec.shape.as_list()], spec.dtype.name)


def _load_saved_model(path: Path, key: str) -> Any:
    tf = tensorflow()

    if not (path / "saved_model.pb").is_file():
        raise InputError("not a SavedModel folder (no saved_model.pb)", file=str(path), key=f"{key}.path")
    try:
        return tf.saved_model.load(str(path))
    except Exception as exc:  # corrupt protobufs raise several TF error types
        raise InputError(f"cannot load SavedModel: {first_line(exc)}", file=str(path), key=f"{key}.path") from None


def _signature(loaded: Any, signature_key: str, path: Path, key: str) -> Any:
    if signature_key not in loaded.signatures:
        known = ", ".join(sorted(loaded.signatures)) or "none"
        raise ConfigError(
            f"no signature '{signature_key}' in {path} (has: {known})", file=str(path), key=f"{key}.signature_key"
        )
    return loaded.signatures[signature_key]


def _from_saved_model(path: Path, model: ModelConfig, key: str, path_name: str, keep: list | None = None,
                      signature_key: str | None = None) -> LoadedSource:
    tf = tensorflow()

    loaded = _load_saved_model(path, key)
    signature_key = signature_key or model.source.signature_key
    function = _signature(loaded, signature_key, path, key)
    _, input_specs = function.structured_input_signature
    inputs = [_tensor_info(n, s) for n, s in sorted(input_specs.items())]
    outputs = [_tensor_info(n, s) for n, s in sorted(function.structured_outputs.items())]

    def call(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = function(**{n: tf.constant(v) for n, v in feed.items()})
        return {n: t.numpy() for n, t in result.items()}

    signature_keys = model.conversion.signatures or [signature_key]

    def make_converter() -> Any:
        with _handing_over(loaded, path):
            converter = tf.lite.TFLiteConverter.from_saved_model(str(path), signature_keys=signature_keys)
        convert = converter.convert

        def convert_handing_over() -> bytes:
            with _handing_over(loaded, path):
                return convert()

        converter.convert = convert_handing_over
        return converter

    count = sum(int(np.prod(v.shape)) for v in getattr(loaded, "variables", []))
    return LoadedSource(
        model.source.format, path_name, inputs, outputs, call, make_converter, count or None, [loaded, *(keep or [])]
    )


@contextlib.contextmanager
def _handing_over(loaded: Any, path: Path) -> Iterator[None]:
    """Besides its own C++ import, TFLiteConverter loads the SavedModel in Python twice: in
    `from_saved_model` for the signatures, in `convert()` for the debug info. The source has it
    loaded already (1.5 s a load for MobileNetV2 here); TF Lite's loader gets that object for
    this folder instead. The converted bytes are the same (tested)."""
    from tensorflow.lite.python import lite

    original = lite._load

    def load(directory: Any, tags: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and set(tags or ()) == {"serve"} and Path(directory) == path:
            return loaded
        return original(directory, tags, *args, **kwargs)

    lite._load = load
    try:
        yield
    finally:
        lite._load = original


def _from_keras(path: Path, model: ModelConfig, key: str) -> LoadedSource:
    tensorflow()  # before Keras, which imports it
    import keras

    try:
        keras_model = keras.models.load_model(str(path), compile=False, safe_mode=not model.source.trusted)
    except ValueError as exc:
        text = first_line(exc)
        if "safe_mode" in text or "Lambda" in text:
            raise InputError(
                f"refusing to deserialize code in an untrusted model ({text}); set {key}.trusted: true if you trust it",
                file=str(path),
                key=f"{key}.trusted",
            ) from None
        raise InputError(f"cannot load Keras model: {text}", file=str(path), key=f"{key}.path") from None
    except Exception as exc:  # not a zip, no model in the H5, ...
        raise InputError(f"cannot load Keras model: {first_line(exc)}", file=str(path), key=f"{key}.path") from None
    export_dir = tempfile.TemporaryDirectory(prefix="litert-keras-export-")
    saved_model = Path(export_dir.name) / "saved_model"
    call = _export_keras(keras_model, saved_model)
    # Keras exports its own signature: the model's `signature_key` applies to SavedModels only.
    source = _from_saved_model(saved_model, model, key, "keras_export_saved_model", keep=[export_dir, keras_model],
                               signature_key=SERVING)
    source.call = call  # reference outputs come from Keras itself, so an export fault shows in validation
    source.parameter_count = int(keras_model.count_params())
    return source


def _export_keras(keras_model: Any, folder: Path) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Export a serving signature with the model's input and output names; return the call it serves."""
    tf = tensorflow()  # before Keras, which imports it
    import keras

    inputs = getattr(keras_model, "inputs", None)
    output_names = list(getattr(keras_model, "output_names", None) or [])
    if not inputs or not output_names:  # a subclassed model: Keras' own export names what it can
        keras_model.export(str(folder), format="tf_saved_model", verbose=False)

        def call_unnamed(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            result = keras_model(*feed.values(), training=False)
            results = result if isinstance(result, (list, tuple)) else [result]
            return {f"output_{i}": np.asarray(r) for i, r in enumerate(results)}

        return call_unnamed
    input_names = [tensor.name for tensor in inputs]

    def serve(*tensors: Any) -> dict[str, Any]:
        # Keras maps a dict to its inputs by name, whatever structure the model was built with.
        result = keras_model(dict(zip(input_names, tensors)), training=False)
        if isinstance(result, dict):
            return {name: result[name] for name in output_names}
        results = result if isinstance(result, (list, tuple)) else [result]
        return dict(zip(output_names, results))

    archive = keras.export.ExportArchive()
    archive.track(keras_model)
    specs = [tf.TensorSpec(t.shape, t.dtype, name=name) for t, name in zip(inputs, input_names)]
    archive.add_endpoint(SERVING, serve, input_signature=specs)
    archive.write_out(str(folder), verbose=False)

    def call(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.asarray(value) for name, value in serve(*(feed[n] for n in input_names)).items()}

    return call


def resolve_factory(reference: str, *, trusted: bool, key: str, file: str = "params.yaml") -> Callable:
    """Import `module:function`, checked first (see config.check_function_reference)."""
    check_function_reference(reference, trusted=trusted, key=key, file=file)
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while it loads
        raise ConfigError(f"cannot import '{module_name}': {first_line(exc)}", file=file, key=key) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"'{module_name}' has no function '{function_name}'", file=file, key=key)
    return function


def _from_concrete_functions(path: Path, model: ModelConfig, key: str) -> LoadedSource:
    factory = resolve_factory(model.source.factory or "", trusted=model.source.trusted, key=f"{key}.factory")
    tf = tensorflow()  # after the reference is checked: a bad one fails without the 3 s import

    try:
        functions = factory(str(path), **model.source.factory_args)
    except TypeError as exc:  # the factory does not take these arguments
        raise ConfigError(f"factory call failed: {first_line(exc)}", file=PARAMS_FILE, key=f"{key}.factory_args") from None
    except Exception as exc:  # whatever the team's factory raises on a bad weights file
        message = f"factory failed: {type(exc).__name__}: {first_line(exc)}"
        raise InputError(message, file=str(path), key=f"{key}.factory") from None
    # (functions, trackable): the object owning the variables the functions capture.
    trackable = None
    if isinstance(functions, tuple) and len(functions) == 2 and isinstance(functions[1], tf.Module):
        functions, trackable = functions
    if not isinstance(functions, (list, tuple)) or not functions or not all(
        isinstance(f, tf.types.experimental.ConcreteFunction) for f in functions
    ):
        raise ConfigError(
            "the factory must return a non-empty list of concrete functions, or (that list, the tf.Module owning "
            "their variables)", file=str(path), key=f"{key}.factory"
        )
    # With a trackable object the converter writes a serving signature naming inputs and outputs;
    # functions whose weights are constants need no more than an empty module.
    trackable = trackable if trackable is not None else tf.Module()
    function = functions[0]
    inputs = [_tensor_info(s.name or f"input_{i}", s) for i, s in enumerate(function.structured_input_signature[0])]
    structured = function.structured_outputs
    if isinstance(structured, dict):
        outputs = [_tensor_info(n, s) for n, s in sorted(structured.items())]
    else:  # the names the converter gives a signature's unnamed outputs
        flat = tf.nest.flatten(structured)
        outputs = [_tensor_info(f"output_{i}", s) for i, s in enumerate(flat)]

    def call(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = function(*[tf.constant(feed[i.name]) for i in inputs])
        if isinstance(result, dict):
            return {n: t.numpy() for n, t in result.items()}
        return {o.name: t.numpy() for o, t in zip(outputs, tf.nest.flatten(result))}

    def make_converter() -> Any:
        return tf.lite.TFLiteConverter.from_concrete_functions(list(functions), trackable)

    count = sum(int(np.prod(v.shape)) for v in function.variables) or None
    return LoadedSource(model.source.format, "from_concrete_functions", inputs, outputs, call, make_converter, count)


