"""Separation hop by hop with an export's streaming model (models/streaming.py): one hop in, one hop per target
out, stems written as they are produced."""
from __future__ import annotations

import json
from pathlib import Path

from configs.errors import SeparateError, StageError


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
    """Blocks `(hop, nb_channels)` float32 from a raw PCM byte stream; the last one may be shorter."""
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


def file_hops(mixture, hop: int):
    """Blocks of `hop` samples of an array; the last one may be shorter."""
    for start in range(0, len(mixture), hop):
        yield mixture[start:start + hop]


def stream_to_stems(streamer: StreamingSeparator, blocks, destination: Path, *, nb_timesteps=None, out_channels: int,
                    fmt: str, atomic: bool, source: str = "-", rate: int = None) -> dict:
    """Run blocks `(n, channels at the model's layout)` at `rate` (default the model's) through the streaming model
    hop by hop, writing every stem as its hops come out (flushed), at `rate` and `out_channels`, aligned with the
    input: the first `latency` output samples are dropped and the tail is flushed with silence. At another rate
    the input is resampled to the model's and each stem back, block by block (`StreamingResampler`: the same
    numbers as resampling the whole signal), which adds the two filters' delays to the latency. `nb_timesteps`:
    the input length when known (a file), else the samples received. Returns {target: file}.

    `atomic` (a file input): the stems are `.part` files renamed together at the end; any error or interruption
    removes them. Otherwise (standard input, a live stream) the stems grow in place: an interruption (Ctrl-C,
    SIGTERM: how a live stream is ended) closes them as valid files holding what was streamed; an error (NaN/Inf
    samples, a malformed or empty stream) removes them, as nothing valid can be promised after it."""
    import numpy as np
    import soundfile

    from components.data.audio import StreamingResampler
    from models.streaming import STATE_NAMES

    from components.inference.files import Terminated, cleanup_destination, remove_parts, rename_together

    rate = rate or streamer.sample_rate
    hop, channels = streamer.hop, streamer.nb_channels
    into = StreamingResampler(rate, streamer.sample_rate, channels)  # identity at the model's rate
    back = {t: StreamingResampler(streamer.sample_rate, rate, channels) for t in streamer.targets}
    created = not destination.exists()
    destination.mkdir(parents=True, exist_ok=True)
    files = {t: destination / f"{t}.{fmt}" for t in streamer.targets}
    paths = {t: (f.with_name(f".{f.stem}.part.{fmt}") if atomic else f) for t, f in files.items()}
    subtype = "FLOAT" if fmt == "wav" else "PCM_24"
    writers = {}  # opened inside the cleanup's try: an interruption after the first file exists removes it
    state = streamer.initial_state()
    counts = {"in": 0, "model": 0}  # input samples received; model-rate samples they became
    written = {t: 0 for t in streamer.targets}  # samples of each stem written, at `rate`
    flush = [np.zeros((hop, channels), np.float32)] * (-(-streamer.latency // hop))

    def hops():
        pending = np.zeros((0, channels), np.float32)

        def ready(samples):
            nonlocal pending
            counts["model"] += len(samples)
            pending = np.concatenate([pending, samples]) if len(pending) else np.asarray(samples, np.float32)
            while len(pending) >= hop:
                yield pending[:hop]
                pending = pending[hop:]

        for block in blocks:
            if not np.all(np.isfinite(block)):
                raise SeparateError(f"{source}: NaN/Inf samples at {counts['in'] / rate:.2f} s; "
                                    f"the stream is refused (check what produces it)")
            counts["in"] += len(block)
            yield from ready(into(block))
        if not counts["in"]:
            raise SeparateError(f"{source}: no audio (the stream was empty)")
        yield from ready(into.flush())
        if len(pending):
            yield np.pad(pending, ((0, hop - len(pending)), (0, 0)))
        yield from flush

    def write(target, stem, resampled=False):
        """Write samples of `target` at the model rate (or already at `rate`), capped at the input's length."""
        stem = stem if resampled else back[target](stem)
        cap = (nb_timesteps if nb_timesteps is not None else counts["in"]) - written[target]
        stem = stem[:max(0, cap)]
        if not len(stem):
            return
        if out_channels != stem.shape[1]:
            stem = stem.mean(axis=1, keepdims=True) if out_channels == 1 else np.repeat(stem, out_channels, 1)
        writers[target].write(np.clip(stem, -1, 1) if fmt == "flac" else stem)
        writers[target].flush()  # a reader (or a pipe) sees the stem grow hop by hop
        written[target] += len(stem)

    skip, produced = streamer.latency, 0
    try:
        for target in streamer.targets:
            writers[target] = soundfile.SoundFile(str(paths[target]), "w", samplerate=rate, channels=out_channels,
                                                  subtype=subtype)
        for block in hops():
            outputs = streamer.step(audio=np.asarray(block, np.float32)[None], **state)
            state = {name: outputs[name + "_out"] for name in STATE_NAMES}
            start = min(skip, hop)
            skip -= start
            count = max(0, min(hop - start, counts["model"] - produced))
            if not count:
                continue
            for target in streamer.targets:
                write(target, np.asarray(outputs[target])[0, start:start + count])
            produced += count
        for target in streamer.targets:  # the back-resampler's last samples, then silence up to the input's length
            write(target, back[target].flush(), resampled=True)
            missing = (nb_timesteps if nb_timesteps is not None else counts["in"]) - written[target]
            if missing > 0:
                writers[target].write(np.zeros((missing, out_channels), np.float32))
                written[target] += missing
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


def resampling_delay(streamer: StreamingSeparator, rate: int) -> int:
    """Input samples (at `rate`) the two resamplers add to the streaming model's latency: 0 at the model's rate."""
    from components.data.audio import StreamingResampler

    if rate == streamer.sample_rate:
        return 0
    into = StreamingResampler(rate, streamer.sample_rate, 1)
    back = StreamingResampler(streamer.sample_rate, rate, 1)
    return into.delay_in_samples + -(-back.delay_in_samples * rate // streamer.sample_rate)


def stream_file(streamer: StreamingSeparator, path: Path, out: Path, *, fmt: str, force: bool) -> Path:
    """Separate the audio file `path` hop by hop into `out/<track>/<target>.<fmt>` (all stems or none)."""
    import numpy as np

    from components.data.audio import conform
    from components.inference.files import read_any, track_folder

    destination = track_folder(path, out)
    existing = [destination / f"{t}.{fmt}" for t in streamer.targets if (destination / f"{t}.{fmt}").exists()]
    if existing and not force:
        raise SeparateError(f"{path}: {existing[0]} exists; use --force to overwrite or --skip-existing to skip it")
    audio, rate = read_any(path)
    if not np.all(np.isfinite(audio)):
        raise SeparateError(f"{path}: {int(np.count_nonzero(~np.isfinite(audio)))} NaN/Inf samples; re-export the "
                            f"file from its source")
    try:  # the model's channels (mono duplicated, stereo averaged), at the file's own rate
        mixture = conform(audio, rate, path, sample_rate=rate, nb_channels=streamer.nb_channels)
    except StageError as error:
        raise SeparateError(str(error)) from None
    stream_to_stems(streamer, file_hops(mixture, streamer.hop), destination, nb_timesteps=len(mixture),
                    out_channels=audio.shape[1], fmt=fmt, atomic=True, source=str(path), rate=rate)
    return destination


def stream_pcm(streamer: StreamingSeparator, handle, destination: Path, *, pcm_format: str, rate: int, channels: int,
               fmt: str, force: bool) -> Path:
    """Separate raw PCM read from `handle` (standard input) hop by hop into `destination/<target>.<fmt>`, the
    stems growing as the hops are separated."""
    import numpy as np

    if rate <= 0:
        raise SeparateError(f"--pcm-rate {rate}: must be a positive sample rate, e.g. --pcm-rate {streamer.sample_rate}")
    if channels not in (1, 2):
        raise SeparateError(f"--pcm-channels {channels}: 1 or 2 channels only")
    existing = [destination / f"{t}.{fmt}" for t in streamer.targets if (destination / f"{t}.{fmt}").exists()]
    if existing and not force:
        raise SeparateError(f"-: {existing[0]} exists; use --force to overwrite or --name to choose another folder")

    def hops():
        for block in pcm_hops(handle, pcm_format, channels, streamer.hop):
            if channels != streamer.nb_channels:
                block = np.repeat(block, streamer.nb_channels, 1) if channels == 1 else block.mean(1, keepdims=True)
            yield block

    stream_to_stems(streamer, hops(), destination, out_channels=channels, fmt=fmt, atomic=False, rate=rate)
    return destination
