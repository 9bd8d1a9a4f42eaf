"""Data set readers: every `data.format` becomes a list of `TrackRef`s, each loading one validated track.

Formats
    musdb     MUSDB18 stem mp4, decoded by one ffmpeg run per track (the `musdb` package's official
              train/valid split of `train`, from its own setup file)
    musdb-hq  MUSDB18-HQ wav folders (same split), read with soundfile
    folder    `<root>/<split>/<track>/<target>.wav|flac` for any `data.targets`; `mixture.*` is ignored
    default   the synthesizer of `components/synth.py`, generated once into `data.root` or
              `<artifacts_dir>/default-data/`, then read like `musdb-hq`

The mixture is never read: the pipeline rebuilds it as the sum of the targets, so for the MUSDB
layouts the targets must cover the four sources exactly once (`accompaniment` = drums+bass+other).
"""
from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Tuple

import numpy as np

from components.data import audio, synth
from configs.config import MUSDB_TARGETS as MUSDB_SOURCES  # the four stems a MUSDB track stores
from configs.errors import StageError

log = logging.getLogger("pipeline")

# what each MUSDB target is made of (musdb's own `setup["targets"]`, minus linear_mixture)
MUSDB_TARGETS = {"vocals": ("vocals",), "drums": ("drums",), "bass": ("bass",), "other": ("other",),
                 "accompaniment": ("drums", "bass", "other")}
# MUSDB's three splits: (subset, musdb split)
MUSDB_SPLITS = {"train": ("train", "train"), "valid": ("train", "valid"), "test": ("test", None)}


@dataclass(frozen=True)
class Track:
    """One validated track: stems `{target: float32 (nb_timesteps, nb_channels)}` of equal length."""

    name: str
    split: str
    stems: Dict[str, np.ndarray]
    paths: Tuple[str, ...]
    silent: Tuple[str, ...] = ()

    @property
    def nb_timesteps(self) -> int:
        return int(next(iter(self.stems.values())).shape[0])


@dataclass(frozen=True)
class TrackRef:
    """A track found on disk, not yet read: `load()` reads and validates it (StageError when bad)."""

    name: str
    split: str
    paths: Tuple[str, ...]
    loader: Callable[[], Dict[str, np.ndarray]] = field(repr=False, compare=False)

    def load(self) -> Track:
        stems = self.loader()
        by_target = {target: next((p for p in self.paths if Path(p).stem == target), self.paths[0])
                     for target in stems} if self.paths else {}
        stems, silent = audio.check_track(self.name, stems, by_target)
        return Track(name=self.name, split=self.split, stems=stems, paths=self.paths, silent=tuple(silent))


def default_root(data, artifacts_dir) -> Path:
    return Path(data.root) if data.root else Path(artifacts_dir) / "default-data"


def find_tracks(data, artifacts_dir, logger=None) -> Dict[str, List[TrackRef]]:
    """{split: [TrackRef]} for every split in `data.splits` (empty lists for absent splits).

    Raises StageError when the root holds no track at all, or a MUSDB layout cannot rebuild the mixture.
    """
    if data.format == "default":
        root = synth.ensure(default_root(data, artifacts_dir), synth.params_of(data), logger=logger)
        _check_musdb_targets(data)
        found = {split: _folder_split(root, split, data, musdb_layout=True) for split in data.splits}
    elif data.format == "folder":
        root = _existing_root(data)
        found = {split: _folder_split(root, split, data, musdb_layout=False) for split in data.splits}
    else:
        root = _existing_root(data)
        _check_musdb_targets(data)
        found = {split: _musdb_split(root, split, data) for split in data.splits}
    if not any(found.values()):
        layout = ("<root>/<split>/<track>.stem.mp4" if data.format == "musdb" else
                  "<root>/<split>/<track>/<target>.wav|flac")
        raise StageError(f"{root}: no tracks for splits {', '.join(data.splits)} (data.format={data.format}); "
                         f"expected {layout} with targets {', '.join(data.targets)}")
    return found


def input_payload(config) -> dict:
    """A cheap fingerprint of the outside inputs of `prepare`: source files (size, mtime) or synth parameters."""
    data = config.data
    if data.format == "default":
        return {"synth": synth.params_of(data), "root": data.root}
    root = Path(data.root)
    if not root.is_dir():
        return {"root": str(root), "missing": True}
    files = []
    for split in data.splits:
        folder = root / _subset_of(data.format, split)
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in (".mp4", ".wav", ".flac"):
                stat = path.stat()
                files.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
    return {"root": str(root.resolve()), "files": files}


def check_inputs(config) -> None:
    """A data set named by `data.root` must be a folder (the synthesizer makes its own)."""
    if config.data.format != "default":
        _existing_root(config.data)


def _subset_of(data_format: str, split: str) -> str:
    return MUSDB_SPLITS[split][0] if data_format in ("musdb", "musdb-hq") and split in MUSDB_SPLITS else split


def _existing_root(data) -> Path:
    root = Path(data.root)
    if not root.is_dir():
        raise StageError(f"{root}: data.root does not exist or is not a directory; "
                         f"set data.root to the {data.format} data set")
    return root


def _check_musdb_targets(data) -> None:
    unknown = [t for t in data.targets if t not in MUSDB_TARGETS]
    if unknown:
        raise StageError(f"data.targets has {', '.join(unknown)}, not a MUSDB target; choose from "
                         f"{', '.join(MUSDB_TARGETS)} for data.format={data.format}, or use data.format=folder")
    covered = [s for t in data.targets for s in MUSDB_TARGETS[t]]
    if sorted(covered) != sorted(MUSDB_SOURCES):
        raise StageError(f"data.targets={list(data.targets)} must cover {', '.join(MUSDB_SOURCES)} exactly once "
                         f"(the mixture is rebuilt as their sum); e.g. [vocals, accompaniment]")


def _mix_sources(sources: Mapping[str, np.ndarray], targets) -> Dict[str, np.ndarray]:
    stems = {}
    for target in targets:
        parts = [sources[name] for name in MUSDB_TARGETS[target]]
        stems[target] = parts[0] if len(parts) == 1 else np.sum(parts, axis=0, dtype=np.float32)
    return stems


def _folder_split(root: Path, split: str, data, musdb_layout: bool) -> List[TrackRef]:
    folder = root / split
    if not folder.is_dir():
        return []
    names = MUSDB_SOURCES if musdb_layout else tuple(data.targets)
    refs = []
    for track_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = {}
        for name in names:
            candidates = [track_dir / f"{name}{suffix}" for suffix in audio.AUDIO_SUFFIXES]
            present = [c for c in candidates if c.is_file()]
            files[name] = present[0] if present else candidates[0]
        if not any(path.is_file() for path in files.values()):
            continue  # not a track folder
        refs.append(TrackRef(name=track_dir.name, split=split, paths=tuple(str(p) for p in files.values()),
                             loader=_folder_loader(files, data, musdb_layout)))
    return refs


def _folder_loader(files: Mapping[str, Path], data, musdb_layout: bool):
    # a partial of a module-level function: picklable, so a track loads in a worker process or a Beam worker
    return functools.partial(_load_folder, dict(files), data, musdb_layout)


def _load_folder(files: Mapping[str, Path], data, musdb_layout: bool) -> Dict[str, np.ndarray]:
    sources = {}
    for name, path in files.items():
        if not path.is_file():
            raise StageError(f"{path}: missing stem '{name}' (.wav or .flac); add it, or remove '{name}' "
                             f"from data.targets")
        sources[name] = audio.read_audio(path, sample_rate=data.sample_rate, nb_channels=data.nb_channels)
    if musdb_layout:
        _check_lengths(sources, files)
        return _mix_sources(sources, data.targets)
    return sources


def _check_lengths(sources, files) -> None:
    """Stems must agree before they are summed into targets (check_track only sees the targets)."""
    lengths = {name: len(a) for name, a in sources.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name}={n}" for name, n in lengths.items())
        folder = Path(next(iter(files.values()))).parent
        raise StageError(f"{folder}: stems differ in length (samples: {described}); trim or pad them to one length")


def _musdb_split(root: Path, split: str, data) -> List[TrackRef]:
    """MUSDB18 (stem mp4) or MUSDB18-HQ (wav folders) tracks of one split, listed the way `musdb.DB` lists them
    (sorted names, its validation tracks held out of `train`) without probing every file with ffprobe."""
    if split not in MUSDB_SPLITS:
        raise StageError(f"data.splits has '{split}', not a MUSDB split; use {', '.join(MUSDB_SPLITS)}")
    subset, musdb_split = MUSDB_SPLITS[split]
    folder = root / subset
    if not folder.is_dir():
        return []
    validation = set(musdb_setup()["validation_tracks"])
    if data.format == "musdb-hq":
        names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    else:
        names = sorted(p.name[: -len(".stem.mp4")] for p in folder.iterdir()
                       if p.name.endswith(".stem.mp4") and p.is_file())
    if musdb_split == "train":
        names = [n for n in names if n not in validation]
    elif musdb_split == "valid":
        names = [n for n in names if n in validation]
    refs = []
    for name in names:
        if data.format == "musdb-hq":
            files = {source: folder / name / f"{source}.wav" for source in MUSDB_SOURCES}
            refs.append(TrackRef(name=name, split=split, paths=tuple(str(p) for p in files.values()),
                                 loader=_folder_loader(files, data, musdb_layout=True)))
        else:
            path = str(folder / f"{name}.stem.mp4")
            refs.append(TrackRef(name=name, split=split, paths=(path,),
                                 loader=functools.partial(_load_stem_mp4, path, data)))
    return refs


@functools.lru_cache(maxsize=1)
def musdb_setup() -> dict:
    """musdb's own `configs/mus.yaml` (stem ids, validation tracks), read without importing musdb."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("musdb")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("the musdb package is not installed; pip install musdb (needed for data.format=musdb*)")
    with open(Path(spec.submodule_search_locations[0]) / "configs" / "mus.yaml") as handle:
        return yaml.safe_load(handle)


_STREAM = re.compile(r"Stream #0:(\d+)[^:]*: Audio: .*?(\d+) Hz, (\w+)")


def decode_stem_mp4(path: str) -> Tuple[Dict[str, np.ndarray], int]:
    """The four MUSDB sources of a Native Instruments stem mp4 in one ffmpeg run.

    One process decodes streams 1..4 (drums, bass, other, vocals; the mixture stream 0 is never read),
    joined by `amerge` into one interleaved 8-channel s16 stream: the same samples as musdb/stempeg, which
    runs ffprobe twice and one ffmpeg per stream (~5x the process start-ups, the bulk of the time on short
    tracks). Returns ({source: float64 (nb_timesteps, nb_channels)}, sample rate).
    """
    stem_ids = musdb_setup()["stem_ids"]
    order = sorted(MUSDB_SOURCES, key=lambda name: stem_ids[name])
    inputs = "".join(f"[0:{stem_ids[name]}]" for name in order)
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "info", "-i", path, "-filter_complex",
               f"{inputs}amerge=inputs={len(order)}[merged]", "-map", "[merged]", "-f", "s16le",
               "-acodec", "pcm_s16le", "pipe:1"]
    try:
        result = subprocess.run(command, capture_output=True, check=False)
    except FileNotFoundError:
        raise StageError(f"{path}: ffmpeg is not on PATH; install ffmpeg (apt-get install ffmpeg) to read "
                         f"MUSDB18 stem mp4 files") from None
    streams = {int(index): (int(rate), layout)
               for index, rate, layout in _STREAM.findall(result.stderr.decode(errors="replace"))}
    if result.returncode != 0 or not result.stdout:
        if streams and len(streams) < 5:
            raise StageError(f"{path}: {len(streams)} audio streams, a MUSDB stem file has 5 (mixture, drums, "
                             f"bass, other, vocals); use the official MUSDB18 files")
        tail = " ".join(result.stderr.decode(errors="replace").split()[-30:])[-200:] or "no output"
        raise StageError(f"{path}: cannot decode the stem mp4 ({tail}); check ffmpeg on PATH "
                         f"or re-download the file")
    found = {streams.get(stem_ids[name]) for name in order}
    if len(found) != 1 or None in found or next(iter(found))[1] != "stereo":
        raise StageError(f"{path}: the stem streams are not all stereo at one sample rate "
                         f"({sorted(streams.items())}); use the official MUSDB18 files")
    rate = next(iter(found))[0]
    merged = np.frombuffer(result.stdout, dtype="<i2")
    merged = merged[: merged.size - merged.size % (2 * len(order))].reshape(-1, 2 * len(order))
    sources = {name: merged[:, 2 * index: 2 * index + 2] / 32768.0 for index, name in enumerate(order)}
    return sources, rate


def _load_stem_mp4(path: str, data) -> Dict[str, np.ndarray]:
    """A Native Instruments stem mp4: one ffmpeg decode of the source streams, then the same checks as wav."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise StageError(f"{path}: missing or empty stem file; re-download it or set data.skip_bad_tracks=true")
    decoded, rate = decode_stem_mp4(path)
    sources = {name: audio.conform(decoded[name], rate, f"{path}[{name}]", sample_rate=data.sample_rate,
                                   nb_channels=data.nb_channels) for name in MUSDB_SOURCES}
    return _mix_sources(sources, data.targets)
