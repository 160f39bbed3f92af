"""TensorFlow's devices, reported the same way by every stage, and TensorFlow's C++ log kept quiet.

On a CPU-only machine TensorFlow prints lines such as ``E0000 ... failed call to cuInit: ...
(303)`` and ``I0000 ... oneDNN custom operations are on`` that read like failures. They come
from C++ (some written before its logging is even set up), so they are silenced where they
start: ``TF_CPP_MIN_LOG_LEVEL`` must be set before TensorFlow's import, and the import itself
runs with file descriptor 2 pointed at /dev/null. :func:`quiet_tensorflow` does both; it runs
from ``worldmodels/__init__.py``, which every entry point imports before TensorFlow.
``--verbose`` on the command line or ``WORLDMODELS_VERBOSE=1`` brings every line back.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

VERBOSE_ENV = "WORLDMODELS_VERBOSE"
VERBOSE_FLAG = "--verbose"


def wants_tensorflow_logs(argv: list[str] | None = None, environ=None) -> bool:
    """True when the user asked for TensorFlow's log: ``--verbose`` or ``$WORLDMODELS_VERBOSE`` (not 0)."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    return VERBOSE_FLAG in argv or environ.get(VERBOSE_ENV, "") not in ("", "0")


class _MutedLoader(importlib.abc.Loader):
    """Runs the real loader of ``tensorflow`` with stderr (the file descriptor, as C++ uses it) sent to /dev/null."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            self.loader.exec_module(module)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _MuteTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, like the normal finders, but with :class:`_MutedLoader` as its loader."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import only, and no recursion into ourselves just below
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _MutedLoader(spec.loader)
        return spec


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ log unless asked for (module docstring); a user's ``TF_CPP_MIN_LOG_LEVEL`` below 2 wins."""
    if wants_tensorflow_logs():
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return
    if os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3") not in ("2", "3"):
        return
    if "tensorflow" not in sys.modules and not any(isinstance(f, _MuteTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _MuteTensorFlowImport())


def describe_devices() -> str:
    """E.g. ``devices: GPU x1 (/physical_device:GPU:0), CPU`` or ``devices: CPU only (no GPU visible)``."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "devices: CPU only (no GPU visible to TensorFlow)"
    return f"devices: GPU x{len(gpus)} ({', '.join(g.name for g in gpus)}), CPU"
