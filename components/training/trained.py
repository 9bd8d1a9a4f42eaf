"""The weights of a trained model: building a family's model, saving and loading a train artifact's weight
files with their checksums checked. Shared by the train, import, evaluate and export stages and `sweep`."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from configs.errors import StageError

WEIGHT_FILES = ("model.weights.h5", "best.weights.h5")  # what `save_weights` writes (train and import)


def build_model(config, stats):
    from models import registry

    return registry.build(config.model, data=config.data, stats=stats)


def load_trained(train_artifact, config, weights: str = "best"):
    """The SeparationModel of a train artifact with its weights (`best` or `last`) loaded."""
    model = build_model(config, train_artifact.meta.get("stats", {}))
    path = train_artifact.file("best.weights.h5" if weights == "best" else "model.weights.h5")
    if not path.is_file() and "best.weights.h5" not in (train_artifact.meta.get("files") or {}):
        path = train_artifact.file("model.weights.h5")  # artifacts written before best.weights.h5 existed
    load_weights_checked(model, path, train_artifact)
    return model


def save_weights(model, out: Path, best: Optional[Path] = None) -> None:
    """The weight files of a train artifact: `model.weights.h5` (these weights) and `best.weights.h5`
    (`best` when given, else the same weights). The import stage writes the same pair."""
    model.train_model.save_weights(str(out / "model.weights.h5"))
    if best is not None and best.is_file():
        shutil.copy2(best, out / "best.weights.h5")
    else:
        shutil.copy2(out / "model.weights.h5", out / "best.weights.h5")


def load_weights_checked(model, path: Path, train_artifact=None) -> None:
    """`load_weights`, with a missing, changed (sha256 in artifact.json) or unreadable file as a one-line
    StageError naming it and the fix."""
    from components import artifacts

    fix = "redo the train stage with `python pipeline/run.py --stage train --force`"
    if not path.is_file():
        raise StageError(f"{path}: weights file missing; {fix}")
    if train_artifact is not None:
        artifacts.verify(train_artifact, [path.name])
    try:
        model.train_model.load_weights(str(path))
    except Exception as error:  # h5py/keras: OSError, ValueError, KeyError... by the kind of damage
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise StageError(f"{path}: unreadable weights ({reason}); {fix}") from None
