"""Fine-tuning: a train stage that starts from a trained or imported model instead of random weights.

`train.init_from` names the starting point: an artifacts directory (its `train/` artifact) or a train artifact
folder (the one holding `artifact.json`). The model it holds fixes the family, its sizes and STFT, the sample
rate and channels (`init_overrides`: a different value on the command line is a one-line error); the recipe
(optimizer, lr, epochs, data) is the preset's and the command line's. `apply_init` copies the weights into the
freshly built model (per-target networks by target, with `train.init_targets` starting a new target from an
existing one; a shared network by weight name and shape, so a different set of targets gets a new output head),
and `freeze` fixes the named parts of `FREEZE_PARTS` (their weights and BatchNorm statistics).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Optional

from components import artifacts
from configs.config import dotted_get, same_value
from configs.errors import StageError

# Named parts of each family for `train.freeze`: a regular expression on a weight's path inside its network
# (`fc1/kernel`, `encoder0_down/kernel`, ...). Per-target families freeze the part in every target's network.
FREEZE_PARTS: Dict[str, Dict[str, str]] = {
    "umx": {
        "input_norm": r"^input_(mean|scale)$",
        "encoder": r"^(fc1|bn1)/",
        "lstm": r"^lstm_\d+/",
        "decoder": r"^(fc2|bn2|fc3|bn3)/|^output_(mean|scale)$",
    },
    "unet": {  # Spleeter: six strided convolutions down, six transposed convolutions and the mask up
        "encoder": r"_conv\d+(_bn)?/",
        "decoder": r"_deconv\d+(_bn)?/|_masks/",
    },
    "dttnet": {
        "tfc_tdf": r"^(first_|encoder\d+_|latent_|decoder\d+_|final_conv)",
        "encoder": r"^(first_|encoder\d+_)",
        "dual_path": r"^dual_path/",
        "decoder": r"^(decoder\d+_|final_conv)",
    },
    "tfc_tdf_v3": {
        "encoder": r"^(first_conv|encoder\d+_)",
        "bottleneck": r"^bottleneck_",
        "decoder": r"^(decoder\d+_|final_conv)",
    },
    "wave_u_net": {
        "encoder": r"^down_\d+_",
        "bottleneck": r"^bottleneck_",
        "decoder": r"^up_\d+_",
        "output": r"^output_",
    },
    "m_unet": {
        "encoder": r"^m_unet_down\d+_",
        "bottleneck": r"^m_unet_bottom_",
        "decoder": r"^m_unet_(up\d+_|final)",
    },
    "c_unet": {
        "encoder": r"^c_unet_conv\d+",
        "decoder": r"^c_unet_deconv\d+",
        "control": r"^c_unet_(control\d+|betas|gammas)",
    },
}


# --------------------------------------------------------------------------------------------
# Where the init comes from
# --------------------------------------------------------------------------------------------
def names_a_release(init_from: str) -> bool:
    """True when `init_from` is a released model's catalogue name rather than a path (a name that is also an
    existing folder here is the folder); an unknown bare name is the catalogue's one-line error."""
    if Path(init_from).expanduser().exists() or "/" in init_from or init_from.startswith("."):
        return False
    from components.inference import catalogue

    catalogue.entry(init_from)  # raises "no released model named ...; did you mean ..."
    return True


def locate(init_from: str) -> artifacts.Artifact:
    """The complete train artifact `init_from` names (an artifacts directory or a train artifact folder), its
    weight files checked against their sha256; a one-line StageError otherwise."""
    path = Path(init_from).expanduser()
    if path.is_file() and path.name == artifacts.META_FILE:
        path = path.parent
    if not path.exists():
        raise StageError(f"train.init_from={init_from}: no such file or folder; give an artifacts directory or "
                         "its train/ folder")
    folder = path if (path / artifacts.META_FILE).is_file() else path / "train"
    artifact, problem = artifacts.load_checked(folder.parent, folder.name)
    if artifact is None:
        why = problem or f"no complete train artifact in {folder}"
        raise StageError(f"train.init_from={init_from}: {why}; give an artifacts directory holding a train "
                         "artifact (run --stage train or --stage import there first)")
    if artifact.meta.get("stage") != "train" or "model" not in artifact.meta:
        raise StageError(f"train.init_from={init_from}: {folder} is a {artifact.meta.get('stage')} artifact, not a "
                         "trained model; give the train/ folder")
    try:
        artifacts.verify(artifact, ["best.weights.h5"])
    except StageError as error:
        raise StageError(f"train.init_from={init_from}: {error}") from None
    return artifact


def init_targets(artifact) -> tuple:
    return tuple(artifact.meta["config"]["data"]["targets"])


def overrides_of(artifact) -> Dict[str, Any]:
    """Dotted config keys the init model fixes: family, every family knob, sample rate and channels."""
    model = artifact.meta["model"]
    data = artifact.meta["config"]["data"]
    found = {"model.name": model["name"], "data.sample_rate": data["sample_rate"],
             "data.nb_channels": data["nb_channels"]}
    found.update({f"model.{model['name']}.{key}": value for key, value in model["family_config"].items()})
    return found


def merge_init(updates: dict, init_from: str) -> dict:
    """Command-line `updates` with the init model's settings added (its targets too unless `data.targets` is
    given); a conflicting explicit key is a one-line StageError."""
    from configs.config import deep_merge, nested

    artifact = locate(init_from)
    overrides = overrides_of(artifact)
    if dotted_get(updates, "data.targets") is KeyError:
        overrides["data.targets"] = list(init_targets(artifact))
    for key, value in overrides.items():
        given = dotted_get(updates, key)
        if given is not KeyError and not same_value(given, value):
            raise StageError(f"train.init_from: {key}={json.dumps(given)} on the command line but the init model "
                             f"{artifact.path} has {json.dumps(value)}; drop {key} from the command line")
    return deep_merge(updates, nested(overrides))


def payload(config) -> Optional[dict]:
    """The init's identity for the train fingerprint: where it is and the sha256 of its weights (None: no init)."""
    if not config.train.init_from:
        return None
    artifact = locate(config.train.init_from)
    return {"init_from": str(artifact.path.resolve()),
            "sha256": {name: artifact.meta["files"][name]["sha256"]
                       for name in ("best.weights.h5", "model.weights.h5") if name in artifact.meta["files"]}}


# --------------------------------------------------------------------------------------------
# Checks before anything is built
# --------------------------------------------------------------------------------------------
def check(config) -> None:
    """One-line StageErrors for an init that cannot start this training: other family, a target neither in
    the init nor mapped, an unknown mapping or freeze part."""
    tc = config.train
    if not tc.init_from:
        if tc.freeze or tc.init_targets:
            raise StageError("train.freeze and train.init_targets need train.init_from=<artifacts dir or train "
                             "artifact>")
        return
    artifact = locate(tc.init_from)
    if artifact.path.resolve() == (Path(config.artifacts_dir) / "train").resolve():
        raise StageError(f"train.init_from={tc.init_from} is this run's own train artifact, which the fine-tune "
                         "replaces; choose another artifacts_dir")
    family = artifact.meta["model"]["name"]
    if family != config.model.name:
        raise StageError(f"train.init_from: the init model is {family} but model.name={config.model.name}; drop "
                         "model.name from the command line")
    parts = FREEZE_PARTS.get(family, {})
    for part in tc.freeze:
        if part not in parts:
            raise StageError(f"train.freeze: {family} has no part '{part}'; choose from {', '.join(parts)}")
    source = init_targets(artifact)
    for target, origin in tc.init_targets.items():
        if target not in config.data.targets:
            raise StageError(f"train.init_targets: '{target}' is not in data.targets ({', '.join(config.data.targets)})")
        if origin not in source:
            raise StageError(f"train.init_targets: {target} starts from '{origin}', which the init model does not "
                             f"have (it has {', '.join(source)})")
    from models import registry

    per_target = family in PER_TARGET_FAMILIES
    missing = [t for t in config.data.targets if t not in source and t not in tc.init_targets]
    if per_target and missing:
        raise StageError(f"train.init_from: the init model has no '{missing[0]}' network (it has "
                         f"{', '.join(source)}); map it, e.g. train.init_targets={{\"{missing[0]}\": \"{source[-1]}\"}}")
    if not per_target and tc.init_targets:
        raise StageError(f"train.init_targets: {family} has one network for all targets; new targets get a new "
                         "output head, drop train.init_targets")
    registry.module(family)


# families with one network per target (SeparationModel.networks); the others share one network
PER_TARGET_FAMILIES = ("umx", "unet", "dttnet")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def _inner(variable, network_name: Optional[str] = None) -> str:
    """A weight's path inside its network: `open_unmix_vocals/fc1/kernel` -> `fc1/kernel`."""
    path = variable.path
    if network_name and path.startswith(network_name + "/"):
        return path[len(network_name) + 1:]
    return path


def apply_init(model, config, build_model) -> dict:
    """Load the init's best weights into `model` (built for `config`); returns what was done, for the record.

    `build_model(config_like, stats)` builds the init's model (its own targets)."""
    import dataclasses

    import numpy as np

    from components.training.trained import load_weights_checked

    tc = config.train
    artifact = locate(tc.init_from)
    source_targets = init_targets(artifact)
    init_config = dataclasses.replace(config, data=dataclasses.replace(config.data, targets=source_targets))
    init_model = build_model(init_config, artifact.meta.get("stats", {}))
    load_weights_checked(init_model, artifact.file("best.weights.h5"), artifact)
    copied, fresh = 0, []
    if model.inference.networks:
        origins = {}
        for target, network in model.inference.networks.items():
            origin = tc.init_targets.get(target, target)
            origins[target] = origin
            values = init_model.inference.networks[origin].get_weights()
            network.set_weights(values)
            copied += len(values)
    else:
        origins = {t: t for t in config.data.targets if t in source_targets}
        by_path = {v.path: v for v in init_model.train_model.weights}
        for variable in model.train_model.weights:
            found = by_path.get(variable.path)
            if found is not None and tuple(found.shape) == tuple(variable.shape):
                variable.assign(np.asarray(found))
                copied += 1
            else:
                fresh.append(variable.path)
        if tuple(config.data.targets) != source_targets and not fresh:
            raise StageError(f"train.init_from: {config.model.name} has one network for all targets and "
                             f"{', '.join(config.data.targets)} cannot get a new head of the same shape as "
                             f"{', '.join(source_targets)}'s; use the init's targets")
    return {"path": str(artifact.path.resolve()), "fingerprint": artifact.fingerprint,
            "family": artifact.meta["model"]["name"], "targets": list(source_targets),
            "target_origins": origins, "imported": bool(artifact.meta.get("imported")),
            "sha256": {name: artifact.meta["files"][name]["sha256"]
                       for name in ("best.weights.h5", "model.weights.h5") if name in artifact.meta["files"]},
            "weights_copied": copied, "weights_new": fresh,
            "config_overrides": {k: v for k, v in overrides_of(artifact).items()}}


def freeze(model, config) -> list:
    """Mark the weights of the parts `train.freeze` names untrainable, and their layers too when a layer holds
    nothing else (a frozen BatchNormalization then runs on its fixed statistics). Returns the frozen paths."""
    if not config.train.freeze:
        return []
    parts = FREEZE_PARTS[config.model.name]
    pattern = re.compile("|".join(f"(?:{parts[part]})" for part in config.train.freeze))
    networks = dict(model.inference.networks) or {"": model.train_model}
    frozen = []
    for name, network in networks.items():
        prefix = network.name if name else None

        def matches(variable):
            return bool(pattern.search(_inner(variable, prefix)))

        for layer in network._flatten_layers(include_self=False, recursive=True):
            own = layer.weights
            if own and all(matches(v) for v in own):
                layer.trainable = False
        for variable in network.weights:
            if matches(variable):
                variable.trainable = False
                frozen.append(variable.path)
    if not frozen:
        raise StageError(f"train.freeze={list(config.train.freeze)} matches no weight of {config.model.name}")
    return frozen
