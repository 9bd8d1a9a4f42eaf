"""Split songs into stems: `separate song.mp3 other.flac [--model DIR|FILE.tflite] [-o stems/]`.

With no `--model`, the SavedModel of the latest export of the default pipeline run
(`artifacts/export/`). Writes `<out>/<track>/<target>.wav` (or .flac) with the input's sample rate,
length and channel count. A file that cannot be read is reported on one line and skipped; the exit
code is non-zero when any file failed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; errors still show
if __name__ == "__main__" and not __package__:  # `python pipeline/separate.py`
    from _script import put_project_root_first
    put_project_root_first()

from components.inference.files import read_any, safe_name, separate_file, write_problem  # noqa: E402 - after the sys.path set-up
from components.inference.separators import load_separator  # noqa: E402
from components.inference.streaming import file_hops, load_streaming, pcm_hops, stream_to_stems  # noqa: E402
from configs.errors import SeparateError, StageError  # noqa: E402



def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicsep separate", description=__doc__.splitlines()[0])
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
    from components.data.audio import conform

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
    stream_to_stems(streamer, file_hops(mixture, streamer.hop), destination, nb_timesteps=len(mixture),
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
        for block in pcm_hops(sys.stdin.buffer, args.pcm_format, channels, streamer.hop):
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
