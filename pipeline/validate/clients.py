"""Whether a real client reads the delivered metadata as the pipeline means it.

MediaPipe's ImageClassifier feeds a classifier 8-bit RGB pixels, normalized by the model's
TFLITE_METADATA (`(pixel - mean) / std`). The check gives it raw pixels made from the
evaluation samples and requires its top-1 class to be the pipeline's own on the same pixels,
normalized as the config says, and its scores to match the pipeline's (a top-1 that differs by
less than the two runtimes' outputs differ anyway counts as agreeing). Optional: without MediaPipe (the `clients` extra) the check is
skipped, with the reason, as it is for models the client cannot take.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np

from pipeline.validate.runner import ModelRunner

CLIENT_SAMPLES = 16
# The client's scores must match the pipeline's on every image at least this closely.
MIN_SCORE_COSINE = 0.95


@contextlib.contextmanager
def _lean_mediapipe_import() -> Iterator[None]:
    """MediaPipe Tasks' import pulls in two packages the check never uses, held off while it loads:
    - TensorFlow, when installed, for its documentation decorators only (its
      tasks/python/core/optional_dependencies.py falls back without it): 8.7 s of a 12.9 s
      MobileNetV2 validate stage, profiled. Shown absent (a None entry in sys.modules makes the
      import raise ModuleNotFoundError).
    - matplotlib.pyplot, imported unconditionally by its landmark-drawing helpers
      (tasks/python/vision/drawing_utils.py): 0.8 s of MediaPipe's 1.05 s import here. An empty
      stand-in meanwhile; only those helpers, never called here, would touch it.
    Both entries go afterwards: a later import gets the real package."""
    held: dict[str, ModuleType | None] = {}
    if "tensorflow" not in sys.modules:  # else already paid for
        held["tensorflow"] = None
    if "matplotlib" not in sys.modules:
        stand_in = ModuleType("matplotlib")
        stand_in.__path__ = []  # a package, so that `import matplotlib.pyplot` looks in sys.modules
        stand_in.pyplot = held["matplotlib.pyplot"] = ModuleType("matplotlib.pyplot")  # type: ignore[attr-defined]
        held["matplotlib"] = stand_in
    sys.modules.update(held)  # type: ignore[arg-type]
    try:
        yield
    finally:
        for name, module in held.items():
            if name in sys.modules and sys.modules[name] is module:
                del sys.modules[name]


def _mediapipe_classifier() -> tuple[Any, Any, Any, Any]:
    """mediapipe, BaseOptions, ImageClassifier, ImageClassifierOptions."""
    import mediapipe
    from mediapipe.tasks.python import BaseOptions
    from mediapipe.tasks.python.vision import ImageClassifier, ImageClassifierOptions

    return mediapipe, BaseOptions, ImageClassifier, ImageClassifierOptions


def _import_mediapipe() -> tuple[Any, Any, Any, Any]:
    try:
        with _lean_mediapipe_import():
            return _mediapipe_classifier()
    except ImportError:
        if importlib.util.find_spec("mediapipe") is None:
            raise
        return _mediapipe_classifier()  # a MediaPipe version that needs what the lean import holds off


def image_classifier_check(model: bytes, runner: ModelRunner, inputs: dict[str, np.ndarray], metadata: Any,
                           num_outputs: int) -> dict[str, Any]:
    """MediaPipe ImageClassifier's top-1 against the pipeline's on raw 8-bit versions of the
    first evaluation samples: {"status": "passed"|"failed"|"skipped", ...}."""
    reason = _cannot_take(runner, metadata, num_outputs)
    if reason:
        return {"client": "mediapipe ImageClassifier", "status": "skipped", "reason": reason}
    try:
        mediapipe, BaseOptions, ImageClassifier, ImageClassifierOptions = _import_mediapipe()
    except ImportError:
        return {"client": "mediapipe ImageClassifier", "status": "skipped",
                "reason": "MediaPipe is not installed (pip install '.[clients]')"}
    entry = metadata.inputs[0]
    mean = np.asarray(entry.mean or [0.0], np.float32)
    std = np.asarray(entry.std or [1.0], np.float32)
    (name, values), = inputs.items()
    raw = np.clip(np.round(values[:CLIENT_SAMPLES] * std + mean), 0, 255).astype(np.uint8)
    ours = [next(iter(runner({name: ((pixels[None].astype(np.float32) - mean) / std)}).values()))[0].astype(np.float64)
            for pixels in raw]
    with tempfile.TemporaryDirectory(prefix="litert-client-") as folder:
        path = Path(folder) / "model.tflite"
        path.write_bytes(model)
        options = ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=-1)
        classifier = ImageClassifier.create_from_options(options)
        try:
            results = [classifier.classify(mediapipe.Image(image_format=mediapipe.ImageFormat.SRGB,
                                                           data=np.ascontiguousarray(pixels))).classifications[0]
                       for pixels in raw]
        finally:
            classifier.close()
    theirs = []
    for scores, result in zip(ours, results):
        vector = np.zeros_like(scores, dtype=np.float64)
        for category in result.categories:
            vector[category.index] = category.score
        theirs.append(vector)
    cosines = [_cosine(a, b) for a, b in zip(ours, theirs)]
    # Two runtimes' kernels differ (for quantized models noticeably): a top-1 that differs by
    # less than the two outputs differ anyway is theirs, not the metadata's. Misread metadata
    # shows as scores that do not match: the cosine.
    agree = [int(np.argmax(a)) == int(np.argmax(b)) or a[int(np.argmax(b))] >= a.max() - np.max(np.abs(a - b))
             for a, b in zip(ours, theirs)]
    same = sum(int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(ours, theirs))
    passed = all(agree) and min(cosines) >= MIN_SCORE_COSINE
    return {"client": f"mediapipe ImageClassifier {_version('mediapipe')}", "status": "passed" if passed else "failed",
            "samples": len(raw), "top1_agreement": sum(agree) / len(raw), "same_top1": same,
            "min_score_cosine": round(min(cosines), 6)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norms) if norms else 0.0


def _cannot_take(runner: ModelRunner, metadata: Any, num_outputs: int) -> str | None:
    """Why MediaPipe's ImageClassifier cannot take this model, or None."""
    if len(runner.input_details) != 1 or num_outputs != 1:
        return "the image classifier takes one image input and one output"
    if not metadata.inputs or metadata.inputs[0].content.value != "image":
        return "the input is not described as an image"
    if metadata.inputs[0].color_space.value != "RGB":
        return f"{metadata.inputs[0].color_space.value} input: the client feeds RGB images"
    (detail,) = runner.input_details.values()
    if np.dtype(detail["dtype"]) != np.float32:
        return "integer input: the client feeds raw pixels, without the metadata's normalization"
    return None


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
