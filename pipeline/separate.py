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
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; errors still show
if __name__ == "__main__" and not __package__:  # `python pipeline/separate.py`
    from _script import put_project_root_first
    put_project_root_first()

from components.inference.files import (Terminated, clashing_inputs, finished, safe_name,  # noqa: E402 - after the
                                        separate_file, track_folder, write_problem)          # sys.path set-up above
from components.inference.separators import load_separator  # noqa: E402
from components.inference.streaming import load_streaming, stream_file, stream_pcm  # noqa: E402
from configs.errors import SeparateError  # noqa: E402



def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicsep separate", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="audio files: wav, flac, ogg, mp3 (soundfile); mp4, m4a, aac (ffmpeg)")
    parser.add_argument("-n", "--pretrained", metavar="NAME",
                        help="a released model by name (--list-models): downloaded, checked, converted and cached "
                             "on first use")
    parser.add_argument("--list-models", action="store_true", help="list the released models and exit")
    parser.add_argument("--model", help="SavedModel directory or .tflite file (default: latest export in "
                                        "--artifacts-dir)")
    server = parser.add_argument_group("TensorFlow Serving (pip install tensorflow-serving-api; deploy/)")
    server.add_argument("--server", metavar="HOST:PORT", help="separate on a TF Serving server over gRPC instead of "
                        "locally, e.g. localhost:8500")
    server.add_argument("--server-model", metavar="NAME", help="the model's name on the server (default: the name of "
                        "the export in --artifacts-dir)")
    server.add_argument("--server-timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    server.add_argument("--server-max-message-mb", type=float, default=4.0,
                        help="the gRPC message limit the chunks must fit (default: gRPC's 4 MB)")
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
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip tracks whose stems all exist (exit 0), e.g. to rerun over a folder")
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
    if args.pcm_rate is not None and args.pcm_rate <= 0:
        return _refuse(f"--pcm-rate {args.pcm_rate}: must be a positive sample rate, e.g. --pcm-rate 44100")
    if args.pcm_channels is not None and args.pcm_channels not in (1, 2):
        return _refuse(f"--pcm-channels {args.pcm_channels}: 1 or 2 channels only")
    streamer, code = _load(args, lambda: load_streaming(args.model, args.artifacts_dir))
    if streamer is None:
        return code
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.files:
        try:
            if name == "-":
                destination = out / safe_name(args.name)
                if args.skip_existing and finished(streamer, destination, args.format):
                    print(f"- -> {destination} (already separated, skipped)")
                    continue
                stream_pcm(streamer, sys.stdin.buffer, destination, pcm_format=args.pcm_format,
                           rate=args.pcm_rate or streamer.sample_rate, channels=args.pcm_channels or
                           streamer.nb_channels, fmt=args.format, force=args.force)
            else:
                destination = track_folder(Path(name), out)
                if args.skip_existing and finished(streamer, destination, args.format):
                    print(f"{name} -> {destination} (already separated, skipped)")
                    continue
                destination = stream_file(streamer, Path(name), out, fmt=args.format, force=args.force)
            print(f"{name} -> {destination}")
        except SeparateError as error:
            failed += 1
            print(f"error: {error}", file=sys.stderr)
    return 1 if failed else 0


def _load(args, load):
    """(the model `load()` returns, None) after the checks both modes make first (the output folder, inputs that
    clash) and TensorFlow's quiet import; (None, exit code) when one fails."""
    from pipeline.quiet import import_tensorflow

    problem = _output_problem(args.files, Path(args.out))
    if problem:
        return None, _refuse(problem)
    import_tensorflow()  # without the CPU-machine start-up notices
    try:
        return load(), None
    except SeparateError as error:
        return None, _refuse(str(error))


def _connect(args, artifacts_dir):
    from components.inference import serving_client

    serving_client.check_address(args.server)
    name = args.server_model
    if name is None:
        sidecar = Path(artifacts_dir) / "export" / "model.json"
        if not sidecar.is_file():
            raise SeparateError(f"--server {args.server}: which model? give --server-model NAME (its name in the "
                                "server's models.config)")
        name = json.loads(sidecar.read_text())["model"]
    return serving_client.connect(args.server, name, args.server_timeout, args.server_max_message_mb)


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _output_problem(names, out: Path):
    """Why the output cannot be written (a file where the folder goes, two inputs for one folder), or None."""
    if out.exists() and not out.is_dir():
        return f"-o {out}: exists and is not a directory; choose a folder for the stems"
    clash = clashing_inputs(names, out)
    if clash:
        first, second, folder = clash
        return (f"{first} and {second} would both write their stems to {folder}; separate them into different "
                f"-o folders or rename one")
    return None


def main(argv=None) -> int:
    """Exit codes: 0 all files separated, 1 some file failed (each reported on one line), 2 the model or
    the output folder is unusable, 130 interrupted (Ctrl-C) and 143 terminated (SIGTERM): tracks already
    finished are kept, the one in progress leaves nothing."""
    import signal

    parser = get_parser()
    args = parser.parse_args(argv)
    if args.list_models:
        from components.inference.catalogue import CatalogueError
        from pipeline.pretrained import list_models

        try:
            print(list_models())
        except CatalogueError as error:
            return _refuse(str(error))
        return 0
    if not args.files:
        parser.error("give the audio files to separate (or --list-models)")
    if args.server and args.stream:
        return _refuse(f"--server {args.server} and --stream both given; the server separates whole files, "
                       "drop one")
    if args.pretrained and args.model:
        return _refuse(f"-n {args.pretrained} and --model {args.model} both given; choose one")
    what = ("finished tracks are kept, a file in progress left no files, and the stems of standard input hold "
            "what was streamed" if args.stream else "finished tracks are kept, the unfinished one left no files")
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, _interrupted)
    try:
        return stream_main(args) if args.stream else _main(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {what}", file=sys.stderr)
        return 130
    except RuntimeError:
        # Ctrl-C inside TensorFlow's C++ executor can surface as pybind11's "error_already_set" RuntimeError
        # instead of KeyboardInterrupt: the same interruption (the file in progress was already cleaned up)
        if not _INTERRUPTS:
            raise
        print(f"\ninterrupted; {what}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"terminated; {what}", file=sys.stderr)
        return 143


def _terminated(signum, frame):
    raise Terminated()


_INTERRUPTS = []  # SIGINTs received (Ctrl-C)


def _interrupted(signum, frame):
    import signal

    _INTERRUPTS.append(signum)
    signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as Python's own handler


def _main(args) -> int:
    if not 0 <= args.overlap < 1:
        print(f"error: --overlap {args.overlap:g}: must be a fraction in [0, 1); e.g. --overlap 0.25", file=sys.stderr)
        return 2
    if args.chunk_seconds is not None and not args.chunk_seconds > 0:
        print(f"error: --chunk-seconds {args.chunk_seconds:g}: must be > 0; e.g. --chunk-seconds 10", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers {args.workers}: must be at least 1; e.g. --workers 2", file=sys.stderr)
        return 2
    artifacts_dir = args.artifacts_dir
    if args.pretrained:
        from components.inference.catalogue import CatalogueError
        from pipeline.pretrained import converted

        try:
            artifacts_dir = str(converted(args.pretrained, quiet=args.quiet))
        except (CatalogueError, SeparateError) as error:
            return _refuse(str(error))
    if args.server:
        separator, code = _load(args, lambda: _connect(args, artifacts_dir))
    else:
        separator, code = _load(args, lambda: load_separator(args.model, artifacts_dir, args.workers))
    if separator is None:
        return code
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"error: -o {out}: cannot create it ({write_problem(out, error)}); choose another folder",
              file=sys.stderr)
        return 2
    failed = 0
    for name in args.files:
        destination = track_folder(Path(name), out)
        if args.skip_existing and finished(separator, destination, args.format):
            print(f"{name} -> {destination} (already separated, skipped)")
            continue
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
