"""Separation hop by hop with an export's streaming model (models/streaming.py): one hop in, one hop per target
out, stems written as they are produced. Input at another rate or channel count is resampled on the way in and
the stems on the way out (`components.data.audio.StreamingResampler`), so they come at the input's rate."""
from __future__ import annotations

import json
from pathlib import Path

from configs.errors import SeparateError


class StreamingSeparator:
    """The export's streaming model (SavedModel folder or .tflite) with its `stream.json` description."""

    def __init__(self, path: Path):
        from components.inference import exported

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
            self.step = exported.tflite_stream_step(model_path=str(path), num_threads=1)
        else:
            self.step = exported.saved_model_stream_step(path)

    def initial_state(self) -> dict:
        import numpy as np

        return {name: np.zeros([1] + spec["shape"][1:], np.float32) for name, spec in self.description["state"].items()}


def load_streaming(model: str | None, artifacts_dir: str) -> StreamingSeparator:
    if model is None:
        from components.inference.exported import ExportLayout

        stream = ExportLayout(Path(artifacts_dir) / "export").stream
        if not (stream / "stream.json").is_file():
            raise SeparateError(f"no streaming model in {stream}; export a unidirectional Open-Unmix "
                                "(model.umx.unidirectional=True) or pass --model")
        return StreamingSeparator(stream / "saved_model")
    path = Path(model)
    if path.is_dir() and (path / "stream.json").is_file():  # the export's stream/ folder itself
        path = path / "saved_model"
    return StreamingSeparator(path)


def pcm_hops(handle, fmt: str, nb_channels: int, hop: int):
    """Blocks `(hop, nb_channels)` float32 from a raw PCM byte stream; the last one as long as what came."""
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
        if len(pending) % frame_bytes:
            raise SeparateError(f"-: the stream ended inside a sample frame ({len(pending) % frame_bytes} of "
                                f"{frame_bytes} bytes: {nb_channels} channel(s) of {fmt}); --pcm-format and "
                                f"--pcm-channels must match what is piped in")
        yield np.frombuffer(pending, dtype=dtype).reshape(-1, nb_channels).astype(np.float32) * scale


def stream_to_stems(streamer: StreamingSeparator, blocks, destination: Path, *, rate: int, channels: int,
                    nb_timesteps=None, fmt: str, atomic: bool, source: str = "-") -> dict:
    """Run blocks `(n, channels)` at `rate` through the streaming model, writing every stem as its hops come
    out (flushed), aligned with the input and at the input's rate and channels, as offline `separate` writes
    them: the input is resampled to the model's rate and channels by a `StreamingResampler`, cut into hops,
    the first `latency` output samples are dropped, the stems are resampled back to `rate` and `channels`, and
    the tail is flushed with silence. `nb_timesteps`: trim to the input length when known (else the number of
    input samples received). Returns {target: file}.

    `atomic` (a file input): the stems are `.part` files renamed together at the end; any error or interruption
    removes them. Otherwise (standard input, a live stream) the stems grow in place: an interruption (Ctrl-C,
    SIGTERM: how a live stream is ended) closes them as valid files holding what was streamed; an error (NaN/Inf
    samples, a malformed or empty stream) removes them, as nothing valid can be promised after it."""
    import numpy as np
    import soundfile

    from models.streaming import STATE_NAMES

    from components.data.audio import StreamingResampler
    from components.inference.files import Terminated, cleanup_destination, remove_parts, rename_together

    created = not destination.exists()
    destination.mkdir(parents=True, exist_ok=True)
    files = {t: destination / f"{t}.{fmt}" for t in streamer.targets}
    paths = {t: (f.with_name(f".{f.stem}.part.{fmt}") if atomic else f) for t, f in files.items()}
    subtype = "FLOAT" if fmt == "wav" else "PCM_24"
    to_model = StreamingResampler(rate, streamer.sample_rate, streamer.nb_channels)
    to_file = {t: StreamingResampler(streamer.sample_rate, rate, channels) for t in streamer.targets}
    writers = {}  # opened inside the try below: an interruption right after the first file exists removes it
    state = streamer.initial_state()
    hop = streamer.hop
    counts = {"consumed": 0, "skip": streamer.latency, "model_written": 0, "written": 0}

    def model_hops():
        """Hops `(hop, model channels)` at the model rate: the resampled input, the last hop zero-padded, then
        silence to flush the latency."""
        pending = np.zeros((0, streamer.nb_channels), np.float32)
        for block in blocks:
            block = np.asarray(block, np.float32).reshape(len(block), -1)
            if not np.all(np.isfinite(block)):
                raise SeparateError(f"{source}: NaN/Inf samples at {counts['consumed'] / rate:.2f} s; "
                                    f"the stream is refused (check what produces it)")
            counts["consumed"] += len(block)
            pending = np.concatenate([pending, to_model.process(block)])
            while len(pending) >= hop:
                yield pending[:hop]
                pending = pending[hop:]
        if not counts["consumed"]:
            raise SeparateError(f"{source}: no audio (the stream was empty)")
        pending = np.concatenate([pending, to_model.flush()])
        pending = np.pad(pending, ((0, -len(pending) % hop + hop * -(-streamer.latency // hop)), (0, 0)))
        for first in range(0, len(pending), hop):
            yield pending[first:first + hop]

    def write(stems: dict, last: bool):
        limit = (nb_timesteps if nb_timesteps is not None else counts["consumed"]) - counts["written"]
        if last and limit > 0:  # what a resampler delay held back (zeros only when the stems came up short)
            stems = {t: np.pad(stem, ((0, max(0, limit - len(stem))), (0, 0))) for t, stem in stems.items()}
        count = max(0, min(len(next(iter(stems.values()))), limit))
        if not count:
            return
        for target, writer in writers.items():
            stem = stems[target][:count]
            writer.write(np.clip(stem, -1, 1) if fmt == "flac" else stem)
            writer.flush()  # a reader (or a pipe) sees the stem grow hop by hop
        counts["written"] += count

    try:
        for target in streamer.targets:
            writers[target] = soundfile.SoundFile(str(paths[target]), "w", samplerate=rate, channels=channels,
                                                  subtype=subtype)
        for block in model_hops():
            outputs = streamer.step(audio=np.asarray(block, np.float32)[None], **state)
            state = {name: outputs[name + "_out"] for name in STATE_NAMES}
            start = min(counts["skip"], hop)
            counts["skip"] -= start
            # model-rate stem samples: no more than the resampled input holds (the rest is padding)
            count = max(0, min(hop - start, to_model.produced - counts["model_written"]))
            if not count:
                continue
            counts["model_written"] += count
            write({t: to_file[t].process(np.asarray(outputs[t])[0, start:start + count]) for t in streamer.targets},
                  last=False)
        write({t: to_file[t].flush() for t in streamer.targets}, last=True)
    except BaseException as error:
        for writer in writers.values():
            writer.close()
        if atomic:
            remove_parts(destination)
            cleanup_destination(destination, created)
        elif not isinstance(error, (KeyboardInterrupt, Terminated)):
            for path in files.values():
                path.unlink(missing_ok=True)
            cleanup_destination(destination, created)
        raise
    for writer in writers.values():
        writer.close()
    if atomic:
        rename_together(paths, files)
    return files


def stream_file(streamer: StreamingSeparator, path: Path, out: Path, *, fmt: str, force: bool) -> Path:
    """Separate the audio file `path` hop by hop into `out/<track>/<target>.<fmt>` (all stems or none)."""
    import numpy as np

    from components.inference.files import read_any, track_folder

    destination = track_folder(path, out)
    existing = [destination / f"{t}.{fmt}" for t in streamer.targets if (destination / f"{t}.{fmt}").exists()]
    if existing and not force:
        raise SeparateError(f"{path}: {existing[0]} exists; use --force to overwrite or --skip-existing to skip it")
    audio, rate = read_any(path)
    if not np.all(np.isfinite(audio)):
        raise SeparateError(f"{path}: {int(np.count_nonzero(~np.isfinite(audio)))} NaN/Inf samples; re-export the "
                            f"file from its source")
    if audio.shape[1] > 2:
        raise SeparateError(f"{path}: {audio.shape[1]} channels, expected mono or stereo; downmix it to "
                            f"{streamer.nb_channels} channel(s) (e.g. ffmpeg -ac {streamer.nb_channels})")
    # at the file's rate, in blocks of about one model hop: resampled on the way in and out as a live stream is
    block = max(1, streamer.hop * rate // streamer.sample_rate)
    blocks = (audio[first:first + block] for first in range(0, len(audio), block))
    stream_to_stems(streamer, blocks, destination, rate=rate, channels=audio.shape[1], nb_timesteps=len(audio),
                    fmt=fmt, atomic=True, source=str(path))
    return destination


def stream_pcm(streamer: StreamingSeparator, handle, destination: Path, *, pcm_format: str, rate: int, channels: int,
               fmt: str, force: bool) -> Path:
    """Separate raw PCM read from `handle` (standard input) hop by hop into `destination/<target>.<fmt>`, the
    stems growing as the hops are separated, at the PCM's `rate` and `channels`."""
    if rate <= 0:
        raise SeparateError(f"--pcm-rate {rate}: must be a positive sample rate, e.g. --pcm-rate {streamer.sample_rate}")
    if channels not in (1, 2):
        raise SeparateError(f"--pcm-channels {channels}: 1 or 2 channels only")
    existing = [destination / f"{t}.{fmt}" for t in streamer.targets if (destination / f"{t}.{fmt}").exists()]
    if existing and not force:
        raise SeparateError(f"-: {existing[0]} exists; use --force to overwrite or --name to choose another folder")
    block = max(1, streamer.hop * rate // streamer.sample_rate)  # about one model hop of the PCM's rate
    stream_to_stems(streamer, pcm_hops(handle, pcm_format, channels, block), destination, rate=rate,
                    channels=channels, fmt=fmt, atomic=False)
    return destination
