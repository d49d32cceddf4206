"""Compiled Cython kernels (built from csrc/). Private: use the wrappers in fastlm."""
import importlib

_REBUILD_HINT = (
    "fastlm's compiled kernels are missing or broken ({error}). They are built from csrc/*.pyx "
    "at install time: run `pip install -e .` (or `make build`) in the fastlm checkout, "
    "with a C compiler available."
)


def load(name):
    """Import fastlm._kernels.<name>, or explain how to rebuild it."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as error:
        raise ImportError(_REBUILD_HINT.format(error=error)) from error
