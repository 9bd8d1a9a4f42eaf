"""The Sacred experiment behind the driver: one command per stage, observers from the CLI options."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from configs import PRESETS, Config, ConfigError
from configs.config import defaults
from components.artifacts import StageError
from pipeline import pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("pipeline")


class UserError(Exception):
    """Anything the user can fix: printed as one line, exit code 2."""


def deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def base_config() -> dict:
    """Dataclass defaults, with every registered model family's own defaults under `model.<name>`."""
    from models import registry

    config = defaults()
    for name in registry.names():
        config["model"][name] = registry.default_params(name)
    return config


def resolve(updates: dict, named: list) -> Config:
    """Validate defaults <- presets (in order) <- updates before Sacred runs anything."""
    merged = base_config()
    for name in named:
        if name not in PRESETS:
            raise UserError(f"unknown preset '{name}'; choose from {', '.join(sorted(PRESETS))}")
        merged = deep_merge(merged, PRESETS[name])
    merged = deep_merge(merged, updates)
    try:
        config = Config.from_dict(merged)
        from models import registry

        registry.family_config(config.model)  # validates `model.<name>.*` against the family's dataclass
    except ConfigError as error:
        raise UserError(str(error)) from None
    return config


def build_experiment(args):
    from sacred import SETTINGS, Experiment

    SETTINGS.CAPTURE_MODE = "sys"
    SETTINGS.DISCOVER_SOURCES = "imported"
    for stage in pipeline.STAGES + pipeline.EXTRA_STAGES:  # import built stages first so Sacred records their sources
        try:
            pipeline.component(stage)
        except pipeline.NotBuiltError:
            pass
    experiment = Experiment("music-separation", base_dir=str(PROJECT_ROOT), save_git_info=False)
    experiment.add_config(base_config())
    for name, preset in PRESETS.items():
        experiment.add_named_config(name, preset)
    experiment.observers.extend(observers(args))
    for stage in pipeline.STAGES + pipeline.EXTRA_STAGES:
        experiment.command(_stage_command(stage), unobserved=False)
    experiment.logger = logging.getLogger("sacred")
    return experiment


def observers(args) -> list:
    found = []
    if not args.no_file_observer:
        from sacred.observers import FileStorageObserver

        found.append(FileStorageObserver(args.runs_dir))
    if args.sql:
        try:
            from sacred.observers import SqlObserver
        except ImportError:
            raise UserError("--sql needs SQLAlchemy: pip install 'music-separation[db]'") from None
        try:
            found.append(SqlObserver(args.sql))
        except Exception as error:  # SQLAlchemy: unparsable URL, missing driver, server down
            reason = " ".join(str(error).split())[:200]
            raise UserError(f"--sql {args.sql}: cannot open the database ({reason}); use a SQLAlchemy URL such "
                            "as sqlite:///runs.db or postgresql://user:password@host/db") from None
    if args.mongo:
        try:
            from sacred.observers import MongoObserver
        except ImportError:
            raise UserError("--mongo needs pymongo: pip install 'music-separation[db]'") from None
        try:
            found.append(MongoObserver(url=args.mongo))
        except Exception as error:
            reason = " ".join(str(error).split())[:200]
            raise UserError(f"--mongo {args.mongo}: cannot reach MongoDB ({reason})") from None
    return found


def _stage_command(stage: str):
    def command(_config, _run):
        config = Config.from_dict({k: v for k, v in _config.items()})
        spec = pipeline.component(stage)
        artifact, skipped = pipeline.run_component(spec, config, force=_run.meta_info.get("force", False),
                                                   log_scalar=_run.log_scalar)
        _run.info["artifact"] = str(artifact.path)
        _run.info["skipped"] = skipped
        _run.info["fingerprint"] = artifact.fingerprint
        _run.info["figures"] = artifact.figures
        if not skipped:
            for name, value in _flat(artifact.figures):
                _run.log_scalar(f"{stage}.{name}", value)
        if artifact.file("artifact.json").is_file():  # a non-chief training worker commits nothing
            _run.add_artifact(str(artifact.file("artifact.json")), name=f"{stage}.artifact.json")
        result = artifact.meta.get("result")
        return float(result) if isinstance(result, (int, float)) else None

    command.__name__ = stage
    return command


def _flat(figures, prefix=""):
    for key, value in figures.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


def release_updates(stages: list, updates: dict, named: list) -> dict:
    """`updates` plus the settings a released checkpoint fixes (rate, targets, STFT, sizes).

    `--stage import`: from the released files themselves; evaluate/export (and prepare) after an
    import: from the imported train artifact, so those stages rebuild the same model. A key given
    on the command line with another value is a one-line error; preset values give way.
    """
    if "train" in stages:
        return updates
    from components import importer

    try:
        if "import" in stages:
            overrides, source = importer.release_overrides(resolve(updates, named)), "the released checkpoint"
        else:
            overrides = importer.imported_overrides(resolve(updates, named).artifacts_dir)
            source = "the imported model in the train artifact"
        return importer.merge_overrides(updates, overrides, source)
    except StageError as error:
        raise UserError(str(error)) from None


def run_stages(experiment, args, updates: dict, named: list) -> int:
    try:
        planned = pipeline.create_pipeline(args.stage)
    except StageError as error:
        raise UserError(str(error)) from None
    updates = release_updates(planned, updates, named)
    config = resolve(updates, named)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    try:
        stages = pipeline.create_pipeline(args.stage)
        for stage in stages:
            pipeline.component(stage)  # fail before any work if a stage is not built yet
    except StageError as error:
        raise UserError(str(error)) from None
    if config.train.replicas > 1 and "train" in stages:
        from components.train import configure_devices

        try:
            configure_devices(config.train.replicas)  # logical CPU devices must exist before TF starts
        except StageError as error:
            raise UserError(str(error)) from None
    for stage in stages:
        try:
            run = experiment.run(stage, config_updates=updates, named_configs=named,
                                 meta_info={"force": args.force},
                                 options={"--loglevel": "WARNING" if args.quiet else "INFO"})
        except (StageError, ConfigError) as error:
            raise UserError(str(error)) from None
        except Exception as error:  # Sacred's own config errors are user errors too
            if type(error).__module__.startswith("sacred"):
                raise UserError(" ".join(str(error).split())) from None
            raise
        log.info("stage %s: %s (Sacred run %s)", stage,
                 "skipped, up to date" if run.info.get("skipped") else "done", run._id)
    return 0
