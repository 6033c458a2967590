"""litert-pipeline: config-driven conversion of TensorFlow models to validated LiteRT models."""

__version__ = "0.1.0"

import os as _os

# TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notes) buries our one-line errors.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import warnings as _warnings

# LiteRT Quantizer's calibration keeps all tensors on purpose; its warning says so every run.
_warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
