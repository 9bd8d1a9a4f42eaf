"""Artifacts: a directory plus `artifact.json` saying what it is, what made it and its key figures.

A stage writes into a hidden staging directory beside its final place and renames it into
`artifacts_dir/<stage>/` only after `artifact.json` is written, so a killed or failed stage never
leaves anything a later stage could mistake for complete. `commit` records every file's size and
sha256 in `artifact.json` ("files"); `load` treats an artifact whose files are missing or changed in
size as incomplete, and `verify` re-hashes them. One run at a time owns an artifacts directory
(`exclusive`, an flock on `artifacts_dir/.lock`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import socket
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from configs.errors import LockedError, StageError

META_FILE = "artifact.json"
LOCK_FILE = ".lock"
SCHEMA_VERSION = 1


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
    """The complete artifact of `stage`, or None when there is none (or its files are damaged)."""
    return load_checked(artifacts_dir, stage)[0]


def load_checked(artifacts_dir: Path, stage: str):
    """(artifact or None, why it is not usable or None)."""
    path = Path(artifacts_dir) / stage
    meta_path = path / META_FILE
    if not meta_path.is_file():
        return None, None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None, f"{meta_path} is not valid JSON"
    if not meta.get("complete"):
        return None, None
    problem = damaged(path, meta)
    if problem:
        return None, problem
    return Artifact(stage=stage, path=path, meta=meta), None


def require(artifacts_dir: Path, stage: str, needed_by: str) -> Artifact:
    artifact, problem = load_checked(artifacts_dir, stage)
    if artifact is None and problem:
        raise StageError(f"stage '{needed_by}' needs the '{stage}' artifact but {problem}; redo it with "
                         f"`python pipeline/run.py --stage {stage} --force` (same artifacts_dir)")
    if artifact is None:
        raise StageError(
            f"stage '{needed_by}' needs the '{stage}' artifact in {Path(artifacts_dir) / stage}; "
            f"run `python pipeline/run.py --stage {stage}` first (same artifacts_dir)"
        )
    return artifact


def inventory(folder: Path, known: Optional[Mapping[str, str]] = None) -> dict:
    """{relative path: {"bytes", "sha256"}} of every file under `folder` except artifact.json; `known` gives
    digests already computed (e.g. TFRecord shards hashed while they were written)."""
    folder, known = Path(folder), known or {}
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(folder).as_posix()
        if relative in (META_FILE, META_FILE + ".tmp"):
            continue
        files[relative] = {"bytes": path.stat().st_size, "sha256": known.get(relative) or file_digest(path)}
    return files


def damaged(path: Path, meta: Mapping[str, Any]) -> Optional[str]:
    """Why the files listed in `meta["files"]` do not match the folder (missing, other size), or None.
    Cheap: sizes only; `verify` compares the sha256 too. Artifacts without a listing pass."""
    for relative, entry in (meta.get("files") or {}).items():
        file = Path(path) / relative
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{file} has {size} bytes, {entry['bytes']} when it was written (truncated or replaced)"
    return None


def verify(artifact: Artifact, relatives=None) -> None:
    """StageError naming the first listed file (all, or those in `relatives`) whose size or sha256 differs."""
    listed = artifact.meta.get("files") or {}
    problem = damaged(artifact.path, {"files": {r: e for r, e in listed.items()
                                                if relatives is None or r in relatives}})
    for relative in (listed if relatives is None else [r for r in relatives if r in listed]):
        if problem:
            break
        if file_digest(artifact.file(relative)) != listed[relative]["sha256"]:
            problem = f"{artifact.file(relative)} has changed since it was written (sha256 differs)"
    if problem:
        raise StageError(f"{problem}; redo the {artifact.stage} stage with "
                         f"`python pipeline/run.py --stage {artifact.stage} --force`")


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
    except Exception as error:
        problem = disk_problem(tmp)  # measured now, before the partial output is removed
        if problem is None:
            raise
        raise StageError(f"stage {stage}: cannot write {artifacts_dir} ({problem}; {type(error).__name__}); free "
                         "some space or choose another artifacts_dir (the stage left nothing behind)") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def disk_problem(path: Path) -> Optional[str]:
    """"read-only file system" or "the disk is full" for the file system of `path`, else None. libsndfile,
    HDF5 and TensorFlow report a failed write in their own words (often "System error"): this names it."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return "read-only file system"
    free = stats.f_bavail * stats.f_frsize
    if free < (1 << 20):
        return f"the disk is full, {free // 1024} KB free"
    return None


def commit(artifacts_dir: Path, stage: str, staging_dir: Path, meta: Mapping[str, Any],
           known_digests: Optional[Mapping[str, str]] = None) -> Artifact:
    """List the staged files (sizes, sha256) in `artifact.json`, then swap the directory into place (rename)."""
    artifacts_dir = Path(artifacts_dir)
    meta = dict(meta, stage=stage, complete=True, schema=SCHEMA_VERSION,
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), versions=versions(),
                files=inventory(staging_dir, known_digests))
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


# --------------------------------------------------------------------------------------------
# One run per artifacts directory
# --------------------------------------------------------------------------------------------

_held: dict = {}  # resolved artifacts dir -> [open lock file, depth]: re-entrant within a process


@contextlib.contextmanager
def exclusive(artifacts_dir: Path) -> Iterator[None]:
    """Hold `artifacts_dir/.lock` (fcntl.flock, released by the kernel when the process dies) for the block.

    Another holder is an immediate LockedError naming its pid, host and start time: two runs would
    share staging and `.train-work` directories. Re-entrant within one process. flock is local to a host;
    on network file systems that do not forward it, runs on different hosts are not excluded."""
    artifacts_dir = Path(artifacts_dir)
    try:
        artifacts_dir.mkdir(parents=True, exist_ok=True)
        key = str(artifacts_dir.resolve())
        handle = None if key in _held else open(artifacts_dir / LOCK_FILE, "a+")
    except OSError as error:
        reason = "exists and is not a directory" if artifacts_dir.is_file() else (error.strerror or str(error))
        raise StageError(f"artifacts_dir {artifacts_dir}: {reason[:1].lower() + reason[1:]}; choose another "
                         "artifacts_dir") from None
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        try:
            found = json.loads(holder)
            who = f"pid {found['pid']} on host {found['host']}, started {found['started']}"
        except (ValueError, KeyError, TypeError):
            who = "a process that has not written its details yet"
        raise LockedError(f"another run ({who}) holds {artifacts_dir}; wait for it to finish or use another "
                          "artifacts_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
    handle.flush()
    _held[key] = [handle, 1]
    try:
        yield
    finally:
        del _held[key]
        handle.seek(0)
        handle.truncate()  # an unlocked, empty .lock: nobody holds the directory
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
