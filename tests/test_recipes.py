"""Training recipes: optimizers, EMA, constant lr, checkpoint selection, data mixing, offline pitch/tempo copies,
the waveform-domain loss of TFC-TDF v3, the recipe presets and `--describe-model`."""
from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np
import pytest
import soundfile

from components.training import optimizers
from components.data import records
from configs.errors import ConfigError
from configs.presets import PRESETS, RECIPE_DATA_KEYS, RECIPE_PRESETS, RECIPE_TRAIN_KEYS
from tests.cli import cli, describe
from tests.shared_artifacts import DATA, copy_stages
from tests.test_data import make_config, prepare

TARGETS = ["vocals", "drums", "bass", "other"]


# -- optimizers ---------------------------------------------------------------------------------------------------
def _steps(optimizer, weights, gradients):
    """Apply each gradient in turn to one variable; returns its value after every step."""
    import tensorflow as tf

    variable = tf.Variable(np.asarray(weights, np.float32))
    optimizer.build([variable])
    values = []
    for gradient in gradients:
        optimizer.apply_gradients([(tf.constant(np.asarray(gradient, np.float32)), variable)])
        values.append(variable.numpy().copy())
    return values


def test_sgd_momentum_update_equals_the_hand_computed_one():
    w0, grads, lr, mu, l2 = np.array([1.0, -2.0]), [np.array([0.5, 1.0]), np.array([-1.0, 2.0]),
                                                    np.array([0.25, 0.0])], 0.1, 0.9, 0.01
    for nesterov in (False, True):
        got = _steps(optimizers.make("sgd", learning_rate=lr, momentum=mu, nesterov=nesterov, weight_decay=l2),
                     w0, grads)
        # torch.optim.SGD: g += l2 w; b = mu b + g; w -= lr (g + mu b if nesterov else b)
        w, b = w0.copy(), np.zeros(2)
        for gradient, value in zip(grads, got):
            g = gradient + l2 * w
            b = mu * b + g
            w = w - lr * (g + mu * b if nesterov else b)
            np.testing.assert_allclose(value, w, rtol=1e-6)
    # after step 2 without nesterov, by hand: b1 = g1 + l2 w0 = [0.51, 0.98], w1 = [0.949, -2.098];
    # b2 = 0.9 b1 + g2 + l2 w1 = [-0.53151, 2.86102]; w2 = w1 - 0.1 b2 = [1.002151, -2.384102]
    plain = _steps(optimizers.make("sgd", learning_rate=lr, momentum=mu, weight_decay=l2), w0, grads)
    np.testing.assert_allclose(plain[1], [1.002151, -2.384102], rtol=1e-6)


def test_adam_follows_pytorch_and_adam_tf_follows_tf1_epsilon_hat():
    w0, grads, lr, eps = np.array([0.3, -0.7]), [np.array([1e-3, -2.0]), np.array([4e-3, 1.0])], 0.01, 1e-3
    torch_like = _steps(optimizers.make("adam", learning_rate=lr, epsilon=eps), w0, grads)
    tf1_like = _steps(optimizers.make("adam_tf", learning_rate=lr, epsilon=eps), w0, grads)
    decoupled = _steps(optimizers.make("adamw", learning_rate=lr, epsilon=eps, weight_decay=0.1), w0, grads)
    w_t, w_1, w_w, m, v = w0.copy(), w0.copy(), w0.copy(), np.zeros(2), np.zeros(2)
    for step, (g, a, b, c) in enumerate(zip(grads, torch_like, tf1_like, decoupled), start=1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9 ** step), v / (1 - 0.999 ** step)
        w_t = w_t - lr * m_hat / (np.sqrt(v_hat) + eps)  # torch.optim.Adam
        w_1 = w_1 - lr * np.sqrt(1 - 0.999 ** step) / (1 - 0.9 ** step) * m / (np.sqrt(v) + eps)  # TF1
        w_w = w_w * (1 - lr * 0.1) - lr * m_hat / (np.sqrt(v_hat) + eps)  # torch.optim.AdamW
        np.testing.assert_allclose(a, w_t, rtol=1e-5)
        np.testing.assert_allclose(b, w_1, rtol=1e-5)
        np.testing.assert_allclose(c, w_w, rtol=1e-5)
    assert abs(torch_like[0][0] - tf1_like[0][0]) > 1e-4  # a small gradient shows where epsilon sits


def test_adam_flat_update_is_bitwise_the_per_variable_one():
    """Outside a distribution strategy Adam updates every variable in one pass, its step scalars computed once;
    inside one (here a one-device strategy) variable by variable, as Keras does. Both run one ResourceApplyAdam
    per variable and must give the same bits, with the L2 term or the decoupled decay (with a variable excluded
    from it)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (2, 2, 3)]
    start = [rng.normal(size=shape).astype(np.float32) for shape in shapes]
    grads = [[rng.normal(size=shape).astype(np.float32) for shape in shapes] for _ in range(3)]
    for name, decay in (("adam", 1e-2), ("adamw", 0.1)):
        results = []
        for strategy in (None, tf.distribute.OneDeviceStrategy("/cpu:0")):
            with strategy.scope() if strategy else tf.name_scope("flat"):
                variables = [tf.Variable(w, name=f"w{i}") for i, w in enumerate(start)]
                optimizer = optimizers.make(name, learning_rate=0.01, weight_decay=decay)
                optimizer.exclude_from_weight_decay(var_names=["w1"])
                optimizer.build(variables)
                assert optimizer._fused(variables) is (strategy is None)
                step = tf.function(lambda gs: optimizer.apply_gradients(zip(gs, variables)))
                for gs in grads:
                    (strategy.run if strategy else lambda f, args: f(*args))(step, ([tf.constant(g) for g in gs],))
            results.append([v.numpy() for v in variables] + [s.numpy() for s in optimizer.variables[1:]])
        assert all(np.array_equal(a, b) for a, b in zip(*results)), name
        assert not np.array_equal(results[0][0], start[0])


def test_ema_weights_after_n_steps_equal_the_closed_form():
    mu, lr, w0 = 0.9, 0.5, np.array([2.0, -1.0])
    grads = [np.array([1.0, 0.5]) * (k + 1) for k in range(5)]
    optimizer = optimizers.make("sgd", learning_rate=lr, momentum=0.0, ema_momentum=mu)
    raw = _steps(optimizer, w0, grads)
    (average,) = [a.numpy() for a in optimizer._model_variables_moving_average]
    # sdx23 EMAHelper: a_0 = w_0, a_k = mu a_{k-1} + (1 - mu) w_k  =>  a_n = mu^n w_0 + sum (1 - mu) mu^(n-k) w_k
    n = len(grads)
    closed = mu ** n * w0 + sum((1 - mu) * mu ** (n - k) * raw[k - 1] for k in range(1, n + 1))
    np.testing.assert_allclose(average, closed, rtol=1e-6)
    assert not np.allclose(average, raw[-1])


def test_fit_with_ema_validates_and_leaves_the_averaged_weights():
    import keras

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5]], np.float32)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=optimizers.make("sgd", learning_rate=0.05, momentum=0.0, ema_momentum=0.8), loss="mse")
    model.optimizer.build(model.trainable_variables)
    w0 = model.get_weights()[0].copy()
    raw = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raw.append(self.model.trainable_variables[0].numpy().copy())

    enter, leave = optimizers.ema_window()
    history = model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, validation_data=(x, y),
                        callbacks=[Record(), enter, leave])
    closed = 0.8 ** 4 * w0 + sum(0.2 * 0.8 ** (4 - k) * raw[k - 1] for k in range(1, 5))
    np.testing.assert_allclose(model.get_weights()[0], closed, rtol=1e-5)  # the averages are the model now
    # the validation loss was measured with the averaged weights, not the raw ones
    assert history.history["val_loss"][0] == pytest.approx(float(np.mean((x @ closed - y) ** 2)), rel=1e-5)
    assert abs(history.history["val_loss"][0] - float(np.mean((x @ raw[-1] - y) ** 2))) > 1e-4


def test_train_keys_are_validated():
    from pipeline.experiment import resolve
    from configs.errors import UserError

    for key, value, words in (("optimizer", "rmsprop", "'train.optimizer' must be one of adam, adam_tf, adamw, sgd"),
                              ("lr_schedule", "cosine", "'train.lr_schedule'"),
                              ("checkpoint_metric", "val_bss", "'train.checkpoint_metric'"),
                              ("ema_momentum", 1.5, "'train.ema_momentum' must be in \\(0, 1\\)"),
                              ("beta_2", 1.0, "'train.beta_2' must be in \\[0, 1\\)")):
        with pytest.raises(UserError, match=words):
            resolve({"train": {key: value}}, ["unittest"])
    with pytest.raises(UserError, match="data.quiet_threshold redraws sources"):
        resolve({"data": {"quiet_threshold": 0.01}}, ["unittest"])
    with pytest.raises(ConfigError, match="data.mixing"):
        make_config("/tmp/unused", mixing="random")


def test_constant_lr_without_early_stopping_ema_and_best_by_validation_sdr(tmp_path, umx_pipeline):
    root = copy_stages(umx_pipeline, tmp_path / "a", "prepare", DATA)  # the unittest data, prepared
    cli("--stage", "train", "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}",
        "train.epochs=3", "train.lr_schedule=constant", "train.early_stopping=False", "train.patience=0",
        "train.lr_decay_patience=0", "train.optimizer=sgd", "train.lr=0.05", "train.ema_momentum=0.5",
        "train.checkpoint_metric=val_sdr")
    meta = json.loads((root / "train" / "artifact.json").read_text())
    history = json.loads((root / "train" / "history.json").read_text())
    # patience 0 would stop (and decay the rate) at the first epoch without improvement: neither happens
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["learning_rate"] for h in history] == pytest.approx([0.05] * 3)
    sdrs = [h["val_sdr"] for h in history]
    assert all(np.isfinite(sdrs)) and meta["figures"]["best_val_sdr"] == pytest.approx(max(sdrs))


# -- data mixing ---------------------------------------------------------------------------------------------------
def _value(k, j):
    return 0.1 * (k + 1) + 0.01 * j  # track k, target j: a constant that names both


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """4 train tracks of constant stems that name their track; t3 is 3x as long; t1's bass is quiet (0.002)."""
    root = tmp_path_factory.mktemp("labelled")
    for k, seconds in enumerate((2, 2, 2, 6)):
        folder = root / "data" / "train" / f"t{k}"
        folder.mkdir(parents=True)
        for j, target in enumerate(TARGETS):
            value = 0.002 if (k, target) == (1, "bass") else _value(k, j)
            soundfile.write(str(folder / f"{target}.wav"), np.full((8000 * seconds, 2), value), 8000, subtype="FLOAT")
    config = make_config(root / "artifacts", format="folder", root=str(root / "data"), splits=["train"],
                         segment_seconds=2.0, gain_range=[1.0, 1.0], channel_swap=False, evaluate={"split": "train"})
    artifact, _ = prepare(config)
    return config, artifact


def _origins(dataset, batches):
    """[[track index of each target's source] per example]."""
    found = []
    for _, stems in dataset.take(batches).as_numpy_iterator():
        for b in range(len(stems["vocals"])):
            found.append([int(round((float(stems[t][b].mean()) - 0.01 * j) / 0.1)) - 1 for j, t in enumerate(TARGETS)])
    return found


def test_independent_mixing_draws_every_source_from_its_own_track_uniformly(labelled):
    config, artifact = labelled
    data = dataclasses.replace(config.data, mixing="independent")
    origins = _origins(records.load_dataset(artifact, "train", seq_samples=4000, batch_size=8, augment=True,
                                            data_config=data, seed=3), 40)
    mixed = sum(len(set(example)) > 1 for example in origins)
    assert mixed / len(origins) > 0.9  # 4 sources from 4 equally likely tracks: all alike with p = 1/64
    counts = collections.Counter(k for example in origins for k in example)
    # tracks equally likely although t3 holds half of the segments (3 of 6)
    assert all(0.18 < counts[k] / sum(counts.values()) < 0.32 for k in range(4)), counts
    # the default: the sources of one segment stay together
    together = _origins(records.load_dataset(artifact, "train", seq_samples=4000, batch_size=8, augment=True,
                                             data_config=config.data, seed=3), 5)
    assert all(len(set(example) - {-1}) == 1 for example in together)  # -1: t1's quiet bass


def test_quiet_sources_are_redrawn(labelled):
    config, artifact = labelled
    data = dataclasses.replace(config.data, mixing="independent", quiet_threshold=0.005)
    origins = _origins(records.load_dataset(artifact, "train", seq_samples=4000, batch_size=8, augment=True,
                                            data_config=data, seed=4), 30)
    bass = collections.Counter(example[TARGETS.index("bass")] for example in origins)
    vocals = collections.Counter(example[0] for example in origins)
    assert bass[1] == 0 and sorted(bass) == [0, 2, 3]  # mean |x| 0.002 < 0.005: never used
    assert vocals[1] > 0  # t1's other sources are loud enough


def test_examples_with_a_silent_source_are_dropped(labelled):
    config, artifact = labelled
    # energy of t1's bass over 4,000 samples: 4,000 x 0.002^2 = 0.016; every other source is above 40
    data = dataclasses.replace(config.data, silent_energy=0.5)
    origins = _origins(records.load_dataset(artifact, "train", seq_samples=4000, batch_size=8, augment=True,
                                            data_config=data, seed=5), 20)
    assert {example[0] for example in origins} == {0, 2, 3}


# -- offline pitch / tempo copies ---------------------------------------------------------------------------------
def test_pitch_and_tempo_copies_shift_the_pitch_and_the_length():
    from components.data import pitch_tempo

    rate, seconds = 8000, 2
    t = np.arange(rate * seconds) / rate
    tone = np.stack([0.5 * np.sin(2 * np.pi * 440 * t)] * 2, axis=1)

    def peak(audio):
        middle = audio[len(audio) // 4: len(audio) // 4 + 8000, 0]
        return np.argmax(np.abs(np.fft.rfft(middle * np.hanning(len(middle))))) * rate / len(middle)

    for semitones, percent in ((2, 0), (0, 20), (-2, -20), (1, 10)):
        shifted = pitch_tempo.shift(tone, semitones, percent)
        assert len(shifted) == round(len(tone) / (1 + percent / 100))
        assert abs(peak(shifted) - 440 * 2 ** (semitones / 12)) <= 1.0  # 1 Hz bins
    assert pitch_tempo.variants([-2, -1, 0, 1, 2], [-20, -10, 0, 10, 20]).__len__() == 24  # DTTNet's copies


def test_prepare_writes_augmented_training_copies(tmp_path):
    config = make_config(tmp_path / "artifacts", pitch_shifts=[0, 1], tempo_changes=[0, 20])
    artifact, _ = prepare(config)
    train = artifact.meta["manifest"]["splits"]["train"]["tracks"]
    originals = [t for t in train if "augmented_from" not in t]
    copies = [t for t in train if "augmented_from" in t]
    assert len(originals) == 2 and len(copies) == 2 * 3
    assert {t["name"].split("_", 1)[1] for t in copies if "_p=" in t["name"]} >= {"p=1_t=0", "p=0_t=20", "p=1_t=20"}
    lengths = {t["name"]: t["nb_timesteps"] for t in train}
    for copy in copies:
        percent = int(copy["name"].rsplit("_t=", 1)[1])
        assert lengths[copy["name"]] == round(lengths[copy["augmented_from"]] / (1 + percent / 100))
    assert len(artifact.meta["manifest"]["splits"]["valid"]["tracks"]) == 1  # only training tracks are copied


# -- TFC-TDF v3: the loss on waveforms ----------------------------------------------------------------------------
def test_waveform_domain_quantile_loss_against_hand_computed_values():
    from models import tfc_tdf_unet as tfc
    from tests import model_harness as harness

    # element-wise mask along time: errors 0..4 on 5 samples -> ℓ 0, 1, 4, 9, 16; q = 0.5: τ = 4; kept 0 and 1
    y_pred = np.arange(5, dtype=np.float32).reshape(1, 5, 1)
    assert float(tfc.quantile_masked_loss(np.zeros_like(y_pred), y_pred, 0.5, coarse=False)) == pytest.approx(0.2)
    # through the tiny model: its loss is the masked MSE of the separator's waveforms, per target
    for variant, coarse in (("quantile_coarse", True), ("quantile_element", False)):
        model = harness.build_tiny("tfc_tdf_v3", overrides={"model": {"tfc_tdf_v3": {"loss": variant}}})
        mixture, stems = harness.random_batch(model, 5, model.input_samples(1500))
        estimates = {t: np.asarray(v, np.float64) for t, v in model.separator(mixture, training=False).items()}
        q = tfc.DEFAULT_QUANTILE[variant]
        for target in model.targets:
            error = (estimates[target] - np.asarray(stems[target], np.float64)) ** 2  # (5, samples, channels)
            if coarse:
                error = error.mean(axis=(1, 2))
            expected = np.mean(error * (error < np.quantile(error, q)))
            got = float(model.loss[target](stems[target], model.train_model(mixture, training=False)[target]))
            assert got == pytest.approx(expected, rel=1e-4)


# -- presets and --describe-model ---------------------------------------------------------------------------------
def test_every_recipe_preset_sets_every_training_key():
    from pipeline.experiment import resolve

    for name in RECIPE_PRESETS:
        preset = PRESETS[name]
        missing = [k for k in RECIPE_TRAIN_KEYS if k not in preset["train"]]
        missing += [f"data.{k}" for k in RECIPE_DATA_KEYS if k not in preset["data"]]
        assert not missing, f"{name} inherits {missing}"
        resolve({}, [name])  # and validates
    sdx = resolve({}, ["tfc_tdf_v3_sdx23"])
    assert (sdx.train.ema_momentum, sdx.train.epochs * sdx.train.steps_per_epoch, sdx.data.quiet_threshold) == (
        0.999, 100_000, 0.01)
    dtt = resolve({}, ["dttnet_paper"])
    assert (dtt.train.optimizer, dtt.train.lr_schedule, dtt.train.checkpoint_metric) == ("adamw", "constant", "val_sdr")
    assert resolve({}, ["m_unet_paper"]).train.optimizer == "sgd"


@pytest.mark.parametrize("presets, lines", [
    (["unittest", "model.name=tfc_tdf_v3"], ["  tfc_tdf_net          36,848 trainable parameters",
                                             "total: 36,848 trainable parameters"]),
    (["dttnet_paper"], ["  vocals       4,958,468 trainable parameters",
                        "  bass         4,184,388 trainable parameters", "total: 19,059,792 trainable parameters"]),
    (["wave_u_net_paper"], ["total: 10,263,498 trainable parameters"]),
])
def test_describe_model_prints_each_network_and_the_total(presets, lines):
    # the text `run.py --describe-model` prints, built in this process (the CLI itself: the test below)
    output = describe(*presets).splitlines()
    assert output[0].startswith("family: ")
    for line in lines:
        assert line in output, (line, output)


def test_describe_model_cli_prints_the_description_and_exits_0():
    result = cli("--describe-model", "with", "unittest", "model.name=tfc_tdf_v3")
    assert result.stdout == describe("unittest", "model.name=tfc_tdf_v3") + "\n"
    assert result.stdout.splitlines()[-1] == "total: 36,848 trainable parameters"


def test_wave_u_net_fine_tuning_continues_with_the_lower_rate(tmp_path, umx_pipeline):
    root = copy_stages(umx_pipeline, tmp_path / "w", "prepare", DATA)  # prepare does not depend on the model
    common = ("--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}", "model.name=wave_u_net")
    cli("--stage", "train", *common, "train.epochs=1", "train.finetune_epochs=1", "train.finetune_lr=1e-5",
        "train.finetune_batch_size=4", "train.finetune_from=last", "train.optimizer=adam_tf")
    history = json.loads((root / "train" / "history.json").read_text())
    # one epoch at train.lr, then the fine-tuning epoch at finetune_lr on the same optimizer (its state kept)
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["learning_rate"] for h in history] == pytest.approx([1e-3, 1e-5])


def test_adam_is_one_fused_kernel_per_variable_in_the_traced_step():
    # the traced training graph's size (DTTNet: 800 variables) is what its first step costs: one ResourceApplyAdam
    # per variable, no per-variable reads and writes of the moments
    import tensorflow as tf

    variables = [tf.Variable(np.ones(shape, np.float32)) for shape in [(3, 4), (4,), (2, 2, 3), (4,)]]
    optimizer = optimizers.make("adam", learning_rate=0.01)
    optimizer.build(variables)
    step = tf.function(lambda gs: optimizer.apply_gradients(zip(gs, variables)))
    graph = step.get_concrete_function([tf.TensorSpec(v.shape, tf.float32) for v in variables]).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("ResourceApplyAdam") == len(variables)
    assert types.count("AssignVariableOp") <= 1  # the iteration counter at most
