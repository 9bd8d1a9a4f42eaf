"""Split songs into stems: `separate song.mp3 album/ [-n NAME | --model DIR|FILE.tflite | --artifacts-dir DIR]`.

With none of `-n`, `--model` and `--artifacts-dir`, the catalogue's default released model (downloaded and
converted once). Writes `<out>/<track>/<stem>.wav` (`--filename`, `--format`) with the input's sample rate,
length and channel count. A file that cannot be read is reported on one line and skipped; the exit
code is non-zero when any file failed. The Python API is `pipeline.api.Separator`.
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

from components.inference.files import (DEFAULT_FILENAME, FORMATS, Terminated, clashing_inputs,  # noqa: E402
                                        expand_inputs, finished, safe_name, StemOutput, track_destination,
                                        track_folder, track_name, write_problem)  # after the sys.path set-up above
from components.inference.streaming import load_streaming, stream_file, stream_pcm  # noqa: E402
from configs.errors import SeparateError  # noqa: E402



def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicsep separate", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="audio files (wav, flac, ogg, mp3, aiff via soundfile; mp4, m4a, aac, "
                                                 "webm, opus via ffmpeg), folders (their audio files, recursively, "
                                                 "the tree mirrored under -o) and glob patterns ('**/*.mp3')")
    parser.add_argument("-n", "--pretrained", metavar="NAME",
                        help="a released model by name (--list-models): downloaded, checked, converted and cached "
                             "on first use (default: the catalogue's default model, umxl)")
    parser.add_argument("--list-models", action="store_true", help="list the released models and exit")
    parser.add_argument("--model", help="SavedModel directory, TF Serving model folder or exported .tflite file")
    server = parser.add_argument_group("TensorFlow Serving (pip install tensorflow-serving-api; deploy/)")
    server.add_argument("--server", metavar="HOST:PORT", help="separate on a TF Serving server over gRPC instead of "
                        "locally, e.g. localhost:8500")
    server.add_argument("--server-model", metavar="NAME", help="the model's name on the server (default: the name of "
                        "the export in --artifacts-dir)")
    server.add_argument("--server-timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    server.add_argument("--server-max-message-mb", type=float, default=4.0,
                        help="the gRPC message limit the chunks must fit (default: gRPC's 4 MB)")
    parser.add_argument("--artifacts-dir", help="separate with the latest export of the pipeline run in this folder "
                                                "(e.g. artifacts after `musicsep run --stage all`)")
    parser.add_argument("-o", "--out", default="separated", help="output directory (default: separated)")
    stems = parser.add_argument_group("which stems, how written")
    stems.add_argument("--stems", metavar="A,B", help="only these of the model's stems, e.g. --stems vocals,drums")
    stems.add_argument("--two-stems", metavar="STEM", help="STEM and no_STEM (the sum of the model's other stems), "
                                                           "e.g. --two-stems vocals")
    stems.add_argument("--format", choices=FORMATS, default="wav", help="stem file format (default wav; mp3 through "
                                                                         "ffmpeg)")
    stems.add_argument("--bit-depth", type=int, choices=(16, 24, 32),
                       help="wav: 16, 24 or 32 (float, the default); flac: 16 or 24 (the default)")
    stems.add_argument("--mp3-bitrate", type=int, default=320, metavar="KBPS", help="mp3 bit rate (default 320)")
    stems.add_argument("--filename", default=DEFAULT_FILENAME, metavar="TEMPLATE",
                       help=f"stem file path under -o, from {{track}}, {{stem}}, {{ext}} (default {DEFAULT_FILENAME})")
    parser.add_argument("--chunk-seconds", type=float, default=None,
                        help="SavedModel chunk length, bounds memory (default: the chunk the model declares, else 10)")
    parser.add_argument("--overlap", type=float, default=0.25, help="overlap fraction between chunks")
    parser.add_argument("--workers", type=int, default=None,
                        help=".tflite models: chunks separated at the same time, one 1-thread interpreter each "
                             "(default 2: on a quiet 2-core machine 1.8x faster than one 2-thread interpreter)")
    parser.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                        help="files separated at the same time (default 1; each also uses TensorFlow's threads)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is visible")
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
    for flag, value, default in (("--stems", args.stems, None), ("--two-stems", args.two_stems, None),
                                 ("--bit-depth", args.bit_depth, None), ("--filename", args.filename,
                                                                         DEFAULT_FILENAME), ("--jobs", args.jobs, 1)):
        if value != default:
            return _refuse(f"{flag} {value}: --stream writes every stem to <out>/<track>/<stem>.wav|flac as it is "
                           f"separated; drop {flag} or --stream")
    if args.format == "mp3":
        return _refuse("--format mp3: --stream writes wav or flac (an mp3 cannot grow hop by hop); convert after")
    streamer, code = _load(args, args.files, lambda: load_streaming(args.model, args.artifacts_dir or "artifacts"))
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


def _load(args, inputs, load, output: StemOutput = StemOutput()):
    """(the model `load()` returns, None) after the checks both modes make first (the output folder, inputs that
    clash) and TensorFlow's quiet import; (None, exit code) when one fails."""
    from pipeline.quiet import import_tensorflow

    problem = _output_problem(inputs, Path(args.out), output)
    if problem:
        return None, _refuse(problem)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # before TensorFlow initialises its devices
    import_tensorflow()  # without the CPU-machine start-up notices
    if args.cpu:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    try:
        return load(), None
    except SeparateError as error:
        return None, _refuse(str(error))


def _server_model(args, artifacts_dir):
    """The model's name on the server: --server-model, else the name of the export in --artifacts-dir."""
    name = args.server_model
    if name is None:
        sidecar = Path(artifacts_dir) / "export" / "model.json"
        if not sidecar.is_file():
            raise SeparateError(f"--server {args.server}: which model? give --server-model NAME (its name in the "
                                "server's models.config)")
        name = json.loads(sidecar.read_text())["model"]
    return name


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _output_problem(inputs, out: Path, output: StemOutput = StemOutput()):
    """Why the output cannot be written (a file where the folder goes, two inputs for one folder), or None."""
    if out.exists() and not out.is_dir():
        return f"-o {out}: exists and is not a directory; choose a folder for the stems"
    clash = clashing_inputs(inputs, out, output)
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
    _INTERRUPTS.clear(), _TERMINATIONS.clear()  # this run's signals only (main can run twice in one process)
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, _interrupted)
    try:
        return stream_main(args) if args.stream else _main(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {what}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"terminated; {what}", file=sys.stderr)
        return 143
    except Exception:
        # a signal inside TensorFlow can surface as another exception: pybind11's "error_already_set"
        # RuntimeError from the C++ executor, or the ValueError a SavedModel function raises when binding its
        # arguments was interrupted. After a signal it is that interruption (the file in progress was already
        # cleaned up); without one, a real error.
        if _TERMINATIONS:
            print(f"terminated; {what}", file=sys.stderr)
            return 143
        if not _INTERRUPTS:
            raise
        print(f"\ninterrupted; {what}", file=sys.stderr)
        return 130


_TERMINATIONS = []  # SIGTERMs received


def _terminated(signum, frame):
    _TERMINATIONS.append(signum)
    raise Terminated()


_INTERRUPTS = []  # SIGINTs received (Ctrl-C)


def _interrupted(signum, frame):
    import signal

    _INTERRUPTS.append(signum)
    signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as Python's own handler


def _main(args) -> int:
    from pipeline.api import Separator, check_chunking

    if args.workers is not None and args.workers < 1:
        return _refuse(f"--workers {args.workers}: must be at least 1; e.g. --workers 2")
    if args.jobs < 1:
        return _refuse(f"--jobs {args.jobs}: must be at least 1; e.g. -j 2")
    try:
        output = StemOutput(fmt=args.format, bit_depth=args.bit_depth, mp3_bitrate=args.mp3_bitrate,
                            filename=args.filename)
        inputs = expand_inputs(args.files)
        stems = None if args.stems is None else args.stems.split(",")
        options = dict(stems=stems, two_stems=args.two_stems, chunk_seconds=args.chunk_seconds, overlap=args.overlap)
        check_chunking(args.chunk_seconds, args.overlap)  # before any download or loading
    except SeparateError as error:
        return _refuse(str(error))
    pretrained = args.pretrained
    if pretrained is None and args.model is None and args.artifacts_dir is None and not args.server:
        from components.inference.catalogue import CatalogueError, default_name, entry

        try:
            pretrained = default_name()
            licence = entry(pretrained).license
        except CatalogueError as error:
            return _refuse(str(error))
        print(f"separating with the released model {pretrained} ({licence}); -n NAME for another (--list-models), "
              "--artifacts-dir DIR for a pipeline export", file=sys.stderr)
    artifacts_dir = args.artifacts_dir or "artifacts"
    if pretrained and not args.server:
        from components.inference.catalogue import CatalogueError
        from pipeline.experiment import convert_release

        problem = _output_problem(inputs, Path(args.out), output)  # before a download or conversion
        if problem:
            return _refuse(problem)
        try:
            artifacts_dir = str(convert_release(pretrained, args.quiet))
        except (CatalogueError, SeparateError) as error:
            return _refuse(str(error))
    if args.server:
        def connect():
            from components.inference.serving_client import check_address

            check_address(args.server)  # the address first, then which model
            return Separator.from_server(args.server, _server_model(args, artifacts_dir), timeout=args.server_timeout,
                                         max_message_mb=args.server_max_message_mb, **options)

        separator, code = _load(args, inputs, connect, output)
    elif args.model:
        separator, code = _load(args, inputs, lambda: Separator.from_model(args.model, workers=args.workers,
                                                                           **options), output)
    else:
        separator, code = _load(args, inputs, lambda: Separator.from_artifacts(artifacts_dir, workers=args.workers,
                                                                               **options), output)
    if separator is None:
        return code
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return _refuse(f"-o {out}: cannot create it ({write_problem(out, error)}); choose another folder")
    todo = []
    for name, root in inputs:
        track = track_name(Path(name), root)
        if args.skip_existing and separator.finished(name, out, output, track):
            print(f"{name} -> {track_destination(out, track, output)} (already separated, skipped)")
            continue
        todo.append((name, track))

    def one(name, track, cancel=None):
        files = separator.separate_file(name, out, output=output, track=track, force=args.force,
                                        progress=not args.quiet and args.jobs == 1, cancel=cancel)
        return track_destination(out, track, output) if len(files) > 1 else next(iter(files.values()))

    failed = 0
    if args.jobs == 1 or len(todo) < 2:
        for name, track in todo:
            try:
                print(f"{name} -> {one(name, track)}")
            except SeparateError as error:
                failed += 1
                print(f"error: {error}", file=sys.stderr)
        return 1 if failed else 0
    import threading
    from concurrent.futures import ThreadPoolExecutor

    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=args.jobs, thread_name_prefix="separate")
    try:
        futures = [(name, pool.submit(one, name, track, cancel)) for name, track in todo]
        for name, future in futures:  # reported in the order given
            try:
                print(f"{name} -> {future.result()}")
            except SeparateError as error:
                failed += 1
                print(f"error: {error}", file=sys.stderr)
    except BaseException:
        cancel.set()  # every running file stops at its next chunk and removes its .part files
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
