"""The explicit model registry: `model.name` -> family module (builder + config dataclass).

A family module exposes `Config` (a frozen dataclass of its knobs, with the published defaults)
and `build(config, *, data, stats) -> models.base.SeparationModel`.
"""
from __future__ import annotations

import dataclasses
import importlib
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
