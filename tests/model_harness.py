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


def fixture_script(path):
    """The module of a fixture-making script (tests/fixtures/make_*.py) whose numpy-only parts (seeded weights,
    inputs) a test regenerates; its `main` needs the authors' code and is never run by the tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"fixture_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
                          optimizer=None, run_eagerly: bool = True):
    """A few `fit` steps on one fixed batch lower the training loss; returns (first, last).

    Plain SGD by default: tracing Keras' Adam update for every variable costs seconds on CPU and the
    check is about gradients flowing, not about the optimizer. Eager by default: the same losses to the
    printed digit, and a few steps run faster than tracing one (DTTNet 1.6 s vs 9.1 s, TFC-TDF 2.3 vs 11.7 s);
    the train stage's tests run the traced step.
    """
    import keras

    keras.utils.set_random_seed(0)
    mixture, stems = random_batch(model, nb_samples, model.input_samples(nb_timesteps), seed=1)
    truth = {target: np.asarray(value) for target, value in model.train_targets(stems).items()}
    optimizer = optimizer if optimizer is not None else keras.optimizers.SGD(1e-2)
    model.train_model.compile(optimizer=optimizer, loss=model.loss, jit_compile=False, run_eagerly=run_eagerly)
    history = model.train_model.fit(mixture, truth, batch_size=nb_samples, epochs=steps, shuffle=False, verbose=0,
                                    callbacks=list(model.training.callbacks))
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), f"non-finite losses {losses}"
    assert losses[-1] < losses[0], f"loss did not decrease over {steps} steps: {losses}"
    return losses[0], losses[-1]


def check_train_step_moves_weights(model, nb_timesteps: int = 4001, nb_samples: int = 2, learning_rate: float = 1e-2,
                                   min_moved: float = 0.95):
    """One SGD step (`train_on_batch`) gives a finite loss and changes the variables holding at least `min_moved`
    of the trainable parameters; returns (loss, that fraction).

    Not all of them: a conv bias followed by batch normalisation gets a gradient that is zero up to rounding
    (the normalisation subtracts it again), and PyTorch-initialised biases are not zero, so one step of
    1e-2 x ~1e-10 leaves them bit-identical in float32 (DTTNet: 100 of 544 variables, < 5 % of the parameters).
    """
    import keras

    keras.utils.set_random_seed(0)
    mixture, stems = random_batch(model, nb_samples, model.input_samples(nb_timesteps), seed=2)
    truth = {target: np.asarray(value) for target, value in model.train_targets(stems).items()}
    # eagerly: tracing the train step costs more than running it once on the tiny models (DTTNet: ~80 s vs ~5 s)
    model.train_model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss=model.loss, jit_compile=False,
                              run_eagerly=True)
    weights = model.train_model.trainable_weights
    before = [np.array(weight.numpy()) for weight in weights]
    loss = model.train_model.train_on_batch(mixture, truth, return_dict=True)["loss"]
    assert np.isfinite(loss), f"non-finite training loss {loss}"
    still = [weight for weight, old in zip(weights, before) if np.array_equal(weight.numpy(), old)]
    total = count_parameters(model.train_model)
    moved = 1.0 - sum(int(np.prod(weight.shape)) for weight in still) / total
    assert moved >= min_moved, (f"one step moved only {moved:.1%} of {total} trainable parameters; unchanged: "
                                f"{[weight.path for weight in still][:8]}")
    return float(loss), moved


def _forbidden(ops, extra=()):
    return [op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE", *extra)]


def check_saved_model_parity(model, path, lengths=(1001,), nb_samples: int = 2, max_abs_diff: float = 1e-5):
    """The `serving_default` SavedModel written by the export stage, reloaded, gives the Keras separator's
    waveforms for any batch and length: same keys (the targets, and whatever else the separator returns),
    same shapes, |SavedModel - Keras| <= `max_abs_diff` (float32 graphs differ only in op fusion/order).
    Returns the worst absolute difference."""
    import tensorflow as tf

    from components.export import write_saved_model
    from components.inference.exported import INPUT_NAME, SIGNATURE

    write_saved_model(model.separator, path, model.nb_channels)
    signature = tf.saved_model.load(str(path)).signatures[SIGNATURE]
    worst = 0.0
    for length in lengths:
        mixture, _ = random_batch(model, nb_samples, length, seed=length)
        served = {k: np.asarray(v) for k, v in signature(**{INPUT_NAME: tf.constant(mixture)}).items()}
        expected = {k: np.asarray(v) for k, v in model.separator(mixture, training=False).items()}
        assert set(served) == set(expected) and set(model.targets) <= set(served), (sorted(served), sorted(expected))
        for target, value in expected.items():
            assert served[target].shape == value.shape == mixture.shape, (target, served[target].shape, value.shape)
            worst = max(worst, float(np.max(np.abs(served[target] - value))))
    assert worst <= max_abs_diff, f"max |SavedModel - Keras| = {worst:.3g} > {max_abs_diff:g}"
    return worst


def check_tflite_parity(model, chunk: int, min_parity_db: float = 80.0, forbidden_ops=(), required_ops=()):
    """`model.inference.mobile(chunk)` converted with TFLite built-in ops only, run by the LiteRT interpreter, gives
    the Keras separator's waveforms on the same chunk (every family's file is waveform in, stems out):
    SDR of TFLite against Keras >= `min_parity_db` for every target (export.parity_db, the export stage's
    figure). Returns {"ops", "parity_db", "megabytes"}."""
    from components.export import convert_tflite, parity_db
    from components.inference.exported import TFLiteChunkRunner, run_tflite, tflite_ops

    assert model.inference.mobile is not None, "family has no mobile form"
    blob = convert_tflite(model.inference.mobile(chunk), chunk, model.nb_channels)
    ops = tflite_ops(blob)
    assert not _forbidden(ops, forbidden_ops), f"non-builtin or forbidden ops {_forbidden(ops, forbidden_ops)}"
    assert set(required_ops) <= set(ops), f"ops {sorted(set(required_ops) - set(ops))} missing from {ops}"
    mixture, _ = random_batch(model, 1, chunk, seed=chunk)
    outputs = run_tflite(blob, mixture)
    # chunk after chunk on one interpreter, as `separate` and an app run it: the second chunk's outputs do not
    # depend on the first (no state kept from one invoke to the next, e.g. the fused LSTMs' variable tensors)
    again = TFLiteChunkRunner(blob, workers=1)(np.concatenate([mixture[:, ::-1], mixture]))
    stale = parity_db(outputs, {k: v[1:] for k, v in again.items()})
    assert stale >= min_parity_db, f"TFLite chunk after chunk: {stale:.1f} dB from a fresh interpreter's output"
    waveforms = outputs
    separated = {k: np.asarray(v) for k, v in model.separator(mixture, training=False).items()}
    for target in model.targets:
        assert np.shape(waveforms[target]) == mixture.shape, (target, np.shape(waveforms[target]))
    parity = parity_db({t: separated[t] for t in model.targets}, {t: np.asarray(waveforms[t]) for t in model.targets})
    assert parity >= min_parity_db, f"TFLite vs Keras separator: {parity:.1f} dB < {min_parity_db} dB"
    return {"ops": ops, "parity_db": parity, "megabytes": len(blob) / 1e6}
