"""The driver: `python pipeline/run.py --stage {prepare,train,evaluate,export,all} [with preset key=value ...]`.

Every stage run is a Sacred run (config, host info, sources, metrics, artifacts), recorded by a
FileStorageObserver under `runs/` and optionally by a SQL database or MongoDB.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; errors still show
if __name__ == "__main__" and not __package__:  # `python pipeline/run.py`
    from _script import put_project_root_first
    put_project_root_first()

from configs.errors import UserError  # noqa: E402 - after the sys.path set-up above
from pipeline.definition import EXTRA_STAGES, STAGES  # noqa: E402

STAGE_CHOICES = (*STAGES, "all", *EXTRA_STAGES)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musicsep run",
        description="Music source separation pipeline: prepare -> train -> evaluate -> export.",
        epilog="Configuration follows Sacred: `with unittest model.name=umx data.root=/path artifacts_dir=/tmp/a`.",
    )
    parser.add_argument("--stage", choices=STAGE_CHOICES, default="all", help="stage to run (default: all = prepare, train, evaluate, "
                        "export); `import` writes the train artifact from released weights (import.path=...)")
    parser.add_argument("--force", action="store_true", help="redo stages even when a matching artifact exists")
    parser.add_argument("--runs-dir", default="runs", help="FileStorageObserver directory (default: runs)")
    parser.add_argument("--no-file-observer", action="store_true", help="do not record runs under --runs-dir")
    parser.add_argument("--sql", metavar="URL", help="also record runs in a SQL database, e.g. sqlite:///runs.db")
    parser.add_argument("--mongo", metavar="URL", help="also record runs in MongoDB, e.g. mongodb://host:27017/db")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--describe-model", action="store_true",
                        help="print the model family, each network's parameter count and the total, and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("updates", nargs=argparse.REMAINDER,
                        help="`with` followed by preset names and key=value overrides")
    return parser


def split_updates(tokens):
    """`with unittest a.b=1` -> (config updates dict, [named presets]) using Sacred's own parser."""
    from sacred.arg_parser import get_config_updates

    if not tokens:
        return {}, []
    if tokens[0] != "with":
        raise UserError(f"unexpected arguments {' '.join(tokens)!r}; configuration goes after `with`")
    options = [token for token in tokens[1:] if token.startswith("-")]
    if options:
        raise UserError(f"{options[0]} after `with` is read as configuration; put options before `with`, e.g. "
                        f"`python pipeline/run.py --stage all {options[0]} with unittest`")
    updates, named = get_config_updates(tokens[1:])
    return _booleans(updates), named


def _booleans(updates):
    """`key=true` / `key=FALSE` as booleans (Sacred reads only Python's True/False as such)."""
    if isinstance(updates, dict):
        return {key: _booleans(value) for key, value in updates.items()}
    if isinstance(updates, str) and updates.lower() in ("true", "false"):
        return updates.lower() == "true"
    return updates


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from pipeline.quiet import import_tensorflow

    import_tensorflow()  # without the CPU-machine start-up notices
    from pipeline.experiment import build_experiment, resolve, run_stages

    try:
        updates, named = split_updates(args.updates)
        # no preset named: the `default` preset (the 10-minute CPU pipeline); `with paper` gives the
        # full-size published recipes (the dataclass defaults), `with unittest` the tiny one
        named = named or ["default"]
        if args.describe_model:
            print(describe_model(updates, named))
            return 0
        config = resolve(updates, named)  # every key checked before anything is written or connected to
        # Sacred's "Failed after 0:00:01!": the one-line error (or the traceback) that follows says what failed
        _drop_sacred_notice("Failed after ")
        _drop_sacred_notice('Added new config entry: "train.init_targets.')  # a mapping's keys (train.init_targets)
        if args.no_file_observer and not (args.sql or args.mongo):
            _drop_sacred_notice("No observers have been added to this run")  # the user asked for none
        experiment = build_experiment(args)
        return run_stages(experiment, args, updates, named, config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, the interrupted one resumes (train) or restarts on the "
              "next run", file=sys.stderr)
        return 130


def _drop_sacred_notice(text: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not (record.name.startswith("sacred") and text in record.getMessage()))


def network_parameters(model) -> dict:
    """{network name: trainable parameters} of a built SeparationModel: the family's `networks` (one per
    target), else the Keras sub-models of `train_model`, else `train_model` itself."""
    import keras

    from models.base import count_parameters

    networks = dict(model.inference.networks)
    if not networks:
        networks = {layer.name: layer for layer in model.train_model.layers
                    if isinstance(layer, keras.Model) and layer.trainable_weights}
    if not networks:
        networks = {model.train_model.name: model.train_model}
    return {name: count_parameters(network) for name, network in networks.items()}


def describe_model(updates: dict, named: list) -> str:
    """The text of `--describe-model`: family, targets, each network's parameter count and the total, then each
    recipe preset's deliberate differences from the authors' recipe (`configs/recipes.py`)."""
    from components.training.trained import build_model
    from models.base import count_parameters
    from pipeline.experiment import resolve

    config = resolve(updates, named)
    model = build_model(config, {})
    lines = [f"family: {config.model.name} (presets: {', '.join(named)}; targets: {', '.join(model.targets)}; "
             f"{model.sample_rate} Hz, {model.nb_channels} channel(s))"]
    counts = network_parameters(model)
    width = max(len(name) for name in counts)
    for name, count in counts.items():
        lines.append(f"  {name:<{width}}  {count:>14,} trainable parameters")
    lines.append(f"total: {count_parameters(model.train_model):,} trainable parameters")
    from configs.recipes import describe as recipe_differences

    for preset in named:  # each recipe preset's deliberate differences from the authors' recipe
        differences = recipe_differences(preset)
        if differences:
            lines += [f"differences of '{preset}' from the authors' recipe (docs/recipes.md):", *differences]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
