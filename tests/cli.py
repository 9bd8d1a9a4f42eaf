"""The driver as the tests run it: `python pipeline/run.py ...` in a subprocess from the project root."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "pipeline" / "run.py")]


def cli(*args, check=True, timeout=900, **kwargs):
    """Run `pipeline/run.py *args`; with `check`, a non-zero exit fails with the end of stderr."""
    result = subprocess.run([*RUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
