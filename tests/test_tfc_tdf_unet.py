"""TFC-TDF-UNet v3: published parameter count, config, shapes, quantile losses, one training step,
chunked overlap-add, SavedModel and TFLite export. Everything but the parameter counts uses the
`unittest` preset's tiny model."""
from __future__ import annotations

import numpy as np
import pytest

from configs.config import DataConfig, ModelConfig
from configs.errors import ConfigError
from models import registry
from models import tfc_tdf_unet as tfc
from tests import model_harness as harness

# --------------------------------------------------------------------------------------------
# The SDX23 configuration's weight count, derived from the architecture (kuielab/sdx23 tfc_tdf_v3.py
# with ckpts/modelA/config.yaml): stereo, 4 targets, dim_f 4096, k = 4 subbands -> dim_c = 4·2·2 = 16
# features, f = 4096 / 4 = 1024 bins; c = 64, g = 64, 5 scales, l = 2 blocks per scale, bn = 4.
# No layer has a bias; InstanceNorm(affine) has 2 weights per channel.
#
#   one TFC-TDF block (in -> c, f bins):
#       tfc1 norm 2·in + conv 9·in·c; tdf norm 2c + f·f/4 + norm 2c + f/4·f; tfc2 norm 2c + 9·c·c; shortcut in·c
#   first conv 16·64 = 1,024
#   encoder s = 0..4 (c = 64 (s+1), f = 1024 / 2^s): 2 blocks c -> c, downscale norm 2c + 4·c·(c+64)
#   bottleneck (c = 384, f = 32): 2 blocks
#   decoder (c = 320..64): upscale norm 2(c+64) + 4·(c+64)·c, 2 blocks (first 2c -> c, second c -> c)
#   final convs (64 + 16)·64 + 64·(4·16) = 9,216
# --------------------------------------------------------------------------------------------


def _block(in_c, c, f, bn=4):
    return 2 * in_c + 9 * in_c * c + 2 * c + 2 * f * (f // bn) + 2 * c + 2 * c + 9 * c * c + in_c * c


def derived_parameters(c0=64, g=64, scales=5, dim_f=4096, subbands=4, channels=2, sources=4):
    dim_c = subbands * channels * 2
    f, c = dim_f // subbands, c0
    total = dim_c * c
    for _ in range(scales):
        total += 2 * _block(c, c, f) + 2 * c + 4 * c * (c + g)
        f, c = f // 2, c + g
    total += 2 * _block(c, c, f)
    for _ in range(scales):
        total += 2 * c + 4 * c * (c - g)
        f, c = f * 2, c - g
        total += _block(2 * c, c, f) + _block(c, c, f)
    return total + (c + dim_c) * c + c * sources * dim_c


SDX23_PARAMETERS = 30_119_168
MUSDB18_PARAMETERS = 111_994_368  # c = g = 128 (the hop does not change the count)


def noise(shape, seed=0, scale=0.1):
    return np.random.default_rng(seed).normal(0.0, scale, shape).astype("float32")


@pytest.fixture(scope="module")
def tiny():
    return harness.build_tiny("tfc_tdf_v3")


def test_sdx23_and_musdb18_configurations_have_the_derived_parameter_counts():

    assert derived_parameters() == SDX23_PARAMETERS
    assert abs(SDX23_PARAMETERS / 30e6 - 1) < 0.01  # the report's "~30M"
    model = tfc.build(tfc.Config(), data=DataConfig(), stats={})
    assert harness.count_parameters(model.train_model) == SDX23_PARAMETERS
    assert harness.count_parameters(model.separator) == SDX23_PARAMETERS  # same weights behind STFT / ISTFT
    assert derived_parameters(c0=128, g=128) == MUSDB18_PARAMETERS
    config = harness.tiny_config("tfc_tdf_v3", "tfc_tdf_v3_musdb18")
    net = tfc.tfc_tdf_net(registry.family_config(config.model), 4, 2)
    assert harness.count_parameters(net) == MUSDB18_PARAMETERS


def test_config_round_trip_and_validation():
    family = harness.family_module("tfc_tdf_v3")
    assert family is tfc
    harness.check_config_round_trip(tfc)
    params = {"num_channels": 8, "loss": "quantile_element", "quantile": 0.9}
    given = ModelConfig(name="tfc_tdf_v3", families={"tfc_tdf_v3": params})
    assert registry.family_config(given) == tfc.Config(**params)
    with pytest.raises(ConfigError, match="model.tfc_tdf_v3.num_chanels"):
        registry.family_config(ModelConfig(name="tfc_tdf_v3", families={"tfc_tdf_v3": {"num_chanels": 8}}))
    with pytest.raises(ConfigError, match="loss"):
        tfc.Config(loss="l1")
    with pytest.raises(ConfigError, match="dim_f"):
        tfc.Config(dim_f=4100)
    with pytest.raises(ConfigError, match="dim_t"):
        tfc.Config(dim_t=100)


def test_presets_give_the_reference_chunks():
    sdx = harness.tiny_config("tfc_tdf_v3", "tfc_tdf_v3_sdx23")
    family = registry.family_config(sdx.model)
    assert family.loss == "quantile_coarse" and tfc.make_loss(family).q == 0.4
    assert (sdx.train.lr, sdx.train.batch_size) == (1e-4, 6)
    rate = sdx.data.sample_rate
    assert tfc.valid_samples(family, round(sdx.train.seq_seconds * rate)) == 261_120 == 1024 * (256 - 1)
    assert tfc.valid_samples(family, round(sdx.evaluate.chunk_seconds * rate)) == 1024 * (1024 - 1)
    assert sdx.evaluate.overlap == 1 - 1 / family.num_overlap == 0.875
    musdb = harness.tiny_config("tfc_tdf_v3", "tfc_tdf_v3_musdb18")
    family = registry.family_config(musdb.model)
    seq = tfc.valid_samples(family, round(musdb.train.seq_seconds * rate))
    assert seq == 2048 * 255 <= musdb.data.segment_seconds * rate
    unit = harness.tiny_config("tfc_tdf_v3")
    family = registry.family_config(unit.model)
    assert tfc.valid_samples(family, round(unit.train.seq_seconds * unit.data.sample_rate)) == 64 * 123


def test_shapes_and_shared_weights(tiny):
    assert harness.count_parameters(tiny.train_model) == 36_848
    shapes = harness.check_train_shapes(tiny, nb_timesteps=3000)
    assert set(shapes.values()) == {(2, 2752, 2)}  # waveforms: the loss follows the ISTFT (loss_domain=waveform)
    harness.check_separator_shapes(tiny, nb_timesteps=2753)  # any length: frames are padded inside
    for length in (129, 3001):  # any length: frames zero-padded to a multiple of 4, then cropped
        assert {tuple(v.shape) for v in tiny.separator(noise((1, length, 2))).values()} == {(1, length, 2)}
    harness.check_shared_weights(tiny)
    # the TFLite chunk model is static: only lengths of whole frames (test_model_contract checks its parity)
    chunk = tiny.input_samples(1000)
    assert chunk == 960
    with pytest.raises(ValueError, match="not a valid TFC-TDF-UNet input; use input_samples"):
        tiny.inference.mobile(chunk + 1)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def test_quantile_matches_torch_linear_interpolation():
    values = np.array([3.0, 1.0, 7.0, 2.0, 10.0], np.float32)
    for q in (0.0, 0.4, 0.5, 0.93, 1.0):
        assert float(tfc.quantile(values, q)) == pytest.approx(float(np.quantile(values, q)), rel=1e-6)


def test_quantile_masked_loss_against_hand_computed_values():
    import tensorflow as tf

    # coarse: per-item mean squared errors 1, 4, 9, 16, 25 (constant errors 1..5 per item)
    y_true = np.zeros((5, 3, 2), np.float32)
    y_pred = np.arange(1, 6, dtype=np.float32)[:, None, None] * np.ones((5, 3, 2), np.float32)
    # q = 0.4: position 0.4·4 = 1.6 -> τ = 4 + 0.6·(9 - 4) = 7; items 1 and 4 kept: (1 + 4 + 0 + 0 + 0) / 5 = 1
    assert float(tfc.quantile_masked_loss(y_true, y_pred, 0.4, coarse=True)) == pytest.approx(1.0)
    # element: errors 0..9 -> ℓ = 0, 1, 4, ..., 81; q = 0.93: position 8.37 -> τ = 64 + 0.37·17 = 70.29;
    # kept 0..64 (sum 204) over 10 entries = 20.4
    y_pred = np.arange(10, dtype=np.float32).reshape(2, 5)
    assert float(tfc.quantile_masked_loss(np.zeros_like(y_pred), y_pred, 0.93, coarse=False)) == pytest.approx(20.4)
    # the masked items get no gradient, the kept ones d/dŷ mean(ℓ) = 2 (ŷ − y) / N
    prediction = tf.Variable(np.arange(1, 6, dtype=np.float32)[:, None])
    with tf.GradientTape() as tape:
        loss = tfc.quantile_masked_loss(tf.zeros((5, 1)), prediction, 0.4, coarse=True)
    np.testing.assert_allclose(tape.gradient(loss, prediction).numpy()[:, 0], [0.4, 0.8, 0, 0, 0], atol=1e-6)
    keras_loss = tfc.make_loss(tfc.Config(loss="quantile_element"))
    assert keras_loss.q == 0.93 and not keras_loss.coarse
    assert float(keras_loss(np.zeros_like(y_pred), y_pred)) == pytest.approx(20.4)


def test_train_targets_are_stems_or_their_spectrograms_and_one_fit_lowers_the_loss(tiny):
    from models.transforms import stft

    stems = {t: noise((1, 2000, 2), i) for i, t in enumerate(tiny.targets)}
    # the default: the loss on waveforms after the ISTFT (the reference train.py); training graph = separator
    assert tiny.train_model is tiny.separator
    np.testing.assert_array_equal(tiny.train_targets(stems)["drums"], stems["drums"])
    spectral = harness.build_tiny("tfc_tdf_v3", overrides={"model": {"tfc_tdf_v3": {"loss_domain": "spectrogram"}}})
    truth = spectral.train_targets(stems)
    np.testing.assert_allclose(truth["drums"], stft(stems["drums"], 256, 64)[:, :, :128], atol=1e-6)
    assert spectral.train_model is not spectral.separator  # spectrogram-domain outputs; the separator is waveforms
    first, last = harness.check_fit_lowers_loss(tiny, steps=3, nb_timesteps=2000)
    assert last < first


def test_quantile_loss_trains(tiny):
    model = harness.build_tiny("tfc_tdf_v3", overrides={"model": {"tfc_tdf_v3": {"loss": "quantile_element"}}})
    harness.check_fit_lowers_loss(model, steps=3, nb_timesteps=2000, nb_samples=4)


# --------------------------------------------------------------------------------------------
# Chunked separation
# --------------------------------------------------------------------------------------------
def test_overlap_add_with_the_family_chunk_is_exact_for_an_identity_model(tiny):
    from components.inference.separation import separate_array

    chunk = tiny.inference.chunk_samples
    assert chunk == 64 * 31 and tiny.input_samples(chunk) == chunk and tiny.inference.overlap == 0.875
    mixture = noise((10_000, 2), 3)
    calls = []

    def identity(batch):
        calls.append(batch.shape)
        return {t: batch for t in tiny.targets}

    out = separate_array(identity, mixture, sample_rate=8000, chunk_seconds=chunk / 8000,
                         overlap=tiny.inference.overlap, batch_size=2, input_samples=tiny.input_samples)
    assert {shape[1] for shape in calls} == {chunk}
    for target in tiny.targets:
        assert np.max(np.abs(out[target] - mixture)) < 1e-6


def test_overlap_add_through_the_spectral_path_with_an_identity_network():
    """The family's STFT / fold / unfold / ISTFT with the U-Net replaced by a copy of its input per source."""
    import keras

    from components.inference.separation import separate_array

    config = registry.family_config(harness.tiny_config("tfc_tdf_v3").model)
    targets = ("vocals", "accompaniment")
    folded = keras.Input((None, config.dim_f // config.num_subbands, 2 * 2 * config.num_subbands))
    identity = keras.Model(folded, keras.layers.Concatenate()([folded, folded]))
    _, separator, _ = tfc.spectral_graphs(config, targets, 2, identity)
    # sinusoids on bin centres below Nyquist: the dropped Nyquist bin holds nothing but the leakage of the
    # reflect-padded chunk edges (measured: max 2e-3 for unit amplitude, -54 dB), so this is near, not exactly, exact
    t = np.arange(12_000)
    mixture = np.stack([np.sin(2 * np.pi * 10 * t / 256), 0.5 * np.cos(2 * np.pi * 37 * t / 256)], -1)
    chunk = config.hop_length * (config.inference_dim_t - 1)
    out = separate_array(lambda b: separator(b), mixture.astype("float32"), sample_rate=8000,
                         chunk_seconds=chunk / 8000, overlap=1 - 1 / config.num_overlap, batch_size=4,
                         input_samples=lambda n: tfc.valid_samples(config, n))
    for target in targets:
        assert np.max(np.abs(out[target] - mixture)) < 3e-3
        assert 10 * np.log10(np.sum(mixture ** 2) / np.sum((out[target] - mixture) ** 2)) > 60
