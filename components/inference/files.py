"""Songs in, stem files out: reading any audio file (soundfile, or ffmpeg for mp4/aac), `separate_file` with
chunked separation, a progress bar, and stems written beside as `.part` files and renamed together."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from configs.errors import SeparateError, StageError

class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt (by the command line's handler) so that the same cleanup runs."""


class Cancelled(BaseException):
    """Raised inside a separation running in a worker thread when the command was interrupted (`cancel` set):
    the same cleanup as an interruption, in that thread."""


FFMPEG_SUFFIXES = (".mp4", ".m4a", ".aac", ".webm", ".opus")
# what a folder or glob input picks up: soundfile's formats and ffmpeg's
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf", ".w64",
                  ".rf64") + FFMPEG_SUFFIXES
DEFAULT_FILENAME = "{track}/{stem}.{ext}"
FORMATS = ("wav", "flac", "mp3")
# bit depth -> soundfile subtype; 32 is float. None: the format's default (wav float, flac 24-bit)
SUBTYPES = {"wav": {None: "FLOAT", 16: "PCM_16", 24: "PCM_24", 32: "FLOAT"}, "flac": {None: "PCM_24", 16: "PCM_16",
                                                                                   24: "PCM_24"}}
MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)  # kbit/s, MPEG-1 layer III


@dataclass(frozen=True)
class StemOutput:
    """How stems are written: `fmt` wav | flac | mp3, `bit_depth` 16 | 24 | 32 (32 = float; wav and flac, default
    wav float and flac 24-bit), `mp3_bitrate` kbit/s (mp3 through ffmpeg's LAME), and the `filename` template,
    relative to the output folder, with `{track}`, `{stem}` and `{ext}` (default `{track}/{stem}.{ext}`).
    A value that cannot work is a SeparateError on construction."""

    fmt: str = "wav"
    bit_depth: Optional[int] = None
    mp3_bitrate: int = 320
    filename: str = DEFAULT_FILENAME

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise SeparateError(f"--format {self.fmt}: one of {', '.join(FORMATS)}")
        if self.fmt == "mp3":
            if self.bit_depth is not None:
                raise SeparateError(f"--bit-depth {self.bit_depth} with --format mp3: an mp3 has no bit depth; "
                                    "choose its quality with --mp3-bitrate")
            if self.mp3_bitrate not in MP3_BITRATES:
                raise SeparateError(f"--mp3-bitrate {self.mp3_bitrate}: one of {', '.join(map(str, MP3_BITRATES))} "
                                    "kbit/s")
        elif self.bit_depth not in SUBTYPES[self.fmt]:
            depths = ", ".join(str(d) for d in SUBTYPES[self.fmt] if d)
            raise SeparateError(f"--bit-depth {self.bit_depth}: {self.fmt} takes {depths}"
                                + (" (FLAC has no float samples; use --format wav for 32-bit float)"
                                   if self.fmt == "flac" else ""))
        try:
            fields = [field for _, field, spec, _ in string.Formatter().parse(self.filename) if field is not None]
        except ValueError as error:
            raise SeparateError(f"--filename {self.filename}: {error}; e.g. {DEFAULT_FILENAME}") from None
        unknown = sorted(set(fields) - {"track", "stem", "ext"})
        if unknown:
            raise SeparateError(f"--filename {self.filename}: unknown field {{{unknown[0]}}}; use {{track}}, {{stem}} "
                                f"and {{ext}}, e.g. {DEFAULT_FILENAME}")
        if "stem" not in fields:
            raise SeparateError(f"--filename {self.filename}: needs {{stem}}, or every stem goes to one file; e.g. "
                                f"{DEFAULT_FILENAME}")
        if self.filename.startswith("/") or ".." in Path(self.filename).parts:
            raise SeparateError(f"--filename {self.filename}: must stay inside the output folder (no leading / or "
                                f"..); e.g. {DEFAULT_FILENAME}")

    @property
    def subtype(self) -> Optional[str]:
        return SUBTYPES[self.fmt][self.bit_depth] if self.fmt != "mp3" else None

    def paths(self, out: Path, track: str, stems) -> Dict[str, Path]:
        """{stem: the file it is written to} for the track named `track` (a name from `track_name`)."""
        files = {}
        for stem in stems:
            relative = self.filename.format(track=track, stem=safe_name(stem), ext=self.fmt)
            files[stem] = Path(out) / Path(*[safe_name(part) for part in Path(relative).parts])
        return files


def stem_plan(targets: Sequence[str], stems: Optional[Sequence[str]] = None,
              two_stems: Optional[str] = None) -> Dict[str, Tuple[str, ...]]:
    """{output stem: the model targets whose estimates it sums}. Every target by default; `stems` keeps only those;
    `two_stems=t` gives `t` and `no_<t>`, the sum of every other target's estimate (the model's own estimate of
    the rest, as demucs's --two-stems; for a vocals/accompaniment model, the accompaniment)."""
    targets = list(targets)
    known = ", ".join(targets)
    if stems is not None and two_stems is not None:
        raise SeparateError(f"--stems {','.join(stems)} and --two-stems {two_stems} both given; choose one")
    if two_stems is not None:
        if two_stems not in targets:
            raise SeparateError(f"--two-stems {two_stems}: the model has no stem '{two_stems}'; its stems: {known}")
        rest = tuple(t for t in targets if t != two_stems)
        if not rest:
            raise SeparateError(f"--two-stems {two_stems}: the model has only this stem, there is no rest")
        return {two_stems: (two_stems,), f"no_{two_stems}": rest}
    if stems is not None:
        stems = [s.strip() for s in stems if s.strip()]
        if not stems:
            raise SeparateError(f"--stems: name at least one of {known}")
        unknown = [s for s in stems if s not in targets]
        if unknown:
            raise SeparateError(f"--stems {','.join(stems)}: the model has no stem '{unknown[0]}'; its stems: {known}")
        return {s: (s,) for s in dict.fromkeys(stems)}
    return {t: (t,) for t in targets}


def combine(plan: Mapping[str, Tuple[str, ...]], blocks: Mapping[str, object]) -> Dict[str, object]:
    """The output stems of `plan` from the model's per-target blocks."""
    combined = {}
    for stem, sources in plan.items():
        block = blocks[sources[0]]
        for source in sources[1:]:
            block = block + blocks[source]
        combined[stem] = block
    return combined


def track_name(path: Path, root: Optional[Path] = None) -> str:
    """The `{track}` of an input: its file name without extension (and `.stem`), or, for a file found in the
    folder `root`, its path inside that folder (`album/01 song`), so a folder's tree is mirrored."""
    path = Path(path)
    parts = list(path.relative_to(root).parts) if root is not None else [path.name]
    parts[-1] = Path(parts[-1]).stem.removesuffix(".stem") if Path(parts[-1]).suffix else parts[-1]
    return "/".join(safe_name(part) for part in parts)


def expand_inputs(names: Sequence[str]) -> List[Tuple[str, Optional[Path]]]:
    """The files the command line's inputs name, in order, as (file, folder it was found in or None): a folder
    gives every audio file under it (recursively, sorted), a glob pattern (`*.mp3`, `**/*.wav`) its audio files;
    anything else is kept as given (a missing file is reported when it is read). A folder or pattern without
    audio files is a SeparateError."""
    found: List[Tuple[str, Optional[Path]]] = []
    for name in names:
        path = Path(name)
        if name != "-" and path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
                           and not p.name.startswith("."))
            if not files:
                raise SeparateError(f"{name}: is a directory without audio files ({', '.join(AUDIO_SUFFIXES)}) in it "
                                    "or below")
            found += [(str(p), path) for p in files]
        elif name != "-" and not path.exists() and glob.has_magic(name):
            files = sorted(p for p in map(Path, glob.glob(name, recursive=True))
                           if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not files:
                raise SeparateError(f"{name}: no audio file matches this pattern")
            found += [(str(p), None) for p in files]
        else:
            found.append((name, None))
    return found
LAZY_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "FLAC", "AIFF", "CAF")  # soundfile formats FileMixture reads lazily


def read_any(path: Path):
    """(float32 `(nb_timesteps, nb_channels)`, sample rate) from soundfile, or ffmpeg for mp4/aac/m4a."""
    import numpy as np
    import soundfile

    if path.is_dir():
        raise SeparateError(f"{path}: is a directory; give the audio files in it (e.g. {path}/*.wav)")
    if not path.is_file():
        raise SeparateError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise SeparateError(f"{path}: empty file")
    if path.suffix.lower() not in FFMPEG_SUFFIXES:
        try:
            declared = soundfile.info(str(path))
            audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
            if audio.shape[0] == 0:
                raise SeparateError(f"{path}: no audio samples")
            warn_if_truncated(path, audio.shape[0] / rate, declared.frames / declared.samplerate)
            return audio, rate
        except SeparateError:
            raise
        except Exception:
            pass  # fall through to ffmpeg, which decodes more formats
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        raise SeparateError(f"{path}: cannot decode without ffmpeg/ffprobe; install ffmpeg (apt-get install ffmpeg)")
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                            "stream=sample_rate,channels,duration", "-of", "json", str(path)], capture_output=True,
                           text=True)
    streams = json.loads(probe.stdout or "{}").get("streams") if probe.returncode == 0 else None
    if not streams:
        raise SeparateError(f"{path}: not a decodable audio file")
    rate, channels = int(streams[0]["sample_rate"]), int(streams[0]["channels"])
    decoded = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-map", "0:a:0", "-f", "f32le",
                              "-acodec", "pcm_f32le", "-"], capture_output=True)
    if decoded.returncode != 0 or not decoded.stdout:
        reason = decoded.stderr.decode(errors="replace").strip().splitlines()
        raise SeparateError(f"{path}: ffmpeg could not decode it ({reason[-1] if reason else 'no audio'})")
    audio = np.frombuffer(decoded.stdout, dtype=np.float32).reshape(-1, channels)
    try:
        warn_if_truncated(path, audio.shape[0] / rate, float(streams[0]["duration"]))
    except (KeyError, TypeError, ValueError):
        pass  # no declared duration (raw AAC, some webm): nothing to compare
    return audio, rate


def warn_if_truncated(path: Path, decoded: float, declared: float) -> None:
    """A file that decodes shorter than its header declares (cut off in a download or a copy) separates into
    stems that are shorter too: say so, with both durations."""
    if declared - decoded > max(0.1, 0.01 * declared):
        print(f"warning: {path}: decoded {decoded:.2f} s of the {declared:.2f} s its header declares (truncated?); "
              f"the stems are {decoded:.2f} s long", file=sys.stderr)


class FileMixture:
    """A sound file at the model's rate as `iter_separate`'s mixture, decoded forward as the chunks ask for it:
    a 10-minute stereo song is never whole in memory (212 MB of float32 at 44.1 kHz), only the samples from the
    current chunk's start on. `shape` is `(nb_timesteps, nb_channels)` at the model's channel count; slices
    `[start:stop]` must come with non-decreasing starts (iter_separate's order); channels are conformed as
    `components.data.audio.conform` does (mono duplicated, stereo averaged)."""

    BLOCK = 1 << 16  # frames per read when scanning a float file for NaN/Inf

    def __init__(self, path: Path, handle, nb_channels: int):
        import numpy as np

        self.path, self.file = path, handle
        self.file_channels = handle.channels
        self.shape = (handle.frames, nb_channels)
        self.ndim = 2
        self.dtype = np.dtype(np.float32)
        self._buffer = np.zeros((0, nb_channels), np.float32)  # the decoded samples [self._start, ...)
        self._start = 0

    @classmethod
    def open(cls, path: Path, sample_rate: int, nb_channels: int):
        """The file read lazily when soundfile decodes it at `sample_rate` with 1 or 2 channels, else None (the
        caller decodes it whole: ffmpeg formats, resampling, errors reported by `read_any`)."""
        import numpy as np
        import soundfile

        if path.suffix.lower() in FFMPEG_SUFFIXES or not path.is_file():
            return None
        try:
            handle = soundfile.SoundFile(str(path))
        except Exception:
            return None
        # only uncompressed and FLAC files declare their exact length (an mp3 may decode shorter: read_any checks)
        if (handle.format not in LAZY_FORMATS or handle.samplerate != sample_rate or handle.frames <= 0
                or handle.channels > 2 or not handle.seekable()):
            handle.close()
            return None
        if handle.subtype in ("FLOAT", "DOUBLE"):  # only float samples can be NaN/Inf: count them before anything
            bad = sum(int(np.count_nonzero(~np.isfinite(block)))
                      for block in handle.blocks(blocksize=cls.BLOCK, dtype="float32", always_2d=True))
            if bad:
                handle.close()
                raise SeparateError(f"{path}: {bad} NaN/Inf samples; re-export the file from its source")
            handle.seek(0)
        return cls(path, handle, nb_channels)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        import numpy as np

        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("FileMixture takes [start:stop] slices only")
        start, stop = max(0, index.start or 0), min(self.shape[0], self.shape[0] if index.stop is None else index.stop)
        if start < self._start:
            raise ValueError(f"FileMixture reads forward only: [{start}:] after [{self._start}:]")
        decoded = self._start + len(self._buffer)  # the file's read position
        if start >= decoded:
            if start > decoded:  # beyond what was decoded (never in iter_separate's order)
                self.file.seek(start)
            self._buffer = self._buffer[:0]
        else:
            self._buffer = self._buffer[start - self._start:]
        self._start = start
        wanted = stop - start - len(self._buffer)
        if wanted > 0:
            block = self.file.read(wanted, dtype="float32", always_2d=True)
            channels = self.shape[1]
            if block.shape[1] != channels:
                block = np.repeat(block, channels, axis=1) if block.shape[1] == 1 else block.mean(axis=1, keepdims=True)
            self._buffer = np.concatenate([self._buffer, block.astype(np.float32, copy=False)])
        return self._buffer[:max(0, stop - start)]

    def close(self):
        self.file.close()


def safe_name(name: str) -> str:
    """A track folder name that cannot leave the output directory."""
    name = re.sub(r"[\\/\x00-\x1f]+", "_", name).strip(" .")
    return name or "track"


def track_folder(path: Path, out: Path) -> Path:
    """Where the stems of the input `path` go with the default file names: `out/<file name without extension>`."""
    return out / track_name(Path(path))


def track_destination(out: Path, track: str, output: StemOutput) -> Path:
    """The folder holding every stem file of a track (the common folder of its files)."""
    paths = output.paths(out, track, ("a", "b"))
    return Path(os.path.commonpath([str(p.parent) for p in paths.values()]))


def clashing_inputs(inputs, out: Path, output: StemOutput = StemOutput()):
    """The first two different inputs whose stems would go to the same files (`in/x/song.wav`, `in/y/song.mp3`),
    as (first, second, their folder), or None. `inputs` are file names or (file name, folder it was found in);
    the same file named twice is no clash."""
    seen = {}
    for item in inputs:
        name, root = (item, None) if isinstance(item, (str, Path)) else item
        if str(name) == "-":
            continue
        track = track_name(Path(name), root)
        key = output.paths(out, track, ("a",))["a"]
        first = seen.setdefault(key, name)
        if first is not name and Path(first).resolve() != Path(name).resolve():
            return first, name, track_destination(out, track, output)
    return None


def finished(separator, destination: Path, fmt: str) -> bool:
    """Whether `destination` holds every stem of the separator's targets (default file names)."""
    return all((destination / f"{t}.{fmt}").exists() for t in separator.targets)


def separate_file(separator, path: Path, out: Path, *, chunk_seconds: float, overlap: float, force: bool,
                  progress: bool, output: StemOutput = StemOutput(), plan: Optional[Mapping[str, tuple]] = None,
                  track: Optional[str] = None, cancel=None) -> Dict[str, Path]:
    """Separate one file into the stems of `plan` (default: every target), written as `output` says
    (default `out/<track>/<stem>.wav`); returns {stem: file}.

    The stems are written as hidden `.part` files and renamed into place together at the end (with
    SIGINT/SIGTERM held back for those few renames), so a track has all its stems or none; on any error
    or interruption the `.part` files are removed. A track with only some of its stems (a run killed
    with SIGKILL between two renames) is finished without --force. `cancel` (a threading.Event), when set,
    stops the separation at the next chunk (Cancelled), for a file separated in a worker thread."""
    import numpy as np
    import soundfile

    from components.data.audio import conform, resample
    from components.inference.separation import iter_separate

    plan = dict(plan or stem_plan(separator.targets))
    track = track if track is not None else track_name(path)
    files = output.paths(out, track, plan)
    for file in files.values():
        if not file.resolve().is_relative_to(out.resolve()):
            raise SeparateError(f"{path}: track name would write outside {out}")
    existing = [f for f in files.values() if f.exists()]
    if len(existing) == len(files) and not force:
        raise SeparateError(f"{path}: {existing[0]} exists; use --force to overwrite or --skip-existing to skip it")
    mixture = FileMixture.open(path, separator.sample_rate, separator.nb_channels)
    if mixture is not None:  # at the model's rate: read chunk by chunk as the separation advances
        rate, nb_timesteps, nb_channels = separator.sample_rate, mixture.shape[0], mixture.file_channels
    else:
        audio, rate = read_any(path)
        if not np.all(np.isfinite(audio)):
            bad = int(np.count_nonzero(~np.isfinite(audio)))
            raise SeparateError(f"{path}: {bad} NaN/Inf samples; re-export the file from its source")
        nb_timesteps, nb_channels = audio.shape
        try:
            mixture = conform(audio, rate, path, sample_rate=separator.sample_rate, nb_channels=separator.nb_channels)
        except StageError as error:
            raise SeparateError(str(error)) from None
        del audio  # peak memory: only the model-rate mixture and the stems are kept
    counter = Progress(path.name, enabled=progress)

    def separate_fn(batch):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        result = separator(batch)
        counter.step()
        return result

    batch_size = getattr(separator, "batch_size", 1)  # chunks per call (a .tflite: one per interpreter)
    counter.total = -(-count_chunks(mixture.shape[0], separator, chunk_seconds, overlap) // batch_size)
    same_rate = rate == separator.sample_rate
    direct = same_rate and output.fmt != "mp3"  # written as they come, in their final format
    folders = sorted({f.parent for f in files.values()}, key=lambda f: len(f.parts))
    created = [f for f in folders if not f.exists()]
    writing = folders[0]
    try:
        for folder in folders:
            writing = folder
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        cleanup_folders(created)
        raise SeparateError(f"{path}: cannot create {writing} ({write_problem(writing, error)})") from None
    remove_parts(files)  # what a killed run (SIGKILL) left
    # float32 stems at the model rate (while separating) and at the file's rate (the final files)
    needed = 4 * len(files) * (mixture.shape[0] * separator.nb_channels * (0 if same_rate else 1)
                               + nb_timesteps * nb_channels) + (1 << 16)
    free = shutil.disk_usage(folders[0]).free
    if free < needed:
        cleanup_folders(created)
        raise SeparateError(f"{path}: {folders[0]} has {free / 1e6:.1f} MB free, the stems need about "
                            f"{needed / 1e6:.1f} MB; free some space or choose another -o")
    if 0 < len(existing) < len(files):
        folder = Path(os.path.commonpath([str(f.parent) for f in files.values()]))
        print(f"{path}: {folder} has {len(existing)} of {len(files)} stems; finishing the track", file=sys.stderr)

    def channels(stem):
        if nb_channels == stem.shape[1]:
            return stem
        return stem.mean(axis=1, keepdims=True) if nb_channels == 1 else np.repeat(stem, nb_channels, axis=1)

    def final(stem):
        return np.clip(stem, -1, 1) if output.fmt != "wav" or output.subtype != "FLOAT" else stem

    # Stems stream to disk as the chunks finish: memory holds the mixture and one chunk of estimates, not
    # four whole stems. At another rate (or for mp3) they go to model-rate float files first, then are
    # resampled and encoded one at a time.
    parts = {s: part_path(f, output.fmt if direct else "raw.wav") for s, f in files.items()}
    writers = {}
    try:
        for stem in plan:
            writing = parts[stem]
            writers[stem] = soundfile.SoundFile(
                str(parts[stem]), "w", samplerate=rate if same_rate else separator.sample_rate,
                channels=nb_channels if same_rate else separator.nb_channels,
                format=output.fmt.upper() if direct else "WAV", subtype=output.subtype if direct else "FLOAT")
        try:
            for _, _, blocks in iter_separate(separate_fn, mixture, sample_rate=separator.sample_rate,
                                              chunk_seconds=separator.chunk_seconds or chunk_seconds, overlap=overlap,
                                              batch_size=batch_size):
                for stem, block in combine(plan, blocks).items():
                    block = channels(block) if same_rate else block
                    writing = parts[stem]
                    writers[stem].write(final(block) if direct else block)
        finally:
            for stem, writer in writers.items():
                writing = parts[stem]
                writer.close()
        counter.done()
        if isinstance(mixture, FileMixture):
            mixture.close()
        del mixture
        if not direct:
            for stem in plan:
                audio, _ = soundfile.read(str(parts[stem]), dtype="float32", always_2d=True)
                if not same_rate:
                    audio = resample(audio, separator.sample_rate, rate)[:nb_timesteps]
                    if len(audio) < nb_timesteps:
                        audio = np.pad(audio, ((0, nb_timesteps - len(audio)), (0, 0)))
                    audio = channels(audio)
                done = part_path(files[stem], output.fmt)
                writing = done
                if output.fmt == "mp3":
                    encode_mp3(final(audio), rate, done, output.mp3_bitrate)
                else:
                    soundfile.write(str(done), final(audio), rate, subtype=output.subtype, format=output.fmt.upper())
                parts[stem].unlink()
                parts[stem] = done
                del audio
        rename_together(parts, files)
    except BaseException as error:
        counter.abort()
        remove_parts(files)
        cleanup_folders(created)
        if isinstance(error, (OSError, soundfile.SoundFileError)):
            raise SeparateError(f"{path}: cannot write {writing} ({write_problem(writing, error)}); "
                                "no stems of this track were written") from None
        raise
    return files


def encode_mp3(audio, rate: int, path: Path, bitrate: int) -> None:
    """Write float32 `(samples, channels)` as an mp3 at `bitrate` kbit/s with ffmpeg's LAME encoder."""
    if shutil.which("ffmpeg") is None:
        raise SeparateError("--format mp3 needs ffmpeg; install it (apt-get install ffmpeg) or choose wav/flac")
    encoded = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "f32le", "-ar", str(rate), "-ac",
                              str(audio.shape[1]), "-i", "-", "-c:a", "libmp3lame", "-b:a", f"{bitrate}k", "-f", "mp3",
                              str(path)], input=audio.astype("<f4").tobytes(), capture_output=True)
    if encoded.returncode != 0:
        reason = encoded.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(f"ffmpeg could not encode mp3 ({reason[-1] if reason else 'no reason given'})")


PART_MARK = ".part."


def part_path(file: Path, ext: str) -> Path:
    """The hidden file a stem is written to before it is renamed to `file`."""
    return file.with_name(f".{file.stem}{PART_MARK}{ext}")


def remove_parts(files) -> None:
    """Delete the hidden `.part` files of an unfinished separation: beside each stem file of `files` ({stem:
    file}), or every one in a folder."""
    if isinstance(files, (str, Path)):
        if Path(files).is_dir():
            for leftover in Path(files).glob(f".*{PART_MARK}*"):
                leftover.unlink(missing_ok=True)
        return
    for file in files.values():
        if file.parent.is_dir():
            for leftover in file.parent.glob(f".{glob.escape(file.stem)}{PART_MARK}*"):
                leftover.unlink(missing_ok=True)


def cleanup_destination(destination: Path, created: bool) -> None:
    if created:
        cleanup_folders([destination])


def cleanup_folders(created) -> None:
    """Remove the folders this run created, deepest first, where they are empty: never stems or the user's
    files."""
    for folder in sorted(created, key=lambda f: len(Path(f).parts), reverse=True):
        try:
            Path(folder).rmdir()
        except OSError:
            pass


def rename_together(parts: dict, files: dict) -> None:
    """Rename every part to its final name with SIGINT and SIGTERM held back: a Ctrl-C arriving now takes
    effect after the last rename, so the track is complete rather than half-renamed."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        for target, part in parts.items():
            os.replace(part, files[target])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_problem(path: Path, error: BaseException) -> str:
    """Why writing `path` failed, in words: libsndfile reports only "System error"."""
    import errno

    if isinstance(error, OSError) and error.errno is not None:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on the device"
        reason = error.strerror or str(error)
        return reason[:1].lower() + reason[1:]
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return " ".join(str(error).split()) or type(error).__name__
    if stats.f_flag & os.ST_RDONLY:
        return "read-only file system"
    if not os.access(folder, os.W_OK):
        return "permission denied"
    if stats.f_bavail * stats.f_frsize < (1 << 20):
        return "no space left on the device"
    return " ".join(str(error).split()) or type(error).__name__


def count_chunks(nb_timesteps, separator, chunk_seconds, overlap) -> int:
    from components.inference.separation import chunk_layout

    chunk = int(round((separator.chunk_seconds or chunk_seconds) * separator.sample_rate))
    return chunk_layout(nb_timesteps, chunk, overlap)[2]


class Progress:
    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled, self.count, self.total, self.started = name, enabled, 0, 0, time.time()

    def step(self):
        self.count += 1
        if self.enabled:
            width = 30
            filled = int(width * self.count / max(1, self.total))
            print(f"\r{self.name[:40]:40s} [{'#' * filled}{'.' * (width - filled)}] {self.count}/{self.total} "
                  f"{time.time() - self.started:5.1f}s", end="", file=sys.stderr, flush=True)

    def done(self):
        if self.enabled:
            print(file=sys.stderr)

    def abort(self):
        if self.enabled and self.count:
            print(file=sys.stderr)  # end the progress line before any message
            self.enabled = False
