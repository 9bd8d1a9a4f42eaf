"""Released models by name: the catalogue shipped in the package, downloads, checks and the cache.

    from components.inference import catalogue
    entry = catalogue.entry("umxhq")              # CatalogueError (one line) for an unknown name
    folder = catalogue.fetch(entry)               # the released files, downloaded once, checked, cached

The catalogue is `catalogue.json` beside this module: `{"default": name, "models": [entry, ...]}` (`default`:
the model `separate` uses when given none); an entry has `name`,
`family` (a model.name), `files` (`[{"url", "sha256"}]`: full hex, or the prefix the authors publish, or
null when they publish none), `import` (import.* options), `sample_rate`, `targets`, `license`, `source`,
`reported` and, for a release without a stable URL, `manual` (where to get the file by hand).
`MUSICSEP_CATALOG=<file.json>` adds or replaces entries; `MUSICSEP_MIRROR=<prefix>` fetches every file from
`<prefix>/<file name>` (checksums still apply). The cache is `$MUSICSEP_CACHE`, else
`$XDG_CACHE_HOME/music-separation`, else `~/.cache/music-separation`; an entry's files live in
`<cache>/<name>/files/`. A download goes to `<file>.part` (resumed with an HTTP range when the server
allows it), is renamed only after its checksum matches, and runs under a lock file (`<cache>/<name>/locks/`) so two
processes download it once. Where no checksum is published the first download's sha256 is recorded
(`<cache>/<name>/trusted.json`), printed, and a later, different file is refused.
"""
from __future__ import annotations

import difflib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from configs.errors import UserError

CATALOGUE_FILE = Path(__file__).with_name("catalogue.json")
ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")
_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_CHUNK = 1 << 20


class CatalogueError(UserError, RuntimeError):
    """A fault a user can fix (unknown name, bad catalogue, failed or refused download): one line."""


@dataclass(frozen=True)
class ReleasedFile:
    url: Optional[str]  # None only in a `manual` entry (no stable direct link)
    sha256: Optional[str]  # full hex, or the published prefix; None: trust on first use
    file_name: Optional[str] = None  # a `manual` entry's file name; else the URL's last part

    @property
    def name(self) -> str:
        if self.file_name:
            return self.file_name
        return urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1])

    @property
    def archive(self) -> bool:
        return self.name.endswith(ARCHIVES)


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    files: Tuple[ReleasedFile, ...]
    import_options: Mapping[str, Any] = field(default_factory=dict)
    sample_rate: Optional[int] = None
    targets: Tuple[str, ...] = ()
    license: str = ""
    source: str = ""
    reported: Mapping[str, Any] = field(default_factory=dict)
    manual: Optional[str] = None
    origin: str = ""  # the catalogue file it came from

    def reported_sdr(self) -> Optional[float]:
        value = self.reported.get("sdr") if isinstance(self.reported, Mapping) else None
        return float(value) if isinstance(value, (int, float)) else None


def _entry(raw: Any, origin: str, index: int) -> Entry:
    where = f"catalogue {origin}: entry {index}"
    if not isinstance(raw, dict):
        raise CatalogueError(f"{where}: is not an object")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise CatalogueError(f"{where}: field 'name' must be a string of letters, digits, '.', '_', '-'")
    where = f"catalogue {origin}: entry '{name}'"
    known = {"name", "family", "files", "import", "sample_rate", "targets", "license", "source", "reported",
             "manual", "size"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CatalogueError(f"{where}: unknown field '{unknown[0]}'; the fields are {', '.join(sorted(known))}")
    family = raw.get("family")
    if not isinstance(family, str) or not family:
        raise CatalogueError(f"{where}: field 'family' must name a model family (a model.name)")
    files_raw = raw.get("files")
    if not isinstance(files_raw, list) or not files_raw:
        raise CatalogueError(f"{where}: field 'files' must be a non-empty list of {{\"url\", \"sha256\"}}")
    manual = raw.get("manual")
    if manual is not None and not isinstance(manual, str):
        raise CatalogueError(f"{where}: field 'manual' must be a string saying where to get the files")
    files = []
    for number, item in enumerate(files_raw):
        if not isinstance(item, dict):
            raise CatalogueError(f"{where}: field 'files[{number}]' must be an object {{\"url\", \"sha256\"}}")
        url, file_name = item.get("url"), item.get("name")
        if manual and url is None:
            if not isinstance(file_name, str) or not file_name or "/" in file_name:
                raise CatalogueError(f"{where}: field 'files[{number}].name' must be a file name (manual entry)")
        else:
            if not isinstance(url, str):
                raise CatalogueError(f"{where}: field 'files[{number}].url' must be a string")
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc or not parts.path.rsplit("/", 1)[-1]:
                raise CatalogueError(f"{where}: field 'files[{number}].url' {url!r} is not an http(s) URL of a file")
            file_name = None
        digest = item.get("sha256")
        if digest is not None and (not isinstance(digest, str) or not _HEX.match(digest.lower())):
            raise CatalogueError(f"{where}: field 'files[{number}].sha256' must be 8 to 64 hex digits or null")
        files.append(ReleasedFile(url, digest.lower() if digest else None, file_name))
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise CatalogueError(f"{where}: field 'files' names one file name twice")
    options = raw.get("import", {})
    if not isinstance(options, dict):
        raise CatalogueError(f"{where}: field 'import' must be an object of import.* options")
    rate = raw.get("sample_rate")
    if rate is not None and (not isinstance(rate, int) or rate <= 0):
        raise CatalogueError(f"{where}: field 'sample_rate' must be a positive integer")
    targets = raw.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CatalogueError(f"{where}: field 'targets' must be a list of names")
    reported = raw.get("reported", {})
    if not isinstance(reported, dict):
        raise CatalogueError(f"{where}: field 'reported' must be an object")
    return Entry(name=name, family=family, files=tuple(files), import_options=dict(options), sample_rate=rate,
                 targets=tuple(targets), license=str(raw.get("license", "")), source=str(raw.get("source", "")),
                 reported=reported, manual=manual, origin=origin)


def read_catalogue(path: Path) -> Dict[str, Entry]:
    """The entries of one catalogue file, checked (CatalogueError names the entry and field)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogueError(f"catalogue {path} does not exist; fix MUSICSEP_CATALOG") from None
    except (OSError, ValueError) as error:
        raise CatalogueError(f"catalogue {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CatalogueError(f"catalogue {path}: field 'models' must be a list of entries")
    entries: Dict[str, Entry] = {}
    for index, raw in enumerate(data["models"]):
        item = _entry(raw, str(path), index)
        if item.name in entries:
            raise CatalogueError(f"catalogue {path}: entry '{item.name}' is listed twice")
        entries[item.name] = item
    return entries


def catalogue(environ: Optional[Mapping[str, str]] = None) -> Dict[str, Entry]:
    """The shipped entries, with `MUSICSEP_CATALOG`'s added or replacing them."""
    environ = os.environ if environ is None else environ
    entries = read_catalogue(CATALOGUE_FILE)
    extra = environ.get("MUSICSEP_CATALOG")
    if extra:
        entries.update(read_catalogue(Path(extra)))
    return entries


def default_name(environ: Optional[Mapping[str, str]] = None) -> str:
    """The model `separate` uses when it is given none: the catalogue's `default` (`MUSICSEP_CATALOG`'s own
    `default`, when it has one, replaces the shipped one)."""
    environ = os.environ if environ is None else environ
    name = None
    for path in (CATALOGUE_FILE, environ.get("MUSICSEP_CATALOG")):
        if path:
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # reported by catalogue() below, with the reason
            if isinstance(data, dict) and data.get("default") is not None:
                name = data["default"]
                if not isinstance(name, str):
                    raise CatalogueError(f"catalogue {path}: field 'default' must be a model name")
    if name is None:
        raise CatalogueError("the catalogue names no default model; give one with -n NAME (separate --list-models)")
    entry(name, environ)  # a default that is not an entry is an invalid catalogue, said now
    return name


def entry(name: str, environ: Optional[Mapping[str, str]] = None) -> Entry:
    entries = catalogue(environ)
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(entries))}"
        raise CatalogueError(f"no released model named '{name}'; {hint} (separate --list-models lists them)")
    return entries[name]


def cache_root(environ: Optional[Mapping[str, str]] = None) -> Path:
    environ = os.environ if environ is None else environ
    if environ.get("MUSICSEP_CACHE"):
        return Path(environ["MUSICSEP_CACHE"]).expanduser()
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]).expanduser() / "music-separation"
    return Path.home() / ".cache" / "music-separation"


def files_dir(item: Entry, environ: Optional[Mapping[str, str]] = None) -> Path:
    return cache_root(environ) / item.name / "files"


def source_url(released: ReleasedFile, environ: Optional[Mapping[str, str]] = None) -> str:
    environ = os.environ if environ is None else environ
    mirror = environ.get("MUSICSEP_MIRROR")
    if mirror:
        return f"{mirror.rstrip('/')}/{urllib.parse.quote(released.name)}"
    return released.url


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a lock file in the cache), held by one process at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Progress:
    """A one-line progress bar on stderr (nothing when stderr is not a terminal and quiet is asked)."""

    def __init__(self, label: str, total: Optional[int], done: int, enabled: bool):
        self.label, self.total, self.done, self.enabled = label, total, done, enabled
        self._last = -1

    def update(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        if self.total:
            percent = int(100 * self.done / self.total)
            if percent == self._last:
                return
            self._last = percent
            bar = "#" * (percent // 4)
            sys.stderr.write(f"\r{self.label} [{bar:<25}] {percent:3d}% of {self.total / 1e6:.1f} MB")
        else:
            sys.stderr.write(f"\r{self.label} {self.done / 1e6:.1f} MB")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _download(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Append to `part` from where it stops (HTTP range) or restart it when the server sends it whole."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "music-separation"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # honours http(s)_proxy / no_proxy
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the part is already whole
            return
        raise
    with response:
        resumed = have and response.status == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length and length.isdigit() else None
        bar = _Progress(f"downloading {part.name[:-5]}", total, have if resumed else 0, progress)
        try:
            with open(part, "ab" if resumed else "wb") as stream:
                while True:
                    block = response.read(_CHUNK)
                    if not block:
                        break
                    stream.write(block)
                    bar.update(len(block))
        finally:
            bar.close()
        if total is not None and bar.done < total:
            raise ConnectionError(f"connection closed after {bar.done} of {total} bytes")


def _trusted(folder: Path) -> Dict[str, str]:
    path = folder.parent / "trusted.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _trust(folder: Path, name: str, digest: str) -> None:
    path = folder.parent / "trusted.json"
    record = _trusted(folder)
    record[name] = digest
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(temporary, path)


def _check(released: ReleasedFile, path: Path, folder: Path, url: str) -> str:
    """The file's sha256 when it matches the catalogue (or the hash trusted on first use); else CatalogueError."""
    digest = sha256_of(path)
    expected = released.sha256 or _trusted(folder).get(released.name)
    if expected and not digest.startswith(expected):
        raise CatalogueError(f"download {url}: sha256 {digest} does not match the expected {expected}; "
                             "the file was not kept")
    return digest


def _unpack(archive: Path, folder: Path) -> None:
    """Unpack `archive` into `folder` (members that would leave it are refused)."""
    unpacked = folder / (archive.name + ".unpacked")
    staging = folder / (archive.name + ".unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    root = staging.resolve()
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.namelist()
            if any(not (root / m).resolve().is_relative_to(root) for m in members):
                raise CatalogueError(f"archive {archive} holds a path outside its folder; it was not unpacked")
            bundle.extractall(staging)
    else:
        with tarfile.open(archive) as bundle:
            for member in bundle.getmembers():
                if not (root / member.name).resolve().is_relative_to(root) or member.issym() or member.islnk():
                    raise CatalogueError(f"archive {archive} holds a link or a path outside its folder; "
                                         "it was not unpacked")
            bundle.extractall(staging)
    shutil.rmtree(unpacked, ignore_errors=True)
    os.replace(staging, unpacked)


def released_path(item: Entry, environ: Optional[Mapping[str, str]] = None) -> Path:
    """What `import.path` is for the entry once fetched: the files folder, or the one unpacked archive."""
    folder = files_dir(item, environ)
    if len(item.files) == 1 and item.files[0].archive:
        return folder / (item.files[0].name + ".unpacked")
    return folder


def is_cached(item: Entry, environ: Optional[Mapping[str, str]] = None) -> bool:
    folder = files_dir(item, environ)
    return all((folder / f.name).is_file() and (not f.archive or (folder / (f.name + ".unpacked")).is_dir())
               for f in item.files)


def fetch(item: Entry, *, environ: Optional[Mapping[str, str]] = None, progress: Optional[bool] = None,
          timeout: float = 60.0) -> Path:
    """The entry's released files in the cache (downloaded, checked and unpacked once); the import path.

    Raises CatalogueError (one line) when a file cannot be had: the host unreachable (names the URL and where
    to put the file by hand), a checksum mismatch (both hashes; the file is not kept), a dropped connection
    (the `.part` stays and the next call resumes it), a full disk, a `manual` entry not yet in place."""
    environ = os.environ if environ is None else environ
    progress = sys.stderr.isatty() if progress is None else progress
    folder = files_dir(item, environ)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CatalogueError(f"cache {folder} cannot be created ({error.strerror}); set MUSICSEP_CACHE") from None
    for released in item.files:
        target = folder / released.name
        if item.manual and not target.is_file():
            raise CatalogueError(f"model '{item.name}' is not downloadable: get {released.name} by hand "
                                 f"({item.manual}) and put it at {target}")
        with locked(folder.parent / "locks" / f"{released.name}.lock"):
            if target.is_file():
                if released.archive and not (folder / (released.name + ".unpacked")).is_dir():
                    _unpack(target, folder)
                continue
            url = source_url(released, environ)
            part = folder / f"{released.name}.part"
            try:
                _download(url, part, progress, timeout)
                digest = _check(released, part, folder, url)
            except CatalogueError:
                part.unlink(missing_ok=True)
                raise
            except urllib.error.HTTPError as error:
                part.unlink(missing_ok=True)
                raise CatalogueError(f"download {url} failed (HTTP {error.code} {error.reason}); get {released.name} "
                                     f"by hand and put it at {target}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                    part.unlink(missing_ok=True)
                    raise CatalogueError(f"cache {folder}: disk full while writing {released.name}; free space "
                                         "or set MUSICSEP_CACHE to another disk") from None
                reason = getattr(error, "reason", None) or error
                raise CatalogueError(f"download {url} failed ({reason}); run again to resume it, or get "
                                     f"{released.name} by hand and put it at {target}") from None
            if not released.sha256 and released.name not in _trusted(folder):
                _trust(folder, released.name, digest)
                print(f"{released.name}: no published checksum; recorded sha256 {digest} (a later, different "
                      "file will be refused)", file=sys.stderr)
            os.replace(part, target)
            if released.archive:
                _unpack(target, folder)
    return released_path(item, environ)


def table(environ: Optional[Mapping[str, str]] = None) -> List[Dict[str, Any]]:
    """One row per entry: name, family, targets, rate, size, authors' SDR, license, cached."""
    rows = []
    for item in catalogue(environ).values():
        rows.append({"name": item.name, "family": item.family, "targets": ",".join(item.targets),
                     "rate": item.sample_rate, "sdr": item.reported_sdr(), "license": item.license,
                     "cached": is_cached(item, environ), "manual": bool(item.manual)})
    return rows


def import_updates(name: str, updates: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None,
                   progress: Optional[bool] = None) -> Dict[str, Any]:
    """The config `updates` for `--stage import with import.name=<entry>`: the entry fetched (downloaded once,
    checked, cached), `import.path` at its files, `model.name` its family and its `import.*` options. A
    conflicting `import.path`, `model.name` or import option given beside it is a one-line error."""
    from configs.config import deep_merge

    item = entry(name, environ)
    given_import = dict(updates.get("import", {}) or {})
    given_model = (updates.get("model", {}) or {}).get("name")
    if given_import.get("path"):
        raise CatalogueError(f"import.name={name} and import.path={given_import['path']} both given; drop one")
    if given_model not in (None, item.family):
        raise CatalogueError(f"import.name={name} is a model.name={item.family} release but model.name={given_model} "
                             "was given; drop model.name")
    for key, value in item.import_options.items():
        if key in given_import and given_import[key] != value:
            raise CatalogueError(f"import.{key}={given_import[key]} on the command line but the catalogue's '{name}' "
                                 f"has {value}; drop import.{key}")
    path = fetch(item, environ=environ, progress=progress)
    return deep_merge(dict(updates), {"model": {"name": item.family},
                                      "import": {**item.import_options, "path": str(path)}})


def converted_dir(item: Entry, environ: Optional[Mapping[str, str]] = None) -> Path:
    """Where the entry's converted model (an artifacts directory: train + export) is cached, keyed by the entry's
    name and its files' checksums (published, else trusted on first use): new files convert anew."""
    folder = files_dir(item, environ)
    trusted = _trusted(folder)
    key = json.dumps([item.name, item.family, dict(item.import_options),
                      [[f.name, f.sha256 or trusted.get(f.name)] for f in item.files]], sort_keys=True)
    return cache_root(environ) / item.name / "converted" / hashlib.sha256(key.encode()).hexdigest()[:16]
