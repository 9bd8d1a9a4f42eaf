"""The explicit model registry: `model.name` -> family module (builder + config dataclass).

A family module exposes `Config` (a frozen dataclass of its knobs, with the published defaults, validated
in `__post_init__`) and `build(config, *, data, stats) -> models.base.SeparationModel`. `configs/` knows no
family: the `model` section carries each family's knobs as a mapping, checked here against the family's
`Config` (`check`). Adding a family touches this table and the family's own file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, runtime_checkable

from configs.config import build_section
from configs.errors import ConfigError
from models.base import Stats
from models import c_unet, dttnet, m_unet, open_unmix, tfc_tdf_unet, unet, wave_u_net

@runtime_checkable
class Family(Protocol):
    """What a model family module provides (one file in models/).

    `Config`: a dataclass of the family's published defaults, every field with a default and validated in
    `__post_init__` (it is `model.<name>.*`). `build(config, *, data, stats=None)`: the `SeparationModel`
    (models/base.py) for that config and the data section (rate, channels, targets); `stats` are the prepare
    manifest's training statistics (mean energy per target) for the families that use them. The mobile (TFLite)
    and streaming forms are attributes of the built `SeparationModel`, not of the module."""

    Config: type

    def build(self, config, *, data, stats=None): ...


@runtime_checkable
class ReleasedFamily(Family, Protocol):
    """A family whose authors' released weights `--stage import` reads: `read_released(path, **options)` returns
    the checkpoint (`models.checkpoints.ReleasedCheckpoint`: tensors and the config overrides they imply;
    options are `import.*`), `assign_released(model, released)` maps every tensor onto the Keras weights and
    returns the mapping figures."""

    def read_released(self, path, **options): ...

    def assign_released(self, model, released) -> dict: ...


# name -> module. Every family is imported with the registry: `check` validates every family's knobs
# anyway, and callers import the registry lazily (the driver when it resolves a configuration).
FAMILIES = {
    "umx": open_unmix,
    "wave_u_net": wave_u_net,
    "unet": unet,
    "m_unet": m_unet,
    "c_unet": c_unet,
    "tfc_tdf_v3": tfc_tdf_unet,
    "dttnet": dttnet,
}


def names() -> tuple:
    return tuple(FAMILIES)


def module(name: str):
    if name not in FAMILIES:
        raise ConfigError(f"model.name '{name}' is not a registered model; choose one of {', '.join(names())}")
    return FAMILIES[name]


def importable(name: str) -> bool:
    """Whether `--stage import` can read this family's released weights."""
    return isinstance(module(name), ReleasedFamily)


def default_params(name: str) -> dict:
    return dataclasses.asdict(module(name).Config())


def family_config(model_config, name: Optional[str] = None) -> Any:
    """The frozen Config of family `name` (default: the selected one) from `model.<name>` (unknown keys and
    bad values are ConfigErrors naming the key)."""
    name = name or model_config.name
    return build_section(module(name).Config, model_config.params(name), prefix=f"model.{name}.")


def check(model_config) -> None:
    """ConfigError for an unregistered `model.name`, an unknown `model.<key>`, or a bad knob of any family
    (not only the selected one's: a bad value fails now rather than in a later run that selects that family)."""
    module(model_config.name)
    unknown = sorted(set(model_config.families) - set(FAMILIES))
    if unknown:
        raise ConfigError(f"unknown config key 'model.{unknown[0]}'; valid keys here: {', '.join(('name',) + names())}")
    for name in names():
        family_config(model_config, name)


def build(model_config, *, data, stats=None):
    """The selected family's SeparationModel; `stats` (models.base.Stats, or its dict form, or None) reaches the
    family's `build` as Stats or None."""
    return module(model_config.name).build(family_config(model_config), data=data, stats=Stats.of(stats))
