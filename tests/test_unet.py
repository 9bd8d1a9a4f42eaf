"""Spectrogram U-Nets (dedicated, M-U-Net, C-U-Net): published parameter counts, shapes, training,
loss weighting (DWA, EBW), SavedModel and TFLite export."""
import numpy as np
import pytest
import tensorflow as tf

from configs.config import ConfigError, DataConfig, to_plain
from models import registry, unet
from tests import model_harness as harness

FAMILIES = ("unet", "m_unet", "c_unet")


def tiny(name, model=None, targets=("vocals", "drums"), stats=None):
    overrides = {"data": {"targets": list(targets)}, "model": {name: dict(model or {})}}
    if name in ("m_unet",) and "weighting" not in (model or {}):
        overrides["model"][name]["weighting"] = "equal"
    return harness.build_tiny(name, overrides=overrides, stats=stats)


# ------------------------------------------------------------------------------------- parameter counts
#
# Trainable parameters of the U-Net (Jansson et al. 2017) with C_in input and C_out output feature maps
# (5x5 kernels: 25 * in * out weights + out biases per conv; BN: gamma and beta per feature map):
#   encoder convs  in -> 16 -> 32 -> 64 -> 128 -> 256 -> 512:
#       25*C_in*16 + 16 = 400 C_in + 16;  25*16*32 + 32 = 12,832;  25*32*64 + 64 = 51,264;
#       25*64*128 + 128 = 204,928;  25*128*256 + 256 = 819,456;  25*256*512 + 512 = 3,277,312
#       -> 4,365,808 + 400 C_in
#   decoder deconvs (inputs: 512, then 2x the previous output after each skip concat):
#       512 -> 256: 3,277,056;  512 -> 128: 1,638,528;  256 -> 64: 409,664;  128 -> 32: 102,432;
#       64 -> 16: 25,616;  32 -> C_out: 801 C_out                               -> 5,453,296 + 801 C_out
#   BN: 2 * (16+32+64+128+256+512) + 2 * (256+128+64+32+16) = 2,016 + 992    -> 3,008
#   total 9,822,112 + 400 C_in + 801 C_out: stereo one target 9,824,514 (Spleeter's ~9.8 M per stem)
# M-U-Net, stereo, 4 targets: C_out = 8 -> 9,822,112 + 800 + 6,408 = 9,829,320
# C-U-Net, stereo, 4 targets, complex FiLM (1,008 = 16+...+512 gammas and betas), control (16, 256, 1024):
#   dense 4->16: 80; 16->256: 4,352 (+ BN 512); 256->1024: 263,168 (+ BN 2,048);
#   gammas and betas 1024->1008: 2 * 1,033,200  -> control 2,336,560; total 9,824,514 + 2,336,560 = 12,161,074
#   simple FiLM (6 gammas, betas), control (16, 64, 256): 80 + 1,088 + 128 + 16,640 + 512 + 2 * 1,542 = 21,532
#   -> 9,846,046


def unet_parameters(nb_in, nb_out, first_filters=16):
    """The count above for any `first_filters` (checked against the hand-derived figures)."""
    f = [first_filters * 2 ** i for i in range(6)]
    encoder = 25 * nb_in * f[0] + f[0] + sum(25 * f[i - 1] * f[i] + f[i] for i in range(1, 6))
    decoder_in = [f[5]] + [2 * f[i] for i in (4, 3, 2, 1)]
    decoder_out = [f[4], f[3], f[2], f[1], f[0]]
    decoder = sum(25 * i * o + o for i, o in zip(decoder_in, decoder_out)) + 25 * 2 * f[0] * nb_out + nb_out
    return encoder + decoder + 2 * sum(f) + 2 * sum(decoder_out)


def test_parameter_counts_match_the_hand_derivation():
    assert unet_parameters(2, 2) == 9_824_514 and unet_parameters(2, 8) == 9_829_320
    assert unet_parameters(1, 1) == 9_823_313
    stereo = DataConfig()
    one = unet.build_unet(unet.UNetConfig(), data=DataConfig(targets=("vocals",)), stats={})
    assert harness.count_parameters(one.train_model) == 9_824_514
    mono_two = unet.build_unet(unet.UNetConfig(), data=DataConfig(targets=("vocals", "accompaniment"), nb_channels=1),
                               stats={})
    assert harness.count_parameters(mono_two.train_model) == 2 * 9_823_313
    multi = unet.build_m_unet(unet.MUNetConfig(), data=stereo, stats={})
    assert harness.count_parameters(multi.train_model) == 9_829_320
    conditioned = unet.build_c_unet(unet.CUNetConfig(), data=stereo, stats={})
    assert harness.count_parameters(conditioned.train_model) == 12_161_074
    simple = unet.build_c_unet(unet.CUNetConfig(film="simple", control_units=(16, 64, 256)), data=stereo, stats={})
    assert harness.count_parameters(simple.train_model) == 9_846_046


def test_unittest_preset_sizes():
    # first_filters 4, stereo, two targets; c_unet complex FiLM: 252 = 4+...+128 gammas/betas, control (8, 16, 32)
    assert harness.count_parameters(tiny("unet").train_model) == 2 * unet_parameters(2, 2, 4)
    assert harness.count_parameters(tiny("m_unet").train_model) == unet_parameters(2, 4, 4)
    control = (2 * 8 + 8) + (8 * 16 + 16 + 32) + (16 * 32 + 32 + 64) + 2 * (32 * 252 + 252)
    assert harness.count_parameters(tiny("c_unet").train_model) == unet_parameters(2, 2, 4) + control


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name,changes", [
    ("unet", {"max_bin": 0, "mask_extension": "average", "wiener_iterations": 2}),
    ("m_unet", {"weighting": "ebw", "ebw_power": 2.0, "patch_frames": 128}),
    ("c_unet", {"film": "simple", "control_units": (16, 64, 256)}),
])
def test_config_round_trip_and_registry(name, changes):
    family = registry.module(name)
    harness.check_config_round_trip(family, family.Config(**changes))
    assert to_plain(registry.default_params(name)) == to_plain(family.Config())
    with pytest.raises(ConfigError, match=f"model.{name}.patch_frames"):
        family.Config(patch_frames=100)
    with pytest.raises(ConfigError, match=f"model.{name}.max_bin"):
        family.Config(max_bin=10_000)


def test_config_rejects_unknown_weighting_and_film():
    with pytest.raises(ConfigError, match="model.m_unet.weighting"):
        unet.MUNetConfig(weighting="uncertainty")
    with pytest.raises(ConfigError, match="model.c_unet.film"):
        unet.CUNetConfig(film="local")


def test_presets_state_the_paper_settings_and_fit_their_segments():
    from configs.presets import PRESETS

    for preset, name in (("m_unet_paper", "m_unet"), ("m_unet_paper", "c_unet"), ("unet_44k", "unet"),
                         ("unet_44k", "m_unet"), ("unittest", "m_unet")):
        config = harness.tiny_config(name, preset=PRESETS[preset])
        family_config = registry.family_config(config.model)
        rule = lambda n: unet._frames_rule(family_config, n)  # noqa: E731
        seq = rule(int(round(config.train.seq_seconds * config.data.sample_rate)))
        assert seq <= int(round(config.data.segment_seconds * config.data.sample_rate))
        assert (1 + seq // family_config.hop_length) % family_config.patch_frames == 0
        if preset == "m_unet_paper":
            assert config.data.sample_rate == 10880 and seq == 6 * 10880  # 256 frames of hop 256 = 6 s
            assert (family_config.n_fft, family_config.hop_length, family_config.max_bin,
                    family_config.patch_frames) == (1022, 256, 512, 256)
        if preset == "unet_44k":
            assert (family_config.n_fft, family_config.hop_length, family_config.max_bin,
                    family_config.patch_frames) == (4096, 1024, 1024, 512)
            assert seq == 511 * 1024
        if preset == "unittest":
            assert seq == 63 * 64 and family_config.first_filters == 4


# --------------------------------------------------------------------------------------- shapes, fit


@pytest.mark.parametrize("name", FAMILIES)
def test_shapes_for_odd_lengths_shared_weights_and_fit(name):
    import keras

    model = tiny(name)
    for nb_timesteps in (3001, 4097):  # 47 and 65 frames: one patch padded, two patches (the second padded)
        # any length works (the harness's check feeds `input_samples(n)` instead, so test odd lengths here)
        symbolic = model.separator(keras.KerasTensor((2, nb_timesteps, 2)))
        mixture, _ = harness.random_batch(model, 2, nb_timesteps)
        eager = model.separator(mixture, training=False)
        for outputs in (symbolic, eager):
            assert set(outputs) == {"vocals", "drums"}
            assert all(tuple(v.shape) == (2, nb_timesteps, 2) for v in outputs.values())
        assert all(np.all(np.isfinite(np.asarray(v))) for v in eager.values())
        shapes = harness.check_train_shapes(model, nb_timesteps=nb_timesteps)
        assert shapes["vocals"] == (2, 1 + model.input_samples(nb_timesteps) // 64, 64, 2)
    assert model.input_samples(3001) == 4032 and model.input_samples(9000) == 2 * 64 * 64 - 64
    assert harness.check_shared_weights(model) == len(model.train_model.trainable_weights)
    losses = fit(model, epochs=4)["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.97 * losses[0], losses


def test_c_unet_outputs_are_the_u_net_run_once_per_one_hot_target():
    model = tiny("c_unet")
    mixture, _ = harness.random_batch(model, 2, 4032, seed=3)
    outputs = model.train_model(mixture, training=False)
    magnitude = np.asarray(unet.complex_norm(unet.stft(mixture, 256, 64)))[:, :, :64]  # (2, 64, 64, 2): one patch
    for index, target in enumerate(model.targets):
        condition = np.zeros((2, 2), np.float32)
        condition[:, index] = 1
        masks = np.asarray(model.extra["core"]([magnitude, condition], training=False))
        np.testing.assert_allclose(np.asarray(outputs[target]), masks * magnitude, rtol=1e-4, atol=1e-6)
    assert np.max(np.abs(np.asarray(outputs["vocals"]) - np.asarray(outputs["drums"]))) > 1e-4


def test_full_masks_give_back_the_mixture():
    # estimates = the mixture magnitude below max_bin; "average" extends the (all-one) mask to the top bins
    rng = np.random.default_rng(0)
    mixture = rng.normal(0, 0.2, (1, 2001, 2)).astype(np.float32)
    mix_stft = unet.stft(mixture, 256, 64)
    estimates = unet.complex_norm(mix_stft)[:, :, :64, :, None]
    full = unet.reconstruct(estimates, mix_stft, 2001, n_fft=256, hop_length=64, mask_extension="average")
    assert full.shape == (1, 2001, 2, 1)
    assert np.max(np.abs(np.asarray(full)[..., 0] - mixture)) < 1e-5
    low = unet.reconstruct(estimates, mix_stft, 2001, n_fft=256, hop_length=64, mask_extension="zeros")
    def high_band_share(signal):  # energy share above 0.55 x Nyquist (bins 64+ of 129 start at 0.5)
        power = np.abs(np.fft.rfft(signal[0, :, 0])) ** 2
        return power[int(0.55 * len(power)):].sum() / power.sum()

    assert high_band_share(mixture) > 0.4  # white noise
    assert high_band_share(np.asarray(low)[..., 0]) < 0.005  # only the window's leakage is left


# -------------------------------------------------------------------------------------- loss weighting


def test_dwa_weights_match_hand_computed_values():
    # w = (0.5/1, 2/2) = (0.5, 1); lambda = 2 exp(w/2) / (exp(0.25) + exp(0.5)) = (2 / (1 + e^0.25), 2 e^0.25 / (1 + e^0.25))
    np.testing.assert_allclose(unet.dwa_weights([[1.0, 2.0], [0.5, 2.0]], 2.0), [0.8756469982284039, 1.1243530017715961],
                               rtol=1e-12)
    # three targets, w = (0.5, 1, 0.5): lambda = 3 (e^.25, e^.5, e^.25) / (2 e^.25 + e^.5)
    np.testing.assert_allclose(unet.dwa_weights([[9.0, 9.0, 9.0], [2.0, 1.0, 4.0], [1.0, 1.0, 2.0]]),
                               [0.913513027260852, 1.172973945478296, 0.913513027260852], rtol=1e-12)
    np.testing.assert_array_equal(unet.dwa_weights(np.zeros((0, 4))), np.ones(4))  # first two epochs
    np.testing.assert_array_equal(unet.dwa_weights([[3.0, 1.0, 2.0, 5.0]]), np.ones(4))
    np.testing.assert_allclose(unet.dwa_weights([[1.0, 1.0], [0.5, 2.0]], 1e6), [1.0, 1.0], rtol=1e-5)  # T -> inf


def test_ebw_weights_match_hand_computed_values():
    np.testing.assert_allclose(unet.ebw_weights([4.0, 1.0, 2.0, 0.5], 1), [1.0, 4.0, 2.0, 8.0])
    np.testing.assert_allclose(unet.ebw_weights([4.0, 1.0, 2.0, 0.5], 2), [1.0, 16.0, 4.0, 64.0])
    with pytest.raises(ValueError, match="positive"):
        unet.ebw_weights([1.0, 0.0])
    targets = ("vocals", "drums")
    assert unet.target_energies({"energy": {"vocals": 2.0, "drums": 1.0}}, targets).tolist() == [2.0, 1.0]
    manifest = {"splits": {"train": {"energy": {"vocals": 3.0, "drums": 6.0, "bass": 1.0}}}}
    assert unet.target_energies(manifest, targets).tolist() == [3.0, 6.0]
    assert unet.target_energies({}, targets) is None


def _fixed_batch(model, seed=1):
    mixture, stems = harness.random_batch(model, 2, 4032, seed=seed)
    return mixture, {t: np.asarray(v) for t, v in model.train_targets(stems).items()}


def fit(model, epochs, callbacks=(), learning_rate=1e-2):
    """`harness.check_fit_lowers_loss` with the Adam slots built eagerly first: creating them while the
    train step is traced costs ~8 s per model on a shared 2-core machine, building them here ~0.1 s."""
    import keras

    keras.utils.set_random_seed(0)
    mixture, truth = _fixed_batch(model)
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(model.train_model.trainable_variables)
    model.train_model.compile(optimizer=optimizer, loss=model.loss, jit_compile=False)
    return model.train_model.fit(mixture, truth, batch_size=2, epochs=epochs, shuffle=False, verbose=0,
                                 callbacks=list(callbacks)).history


class Recorder:
    """Stands in for the train stage's SacredLogger, which comes *before* model.callbacks in its list."""

    def __init__(self):
        import keras

        self.epochs = []
        recorder = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                recorder.epochs.append(dict(logs))

        self.callback = Callback()


def test_dwa_callback_changes_the_loss_weights_between_epochs_and_logs_them():
    # both targets' losses fall at nearly the same rate here: a low temperature makes their lambdas part visibly
    model = tiny("m_unet", {"weighting": "dwa", "dwa_temperature": 0.01})
    recorder = Recorder()
    history = fit(model, epochs=3, callbacks=[recorder.callback, *model.callbacks])
    # the lambdas in use each epoch are in the logs an earlier callback sees
    logged = np.array([[epoch[f"lambda_{t}"] for t in model.targets] for epoch in recorder.epochs])
    np.testing.assert_array_equal(logged[:2], np.ones((2, 2)))
    # epoch 3: DWA of the per-target losses of epochs 1 and 2 (weights 1 then, so the logged ones)
    losses = np.array([[history[f"{t}_loss"][epoch] for t in model.targets] for epoch in range(2)])
    expected = unet.dwa_weights(losses, 0.01)
    np.testing.assert_allclose(logged[2], expected, rtol=1e-5)
    assert np.max(np.abs(logged[2] - 1.0)) > 1e-3 and abs(logged[2].sum() - 2.0) < 1e-5
    # the loss really uses them: loss = sum_k lambda_k L_k, and "<target>_loss" is lambda_k L_k
    assert abs(history["loss"][2] - sum(history[f"{t}_loss"][2] for t in model.targets)) < 1e-4 * history["loss"][2]
    layer = model.extra["weighting"]
    assert int(layer.epochs_recorded.numpy()) == 2 and float(layer.pending.numpy()) == 1.0
    # the state lives in the model's weights (checkpointed with it: BackupAndRestore resumes the history)
    assert {"loss_weights", "epoch_losses", "running_losses"} <= {w.name for w in model.train_model.weights}


def test_ebw_weights_from_stats_are_applied_and_missing_energies_stop_training():
    import keras

    energies = {"vocals": 0.01, "drums": 0.04}
    model = tiny("m_unet", {"weighting": "ebw", "ebw_power": 2.0}, stats={"energy": energies})
    np.testing.assert_allclose(model.extra["weighting"].loss_weights.numpy(), [16.0, 1.0])
    mixture, truth = _fixed_batch(model)
    model.train_model.compile(loss=model.loss, jit_compile=False)
    result = model.train_model.evaluate(mixture, truth, batch_size=2, verbose=0, return_dict=True)
    estimates = model.train_model(mixture, training=False)
    for target, weight in (("vocals", 16.0), ("drums", 1.0)):
        l1 = float(np.mean(np.abs(truth[target] - np.asarray(estimates[target]))))
        assert abs(result[f"{target}_loss"] - weight * l1) < 1e-4 * weight * l1
        assert result[f"lambda_{target}"] == weight

    missing = tiny("m_unet", {"weighting": "ebw"}, stats={})  # builds (inference needs no energies) ...
    missing.train_model.compile(optimizer="sgd", loss=missing.loss, jit_compile=False)
    with pytest.raises(ValueError, match="energy"):  # ... but refuses to train with silently equal weights
        missing.train_model.fit(mixture, truth, epochs=1, verbose=0, callbacks=list(missing.callbacks))


# --------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_model_and_tflite_export(name, tmp_path):
    from components.export import convert_tflite, run_tflite, tflite_ops, write_saved_model

    model = tiny(name)
    mixture, _ = harness.random_batch(model, 1, 3001, seed=4)
    expected = {k: np.asarray(v) for k, v in model.separator(mixture, training=False).items()}
    write_saved_model(model.separator, tmp_path / "saved", model.nb_channels)
    served = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"](waveform=tf.constant(mixture))
    assert max(float(np.max(np.abs(np.asarray(served[k]) - expected[k]))) for k in expected) <= 1e-5

    chunk = model.input_samples(4000)
    probe, _ = harness.random_batch(model, 1, chunk, seed=5)
    blob = convert_tflite(model.mobile(chunk), chunk, model.nb_channels)
    ops = tflite_ops(blob)
    assert not [op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE")], ops
    assert "CONV_2D" in ops and "TRANSPOSE_CONV" in ops and "RFFT2D" in ops
    outputs = run_tflite(blob, probe)
    reference = {k: np.asarray(v) for k, v in model.train_model(probe, training=False).items()}
    assert set(outputs) == set(reference)
    for target in reference:
        scale = np.max(np.abs(reference[target]))
        assert np.max(np.abs(outputs[target] - reference[target])) <= 1e-4 * scale
    waveforms = model.postprocess(probe, outputs)
    separated = model.separator(probe, training=False)
    for target in model.targets:
        got, want = np.asarray(waveforms[target]), np.asarray(separated[target])
        assert got.shape == probe.shape
        assert np.max(np.abs(got - want)) <= 1e-4 * max(1e-3, np.max(np.abs(want)))
