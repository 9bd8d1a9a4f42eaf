"""The pipeline definition: which stages exist, their order, and how one stage run is carried out.

`create_pipeline` is pure (names -> ComponentSpecs); `run_component` binds a spec to an
artifacts directory: fingerprint, skip-if-complete, staging, atomic commit.
"""
from __future__ import annotations

import contextlib

import importlib
import logging
import time
from pathlib import Path
from typing import Callable, List, Optional

from components import artifacts
from components.artifacts import Artifact
from configs.errors import StageError
from components.base import ComponentSpec, StageContext
from components.data.manifest import Manifest

STAGES = ("prepare", "train", "evaluate", "export")
# stages outside `all`: `import` writes the train artifact from released weights (components/importer.py;
# `import` is a Python keyword, hence the module name)
EXTRA_STAGES = ("import",)
MODULES = {"import": "importer"}

log = logging.getLogger("pipeline")


def component(stage: str) -> ComponentSpec:
    """The ComponentSpec of a stage; each lives in `components/<stage>.py` as `SPEC`."""
    if stage not in STAGES + EXTRA_STAGES:
        raise StageError(f"unknown stage '{stage}'; choose one of {', '.join(STAGES + EXTRA_STAGES)} or all")
    return importlib.import_module(f"components.{MODULES.get(stage, stage)}").SPEC


def create_pipeline(stage: str) -> List[ComponentSpec]:
    """The ComponentSpecs to run, in order, for `--stage <stage>` (`all` = every stage of STAGES)."""
    return [component(name) for name in (STAGES if stage == "all" else (stage,))]


def stage_fingerprint(spec: ComponentSpec, config, upstream: dict) -> str:
    payload = {
        "stage": spec.name,
        "config": {section: config.section(section) for section in spec.config_sections},
        "inputs": {name: art.fingerprint for name, art in sorted(upstream.items())},
    }
    outside = spec.input_payload(config) if spec.input_payload is not None else None
    if outside is not None:  # e.g. the files of an import, the init weights of a fine-tune
        payload["outside"] = outside
    return artifacts.fingerprint(payload)


def run_component(
    spec: ComponentSpec,
    config,
    force: bool = False,
    log_scalar: Optional[Callable] = None,
) -> tuple[Artifact, bool]:
    """Run one stage into `config.artifacts_dir/<stage>/`. Returns (artifact, skipped).

    Holds the artifacts directory's lock throughout (`artifacts.exclusive`; re-entrant, so the driver may
    already hold it for all stages)."""
    with artifacts_lock(config):
        return _run_component(spec, config, force, log_scalar)


def artifacts_lock(config):
    """The artifacts directory's run lock (`artifacts.exclusive`). The workers of one multi-worker training
    job share the directory by design: the chief holds the lock for the job, the other workers (which
    commit nothing) run under it."""
    if config.train.strategy == "multi_worker":
        from components.training import distribute

        try:
            cluster, task_type, index = distribute.cluster_from_env()
        except StageError:
            pass  # the train stage reports the unusable TF_CONFIG
        else:
            if not distribute.is_chief_task(cluster, task_type, index):
                return contextlib.nullcontext()
    return artifacts.exclusive(Path(config.artifacts_dir))


def _run_component(spec, config, force, log_scalar):
    root = Path(config.artifacts_dir)
    removed = artifacts.clean_stale(root)
    if removed:
        log.warning("removed leftovers of an interrupted run: %s", ", ".join(removed))
    upstream = {name: artifacts.require(root, name, needed_by=spec.name) for name in spec.inputs}
    for name in spec.optional_inputs:
        found = artifacts.load(root, name)
        if found is not None:
            upstream[name] = found
    fingerprint = stage_fingerprint(spec, config, upstream)
    existing, problem = artifacts.load_checked(root, spec.name)
    if problem:
        log.warning("stage %s: the existing artifact is damaged (%s); redoing it", spec.name, problem)
    if existing is not None and existing.fingerprint == fingerprint and not force:
        log.info("stage %s: complete artifact with fingerprint %s exists in %s; skipping (use --force to redo)",
                 spec.name, fingerprint, existing.path)
        return existing, True
    started = time.time()
    with artifacts.staging(root, spec.name) as staging_dir:
        context = StageContext(config=config, inputs=upstream, output_dir=staging_dir,
                               log_scalar=log_scalar or (lambda *a, **k: None), logger=log, force=force,
                               fingerprint=fingerprint, side_caches={name: root / name for name in spec.side_caches})
        meta = dict(spec.executor(context))
        if not context.commit:  # e.g. a non-chief training worker: the chief commits the job's artifact
            log.info("stage %s: done on this worker; its artifact is committed by the chief", spec.name)
            return Artifact(stage=spec.name, path=root / spec.name, meta=dict(meta, fingerprint=fingerprint)), False
        missing = [name for name in spec.outputs if not (staging_dir / name).exists()]
        if missing:  # a broken executor, not a user error: nothing half-made is committed
            raise RuntimeError(f"stage {spec.command}: declared output {missing[0]} was not written")
        meta.update(
            fingerprint=fingerprint,
            config={section: config.section(section) for section in spec.config_sections},
            inputs={name: {"fingerprint": art.fingerprint, "path": str(art.path)} for name, art in upstream.items()},
            seconds=round(time.time() - started, 3),
        )
        artifact = artifacts.commit(root, spec.name, staging_dir, meta, known_digests=_shard_digests(meta))
    log.info("stage %s: wrote %s in %.1f s", spec.name, artifact.path, time.time() - started)
    return artifact, False


def _shard_digests(meta) -> dict:
    """TFRecord shards were hashed as they were written (the prepare manifest): no second pass over them."""
    return Manifest.parse(meta, "the prepare stage's meta").shard_digests if "manifest" in meta else {}
