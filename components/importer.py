"""The import stage: the authors' released checkpoint -> the `train` artifact, as training would write it.

    python pipeline/run.py --stage import with model.name=umx import.path=/models/umxhq [import.model=umxhq]

Reads the released files through the family's `read_released` (models/checkpoints.py describes
the interface), builds the family with the settings the release fixes (`config_overrides`: they
replace preset values; a different value on the command line is an error), assigns every weight
through the family's `assign_released` mapping table and writes `artifacts_dir/train/` with the
same files and `artifact.json` fields as the train stage (weights, family config), plus an
`imported` record: the files with their sha256, the overrides and the mapping figures. Evaluate,
export and `separate` read it unchanged; after an import they reuse its overrides (see
`pipeline/experiment.release_updates`). Nothing is written when any check fails.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping

from components.artifacts import file_digest, load
from configs.config import dotted_get, same_value
from configs.errors import CheckpointError, StageError
from components.base import ComponentSpec, StageContext
from components.training.trained import WEIGHT_FILES


def _family(config):
    from models import registry

    module = registry.module(config.model.name)
    if not registry.importable(config.model.name):
        importable = [name for name in registry.names() if registry.importable(name)]
        raise StageError(f"import: model family '{config.model.name}' has no importer; "
                         f"choose model.name from {', '.join(importable)}")
    return module


def _options(config) -> Dict[str, Any]:
    section = config.section("import")
    return {key: value for key, value in section.items() if key not in ("path", "name") and value not in (None, "", [], ())}


def read(config):
    """The family's ReleasedCheckpoint for `import.path` (CheckpointError -> StageError, one line)."""
    path = config.import_.path
    if not path:
        raise StageError("import: no checkpoint given; set import.path=<released file or folder> or "
                         "import.name=<released model> (separate --list-models)")
    if not Path(path).exists() and not Path(f"{path}.index").exists():  # a TF checkpoint is named by its prefix
        raise StageError(f"import: {path} does not exist; set import.path to the released file or folder")
    family = _family(config)
    try:
        return family.read_released(Path(path), **_options(config))
    except CheckpointError as error:
        raise StageError(str(error)) from None


def release_overrides(config) -> Dict[str, Any]:
    """Dotted config keys fixed by the release at `import.path`."""
    return dict(read(config).config_overrides)


def imported_overrides(artifacts_dir) -> Dict[str, Any]:
    """The overrides recorded by an import in `artifacts_dir/train` ({} when the artifact was trained)."""
    artifact = load(Path(artifacts_dir), "train")
    if artifact is None:
        return {}
    if "init" in artifact.meta:  # a fine-tuned model: its init's settings, and its own targets
        return {**artifact.meta["init"]["config_overrides"],
                "data.targets": artifact.meta["config"]["data"]["targets"]}
    return dict(artifact.meta.get("imported", {}).get("config_overrides", {}))


def merge_overrides(updates: dict, overrides: Mapping[str, Any], source: str) -> dict:
    """Command-line `updates` with the release's `overrides` added; a conflicting explicit key is an error."""
    from configs.config import deep_merge, nested

    for key, value in overrides.items():
        given = dotted_get(updates, key)
        if given is not KeyError and not same_value(given, value):
            raise StageError(f"import: {key}={json.dumps(given)} on the command line but {source} has "
                             f"{json.dumps(value)}; drop {key} from the command line")
    return deep_merge(updates, nested(overrides))


def input_payload(config) -> Any:
    """Size and mtime of every file under `import.path`: a changed release is imported again."""
    path = Path(config.import_.path or "")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:  # a file, or a TF checkpoint prefix (<prefix>.index, <prefix>.data-*)
        files = sorted(p for p in [path, *path.parent.glob(path.name + ".*")] if p.is_file())
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


# --------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------
def run(context: StageContext) -> dict:
    from components.training.trained import build_model, save_weights
    from models.base import count_parameters
    from configs.config import to_plain

    config = context.config
    released = read(config)
    for key, value in released.config_overrides.items():  # run_stages merged them; a direct call may not have
        if not same_value(dotted_get(config.to_dict(), key), value):
            raise StageError(f"import: {key} is {json.dumps(dotted_get(config.to_dict(), key))} but the released "
                             f"checkpoint has {json.dumps(value)}; run the stage through pipeline/run.py")
    family = _family(config)
    model = build_model(config, stats={})
    try:
        mapping = family.assign_released(model, released)
    except CheckpointError as error:
        raise StageError(str(error)) from None
    save_weights(model, context.output_dir)
    files = [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size, "sha256": file_digest(Path(f))}
             for f in released.files]
    parameters = count_parameters(model.train_model)
    context.logger.info("import: %s -> %s (%s parameters, %d tensors mapped, %d ignored)", released.description,
                        "the train artifact", f"{parameters:,}", mapping["tensors_mapped"],
                        len(mapping["tensors_ignored"]))
    figures = {"parameters": parameters, "tensors_mapped": mapping["tensors_mapped"],
               "weights_assigned": mapping["weights_assigned"], "tensors_ignored": len(mapping["tensors_ignored"]),
               "files": len(files), "megabytes": round(sum(f["bytes"] for f in files) / 1e6, 3)}
    return {
        "figures": figures,
        "stats": {},
        "model": {"name": config.model.name, "family_config": to_plain(model.config)},
        "imported": {"family": released.family, "description": released.description, "files": files,
                     "config_overrides": to_plain(released.config_overrides), "options": _options(config),
                     "tensors_ignored": mapping["tensors_ignored"]},
        "result": None,
    }


SPEC = ComponentSpec(name="train", inputs=(), config_sections=("data", "model", "import"), executor=run,
                     input_payload=input_payload, outputs=WEIGHT_FILES, stage="import")
