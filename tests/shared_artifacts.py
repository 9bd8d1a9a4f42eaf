"""Artifacts built once per test session and shared by the test files that only read them (tests/conftest.py).

A test that changes an artifact works on a copy (`copy_stages`), never on the shared folder: the session
fixture checks at its teardown that every shared artifact still verifies (sizes and sha256 of its files).
"""
from __future__ import annotations

import shutil
from pathlib import Path

# what an artifacts directory holds besides the stage folders: the generated data set (prepare reads it
# again when it checks its fingerprint) and the evaluate stage's cached MIX/IRM baselines
DATA = "default-data"
BASELINES = "evaluate-baselines"


def copy_stages(source: Path, destination: Path, *names: str) -> Path:
    """Copy the folders `names` (stages, `DATA`, `BASELINES`) of artifacts directory `source` into
    `destination` (created), as a fresh run there would have written them; returns `destination`."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (Path(source) / name).exists():
            shutil.copytree(Path(source) / name, destination / name)
    return destination


def seed_data(source: Path, destination: Path) -> Path:
    """`destination` with `source`'s prepared unittest data and cached baselines: a `--stage all` there skips
    prepare (same fingerprint) and scores only the model, not the MIX/IRM baselines again."""
    return copy_stages(source, destination, "prepare", DATA, BASELINES)
