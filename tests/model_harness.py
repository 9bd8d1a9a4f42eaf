"""Shared checks every model family runs (keras-hub `run_layer_test` style), as plain functions.

Each check asserts figures (shapes, counts, losses) and returns what it measured so that a family's
test can assert more. Typical use in `tests/test_<family>.py`:

    model = build_tiny("umx")
    check_config_round_trip(family_module("umx"), model.config)
    check_separator_shapes(model, nb_timesteps=4001)
    check_fit_lowers_loss(model)
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from configs.config import Config, build_section, deep_merge, to_plain
from configs.presets import PRESETS
from models.base import count_parameters  # noqa: F401 - part of the harness every family test uses


def family_module(name: str):
    from models import registry

    return registry.module(name)


def tiny_config(name: str, preset: str = "unittest", overrides: Optional[Mapping[str, Any]] = None) -> Config:
    """The validated Config of `preset` (a name in PRESETS or a dict) with `model.name=name` and `overrides`."""
    raw = PRESETS[preset] if isinstance(preset, str) else preset
    raw = deep_merge(raw, {"model": {"name": name}})
    return Config.from_dict(deep_merge(raw, overrides or {}))


def build_tiny(name: str, preset: str = "unittest", overrides: Optional[Mapping[str, Any]] = None,
               stats: Optional[Mapping[str, Any]] = None):
    """A SeparationModel built through the registry exactly as the stages do."""
    from models import registry

    config = tiny_config(name, preset, overrides)
    return registry.build(config.model, data=config.data, stats=dict(stats or {}))


def check_config_round_trip(module, config=None):
    """Config -> plain dict -> Config (through the validating loader) is the identity."""
    config = config if config is not None else module.Config()
    plain = to_plain(config)
    again = build_section(module.Config, plain, prefix="model.")
    assert again == config, f"config round trip changed {config} into {again}"
    assert to_plain(again) == plain
    defaults = module.Config()
    assert build_section(module.Config, {}, prefix="model.") == defaults
    return plain


def random_batch(model, nb_samples: int = 2, nb_timesteps: int = 4001, seed: int = 0):
    """(mixture, stems): random stems in [-0.5, 0.5] `(nb_samples, nb_timesteps, nb_channels)` and their sum."""
    rng = np.random.default_rng(seed)
    stems = {target: rng.uniform(-0.5, 0.5, (nb_samples, nb_timesteps, model.nb_channels)).astype("float32")
             for target in model.targets}
    mixture = np.sum(list(stems.values()), axis=0).astype("float32")
    return mixture, stems


def check_separator_shapes(model, nb_timesteps: int = 4001, nb_samples: int = 2):
    """Symbolic and eager separator outputs: one per target, each `(nb_samples, nb_timesteps, nb_channels)`.

    The separator takes any length (the length rule `input_samples` only applies to training excerpts).
    """
    import keras

    expected = (nb_samples, nb_timesteps, model.nb_channels)
    symbolic = model.separator(keras.KerasTensor((nb_samples, nb_timesteps, model.nb_channels)))
    assert set(model.targets) <= set(symbolic), f"separator outputs {sorted(symbolic)} miss targets {model.targets}"
    for target, tensor in symbolic.items():
        assert tuple(tensor.shape) == expected, f"symbolic {target}: {tensor.shape} != {expected}"
    mixture, _ = random_batch(model, nb_samples, nb_timesteps)
    eager = model.separator(mixture, training=False)
    for target, tensor in eager.items():
        assert tuple(tensor.shape) == expected, f"eager {target}: {tensor.shape} != {expected}"
        assert np.all(np.isfinite(np.asarray(tensor))), f"eager {target} has non-finite samples"
    return {target: np.asarray(tensor) for target, tensor in eager.items()}


def check_train_shapes(model, nb_timesteps: int = 4001, nb_samples: int = 2):
    """`train_model(mixture)` and `train_targets(stems)` agree in keys and shapes (the loss needs both)."""
    mixture, stems = random_batch(model, nb_samples, model.input_samples(nb_timesteps))
    estimates = model.train_model(mixture, training=False)
    truth = model.train_targets(stems)
    assert set(estimates) == set(truth) == set(model.targets)
    for target in model.targets:
        assert tuple(estimates[target].shape) == tuple(truth[target].shape), (
            f"{target}: estimate {estimates[target].shape} vs truth {truth[target].shape}")
    return {target: tuple(truth[target].shape) for target in model.targets}


def check_shared_weights(model):
    """Every trainable variable of the separator is one of `train_model`'s (same objects, not copies)."""
    trained = {id(weight) for weight in model.train_model.trainable_weights}
    separator = model.separator.trainable_weights
    assert separator, "separator has no trainable weights"
    missing = [weight.path for weight in separator if id(weight) not in trained]
    assert not missing, f"separator weights not shared with train_model: {missing[:5]}"
    return len(separator)


def check_fit_lowers_loss(model, steps: int = 5, nb_timesteps: int = 4001, nb_samples: int = 2,
                          optimizer=None):
    """A few `fit` steps on one fixed batch lower the training loss; returns (first, last).

    Plain SGD by default: tracing Keras' Adam update for every variable costs seconds on CPU and the
    check is about gradients flowing, not about the optimizer.
    """
    import keras

    keras.utils.set_random_seed(0)
    mixture, stems = random_batch(model, nb_samples, model.input_samples(nb_timesteps), seed=1)
    truth = {target: np.asarray(value) for target, value in model.train_targets(stems).items()}
    optimizer = optimizer if optimizer is not None else keras.optimizers.SGD(1e-2)
    model.train_model.compile(optimizer=optimizer, loss=model.loss, jit_compile=False)
    history = model.train_model.fit(mixture, truth, batch_size=nb_samples, epochs=steps, shuffle=False, verbose=0,
                                    callbacks=list(model.callbacks))
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), f"non-finite losses {losses}"
    assert losses[-1] < losses[0], f"loss did not decrease over {steps} steps: {losses}"
    return losses[0], losses[-1]
