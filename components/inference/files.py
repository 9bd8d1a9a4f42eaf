"""Songs in, stem files out: reading any audio file (soundfile, or ffmpeg for mp4/aac), `separate_file` with
chunked separation, a progress bar, and stems written beside as `.part` files and renamed together."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from configs.errors import SeparateError, StageError

class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt (by the command line's handler) so that the same cleanup runs."""


FFMPEG_SUFFIXES = (".mp4", ".m4a", ".aac", ".webm", ".opus")
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
    """Where the stems of the input `path` go: `out/<file name without extension (and .stem)>`."""
    return out / safe_name(Path(path).stem.removesuffix(".stem"))


def clashing_inputs(paths, out: Path):
    """The first two different inputs whose stems would go to one folder (`in/x/song.wav`, `in/y/song.mp3`), as
    (first, second, folder), or None. The same file named twice is no clash."""
    seen = {}
    for path in paths:
        if str(path) == "-":
            continue
        folder = track_folder(Path(path), out)
        first = seen.setdefault(folder, path)
        if first is not path and Path(first).resolve() != Path(path).resolve():
            return first, path, folder
    return None


def finished(separator, destination: Path, fmt: str) -> bool:
    """Whether `destination` holds every stem of the separator's targets."""
    return all((destination / f"{t}.{fmt}").exists() for t in separator.targets)


def separate_file(separator, path: Path, out: Path, *, fmt: str, chunk_seconds: float, overlap: float,
                  force: bool, progress: bool) -> Path:
    """Separate one file into `out/<track>/<target>.<fmt>`.

    The stems are written as hidden `.part` files and renamed into place together at the end (with
    SIGINT/SIGTERM held back for those few renames), so a track has all its stems or none; on any error
    or interruption the `.part` files are removed. A track with only some of its stems (a run killed
    with SIGKILL between two renames) is finished without --force."""
    import numpy as np
    import soundfile

    from components.data.audio import conform, resample
    from components.inference.separation import iter_separate

    destination = track_folder(path, out)
    if destination.resolve().parent != out.resolve():
        raise SeparateError(f"{path}: track name would write outside {out}")
    files = {t: destination / f"{t}.{fmt}" for t in separator.targets}
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
        result = separator(batch)
        counter.step()
        return result

    batch_size = getattr(separator, "batch_size", 1)  # chunks per call (a .tflite: one per interpreter)
    counter.total = -(-count_chunks(mixture.shape[0], separator, chunk_seconds, overlap) // batch_size)
    same_rate = rate == separator.sample_rate
    subtype = "FLOAT" if fmt == "wav" else "PCM_24"
    created = not destination.exists()
    try:
        destination.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SeparateError(f"{path}: cannot create {destination} ({write_problem(destination, error)})") from None
    remove_parts(destination)  # what a killed run (SIGKILL) left
    # float32 stems at the model rate (while separating) and at the file's rate (the final files)
    needed = 4 * len(files) * (mixture.shape[0] * separator.nb_channels * (0 if same_rate else 1)
                               + nb_timesteps * nb_channels) + (1 << 16)
    free = shutil.disk_usage(destination).free
    if free < needed:
        cleanup_destination(destination, created)
        raise SeparateError(f"{path}: {destination} has {free / 1e6:.1f} MB free, the stems need about "
                            f"{needed / 1e6:.1f} MB; free some space or choose another -o")
    if 0 < len(existing) < len(files):
        print(f"{path}: {destination} has {len(existing)} of {len(files)} stems; finishing the track",
              file=sys.stderr)

    def channels(stem):
        if nb_channels == stem.shape[1]:
            return stem
        return stem.mean(axis=1, keepdims=True) if nb_channels == 1 else np.repeat(stem, nb_channels, axis=1)

    # Stems stream to disk as the chunks finish: memory holds the mixture and one chunk of estimates, not
    # four whole stems. At another rate they go to model-rate float files first, resampled one at a time.
    parts = {t: destination / f".{t}.part.{fmt if same_rate else 'wav'}" for t in separator.targets}
    writing = destination
    writers = {}
    try:
        for target in separator.targets:
            writing = parts[target]
            writers[target] = soundfile.SoundFile(
                str(parts[target]), "w", samplerate=rate if same_rate else separator.sample_rate,
                channels=nb_channels if same_rate else separator.nb_channels,
                subtype=subtype if same_rate else "FLOAT")
        try:
            for _, _, blocks in iter_separate(separate_fn, mixture, sample_rate=separator.sample_rate,
                                              chunk_seconds=separator.chunk_seconds or chunk_seconds, overlap=overlap,
                                              batch_size=batch_size):
                for target, block in blocks.items():
                    if target in writers:
                        block = channels(block) if same_rate else block
                        writing = parts[target]
                        writers[target].write(np.clip(block, -1, 1) if same_rate and fmt == "flac" else block)
        finally:
            for target, writer in writers.items():
                writing = parts[target]
                writer.close()
        counter.done()
        if isinstance(mixture, FileMixture):
            mixture.close()
        del mixture
        for target in separator.targets:
            if not same_rate:
                stem, _ = soundfile.read(str(parts[target]), dtype="float32", always_2d=True)
                stem = resample(stem, separator.sample_rate, rate)[:nb_timesteps]
                if len(stem) < nb_timesteps:
                    stem = np.pad(stem, ((0, nb_timesteps - len(stem)), (0, 0)))
                stem = channels(stem)
                final_part = destination / f".{target}.part.final.{fmt}"
                writing = final_part
                soundfile.write(str(final_part), np.clip(stem, -1, 1) if fmt == "flac" else stem, rate,
                                subtype=subtype)
                parts[target].unlink()
                parts[target] = final_part
                del stem
        rename_together(parts, files)
    except BaseException as error:
        counter.abort()
        remove_parts(destination)
        cleanup_destination(destination, created)
        if isinstance(error, (OSError, soundfile.SoundFileError)):
            raise SeparateError(f"{path}: cannot write {writing} ({write_problem(writing, error)}); "
                                "no stems of this track were written") from None
        raise
    return destination


PART_MARK = ".part."


def remove_parts(destination: Path) -> None:
    """Delete the hidden `.<target>.part.*` files of an unfinished separation in `destination`."""
    if destination.is_dir():
        for leftover in destination.glob(f".*{PART_MARK}*"):
            leftover.unlink(missing_ok=True)


def cleanup_destination(destination: Path, created: bool) -> None:
    if created:
        try:
            destination.rmdir()  # only when empty: never removes stems or the user's files
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
