"""Artifacts: a directory plus `artifact.json` saying what it is, what made it and its key figures.

A stage writes into a hidden staging directory beside its final place and renames it into
`artifacts_dir/<stage>/` only after `artifact.json` is written, so a killed or failed stage never
leaves anything a later stage could mistake for complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

META_FILE = "artifact.json"
SCHEMA_VERSION = 1


class StageError(RuntimeError):
    """A user-caused failure of a stage (bad data, missing input); its message says what and how to fix."""


@dataclass(frozen=True)
class Artifact:
    stage: str
    path: Path
    meta: Mapping[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def figures(self) -> Mapping[str, Any]:
        return self.meta.get("figures", {})

    def file(self, relative: str) -> Path:
        return self.path / relative


def fingerprint(payload: Any) -> str:
    """A stable hash of a JSON-able payload (config sections, input fingerprints, file stats)."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load(artifacts_dir: Path, stage: str) -> Optional[Artifact]:
    """The complete artifact of `stage`, or None when there is none."""
    path = Path(artifacts_dir) / stage
    meta_path = path / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    if not meta.get("complete"):
        return None
    return Artifact(stage=stage, path=path, meta=meta)


def require(artifacts_dir: Path, stage: str, needed_by: str) -> Artifact:
    artifact = load(artifacts_dir, stage)
    if artifact is None:
        raise StageError(
            f"stage '{needed_by}' needs the '{stage}' artifact in {Path(artifacts_dir) / stage}; "
            f"run `python pipeline/run.py --stage {stage}` first (same artifacts_dir)"
        )
    return artifact


def versions() -> dict:
    from importlib import metadata

    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("numpy", "tensorflow", "keras", "musdb", "museval", "sacred", "soundfile", "scipy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@contextlib.contextmanager
def staging(artifacts_dir: Path, stage: str) -> Iterator[Path]:
    """Yield an empty staging directory; on success the caller calls `commit`. On error it vanishes."""
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    tmp = artifacts_dir / f".{stage}.staging-{os.getpid()}-{int(time.time() * 1000)}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def commit(artifacts_dir: Path, stage: str, staging_dir: Path, meta: Mapping[str, Any]) -> Artifact:
    """Write `artifact.json` into the staging dir, then swap it into place atomically (rename)."""
    artifacts_dir = Path(artifacts_dir)
    meta = dict(meta, stage=stage, complete=True, schema=SCHEMA_VERSION,
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), versions=versions())
    tmp_meta = staging_dir / (META_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    os.replace(tmp_meta, staging_dir / META_FILE)
    final = artifacts_dir / stage
    trash = None
    if final.exists():
        trash = artifacts_dir / f".{stage}.old-{os.getpid()}-{int(time.time() * 1000)}"
        os.replace(final, trash)
    os.replace(staging_dir, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return Artifact(stage=stage, path=final, meta=meta)


def clean_stale(artifacts_dir: Path) -> list:
    """Remove staging/trash directories that a killed run left behind; returns what was removed."""
    removed = []
    artifacts_dir = Path(artifacts_dir)
    if not artifacts_dir.is_dir():
        return removed
    for entry in artifacts_dir.iterdir():
        if entry.name.startswith(".") and (".staging-" in entry.name or ".old-" in entry.name):
            pid = entry.name.rsplit("-", 2)[-2]
            if pid.isdigit() and process_alive(int(pid)) and int(pid) != os.getpid():
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (a staging dir's owner may still be writing)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
