"""The Sacred experiment behind the driver: one command per stage, observers from the CLI options."""
from __future__ import annotations

import errno
import json
import logging
import re
from pathlib import Path

from configs import PRESETS, Config
from configs.config import deep_merge, defaults
from configs.errors import UserError
from pipeline import definition

PROJECT_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("pipeline")


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
    config = Config.from_dict(merged)
    from models import registry

    registry.check(config.model)  # model.name and every family's knobs
    return config


def build_experiment(args):
    from sacred import SETTINGS, Experiment

    SETTINGS.CAPTURE_MODE = "sys"
    SETTINGS.DISCOVER_SOURCES = "imported"
    for stage in definition.STAGES + definition.EXTRA_STAGES:  # import the stages first so Sacred records their sources
        definition.component(stage)
    experiment = Experiment("music-separation", base_dir=str(PROJECT_ROOT), save_git_info=False)
    experiment.add_config(base_config())
    for name, preset in PRESETS.items():
        experiment.add_named_config(name, preset)
    experiment.observers.extend(observers(args))
    for stage in definition.STAGES + definition.EXTRA_STAGES:
        experiment.command(_stage_command(stage), unobserved=False)
    experiment.logger = logging.getLogger("sacred")
    return experiment


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)  # the user's disk, not our bug
CONNECT_TIMEOUT = 5.0  # seconds for a database observer to answer before the run starts


def observers(args) -> list:
    """The observers the CLI asks for; each database is reached once now (seconds, not minutes), so an
    unreachable one is a one-line UserError before any stage runs."""
    found = []
    if not args.no_file_observer:
        from sacred.observers import FileStorageObserver

        found.append(FileStorageObserver(args.runs_dir))
    if args.sql:
        found.append(sql_observer(args.sql))
    if args.mongo:
        found.append(mongo_observer(args.mongo))
    return found


def _hide_password(url: str) -> str:
    """`scheme://user:secret@host` -> `scheme://user:***@host`: messages and logs never show a password."""
    import re

    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def sql_observer(url: str):
    where = f"--sql {_hide_password(url)}"
    try:
        import sqlalchemy
        from sacred.observers import SqlObserver
    except ImportError:
        raise UserError(f"{where}: needs SQLAlchemy; pip install 'music-separation[db]'") from None
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:
        raise UserError(f"{where}: not a database URL; use a SQLAlchemy URL such as sqlite:///runs.db or "
                        "postgresql+psycopg://user:password@host/db") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise UserError(f"{where}: the folder {folder} does not exist; create it or choose another path")
    try:
        engine = sqlalchemy.create_engine(url, **_connect_args(parsed))
    except ModuleNotFoundError as error:
        raise UserError(f"{where}: the database driver is not installed (no module '{error.name}'); install it, "
                        "e.g. pip install 'psycopg[binary]' and use postgresql+psycopg://...") from None
    except Exception as error:
        raise UserError(f"{where}: cannot use this URL ({_one_line(error)})") from None
    _within_timeout(lambda: engine.connect().close(), where, "cannot reach the database")
    engine.dispose()
    try:
        return SqlObserver(url)
    except Exception as error:
        raise UserError(f"{where}: cannot open the database ({_one_line(error)})") from None


def mongo_observer(url: str):
    import importlib.util

    where = f"--mongo {_hide_password(url)}"
    if importlib.util.find_spec("pymongo") is None:
        raise UserError(f"{where}: needs pymongo, which is not installed; pip install 'music-separation[db]'")
    import pymongo
    from sacred.observers import MongoObserver

    timeout_ms = int(CONNECT_TIMEOUT * 1000)
    options = dict(serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms)
    try:
        client = pymongo.MongoClient(url, **options)
    except Exception as error:  # bad URL, bad options
        raise UserError(f"{where}: not a MongoDB URL ({_one_line(error)}); e.g. mongodb://host:27017/db") from None
    _within_timeout(lambda: client.admin.command("ping"), where, "cannot reach MongoDB")
    try:
        return MongoObserver(client=client)
    except Exception as error:
        raise UserError(f"{where}: cannot use MongoDB ({_one_line(error)})") from None


def _connect_args(parsed) -> dict:
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "mysql", "mariadb"):
        return {"connect_args": {"connect_timeout": int(CONNECT_TIMEOUT)}, "pool_pre_ping": True}
    if backend == "sqlite":
        return {"connect_args": {"timeout": CONNECT_TIMEOUT}}
    return {}


def _within_timeout(call, where: str, problem: str) -> None:
    """Run `call` in a daemon thread; UserError when it fails or takes more than CONNECT_TIMEOUT (+1 s)."""
    import threading

    outcome = {}

    def target():
        try:
            call()
            outcome["ok"] = True
        except BaseException as error:  # noqa: BLE001 - reported to the user below
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT + 1)
    if "ok" in outcome:
        return
    reason = _one_line(outcome["error"]) if "error" in outcome else f"no answer within {CONNECT_TIMEOUT:g} s"
    raise UserError(f"{where}: {problem} ({reason}); start it, fix the URL, or drop the option")


def _one_line(error, limit: int = 100) -> str:
    """The gist of a driver's error on one short line: pymongo appends its timeouts and the whole topology
    description (~450 characters) after the reason, which is all a user needs."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = re.split(r" \(configured timeouts|, Timeout: ", text)[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stage_command(stage: str):
    # `train` is captured (and unused: `_config` has it) so that Sacred accepts the keys of the free-form mapping
    # train.init_targets (a key a config does not have is otherwise ConfigAddedError); Config checks every key
    def command(_config, _run, train=None):
        config = Config.from_dict({k: v for k, v in _config.items()})
        spec = definition.component(stage)
        artifact, skipped = definition.run_component(spec, config, force=_run.meta_info.get("force", False),
                                                   log_scalar=_run.log_scalar)
        _run.info["artifact"] = str(artifact.path)
        _run.info["skipped"] = skipped
        _run.info["fingerprint"] = artifact.fingerprint
        _run.info["figures"] = artifact.figures
        record_lineage(_run, artifact)
        if not skipped:
            for name, value in _flat(artifact.figures):
                _run.log_scalar(f"{stage}.{name}", value)
        if artifact.file("artifact.json").is_file():  # a non-chief training worker commits nothing
            _run.add_artifact(str(artifact.file("artifact.json")), name=f"{stage}.artifact.json")
            for relative in ATTACHED.get(artifact.stage, ()):
                if artifact.file(relative).is_file():
                    _run.add_artifact(str(artifact.file(relative)), name=f"{artifact.stage}.{relative}")
        result = artifact.meta.get("result")
        return float(result) if isinstance(result, (int, float)) else None

    command.__name__ = stage
    return command


# the files of each artifact attached to its Sacred run (weights stay in the artifacts directory, listed with their
# sha256 in the attached artifact.json)
ATTACHED = {
    "train": ("history.json", "training_curves.png"),
    "evaluate": ("metrics.json", "per_track.csv", "sdr_boxplot.png"),
    "export": ("model.json",),
}


def invocation_meta(force: bool, **extra) -> dict:
    """The meta_info of the Sacred runs of one driver invocation: its id, the git state of the project, and the
    Sacred run id of each stage run so far (`runs`, filled in as the stages finish)."""
    import uuid

    return {"force": force, "invocation": uuid.uuid4().hex[:12], "git": git_state(), "runs": {}, **extra}


def git_state(root: Path = PROJECT_ROOT):
    """{"commit", "dirty"} of the project's git checkout (None when it is not one, or git is missing)."""
    import subprocess

    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def record_lineage(run, artifact) -> None:
    """The invocation id, git state, sweep point and upstream stage runs (Sacred run id when run by this
    invocation, artifact fingerprint and path) in the run's info; the run's own id in the invocation's table."""
    meta = run.meta_info
    for key in ("invocation", "git", "sweep"):
        if meta.get(key) is not None:
            run.info[key] = meta[key]
    runs = meta.get("runs")
    run.info["upstream"] = {name: {"fingerprint": entry["fingerprint"], "path": entry["path"],
                                   "run_id": (runs or {}).get(name)}
                            for name, entry in (artifact.meta.get("inputs") or {}).items()}
    if runs is not None:
        runs[artifact.stage] = run._id


def _flat(figures, prefix=""):
    for key, value in figures.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


def release_updates(stages: list, updates: dict, named: list, config: Config = None) -> dict:
    """`updates` plus the settings a released checkpoint fixes (rate, targets, STFT, sizes).

    `stages`: the `--stage` names of the run. `--stage import`: from the released files themselves;
    evaluate/export (and prepare) after an import: from the imported train artifact, so those stages
    rebuild the same model. A key given on the command line with another value is a one-line error;
    preset values give way. `config`: `updates` and `named` already resolved (resolved here when not given).
    """
    config = config if config is not None else resolve(updates, named)
    if config.train.init_from:  # a fine-tune: family, sizes, STFT, rate (and targets unless given) from the init
        from components.training import finetune

        init_from = config.train.init_from
        if finetune.names_a_release(init_from):  # a catalogue name: fetched and converted once, then a folder
            init_from = str(convert_release(init_from, quiet=True))
            updates = deep_merge(dict(updates), {"train": {"init_from": init_from}})
        return finetune.merge_init(updates, init_from)
    if "train" in stages:
        return updates
    from components import importer

    if "import" in stages and config.import_.name:  # a catalogue entry: fetched, then imported as a local path
        from components.inference import catalogue

        updates = catalogue.import_updates(config.import_.name, updates)
        config = resolve(updates, named)
    if "import" in stages:
        overrides, source = importer.release_overrides(config), "the released checkpoint"
    else:
        overrides = importer.imported_overrides(config.artifacts_dir)
        source = "the imported model in the train artifact"
    return importer.merge_overrides(updates, overrides, source)


def convert_release(name: str, quiet: bool = False) -> Path:
    """The artifacts directory of the catalogue's release `name`, ready to use: fetched (downloaded once and
    checked), then `--stage import with import.name=<name>` and `--stage export` run once into a staging
    folder beside the cache entry, renamed into place when both finished; a lock makes two processes convert
    once. A failed conversion caches nothing."""
    import argparse
    import os
    import shutil
    import sys

    from components.inference import catalogue

    item = catalogue.entry(name)
    catalogue.fetch(item, progress=None if not quiet else False)
    target = catalogue.converted_dir(item)
    if (target / "export" / "artifact.json").is_file():
        return target
    with catalogue.locked(target.parent / ".convert.lock"):
        if (target / "export" / "artifact.json").is_file():
            return target
        staging = target.with_name(f"{target.name}.converting")
        shutil.rmtree(staging, ignore_errors=True)
        if not quiet:
            print(f"converting {name} (import + export, once; cached in {target})", file=sys.stderr)
        args = argparse.Namespace(force=False, runs_dir="runs", no_file_observer=True, sql=None, mongo=None,
                                  print_config=False, quiet=True)
        try:
            for stage, updates in (("import", {"import": {"name": name}}), ("export", {})):
                args.stage = stage
                run_stages(build_experiment(args), args, {**updates, "artifacts_dir": str(staging)}, ["default"])
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.replace(staging, target)
    return target


def run_stages(experiment, args, updates: dict, named: list, config: Config = None) -> int:
    """Run the stages of `--stage` in one Sacred run each, under the artifacts directory's lock. Every
    stage's `setup` hook runs first (before TensorFlow initialises); errors a user can fix are `UserError`s."""
    specs = definition.create_pipeline(args.stage)
    released = release_updates([spec.command for spec in specs], updates, named, config)
    if config is None or released != updates:
        updates, config = released, resolve(released, named)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    for spec in specs:
        if spec.setup is not None:
            spec.setup(config)
    for spec in specs:  # outside inputs (data set, release files) checked before any lock, folder or Sacred run
        if spec.check_inputs is not None:
            spec.check_inputs(config)
    # one run owns the artifacts directory for all its stages (see artifacts.exclusive)
    meta = invocation_meta(getattr(args, "force", False))  # one id for every stage run of this command
    with definition.artifacts_lock(config):
        for spec in specs:
            _run_stage(experiment, args, updates, named, spec.command, meta)
    return 0


def _run_stage(experiment, args, updates, named, stage, meta=None) -> None:
    try:
        run = experiment.run(stage, config_updates=updates, named_configs=named,
                             meta_info=meta if meta is not None else {"force": args.force},
                             options={"--loglevel": "WARNING" if args.quiet else "INFO"})
    except UserError:
        raise
    except Exception as error:
        if type(error).__module__.startswith("sacred"):  # Sacred's own config errors are user errors too
            raise UserError(" ".join(str(error).split())) from None
        if isinstance(error, OSError) and error.errno in WRITE_ERRORS:
            reason = error.strerror[:1].lower() + error.strerror[1:]
            raise UserError(f"stage {stage}: cannot write {error.filename or 'the artifacts directory'} ({reason}); "
                            "free some space or choose another artifacts_dir (the stage left nothing behind)") from None
        raise
    log.info("stage %s: %s (Sacred run %s)", stage,
             "skipped, up to date" if run.info.get("skipped") else "done", run._id)
