"""`musicsep`: one console command with a subcommand per job, each the same as its script.

    musicsep run --stage all [with preset key=value ...]   = python pipeline/run.py ...
    musicsep separate song.mp3 [...]                        = python pipeline/separate.py ...
    musicsep sweep | benchmark | compare ...                = python pipeline/<name>.py ...

A subcommand's module is imported only when it is chosen, so `musicsep --help` is instant.
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; errors still show
if __name__ == "__main__" and not __package__:  # `python pipeline/cli.py`
    from _script import put_project_root_first
    put_project_root_first()

SUBCOMMANDS = {
    "run": ("pipeline.run", "run pipeline stages (prepare, train, evaluate, export, import, all)"),
    "separate": ("pipeline.separate", "split songs into stems with an exported or published model"),
    "sweep": ("pipeline.sweep", "run a grid of configurations and tabulate their scores"),
    "compare": ("pipeline.compare", "train and evaluate every model family on one budget"),
    "benchmark": ("pipeline.benchmark", "measure separation and training speed and memory"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return ("usage: musicsep <command> [options]   (musicsep <command> --help for its options)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"musicsep: unknown command '{name}'; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
