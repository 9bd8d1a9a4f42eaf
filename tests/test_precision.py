"""Mixed precision (`train.precision`): every family trains under mixed_float16 and mixed_bfloat16 with float32
variables, float32 signal processing and float32 separator outputs (the training-domain estimates may leave a
network in half precision, as under torch's autocast; Keras' losses compute in float32); a killed mixed-precision
run resumes; evaluation and export build the model in float32 from the same weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests import model_harness
from tests.cli import cli, kill_training_after
from tests.shared_artifacts import seed_data

POLICIES = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def _recipe_presets():
    from configs.presets import RECIPE_PRESETS

    return list(RECIPE_PRESETS)  # every family has one


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("preset", _recipe_presets())
def test_every_recipe_preset_trains_under_each_mixed_policy(preset, policy, tmp_path):
    """Each recipe preset's optimizer (SGD, Adam as torch or TF1, AdamW, EMA, clipping, weight decay) on its
    family's tiny model under the policy: half-precision networks, float32 variables and signal layers, finite
    losses and moving weights, the EMA swap (sdx23) through the loss-scale wrapper, float32 separator outputs,
    and the same weights in a float32 build (what evaluate and export load)."""
    import keras
    import tensorflow as tf

    from components.train import compile_model
    from components.training.optimizers import swap_average
    from models.transforms import Float32Layer, precision
    from pipeline.experiment import resolve

    config = resolve({"train": {"precision": policy}}, [preset])
    family = config.model.name
    with precision(policy):
        model = model_harness.build_tiny(family)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored after the build
    compile_model(model, tf.distribute.get_strategy(), config.train)
    optimizer = model.train_model.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")

    layers = list(model.train_model._flatten_layers(include_self=False))
    compute = {layer.compute_dtype for layer in layers if layer.weights and not isinstance(layer, Float32Layer)}
    assert POLICIES[policy] in compute, compute  # the networks compute in half precision
    assert all(layer.compute_dtype == "float32" for layer in layers if isinstance(layer, Float32Layer))
    assert {v.dtype for v in model.train_model.weights} == {"float32"}

    mixture, stems = model_harness.random_batch(model, nb_timesteps=model.input_samples(8000))
    truth = {k: np.asarray(v) for k, v in model.train_targets(stems).items()}
    before = [v.numpy() for v in model.train_model.trainable_weights]
    # float16: a step whose scaled gradients overflow is skipped and the loss scale halved (as torch's GradScaler
    # does), so the first steps of a fresh run may leave the weights; within a few steps they move
    for step in range(8):
        loss = model.train_model.train_on_batch(mixture, truth, return_dict=True)["loss"]
        assert np.isfinite(loss), loss
        moved = sum(not np.array_equal(a, b.numpy()) for a, b in zip(before, model.train_model.trainable_weights))
        if moved > 0.5 * len(before):
            break
    assert moved > 0.5 * len(before), (step, moved, len(before))
    if policy == "mixed_float16":
        assert float(optimizer.dynamic_scale) == 2.0 ** 15 / 2 ** step  # halved once per skipped step
    if config.train.ema_momentum is not None:
        weights = [v.numpy() for v in model.train_model.trainable_weights]
        swap_average(model.train_model)
        averaged = [v.numpy() for v in model.train_model.trainable_weights]
        swap_average(model.train_model)
        assert any(not np.array_equal(a, b) for a, b in zip(weights, averaged))
        assert all(np.array_equal(a, b.numpy()) for a, b in zip(weights, model.train_model.trainable_weights))
    outputs = model.separator(mixture, training=False)
    assert {str(np.asarray(v).dtype) for v in outputs.values()} == {"float32"}

    # evaluation and export: the same weights in a model built in float32
    model.train_model.save_weights(tmp_path / "mixed.weights.h5")
    plain = model_harness.build_tiny(family)
    plain.train_model.load_weights(tmp_path / "mixed.weights.h5")
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(model.train_model.weights, plain.train_model.weights))
    assert all(layer.compute_dtype == "float32" for layer in plain.train_model._flatten_layers(include_self=False))
    full = plain.separator(mixture, training=False)
    for target in model.targets:  # half-precision networks: the same separation, to the precision's rounding
        error = np.linalg.norm(np.asarray(outputs[target]) - np.asarray(full[target]))
        assert error <= 0.25 * np.linalg.norm(np.asarray(full[target])) + 1e-4, (target, error)


def test_a_killed_mixed_precision_run_resumes_and_evaluates_in_float32(umx_pipeline, tmp_path):
    """`--stage train with train.precision=mixed_float16`, killed after two epochs, resumes where it stopped (the
    loss scale is optimizer state, restored with the backup); the train artifact records the precision and
    `load_trained` (evaluate, export) builds a float32 model."""
    import keras

    from components import artifacts
    from components.training.trained import load_trained
    from pipeline.experiment import resolve

    root = seed_data(umx_pipeline, tmp_path / "k")
    args = ["--stage", "train", "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}",
            "train.precision=mixed_float16", "train.epochs=8", "train.steps_per_epoch=2"]
    done_before = kill_training_after(args, root)
    killed_at = len(done_before)
    assert 2 <= killed_at < 8 and not (root / "train" / "artifact.json").exists()

    cli(*args)
    train = artifacts.load(root, "train")
    history = json.loads(train.file("history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 9)) and all(np.isfinite(h["loss"]) for h in history)
    assert len({h["pid"] for h in history[:killed_at]}) == 1 and history[-1]["pid"] != history[0]["pid"]
    assert train.meta["config"]["train"]["precision"] == "mixed_float16"

    config = resolve({"artifacts_dir": str(root), "train": {"precision": "mixed_float16"}}, ["unittest"])
    model = load_trained(train, config)
    assert keras.config.dtype_policy().name == "float32"
    assert all(layer.compute_dtype == "float32" for layer in model.train_model._flatten_layers(include_self=False))
