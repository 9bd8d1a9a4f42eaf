"""Split songs into stems: `separate song.mp3 other.flac [--model DIR|FILE.tflite] [-o stems/]`.

With no `--model`, the SavedModel of the latest export of the default pipeline run
(`artifacts/export/`). Writes `<out>/<track>/<target>.wav` (or .flac) with the input's sample rate,
length and channel count. A file that cannot be read is reported on one line and skipped; the exit
code is non-zero when any file failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; errors still show
if __name__ == "__main__" and not __package__:  # `python pipeline/separate.py`
    from _script import put_project_root_first
    put_project_root_first()

from components.export import SIDECAR  # noqa: E402 - after the sys.path set-up above
from configs.errors import SeparateError, StageError  # noqa: E402

FFMPEG_SUFFIXES = (".mp4", ".m4a", ".aac", ".webm", ".opus")
DEFAULT_CHUNK_SECONDS = 10.0  # --chunk-seconds when the model declares no chunk of its own


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="separate", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="audio files: wav, flac, ogg, mp3 (soundfile); mp4, m4a, aac (ffmpeg)")
    parser.add_argument("--model", help="SavedModel directory or .tflite file (default: latest export in "
                                        "--artifacts-dir)")
    parser.add_argument("--artifacts-dir", default="artifacts", help="where the pipeline exported (default: artifacts)")
    parser.add_argument("-o", "--out", default="separated", help="output directory (default: separated)")
    parser.add_argument("--format", choices=("wav", "flac"), default="wav", help="stem file format")
    parser.add_argument("--chunk-seconds", type=float, default=None,
                        help="SavedModel chunk length, bounds memory (default: the chunk the model declares, else 10)")
    parser.add_argument("--overlap", type=float, default=0.25, help="overlap fraction between chunks")
    parser.add_argument("--workers", type=int, default=None,
                        help=".tflite models: chunks separated at the same time, one 1-thread interpreter each "
                             "(default 2: on a quiet 2-core machine 1.8x faster than one 2-thread interpreter)")
    parser.add_argument("--force", action="store_true", help="overwrite existing stems")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_stream_arguments(parser)
    return parser


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    stream = parser.add_argument_group("streaming (unidirectional Open-Unmix exports)")
    stream.add_argument("--stream", action="store_true",
                        help="separate hop by hop with the real-time streaming model (export's stream/); a file "
                             "named - is raw PCM on standard input, and stems are written as they are produced")
    stream.add_argument("--pcm-format", choices=("s16le", "f32le"), default="s16le",
                        help="raw PCM sample format on standard input (default s16le)")
    stream.add_argument("--pcm-rate", type=int, help="sample rate of the PCM on standard input (default: the model's)")
    stream.add_argument("--pcm-channels", type=int, help="channels of the PCM on standard input (default: the model's)")
    stream.add_argument("--name", default="stdin", help="track folder name for standard input (default: stdin)")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class SavedModelSeparator:
    """The exported SavedModel's `serving_default`; any chunk length."""

    def __init__(self, path: Path):
        import tensorflow as tf

        self.sidecar = _find_sidecar(path)
        loaded = tf.saved_model.load(str(path))
        self._loaded = loaded  # keep the trackable alive
        self.signature = loaded.signatures["serving_default"]
        self.sample_rate = int(self.sidecar["sample_rate"])
        self.nb_channels = int(self.sidecar["nb_channels"])
        self.targets = list(self.sidecar["targets"])
        self.chunk_seconds = None
        # the family's chunk for bounded memory at its size (models.base.SeparationModel.separation_chunk_samples)
        declared = self.sidecar.get("separation_chunk_samples")
        self.default_chunk_seconds = declared / self.sample_rate if declared else DEFAULT_CHUNK_SECONDS

    def __call__(self, batch):
        import tensorflow as tf

        return {k: v.numpy() for k, v in self.signature(waveform=tf.constant(batch)).items()}


class TFLiteSeparator:
    """A .tflite chunk model plus the app-side post-processing of its family (e.g. Wiener + ISTFT).

    The file takes one chunk `(1, chunk, channels)`, as a phone app streaming chunk after chunk uses it; every
    chunk starts from the zero LSTM state (`export.TFLiteChunkRunner`). `workers` > 1 interpreters of one
    thread each separate that many chunks at the same time (default `WORKERS`); `workers=1` is one interpreter
    of `THREADS` threads."""

    THREADS = 2  # of the single interpreter (XNNPACK and the fused LSTM's GEMM backend)
    # chunks at once, one 1-thread interpreter each: measured 1.8x one 2-thread interpreter on a quiet 2-core
    # machine (UMX-HQ, 30 s: 2.10 s against 3.78 s, `pipeline/benchmark.py separate with paper`)
    WORKERS = 2

    def __init__(self, path: Path, workers: int = None):
        from components.export import TFLiteChunkRunner

        description_path = path.parent / (path.name.split(".")[0] + ".json")
        export_sidecar = path.parent.parent / SIDECAR
        if not description_path.is_file() or not export_sidecar.is_file():
            raise SeparateError(f"{path}: missing {description_path.name} / {SIDECAR} beside the export; "
                                "use a .tflite from an export stage directory")
        self.description = json.loads(description_path.read_text())
        self.sidecar = json.loads(export_sidecar.read_text())
        self.sample_rate = int(self.sidecar["sample_rate"])
        self.nb_channels = int(self.sidecar["nb_channels"])
        self.targets = list(self.sidecar["targets"])
        self.chunk_seconds = self.default_chunk_seconds = self.description["chunk_seconds"]  # the .tflite's fixed chunk
        self.batch_size = workers or self.WORKERS  # chunks per call, one per interpreter
        self.runner = TFLiteChunkRunner(model_path=str(path), workers=self.batch_size,
                                        threads_per_worker=self.THREADS if self.batch_size == 1 else 1)
        self.model = _family_model(self.sidecar)

    def __call__(self, batch):
        import numpy as np

        outputs = self.runner(batch)
        if self.model.postprocess is None:
            return outputs
        return {k: np.asarray(v) for k, v in self.model.postprocess(batch, outputs).items()}


def _family_model(sidecar):
    """An untrained instance of the exported family: only its (weight-free) post-processing is used."""
    from configs.config import DataConfig, ModelConfig, build_section
    from models import registry

    data = build_section(DataConfig, sidecar["config"]["data"], "data.")
    model_config = build_section(ModelConfig, sidecar["config"]["model"], "model.")
    return registry.build(model_config, data=data, stats={})


def _find_sidecar(saved_model: Path) -> dict:
    for candidate in (saved_model / "assets.extra" / SIDECAR, saved_model.parent.parent.parent / SIDECAR):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise SeparateError(f"{saved_model}: no {SIDECAR} sidecar (sample rate, targets); export with the pipeline")


def load_separator(model: str | None, artifacts_dir: str, workers: int = None):
    if model is None:
        export = Path(artifacts_dir) / "export"
        meta = export / "artifact.json"
        if not meta.is_file():
            raise SeparateError(f"no exported model in {export}; run `python pipeline/run.py --stage all` "
                                "or pass --model")
        sidecar = json.loads((export / SIDECAR).read_text())
        model = str(export / "saved_model" / sidecar["model"] / str(sidecar["version"]))
    path = Path(model)
    if path.suffix == ".tflite" and path.is_file():
        return TFLiteSeparator(path, workers)
    if (path / "saved_model.pb").is_file():
        return SavedModelSeparator(path)
    if path.is_dir():  # a TF Serving model folder: take the highest version
        versions = sorted((p for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file()),
                          key=lambda p: int(p.name))
        if versions:
            return SavedModelSeparator(versions[-1])
    raise SeparateError(f"{model}: not a SavedModel directory or .tflite file")


# --------------------------------------------------------------------------------------------
# Audio in and out
# --------------------------------------------------------------------------------------------
def read_any(path: Path):
    """(float32 `(nb_timesteps, nb_channels)`, sample rate) from soundfile, or ffmpeg for mp4/aac/m4a."""
    import numpy as np
    import soundfile

    if not path.is_file():
        raise SeparateError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise SeparateError(f"{path}: empty file")
    if path.suffix.lower() not in FFMPEG_SUFFIXES:
        try:
            audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
            if audio.shape[0] == 0:
                raise SeparateError(f"{path}: no audio samples")
            return audio, rate
        except SeparateError:
            raise
        except Exception:
            pass  # fall through to ffmpeg, which decodes more formats
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        raise SeparateError(f"{path}: cannot decode without ffmpeg/ffprobe; install ffmpeg (apt-get install ffmpeg)")
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                            "stream=sample_rate,channels", "-of", "json", str(path)], capture_output=True, text=True)
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
    return audio, rate


class FileMixture:
    """A sound file at the model's rate as `iter_separate`'s mixture, decoded forward as the chunks ask for it:
    a 10-minute stereo song is never whole in memory (212 MB of float32 at 44.1 kHz), only the samples from the
    current chunk's start on. `shape` is `(nb_timesteps, nb_channels)` at the model's channel count; slices
    `[start:stop]` must come with non-decreasing starts (iter_separate's order); channels are conformed as
    `components.audio.conform` does (mono duplicated, stereo averaged)."""

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
        if handle.samplerate != sample_rate or handle.frames <= 0 or handle.channels > 2 or not handle.seekable():
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


def separate_file(separator, path: Path, out: Path, *, fmt: str, chunk_seconds: float, overlap: float,
                  force: bool, progress: bool) -> Path:
    """Separate one file into `out/<track>/<target>.<fmt>`.

    The stems are written as hidden `.part` files and renamed into place together at the end (with
    SIGINT/SIGTERM held back for those few renames), so a track has all its stems or none; on any error
    or interruption the `.part` files are removed. A track with only some of its stems (a run killed
    with SIGKILL between two renames) is finished without --force."""
    import numpy as np
    import soundfile

    from components.audio import conform, resample
    from components.separation import iter_separate

    destination = out / safe_name(path.stem.removesuffix(".stem"))
    if destination.resolve().parent != out.resolve():
        raise SeparateError(f"{path}: track name would write outside {out}")
    files = {t: destination / f"{t}.{fmt}" for t in separator.targets}
    existing = [f for f in files.values() if f.exists()]
    if len(existing) == len(files) and not force:
        raise SeparateError(f"{path}: {existing[0]} exists; use --force to overwrite")
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
    counter = _Progress(path.name, enabled=progress)

    def separate_fn(batch):
        result = separator(batch)
        counter.step()
        return result

    batch_size = getattr(separator, "batch_size", 1)  # chunks per call (a .tflite: one per interpreter)
    counter.total = -(-_count_chunks(mixture.shape[0], separator, chunk_seconds, overlap) // batch_size)
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
        _cleanup_destination(destination, created)
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
        _rename_together(parts, files)
    except BaseException as error:
        counter.abort()
        remove_parts(destination)
        _cleanup_destination(destination, created)
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


def _cleanup_destination(destination: Path, created: bool) -> None:
    if created:
        try:
            destination.rmdir()  # only when empty: never removes stems or the user's files
        except OSError:
            pass


def _rename_together(parts: dict, files: dict) -> None:
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


def _count_chunks(nb_timesteps, separator, chunk_seconds, overlap) -> int:
    from components.separation import chunk_layout

    chunk = int(round((separator.chunk_seconds or chunk_seconds) * separator.sample_rate))
    return chunk_layout(nb_timesteps, chunk, overlap)[2]


class _Progress:
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


# --------------------------------------------------------------------------------------------
# Streaming: one hop in, one hop per target out (models/streaming.py)
# --------------------------------------------------------------------------------------------
class StreamingSeparator:
    """The export's streaming model (SavedModel folder or .tflite) with its `stream.json` description."""

    def __init__(self, path: Path):
        from components import export

        if path.suffix == ".tflite" and path.is_file():
            description_path = path.parent / "stream.json"
        elif (path / "saved_model.pb").is_file():
            description_path = path.parent / "stream.json"
        else:
            raise SeparateError(f"{path}: not a streaming SavedModel or .tflite; use the export's stream/saved_model "
                                "or stream/stream.float32.tflite (unidirectional Open-Unmix only)")
        if not description_path.is_file():
            raise SeparateError(f"{path}: no stream.json beside it; use a streaming model from an export stage")
        self.description = json.loads(description_path.read_text())
        self.sample_rate = int(self.description["sample_rate"])
        self.nb_channels = int(self.description["nb_channels"])
        self.targets = list(self.description["targets"])
        self.hop = int(self.description["hop_samples"])
        self.latency = int(self.description["latency_samples"])
        if path.suffix == ".tflite":
            self.step = export.tflite_stream_step(model_path=str(path), num_threads=1)
        else:
            self.step = export.saved_model_stream_step(path)

    def initial_state(self) -> dict:
        import numpy as np

        return {name: np.zeros([1] + spec["shape"][1:], np.float32) for name, spec in self.description["state"].items()}


def load_streaming(model: str | None, artifacts_dir: str) -> StreamingSeparator:
    if model is None:
        stream = Path(artifacts_dir) / "export" / "stream"
        if not (stream / "stream.json").is_file():
            raise SeparateError(f"no streaming model in {stream}; export a unidirectional Open-Unmix "
                                "(model.umx.unidirectional=True) or pass --model")
        return StreamingSeparator(stream / "saved_model")
    path = Path(model)
    if path.is_dir() and (path / "stream.json").is_file():  # the export's stream/ folder itself
        path = path / "saved_model"
    return StreamingSeparator(path)


def _pcm_hops(handle, fmt: str, nb_channels: int, hop: int):
    """Hops `(hop, nb_channels)` float32 from a raw PCM byte stream; the last one zero-padded."""
    import numpy as np

    dtype, scale = (np.int16, 1 / 32768.0) if fmt == "s16le" else (np.float32, 1.0)
    frame_bytes = np.dtype(dtype).itemsize * nb_channels
    pending = b""
    while True:
        data = handle.read(hop * frame_bytes - len(pending))
        if not data:
            break
        pending += data
        if len(pending) == hop * frame_bytes:
            yield np.frombuffer(pending, dtype=dtype).reshape(hop, nb_channels).astype(np.float32) * scale
            pending = b""
    if pending:
        usable = len(pending) - len(pending) % frame_bytes
        block = np.frombuffer(pending[:usable], dtype=dtype).reshape(-1, nb_channels).astype(np.float32) * scale
        yield np.pad(block, ((0, hop - len(block)), (0, 0)))


def _file_hops(mixture, hop: int):
    import numpy as np

    for start in range(0, len(mixture), hop):
        block = mixture[start:start + hop]
        yield np.pad(block, ((0, hop - len(block)), (0, 0))) if len(block) < hop else block


def stream_to_stems(streamer: StreamingSeparator, hops, destination: Path, *, nb_timesteps=None, out_channels: int,
                    fmt: str, atomic: bool) -> dict:
    """Run hops `(hop, channels at the model's layout)` through the streaming model, writing every stem as its
    hops come out (flushed), aligned with the input: the first `latency` output samples are dropped and the
    tail is flushed with silence. `nb_timesteps`: trim to the input length when known. Returns {target: file}."""
    import numpy as np
    import soundfile

    from models.streaming import STATE_NAMES

    destination.mkdir(parents=True, exist_ok=True)
    files = {t: destination / f"{t}.{fmt}" for t in streamer.targets}
    paths = {t: (f.with_name(f".{f.stem}.part.{fmt}") if atomic else f) for t, f in files.items()}
    subtype = "FLOAT" if fmt == "wav" else "PCM_24"
    writers = {t: soundfile.SoundFile(str(paths[t]), "w", samplerate=streamer.sample_rate, channels=out_channels,
                                      subtype=subtype) for t in streamer.targets}
    state = streamer.initial_state()
    skip, written, consumed = streamer.latency, 0, 0
    flush = [np.zeros((streamer.hop, streamer.nb_channels), np.float32)] * (-(-streamer.latency // streamer.hop))

    def blocks():
        nonlocal consumed
        for block in hops:
            consumed += len(block)
            yield block
        yield from flush

    try:
        for block in blocks():
            outputs = streamer.step(audio=np.asarray(block, np.float32)[None], **state)
            state = {name: outputs[name + "_out"] for name in STATE_NAMES}
            start = min(skip, streamer.hop)
            skip -= start
            limit = (nb_timesteps if nb_timesteps is not None else consumed) - written
            count = max(0, min(streamer.hop - start, limit))
            if not count:
                continue
            for target, writer in writers.items():
                stem = np.asarray(outputs[target])[0, start:start + count]
                if out_channels != stem.shape[1]:
                    stem = stem.mean(axis=1, keepdims=True) if out_channels == 1 else np.repeat(stem, out_channels, 1)
                writer.write(np.clip(stem, -1, 1) if fmt == "flac" else stem)
                writer.flush()  # a reader (or a pipe) sees the stem grow hop by hop
            written += count
    finally:
        for writer in writers.values():
            writer.close()
    if atomic:
        for target in streamer.targets:
            paths[target].replace(files[target])
    return files


def stream_main(args) -> int:
    """`separate --stream FILE|- ...`: the streaming model, hop by hop."""
    try:
        streamer = load_streaming(args.model, args.artifacts_dir)
    except SeparateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.files:
        try:
            if name == "-":
                destination = _stream_stdin(streamer, args, out)
            else:
                destination = _stream_file(streamer, Path(name), args, out)
            print(f"{name} -> {destination}")
        except SeparateError as error:
            failed += 1
            print(f"error: {error}", file=sys.stderr)
    return 1 if failed else 0


def _stream_file(streamer, path: Path, args, out: Path) -> Path:
    from components.audio import conform

    destination = out / safe_name(path.stem.removesuffix(".stem"))
    existing = [destination / f"{t}.{args.format}" for t in streamer.targets
                if (destination / f"{t}.{args.format}").exists()]
    if existing and not args.force:
        raise SeparateError(f"{path}: {existing[0]} exists; use --force to overwrite")
    audio, rate = read_any(path)
    if rate != streamer.sample_rate:
        raise SeparateError(f"{path}: {rate} Hz; the streaming model runs at {streamer.sample_rate} Hz; resample it "
                            f"first (ffmpeg -i {path.name} -ar {streamer.sample_rate} ...)")
    try:
        mixture = conform(audio, rate, path, sample_rate=streamer.sample_rate, nb_channels=streamer.nb_channels)
    except StageError as error:
        raise SeparateError(str(error)) from None
    stream_to_stems(streamer, _file_hops(mixture, streamer.hop), destination, nb_timesteps=len(mixture),
                    out_channels=audio.shape[1], fmt=args.format, atomic=True)
    return destination


def _stream_stdin(streamer, args, out: Path) -> Path:
    import numpy as np

    rate = args.pcm_rate or streamer.sample_rate
    channels = args.pcm_channels or streamer.nb_channels
    if rate != streamer.sample_rate:
        raise SeparateError(f"--pcm-rate {rate}: the streaming model runs at {streamer.sample_rate} Hz; resample "
                            f"upstream (e.g. ffmpeg ... -ar {streamer.sample_rate} -f {args.pcm_format} -)")
    if channels not in (1, 2):
        raise SeparateError(f"--pcm-channels {channels}: 1 or 2 channels only")
    destination = out / safe_name(args.name)
    existing = [destination / f"{t}.{args.format}" for t in streamer.targets
                if (destination / f"{t}.{args.format}").exists()]
    if existing and not args.force:
        raise SeparateError(f"-: {existing[0]} exists; use --force to overwrite or --name to choose another folder")

    def hops():
        for block in _pcm_hops(sys.stdin.buffer, args.pcm_format, channels, streamer.hop):
            if channels != streamer.nb_channels:
                block = np.repeat(block, streamer.nb_channels, 1) if channels == 1 else block.mean(1, keepdims=True)
            yield block

    stream_to_stems(streamer, hops(), destination, out_channels=channels, fmt=args.format, atomic=False)
    return destination


def main(argv=None) -> int:
    """Exit codes: 0 all files separated, 1 some file failed (each reported on one line), 2 the model or
    the output folder is unusable, 130 interrupted (Ctrl-C) and 143 terminated (SIGTERM): tracks already
    finished are kept, the one in progress leaves nothing."""
    import signal

    args = get_parser().parse_args(argv)
    if args.stream:
        return stream_main(args)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("\ninterrupted; finished tracks are kept, the unfinished one left no files", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated; finished tracks are kept, the unfinished one left no files", file=sys.stderr)
        return 143


class _Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that the same cleanup runs."""


def _terminated(signum, frame):
    raise _Terminated()


def _main(args) -> int:
    from pipeline.quiet import import_tensorflow

    if not 0 <= args.overlap < 1:
        print(f"error: --overlap {args.overlap:g}: must be a fraction in [0, 1); e.g. --overlap 0.25", file=sys.stderr)
        return 2
    if args.chunk_seconds is not None and not args.chunk_seconds > 0:
        print(f"error: --chunk-seconds {args.chunk_seconds:g}: must be > 0; e.g. --chunk-seconds 10", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers {args.workers}: must be at least 1; e.g. --workers 2", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: -o {out}: exists and is not a directory; choose a folder for the stems", file=sys.stderr)
        return 2
    import_tensorflow()  # without the CPU-machine start-up notices
    try:
        separator = load_separator(args.model, args.artifacts_dir, args.workers)
    except SeparateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"error: -o {out}: cannot create it ({write_problem(out, error)}); choose another folder",
              file=sys.stderr)
        return 2
    failed = 0
    for name in args.files:
        try:
            destination = separate_file(separator, Path(name), out, fmt=args.format,
                                        chunk_seconds=args.chunk_seconds or separator.default_chunk_seconds,
                                        overlap=args.overlap, force=args.force, progress=not args.quiet)
            print(f"{name} -> {destination}")
        except SeparateError as error:
            failed += 1
            print(f"error: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
