"""The prepare manifest: what the TFRecord shards of a prepare artifact hold, as one typed, frozen object.

Written by `prepare` (either runner) into `artifact.json` under `"manifest"`, read by every stage and
tool that needs the prepared data (train, evaluate, export, records, benchmark). This module is the only
place that knows the on-disk layout:

    format, root, targets, sample_rate, nb_channels, segment_samples, pcm, compression
    splits: {split: {tracks: [track entry], seconds, segments, energy, rms, shards: [{file, examples,
             bytes, sha256}]}}
    empty_splits, skipped: [{track, split, reason}], silent: [{track, split, target}], clipped_samples
    stats: {split: "train", energy, rms} of the training split, {} when it has no tracks

`energy` is the mean square per target (duration-weighted over a split), `rms` its square root.
`Manifest.from_dict(m).to_dict() == m` for every manifest written so far, so existing artifacts read
unchanged (the oldest ones lack a shard's `sha256`, kept absent, and `stats`, read as none).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from components.artifacts import META_FILE, Artifact
from models.base import Stats  # the typed training statistics model builders read
from configs.errors import StageError

REDO = "redo it with `python pipeline/run.py --stage prepare --force`"


class _Malformed(Exception):
    """A field missing or of the wrong type; turned into a StageError naming the file by `Manifest.parse`."""


def _take(raw: Mapping, key: str, kind, where: str):
    if not isinstance(raw, Mapping):
        raise _Malformed(f"{where} is a {type(raw).__name__}, not an object")
    if key not in raw:
        raise _Malformed(f"no '{where}.{key}'" if where else f"no '{key}'")
    value = raw[key]
    if kind is float:
        kind = (int, float)  # JSON writes a float that is whole (a sum of nothing) as an int
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Malformed(f"'{where + '.' if where else ''}{key}' is {value!r}")
    return value


def _figures(raw: Mapping, key: str, where: str) -> Dict[str, float]:
    """{target: float} (energy, rms, peak), key order kept."""
    values = _take(raw, key, dict, where)
    return {str(name): _take(values, name, float, f"{where}.{key}") for name in values}


@dataclass(frozen=True)
class Shard:
    """One TFRecord file of a split: its name in the artifact, examples (segments), size and checksum."""

    file: str
    examples: int
    bytes: int
    sha256: Optional[str] = None  # absent from manifests written before shards were hashed

    @classmethod
    def from_dict(cls, raw: Mapping, where: str = "shard") -> "Shard":
        sha256 = raw.get("sha256") if isinstance(raw, Mapping) else None
        return cls(file=_take(raw, "file", str, where), examples=_take(raw, "examples", int, where),
                   bytes=_take(raw, "bytes", int, where), sha256=sha256)

    def to_dict(self) -> dict:
        found = {"file": self.file, "examples": self.examples, "bytes": self.bytes}
        if self.sha256 is not None:
            found["sha256"] = self.sha256
        return found


@dataclass(frozen=True)
class TrackEntry:
    """One prepared track: length, segments, per-target statistics of its stems, where it came from."""

    name: str
    nb_timesteps: int
    seconds: float
    segments: int
    energy: Mapping[str, float]  # mean square per target
    rms: Mapping[str, float]
    peak: Mapping[str, float]  # max |x| per target
    silent: Tuple[str, ...]  # targets whose stem is silent
    clipped_samples: int  # samples clipped to the PCM range when encoded
    sources: Tuple[str, ...]  # the audio files read
    augmented_from: Optional[str] = None  # the training track a pitch/tempo-shifted copy was made from

    @classmethod
    def from_dict(cls, raw: Mapping, where: str = "track") -> "TrackEntry":
        augmented_from = raw.get("augmented_from") if isinstance(raw, Mapping) else None
        return cls(name=_take(raw, "name", str, where), nb_timesteps=_take(raw, "nb_timesteps", int, where),
                   seconds=_take(raw, "seconds", float, where), segments=_take(raw, "segments", int, where),
                   energy=_figures(raw, "energy", where), rms=_figures(raw, "rms", where),
                   peak=_figures(raw, "peak", where), silent=tuple(_take(raw, "silent", list, where)),
                   clipped_samples=_take(raw, "clipped_samples", int, where),
                   sources=tuple(_take(raw, "sources", list, where)), augmented_from=augmented_from)

    def to_dict(self) -> dict:
        found = {"name": self.name, "nb_timesteps": self.nb_timesteps, "seconds": self.seconds,
                 "segments": self.segments, "energy": dict(self.energy), "rms": dict(self.rms),
                 "peak": dict(self.peak), "silent": list(self.silent), "clipped_samples": self.clipped_samples,
                 "sources": list(self.sources)}
        if self.augmented_from is not None:
            found["augmented_from"] = self.augmented_from
        return found


@dataclass(frozen=True)
class Split:
    """The tracks of one split, their totals and the shards holding their segments (in track-list order)."""

    tracks: Tuple[TrackEntry, ...]
    seconds: float
    segments: int
    energy: Mapping[str, float]  # duration-weighted mean square per target over the split
    rms: Mapping[str, float]
    shards: Tuple[Shard, ...]

    @classmethod
    def from_dict(cls, raw: Mapping, where: str) -> "Split":
        tracks = _take(raw, "tracks", list, where)
        shards = _take(raw, "shards", list, where)
        return cls(tracks=tuple(TrackEntry.from_dict(t, f"{where}.tracks[{i}]") for i, t in enumerate(tracks)),
                   seconds=_take(raw, "seconds", float, where), segments=_take(raw, "segments", int, where),
                   energy=_figures(raw, "energy", where), rms=_figures(raw, "rms", where),
                   shards=tuple(Shard.from_dict(s, f"{where}.shards[{i}]") for i, s in enumerate(shards)))

    def to_dict(self) -> dict:
        return {"tracks": [t.to_dict() for t in self.tracks], "seconds": self.seconds, "segments": self.segments,
                "energy": dict(self.energy), "rms": dict(self.rms), "shards": [s.to_dict() for s in self.shards]}

    @property
    def names(self) -> List[str]:
        return [track.name for track in self.tracks]

    @property
    def nb_examples(self) -> int:
        return sum(shard.examples for shard in self.shards)

    def shards_holding(self, name: str) -> List[str]:
        """Files of the shards holding track `name`: both runners write a split's segments in track-list
        order, so its segments are examples [first, first + segments) of the concatenated shards."""
        first = 0
        for track in self.tracks:
            if track.name == name:
                break
            first += track.segments
        else:
            raise KeyError(name)
        last = first + track.segments
        files, start = [], 0
        for shard in self.shards:
            end = start + shard.examples
            if start < last and end > first:
                files.append(shard.file)
            start = end
        return files


@dataclass(frozen=True)
class Skipped:
    """A track that failed validation and was left out (`data.skip_bad_tracks`)."""

    track: str
    split: str
    reason: str


@dataclass(frozen=True)
class SilentStem:
    track: str
    split: str
    target: str


_PARSED: Dict[Tuple[str, str], "Manifest"] = {}  # (artifact folder, fingerprint) -> its parsed manifest


@dataclass(frozen=True)
class Manifest:
    """Everything a stage needs to know about the prepared data, without opening a shard."""

    format: str  # data.format the tracks were read as
    root: Optional[str]  # data.root (None: the default data)
    targets: Tuple[str, ...]
    sample_rate: int
    nb_channels: int
    segment_samples: int  # timesteps per TFRecord example (the last one of a track is zero-padded)
    pcm: str  # int16 | float16 | float32
    compression: str  # "" | GZIP | ZLIB
    splits: Mapping[str, Split]
    empty_splits: Tuple[str, ...] = ()
    skipped: Tuple[Skipped, ...] = ()
    silent: Tuple[SilentStem, ...] = ()
    clipped_samples: int = 0
    stats: Optional[Stats] = None  # None when the training split is empty (or the manifest predates stats)

    # -- reading ---------------------------------------------------------------------------------------
    @classmethod
    def read(cls, source: Union[Artifact, str, Path]) -> "Manifest":
        """The manifest of a prepare artifact: an Artifact, its directory, or its artifact.json.

        A committed artifact never changes under its fingerprint, so its manifest is parsed once per process and
        the same (frozen) object handed to every reader: a stage's data, statistics, validation and evaluation
        code all see one manifest."""
        if isinstance(source, Artifact):
            key = (str(Path(source.path).resolve()), source.meta.get("fingerprint"))
            if key[1] is None:
                return cls.parse(source.meta, source.path / META_FILE)
            if key not in _PARSED:
                if len(_PARSED) >= 8:
                    _PARSED.pop(next(iter(_PARSED)))
                _PARSED[key] = cls.parse(source.meta, source.path / META_FILE)
            return _PARSED[key]
        path = Path(source)
        meta_path = path if path.name == META_FILE else path / META_FILE
        if not meta_path.is_file():
            raise StageError(f"{path}: no {META_FILE}; run `python pipeline/run.py --stage prepare` first")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StageError(f"{meta_path}: unreadable ({error.__class__.__name__}); {REDO}") from None
        return cls.parse(meta, meta_path)

    @classmethod
    def parse(cls, meta: Mapping, where: Union[str, Path]) -> "Manifest":
        """The manifest inside an artifact's meta (read from `where`, named in errors)."""
        if not isinstance(meta, Mapping) or "manifest" not in meta:
            raise StageError(f"{Path(where).parent}: not a prepare artifact (no manifest); run --stage prepare")
        try:
            return cls.from_dict(meta["manifest"])
        except _Malformed as error:
            raise StageError(f"{where}: damaged or older prepare manifest ({error}); {REDO}") from None

    @classmethod
    def from_dict(cls, raw: Mapping) -> "Manifest":
        """The typed manifest of the JSON object written under "manifest"; _Malformed when it is not one."""
        splits = _take(raw, "splits", dict, "")
        stats = raw.get("stats")
        return cls(
            format=_take(raw, "format", str, ""), root=raw.get("root"),
            targets=tuple(_take(raw, "targets", list, "")), sample_rate=_take(raw, "sample_rate", int, ""),
            nb_channels=_take(raw, "nb_channels", int, ""), segment_samples=_take(raw, "segment_samples", int, ""),
            pcm=_take(raw, "pcm", str, ""), compression=_take(raw, "compression", str, ""),
            splits={str(name): Split.from_dict(entry, f"splits.{name}") for name, entry in splits.items()},
            empty_splits=tuple(_take(raw, "empty_splits", list, "")),
            skipped=tuple(Skipped(track=_take(s, "track", str, "skipped"), split=_take(s, "split", str, "skipped"),
                                  reason=_take(s, "reason", str, "skipped")) for s in _take(raw, "skipped", list, "")),
            silent=tuple(SilentStem(track=_take(s, "track", str, "silent"), split=_take(s, "split", str, "silent"),
                                    target=_take(s, "target", str, "silent")) for s in _take(raw, "silent", list, "")),
            clipped_samples=_take(raw, "clipped_samples", int, ""),
            stats=(Stats(split=_take(stats, "split", str, "stats"), energy=_figures(stats, "energy", "stats"),
                         rms=_figures(stats, "rms", "stats")) if stats else None),
        )

    # -- writing ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON object stored under "manifest" in the prepare artifact's artifact.json."""
        found = {"format": self.format, "root": self.root, "targets": list(self.targets),
                 "sample_rate": self.sample_rate, "nb_channels": self.nb_channels,
                 "segment_samples": self.segment_samples, "pcm": self.pcm, "compression": self.compression,
                 "splits": {name: split.to_dict() for name, split in self.splits.items()},
                 "empty_splits": list(self.empty_splits),
                 "skipped": [{"track": s.track, "split": s.split, "reason": s.reason} for s in self.skipped],
                 "silent": [{"track": s.track, "split": s.split, "target": s.target} for s in self.silent],
                 "clipped_samples": self.clipped_samples, "stats": self.stats_dict()}
        return found

    # -- questions stages ask ----------------------------------------------------------------------------
    def split(self, name: str, where: Union[str, Path] = "the prepare artifact") -> Split:
        """The split `name`; StageError naming the prepared ones when it was not prepared."""
        if name not in self.splits:
            raise StageError(f"{where}: split '{name}' was not prepared (prepared: {', '.join(self.splits)}); "
                             f"add it to data.splits and rerun prepare")
        return self.splits[name]

    def nb_tracks(self, name: str) -> int:
        """Tracks of split `name`, 0 when it was not prepared."""
        return len(self.splits[name].tracks) if name in self.splits else 0

    def first_split_with_tracks(self, names: Iterable[str]) -> Optional[str]:
        return next((name for name in names if self.nb_tracks(name)), None)

    @property
    def shard_digests(self) -> Dict[str, str]:
        """{file: sha256} of every shard hashed when written."""
        return {shard.file: shard.sha256 for split in self.splits.values() for shard in split.shards
                if shard.sha256}

    def stats_dict(self) -> Dict[str, Any]:
        """`stats` as model builders take it (`{"split", "energy": {target: mean square}, "rms"}`, or {})."""
        return self.stats.to_dict() if self.stats is not None else {}
