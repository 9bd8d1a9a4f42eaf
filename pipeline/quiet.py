"""A quiet first run: TensorFlow's start-up chatter on CPU-only machines, kept away from newcomers.

TensorFlow 2.21 logs through absl before absl is initialised, so `TF_CPP_MIN_LOG_LEVEL` does not reach
its oneDNN / CUDA-stub / CPU-feature lines, nor the `cuInit` error a CPU machine gets when the devices
are first listed. `import_tensorflow` imports TensorFlow and lists the devices with the process's stderr
(file descriptor 2) captured, then writes back every line that is not one of those known notices, so
real warnings and errors still show. Keras' `shuffle=True ... tf.data.Dataset` notice (our datasets
are shuffled by tf.data on purpose) and Sacred's `pkg_resources` deprecation notice are filtered by message.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings

# Notices that say nothing a user must act on (the GPU lines only on machines without CUDA).
NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|cuda_executor\.cc:\d+\] .*(kernel driver does not appear to be running|could not open file to read NUMA)"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
)


def filter_lines(text: str) -> str:
    """`text` without the lines matching NOISE."""
    return "".join(line for line in text.splitlines(keepends=True) if not NOISE.search(line))


@contextlib.contextmanager
def filtered_stderr():
    """Capture file descriptor 2 (C++ and Python writes alike) and replay it minus the NOISE lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = filter_lines(captured.read().decode(errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def quiet_keras_notices() -> None:
    """Keras' shuffle notice, and Sacred's import of the deprecated `pkg_resources` (setuptools >= 81 warns
    on it; nothing a user of this project can act on)."""
    warnings.filterwarnings("ignore", message=r"`shuffle=True` was passed, but will be ignored", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated as an API", category=UserWarning)


def import_tensorflow():
    """TensorFlow, imported (and its devices listed) without the CPU-machine start-up notices."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet_keras_notices()
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with filtered_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()  # where a CPU-only machine logs the failed cuInit
    return tf
