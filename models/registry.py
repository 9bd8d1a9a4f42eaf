"""The explicit model registry: `model.name` -> family module (builder + config dataclass).

A family module exposes `Config` (a frozen dataclass of its knobs, with the published defaults)
and `build(config, *, data, stats) -> models.base.SeparationModel`.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Mapping

from configs.config import ConfigError

# name -> module. Modules are imported on first use so that `--help` and config checks stay light.
FAMILIES = {
    "umx": "models.open_unmix",
    "wave_u_net": "models.wave_u_net",
    "unet": "models.unet",
    "m_unet": "models.m_unet",
    "c_unet": "models.c_unet",
    "tfc_tdf_v3": "models.tfc_tdf_unet",
    "dttnet": "models.dttnet",
}


def names() -> tuple:
    return tuple(FAMILIES)


def module(name: str):
    if name not in FAMILIES:
        raise ConfigError(f"model.name '{name}' is not a registered model; choose one of {', '.join(names())}")
    return importlib.import_module(FAMILIES[name])


def default_params(name: str) -> dict:
    return dataclasses.asdict(module(name).Config())


def family_config(model_config) -> Any:
    """The family's frozen Config from `model.<name>` (unknown keys are errors naming the key)."""
    from configs.config import _build

    family = module(model_config.name)
    return _build(family.Config, dict(model_config.family_params()), prefix=f"model.{model_config.name}.")


def build(model_config, *, data, stats: Mapping[str, Any]):
    family = module(model_config.name)
    return family.build(family_config(model_config), data=data, stats=stats)


def describe(config) -> str:
    """The family, each network's trainable parameter count and the total, from a validated `Config`
    (`python pipeline/run.py --describe-model with ...`); builds the model, trains nothing."""
    model = build(config.model, data=config.data, stats={})
    lines = [f"family: {config.model.name} ({FAMILIES[config.model.name].replace('.', '/')}.py)"]
    for layer in model.train_model.layers:
        count = sum(int(math.prod(weight.shape)) for weight in layer.trainable_weights)
        if count:
            lines.append(f"  {layer.name}: {count:,}")
    total = sum(int(math.prod(weight.shape)) for weight in model.train_model.trainable_weights)
    lines.append(f"total trainable parameters: {total:,}")
    return "\n".join(lines)
