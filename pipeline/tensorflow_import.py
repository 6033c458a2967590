"""TensorFlow, imported without the packages its import pulls in for features the pipeline
never uses: scikit-learn (and SciPy) for Keras's scikit-learn wrappers, matplotlib for Keras's
image gallery plot, IPython for Keras's saved-file editor, JAX for TF Lite's
`experimental_from_jax` (JAX sources arrive as jax2tf SavedModels). Each is imported there
under `try: ... except ImportError`. Together they took 1.7 s of TensorFlow's 4.4 s import
here (`python -X importtime`), in every process converting a model. They stay importable
afterwards: a concrete-function factory may import them itself."""

from __future__ import annotations

import sys
from types import ModuleType

UNUSED_BY_ITS_IMPORT = ("sklearn", "matplotlib", "IPython", "jax")


def tensorflow() -> ModuleType:
    """`import tensorflow`, the first time without UNUSED_BY_ITS_IMPORT (Keras too: TensorFlow
    imports it)."""
    if "tensorflow" not in sys.modules:
        blocked = [name for name in UNUSED_BY_ITS_IMPORT if name not in sys.modules]
        for name in blocked:
            sys.modules[name] = None  # Python's own way to make `import name` raise ImportError
        try:
            import tensorflow  # noqa: F401
        finally:
            for name in blocked:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]
    import tensorflow

    return tensorflow
