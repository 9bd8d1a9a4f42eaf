"""Spectrogram U-Nets (models/unet.py, m_unet.py, c_unet.py, unet_core.py, loss_weighting.py): published parameter
counts, Spleeter parity through its checkpoint import, framing, masks, training, loss weighting (DWA, EBW),
SavedModel and TFLite export."""
import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from configs.config import DataConfig, nested, to_plain
from configs.errors import CheckpointError, ConfigError
from models import c_unet, loss_weighting, m_unet, registry, unet, unet_core
from models.transforms import complex_norm
from tests import model_harness as harness

FAMILIES = ("unet", "m_unet", "c_unet")
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "spleeter"


def tiny(name, model=None, targets=("vocals", "drums"), stats=None):
    overrides = {"data": {"targets": list(targets)}, "model": {name: dict(model or {})}}
    if name == "m_unet" and "weighting" not in (model or {}):
        overrides["model"][name]["weighting"] = "equal"
    return harness.build_tiny(name, overrides=overrides, stats=stats)


# ------------------------------------------------------------------------------------- parameter counts
#
# Spleeter's `apply_unet` (5x5 kernels: 25 * in * out weights + out biases; BN: gamma and beta), stereo:
#   encoder convs 2 -> 16 -> ... -> 512: 816 + 12,832 + 51,264 + 204,928 + 819,456 + 3,277,312 = 4,366,608
#   encoder BN 1-5 (the bottleneck's BN feeds nothing, so a Keras model has no such weights): 2 * 496 = 992
#   decoder deconvs 512 -> 256: 3,277,056; 512 -> 128: 1,638,528; 256 -> 64: 409,664; 128 -> 32: 102,432;
#       64 -> 16: 25,616; 32 -> 1: 801                                                   -> 5,454,097
#   decoder BN 7-12: 2 * (256 + 128 + 64 + 32 + 16 + 1) = 994;  4x4 conv 1 -> 2: 34
#   total 4,366,608 + 992 + 5,454,097 + 994 + 34 = 9,822,725 per target network (+ 1,024 unused BN in the ckpt)
# Jansson variant (BN after every conv incl. the bottleneck, last deconv straight to C_out masks):
#   9,822,112 + 400 C_in + 801 C_out: stereo 9,824,514; mono 9,823,313
# C-U-Net, stereo, 4 targets, complex FiLM, control (16, 256, 1024): U-Net 9,824,514 + last BN 4 = 9,824,518,
#   control 80 + 4,352 + 512 + 263,168 + 2,048 + 2 * 1,033,200 = 2,336,560 -> 12,161,078
#   simple FiLM, control (16, 64, 256): 80 + 1,088 + 128 + 16,640 + 512 + 2 * 1,542 = 21,532 -> 9,846,050


def spleeter_parameters(nb_channels=2, first_filters=16):
    f = [first_filters * 2 ** i for i in range(6)]
    encoder = 25 * nb_channels * f[0] + f[0] + sum(25 * f[i - 1] * f[i] + f[i] for i in range(1, 6)) + 2 * sum(f[:5])
    decoder_in = [f[5]] + [2 * f[i] for i in (4, 3, 2, 1, 0)]
    decoder_out = [f[4], f[3], f[2], f[1], f[0], 1]
    decoder = sum(25 * i * o + o + 2 * o for i, o in zip(decoder_in, decoder_out))
    return encoder + decoder + 16 * nb_channels + nb_channels


def jansson_parameters(nb_in, nb_out, first_filters=16):
    f = [first_filters * 2 ** i for i in range(6)]
    encoder = 25 * nb_in * f[0] + f[0] + sum(25 * f[i - 1] * f[i] + f[i] for i in range(1, 6))
    decoder_in = [f[5]] + [2 * f[i] for i in (4, 3, 2, 1)]
    decoder_out = [f[4], f[3], f[2], f[1], f[0]]
    decoder = sum(25 * i * o + o for i, o in zip(decoder_in, decoder_out)) + 25 * 2 * f[0] * nb_out + nb_out
    return encoder + decoder + 2 * sum(f) + 2 * sum(decoder_out)


def flerken_parameters(dims, nb_in, nb_out):
    """flerken's UNet(dims, K, useBN=True): 3x3 convs with bias, BN gamma/beta, 2x2 transposed convs, 1x1 output."""
    total = 0
    for level, d in enumerate(dims[:-1]):  # ConvolutionalBlock
        c_in = nb_in if level == 0 else dims[level - 1]
        total += 9 * c_in * d + d + 9 * d * d + d + 4 * d
    d = dims[-1]  # TransitionBlock
    total += 9 * dims[-2] * d + d + 9 * d * d + d + 4 * d + 4 * d * dims[-2] + dims[-2]
    for level in range(len(dims) - 2, -1, -1):  # AtrousBlock (level 0: no transposed conv)
        d = dims[level]
        total += 9 * 2 * d * d + d + 9 * d * d + d + 4 * d
        if level:
            total += 4 * d * dims[level - 1] + dims[level - 1]
    return total + dims[0] * nb_out + nb_out


def test_spleeter_and_jansson_parameter_counts():
    assert spleeter_parameters() == 9_822_725
    assert jansson_parameters(2, 2) == 9_824_514 and jansson_parameters(1, 1) == 9_823_313
    four = unet.build(unet.Config(conv_activation="elu", deconv_activation="elu"), data=DataConfig(), stats={})
    assert [harness.count_parameters(net) for net in four.inference.networks.values()] == [9_822_725] * 4
    assert harness.count_parameters(four.train_model) == 4 * 9_822_725
    jansson = unet.build(unet.Config(network="jansson"), data=DataConfig(targets=("vocals", "accompaniment"),
                                                                         nb_channels=1), stats={})
    assert harness.count_parameters(jansson.train_model) == 2 * 9_823_313


def test_m_unet_has_the_authors_124_4_million_parameters():
    dims = [32, 64, 128, 256, 512, 1024, 2048]
    assert flerken_parameters(dims, 1, 4) == 124_448_772  # "124.4M" for K = 4, mono
    model = m_unet.build(m_unet.Config(weighting="equal"), data=DataConfig(nb_channels=1), stats={})
    assert harness.count_parameters(model.train_model) == 124_448_772
    layers = {layer.name: layer for layer in model.inference.network.layers}
    assert layers["m_unet_down1_bn1"].momentum == pytest.approx(0.9) and layers["m_unet_down1_bn1"].epsilon == 1e-5
    assert layers["m_unet_down1_act1"].negative_slope == pytest.approx(0.1)
    assert layers["m_unet_down1_drop1"].rate == pytest.approx(0.1)


def test_c_unet_parameter_counts_and_authors_layer_settings():
    stereo = DataConfig()
    conditioned = c_unet.build(c_unet.Config(), data=stereo, stats={})
    assert harness.count_parameters(conditioned.train_model) == 12_161_078
    simple = c_unet.build(c_unet.Config(film="simple", control_units=(16, 64, 256)), data=stereo, stats={})
    assert harness.count_parameters(simple.train_model) == 9_846_050
    layers = {layer.name: layer for layer in conditioned.inference.network.layers}
    assert all(layer.momentum == pytest.approx(0.9) for layer in layers.values()
               if layer.__class__.__name__ == "BatchNormalization")
    dropped = sorted(name for name in layers if name.endswith("_dropout") and "deconv" in name)
    assert dropped == ["c_unet_deconv2_dropout", "c_unet_deconv3_dropout", "c_unet_deconv4_dropout"]
    assert "c_unet_deconv6_bn" in layers and layers["c_unet_deconv6_act"].activation.__name__ == "sigmoid"


def test_c_unet_control_layers_draw_their_own_initial_weights():
    # one RandomNormal instance shared by the control's Dense layers gave the same-shaped gammas and betas
    # equal initial kernels (a Keras 3 initializer repeats its values on every call)
    import keras

    keras.utils.set_random_seed(0)
    model = c_unet.build(c_unet.Config(), data=DataConfig(), stats={})
    kernels = {weight.path: weight.numpy() for weight in model.train_model.weights
               if ("_gammas" in weight.path or "_betas" in weight.path) and weight.path.endswith("kernel")}
    assert len(kernels) == 2, list(kernels)
    gammas, betas = kernels.values()
    assert gammas.shape == betas.shape and not np.array_equal(gammas, betas)



@pytest.mark.parametrize("preset,networks,total", [
    ("unet_44k", {t: 9_822_725 for t in ("vocals", "drums", "bass", "other")}, 39_290_900),
    ("m_unet_paper", {"m_unet": 124_448_772}, 124_448_772),
])
def test_describe_model_prints_the_paper_presets_published_sizes(preset, networks, total):
    from tests.cli import describe  # `--describe-model`'s text in this process (its CLI: test_recipes)

    lines = describe(preset).strip().splitlines()
    family = preset.split("_paper")[0].split("_44k")[0]
    assert lines[0].startswith(f"family: {family} ")
    end = next(i for i, line in enumerate(lines) if line.startswith("total: "))  # the recipe differences follow
    counts = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in lines[1:end]}
    assert counts == networks
    assert lines[end] == f"total: {total:,} trainable parameters"


def test_unittest_preset_sizes():
    # unet first_filters 4, stereo, two targets; m_unet 3 levels (4, 8, 16); c_unet control (8, 16, 32)
    assert harness.count_parameters(tiny("unet").train_model) == 2 * spleeter_parameters(2, 4)
    assert harness.count_parameters(tiny("m_unet").train_model) == flerken_parameters([4, 8, 16], 2, 4)
    control = (2 * 8 + 8) + (8 * 16 + 16 + 32) + (16 * 32 + 32 + 64) + 2 * (32 * 252 + 252)
    assert harness.count_parameters(tiny("c_unet").train_model) == jansson_parameters(2, 2, 4) + 4 + control


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name,changes", [
    ("unet", {"max_bin": 0, "mask_extension": "average", "wiener_iterations": 2, "network": "jansson",
              "framing": "centered", "separation": "direct"}),
    ("m_unet", {"weighting": "ebw", "ebw_power": 2.0, "patch_frames": 128, "loss_domain": "masks"}),
    ("c_unet", {"film": "simple", "control_units": (16, 64, 256), "input_norm": "none"}),
])
def test_config_round_trip_and_registry(name, changes):
    family = registry.module(name)
    assert family is {"unet": unet, "m_unet": m_unet, "c_unet": c_unet}[name]
    harness.check_config_round_trip(family, family.Config(**changes))
    assert to_plain(registry.default_params(name)) == to_plain(family.Config())
    with pytest.raises(ConfigError, match=f"model.{name}.patch_frames"):
        family.Config(patch_frames=100)
    with pytest.raises(ConfigError, match=f"model.{name}.n_fft"):
        family.Config(n_fft=1023)


def test_config_rejects_bad_choices():
    for family, key, value in ((m_unet, "weighting", "uncertainty"), (c_unet, "film", "local"),
                               (unet, "network", "resnet"), (unet, "conv_activation", "gelu"),
                               (unet, "framing", "librosa"), (m_unet, "loss_domain", "waveform")):
        with pytest.raises(ConfigError, match=f"model.{family.__name__.split('.')[-1]}.{key}"):
            family.Config(**{key: value})
    with pytest.raises(ConfigError, match="model.m_unet.log_bins"):
        m_unet.Config(log_bins=100)
    with pytest.raises(ConfigError, match="model.unet.max_bin"):
        unet.Config(max_bin=10_000)
    # single-key limits are declared on the fields: one line naming the key, at config time
    for family, key, value, message in (
            (unet, "dropout", 1.0, "must be in [0, 1); got 1.0"),
            (unet, "wiener_iterations", -1, "must be >= 0; got -1"),
            (m_unet, "nb_levels", 1, "must be >= 2; got 1"),
            (m_unet, "ebw_power", 0.0, "must be > 0; got 0.0"),
            (c_unet, "control_units", (16, 0), "must be all entries >= 1; got [16, 0]"),
            (c_unet, "mask_extension", "edge", "must be one of zeros, average; got 'edge'")):
        with pytest.raises(ConfigError) as caught:
            family.Config(**{key: value})
        assert str(caught.value) == f"config key 'model.{family.__name__.split('.')[-1]}.{key}' {message}"


def test_presets_state_the_paper_settings_and_fit_their_segments():
    from configs.presets import PRESETS

    for preset, name in (("m_unet_paper", "m_unet"), ("m_unet_paper", "c_unet"), ("unet_44k", "unet"),
                         ("unet_44k", "m_unet"), ("unittest", "m_unet"), ("c_unet_paper", "c_unet")):
        config = harness.tiny_config(name, preset=PRESETS[preset])
        family_config = registry.family_config(config.model)
        built = registry.module(name)
        seq_wanted = int(round(config.train.seq_seconds * config.data.sample_rate))
        framing = getattr(family_config, "framing", "centered")
        seq = unet_core.whole_patches(seq_wanted, n_fft=family_config.n_fft, hop_length=family_config.hop_length,
                                      patch_frames=family_config.patch_frames, framing=framing)
        assert seq <= int(round(config.data.segment_seconds * config.data.sample_rate)), (preset, name)
        if preset == "m_unet_paper" and name == "m_unet":
            assert config.data.sample_rate == 10880 and config.data.nb_channels == 1 and seq == 6 * 10880
            assert family_config == built.Config(weighting=family_config.weighting)  # the authors' defaults
        if preset == "unet_44k":
            if name == "unet":
                assert (family_config.network, family_config.conv_activation, family_config.deconv_activation,
                        family_config.framing, family_config.separation) == ("spleeter", "elu", "elu", "spleeter",
                                                                               "ratio")
                assert seq == 512 * 1024 - 4096  # ceil((T + n_fft) / hop) = 512 frames
        if preset == "c_unet_paper":
            assert (config.data.sample_rate, config.data.nb_channels) == (8192, 1)
            assert (family_config.n_fft, family_config.hop_length, family_config.max_bin, family_config.patch_frames,
                    family_config.input_norm) == (1024, 256, 512, 128, "minmax")


# --------------------------------------------------------------------------------------- framing, masks


def test_spleeter_framing_leads_with_a_zero_frame_and_inverts():
    rng = np.random.default_rng(0)
    mixture = rng.normal(0, 0.2, (1, 3001, 2)).astype(np.float32)
    spectrum = unet_core.analyse(mixture, 256, 64, "spleeter")
    assert spectrum.shape[1] == -(-(3001 + 256) // 64)  # ceil((T + n_fft) / hop) = 51
    assert np.all(np.asarray(spectrum)[:, 0] == 0)  # the first frame holds only the n_fft leading zeros
    for framing in unet_core.FRAMINGS:
        spectrum = unet_core.analyse(mixture, 256, 64, framing)
        ones = np.ones(spectrum.shape[:4] + (1,), np.float32)  # full masks, all bins
        back = unet_core.apply_masks(ones, spectrum, 3001, n_fft=256, hop_length=64, framing=framing)
        assert back.shape == (1, 3001, 2, 1) and np.max(np.abs(np.asarray(back)[..., 0] - mixture)) < 1e-5


def test_ratio_masks_match_spleeter_formula():
    estimates = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], np.float32)  # two bins, three targets
    masks = np.asarray(unet_core.ratio_masks(estimates, 2.0, 1e-10))
    np.testing.assert_allclose(masks[0], [9 / 25, 16 / 25, 0.0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(masks[1], [1 / 3] * 3, rtol=1e-6)  # eps / J over eps: silence split evenly
    np.testing.assert_allclose(masks.sum(-1), 1.0, rtol=1e-6)


def test_full_masks_below_max_bin_drop_the_high_band():
    rng = np.random.default_rng(0)
    mixture = rng.normal(0, 0.2, (1, 2001, 2)).astype(np.float32)
    mix_stft = unet_core.analyse(mixture, 256, 64)
    masks = np.ones(mix_stft.shape[:2] + (64, 2, 1), np.float32)
    full = unet_core.apply_masks(masks, mix_stft, 2001, n_fft=256, hop_length=64, mask_extension="average")
    assert np.max(np.abs(np.asarray(full)[..., 0] - mixture)) < 1e-5
    low = unet_core.apply_masks(masks, mix_stft, 2001, n_fft=256, hop_length=64, mask_extension="zeros")

    def high_band_share(signal):  # energy share above 0.55 x Nyquist (bins 64+ of 129 start at 0.5)
        power = np.abs(np.fft.rfft(signal[0, :, 0])) ** 2
        return power[int(0.55 * len(power)):].sum() / power.sum()

    assert high_band_share(mixture) > 0.4  # white noise
    assert high_band_share(np.asarray(low)[..., 0]) < 0.005  # only the window's leakage is left


def test_m_unet_warp_is_torch_grid_sample():
    # F.grid_sample(align_corners=False): coordinate -1 is pixel -0.5 (half zero padding), +1 is pixel n - 0.5
    matrix = m_unet.grid_sample_matrix(np.array([-1.0, 0.0, 1.0]), 4, align_corners=False)
    np.testing.assert_allclose(matrix, [[0.5, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 0.5]])
    identity = m_unet.grid_sample_matrix(np.linspace(-1, 1, 5), 5, align_corners=True)
    np.testing.assert_allclose(identity, np.eye(5), atol=1e-12)
    # warpgrid(warp=True): y -> (21 ** ((y + 1) / 2) - 11) / 10 spans [-1, 1], dense at low frequencies
    grid = m_unet.warp_grid(256, warp=True)
    assert grid[0] == pytest.approx(-1) and grid[-1] == pytest.approx(1) and np.all(np.diff(grid) > 0)
    assert grid[128] < -0.5  # half the rows cover the lowest quarter of the spectrum
    back = m_unet.warp_grid(512, warp=False)  # the inverse map
    np.testing.assert_allclose((np.power(21.0, (back + 1) / 2) - 11) / 10, np.linspace(-1, 1, 512), atol=1e-12)


def snr(expected, got):
    return 10 * np.log10(np.sum(np.square(expected)) / np.sum(np.square(expected - got)))


def test_m_unet_matches_the_authors_network_with_the_same_weights():
    """flerken's UNet + the authors' Wrapper warping (tests/fixtures/m_unet/make_reference.py) vs ours."""
    folder = pathlib.Path(__file__).parent / "fixtures" / "m_unet"
    script = harness.fixture_script(folder / "make_reference.py")
    meta = json.loads((folder / "state_dict.json").read_text())
    reference = np.load(folder / "reference.npz")
    config = m_unet.Config(n_fft=2 * (meta["nb_bins"] - 1), hop_length=32, patch_frames=meta["frames"],
                           log_bins=meta["log_bins"], first_filters=meta["dims"][0], nb_levels=len(meta["dims"]))
    network = m_unet.flerken_unet(config.patch_frames, config.log_bins, 1, meta["K"], config)
    state = script.seeded_state(meta["entries"], meta["seed"])
    assert m_unet.assign_flerken(network, state) == len(state) == 92  # 106 entries less 14 BN num_batches_tracked
    assert harness.count_parameters(network) == flerken_parameters(meta["dims"], 1, meta["K"])

    def ours(x):  # (1, C, H = freq, W = time) -> (1, W, H, C)
        return np.transpose(x, (0, 3, 2, 1))

    warp, unwarp = m_unet.warp_layers(config, meta["nb_bins"], "test")
    mixture, sources = script.seeded_inputs(meta["seed"])
    warped = np.asarray(warp(ours(mixture)))
    assert snr(ours(reference["warped"][:, -1:]), warped) > 100  # float32 grids (torch) vs float64 matrices (ours)
    masks = np.maximum(np.asarray(network(np.log(warped), training=False)), 0)
    assert snr(ours(reference["pred_masks"]), masks) > 80
    linear = np.asarray(unwarp(ours(reference["pred_masks"])))
    assert snr(ours(reference["linear_masks"]), linear) > 100
    truth = m_unet.pair_distance("masks", 10.0)  # the loss's ideal masks: clip(warp(S) / warp(X), 0, 10)
    warped_sources = np.asarray(warp(ours(sources)))
    pairs_true = np.stack([warped_sources, np.zeros_like(warped_sources)], -1)
    pairs_pred = np.stack([np.asarray(ours(reference["gt_masks"])), np.repeat(warped, meta["K"], -1)], -1)
    assert float(np.max(np.asarray(truth(pairs_true, pairs_pred)))) < 1e-5  # loss 0 at the authors' gt masks
    with pytest.raises(ValueError, match="decoder.0.Conv1.weight"):
        m_unet.assign_flerken(network, {k: v for k, v in state.items() if k != "decoder.0.Conv1.weight"})


@pytest.mark.parametrize("film", ["complex", "simple"])
def test_c_unet_matches_the_authors_keras_model_with_the_same_weights(film):
    """gabolsgabs/cunet `cunet_model()` masks (tests/fixtures/c_unet/make_reference.py) vs our network."""
    folder = pathlib.Path(__file__).parent / "fixtures" / "c_unet"
    script = harness.fixture_script(folder / "make_reference.py")
    meta = json.loads((folder / "weights.json").read_text())
    case = meta["cases"][film]
    frequencies, frames, nb_channels = meta["shape"]
    config = c_unet.Config(max_bin=frequencies, patch_frames=frames, first_filters=meta["filters"], film=film,
                           control_units=tuple(meta["neurons"]))
    network = c_unet.cunet(frames, frequencies, nb_channels, meta["z_dim"], config)
    values = script.seeded_weights(case["weights"], case["seed"])
    assert c_unet.assign_cunet(network, values, len(meta["neurons"])) == len(case["weights"]) == 90
    patches, conditions = script.seeded_batch(case["seed"])
    masks = np.asarray(network([np.transpose(patches, (0, 2, 1, 3)), conditions[:, 0]], training=False))
    expected = np.transpose(np.load(folder / "reference.npz")[film], (0, 2, 1, 3))
    assert snr(expected, masks) > 100
    assert np.max(np.abs(masks[0] - masks[1])) > 1e-3  # the two conditions give different masks


# --------------------------------------------------------------------------------------- shapes, fit


TRAIN_SHAPE = {  # tiny preset: n_fft 256, hop 64, 64 bins or log bins, stereo
    "unet": lambda frames: (2, frames, 64, 2),
    "m_unet": lambda frames: (2, frames, 64, 2, 2),
    "c_unet": lambda frames: (2, frames, 64, 2),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_shapes_for_odd_lengths_shared_weights_and_fit(name):
    import keras

    model = tiny(name)
    for nb_timesteps in (3001, 4097):  # one patch padded, two patches (the second padded)
        symbolic = model.separator(keras.KerasTensor((2, nb_timesteps, 2)))
        mixture, _ = harness.random_batch(model, 2, nb_timesteps)
        eager = model.separator(mixture, training=False)
        for outputs in (symbolic, eager):
            assert set(outputs) == {"vocals", "drums"}
            assert all(tuple(v.shape) == (2, nb_timesteps, 2) for v in outputs.values())
        assert all(np.all(np.isfinite(np.asarray(v))) for v in eager.values())
        shapes = harness.check_train_shapes(model, nb_timesteps=nb_timesteps)
        samples = model.input_samples(nb_timesteps)
        frames = -(-(samples + 256) // 64) if name == "unet" else 1 + samples // 64
        assert frames % 64 == 0 and shapes["vocals"] == TRAIN_SHAPE[name](frames)
    if name == "unet":  # Spleeter framing: ceil((T + 256) / 64) frames
        assert model.input_samples(3001) == 64 * 64 - 256 and model.input_samples(9000) == 2 * 64 * 64 - 256
    else:
        assert model.input_samples(3001) == 4032 and model.input_samples(9000) == 2 * 64 * 64 - 64
    assert harness.check_shared_weights(model) == len(model.train_model.trainable_weights)
    losses = fit(model, epochs=4)["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.97 * losses[0], losses


def test_c_unet_outputs_are_the_u_net_run_once_per_one_hot_target():
    model = tiny("c_unet")
    rng = np.random.default_rng(7)  # the authors' N(0, 0.02) init leaves the conditions almost without effect
    for weight in model.inference.network.trainable_weights:
        weight.assign(rng.normal(0, 0.3, weight.shape).astype(np.float32))
    mixture, _ = harness.random_batch(model, 2, 4032, seed=3)
    outputs = model.train_model(mixture, training=False)
    magnitude = np.asarray(complex_norm(unet_core.analyse(mixture, 256, 64)))  # (2, 64, 129, 2): one patch
    low, high = magnitude.min(axis=(1, 2, 3), keepdims=True), magnitude.max(axis=(1, 2, 3), keepdims=True)
    normalised = ((magnitude - low) / (high - low))[:, :, :64]  # min-max over the whole input, then 64 bins
    for index, target in enumerate(model.targets):
        condition = np.zeros((2, 2), np.float32)
        condition[:, index] = 1
        masks = np.asarray(model.inference.network([normalised, condition], training=False))
        np.testing.assert_allclose(np.asarray(outputs[target]), masks * magnitude[:, :, :64], rtol=1e-4, atol=1e-6)
    assert np.max(np.abs(np.asarray(outputs["vocals"]) - np.asarray(outputs["drums"]))) > 1e-4


def test_m_unet_masks_are_relu_of_the_network_on_the_log_warped_mixture():
    model = tiny("m_unet")
    mixture, _ = harness.random_batch(model, 1, 4032, seed=6)
    outputs = model.train_model(mixture, training=False)
    config = model.config
    magnitude = np.asarray(complex_norm(unet_core.analyse(mixture, 256, 64)))[0]  # (64 frames, 129 bins, 2)
    time = m_unet.grid_sample_matrix(np.linspace(-1, 1, 64), 64, False)
    warp = m_unet.grid_sample_matrix(m_unet.warp_grid(config.log_bins, True), 129, False)
    warped = np.einsum("ut,gf,tfc->ugc", time, warp, magnitude)
    net = np.asarray(model.inference.network(np.log(warped)[None].astype(np.float32), training=False))[0]
    masks = np.maximum(net, 0).reshape(64, 64, 2, 2)  # channel-major: (C, J)
    for index, target in enumerate(model.targets):
        np.testing.assert_allclose(np.asarray(outputs[target])[0, ..., 0], masks[..., index], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(outputs[target])[0, ..., 1], warped, rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------------------- loss weighting


def test_dwa_weights_match_hand_computed_values():
    # w = (0.5/1, 2/2) = (0.5, 1); lambda = 2 exp(w/2) / (exp(0.25) + exp(0.5))
    np.testing.assert_allclose(loss_weighting.dwa_weights([[1.0, 2.0], [0.5, 2.0]], 2.0),
                               [0.8756469982284039, 1.1243530017715961], rtol=1e-12)
    # three targets, w = (0.5, 1, 0.5): lambda = 3 (e^.25, e^.5, e^.25) / (2 e^.25 + e^.5)
    np.testing.assert_allclose(loss_weighting.dwa_weights([[9.0, 9.0, 9.0], [2.0, 1.0, 4.0], [1.0, 1.0, 2.0]]),
                               [0.913513027260852, 1.172973945478296, 0.913513027260852], rtol=1e-12)
    np.testing.assert_array_equal(loss_weighting.dwa_weights(np.zeros((0, 4))), np.ones(4))  # first two epochs
    np.testing.assert_array_equal(loss_weighting.dwa_weights([[3.0, 1.0, 2.0, 5.0]]), np.ones(4))
    np.testing.assert_allclose(loss_weighting.dwa_weights([[1.0, 1.0], [0.5, 2.0]], 1e6), [1.0, 1.0], rtol=1e-5)
    # the authors' code at the EUSIPCO configuration (9eb7032): the two-target formula on the first two, others 1
    history = [[1.0, 2.0, 4.0, 8.0], [0.5, 2.0, 1.0, 16.0]]
    np.testing.assert_allclose(loss_weighting.dwa_weights(history, 2.0, "first_two"),
                               [0.8756469982284039, 1.1243530017715961, 1.0, 1.0], rtol=1e-12)
    assert not np.allclose(loss_weighting.dwa_weights(history, 2.0), [0.8756, 1.1244, 1.0, 1.0], atol=1e-3)


def test_ebw_weights_match_hand_computed_values():
    np.testing.assert_allclose(loss_weighting.ebw_weights([4.0, 1.0, 2.0, 0.5], 1), [1.0, 4.0, 2.0, 8.0])
    np.testing.assert_allclose(loss_weighting.ebw_weights([4.0, 1.0, 2.0, 0.5], 2), [1.0, 16.0, 4.0, 64.0])
    with pytest.raises(ValueError, match="positive"):
        loss_weighting.ebw_weights([1.0, 0.0])
    targets = ("vocals", "drums")
    assert loss_weighting.target_energies({"energy": {"vocals": 2.0, "drums": 1.0}}, targets).tolist() == [2.0, 1.0]
    stats = {"split": "train", "energy": {"vocals": 3.0, "drums": 6.0, "bass": 1.0}, "rms": {}}  # Manifest.stats_dict()
    assert loss_weighting.target_energies(stats, targets).tolist() == [3.0, 6.0]
    assert loss_weighting.target_energies({"energy": {"vocals": 3.0}}, targets) is None
    assert loss_weighting.target_energies({}, targets) is None


def _fixed_batch(model, seed=1):
    mixture, stems = harness.random_batch(model, 2, 4032, seed=seed)
    return mixture, {t: np.asarray(v) for t, v in model.train_targets(stems).items()}


def fit(model, epochs, callbacks=(), learning_rate=1e-2):
    """`harness.check_fit_lowers_loss` with Adam, eagerly as the harness (no step to trace): creating the Adam
    slots while the train step is traced cost ~8 s per model on a shared 2-core machine."""
    import keras

    keras.utils.set_random_seed(0)
    mixture, truth = _fixed_batch(model)
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(model.train_model.trainable_variables)
    model.train_model.compile(optimizer=optimizer, loss=model.loss, jit_compile=False, run_eagerly=True)
    return model.train_model.fit(mixture, truth, batch_size=2, epochs=epochs, shuffle=False, verbose=0,
                                 callbacks=list(callbacks)).history


class Recorder:
    """Stands in for the train stage's SacredLogger, which comes *before* model.training.callbacks in its list."""

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
    history = fit(model, epochs=3, callbacks=[recorder.callback, *model.training.callbacks])
    logged = np.array([[epoch[f"lambda_{t}"] for t in model.targets] for epoch in recorder.epochs])
    np.testing.assert_array_equal(logged[:2], np.ones((2, 2)))
    losses = np.array([[history[f"{t}_loss"][epoch] for t in model.targets] for epoch in range(2)])
    np.testing.assert_allclose(logged[2], loss_weighting.dwa_weights(losses, 0.01), rtol=1e-5)
    assert np.max(np.abs(logged[2] - 1.0)) > 1e-3 and abs(logged[2].sum() - 2.0) < 1e-5
    assert abs(history["loss"][2] - sum(history[f"{t}_loss"][2] for t in model.targets)) < 1e-4 * history["loss"][2]
    layer = model.training.loss_weighting
    assert int(layer.epochs_recorded.numpy()) == 2 and float(layer.pending.numpy()) == 1.0
    assert {"loss_weights", "epoch_losses", "running_losses"} <= {w.name for w in model.train_model.weights}


def test_ebw_weights_apply_to_the_mask_l1_and_missing_energies_stop_training():
    energies = {"vocals": 0.01, "drums": 0.04}
    model = tiny("m_unet", {"weighting": "ebw", "ebw_power": 2.0}, stats={"energy": energies})
    assert model.training.loss_domain == "masks"  # EnergyBasedLossPowerPMask: L1 on the masks
    np.testing.assert_allclose(model.training.loss_weighting.loss_weights.numpy(), [16.0, 1.0])
    mixture, truth = _fixed_batch(model)
    model.train_model.compile(loss=model.loss, jit_compile=False)
    result = model.train_model.evaluate(mixture, truth, batch_size=2, verbose=0, return_dict=True)
    estimates = model.train_model(mixture, training=False)
    for target, weight in (("vocals", 16.0), ("drums", 1.0)):
        masks, warped_mix = np.asarray(estimates[target])[..., 0], np.asarray(estimates[target])[..., 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            ideal = np.clip(np.where(warped_mix > 0, truth[target][..., 0] / warped_mix, 0.0), 0.0, 10.0)
        l1 = float(np.mean(np.abs(masks - ideal)))
        assert abs(result[f"{target}_loss"] - weight * l1) < 1e-4 * weight * l1
        assert result[f"lambda_{target}"] == weight

    missing = tiny("m_unet", {"weighting": "ebw"}, stats={})  # builds (inference needs no energies) ...
    missing.train_model.compile(optimizer="sgd", loss=missing.loss, jit_compile=False)
    with pytest.raises(ValueError, match="energy"):  # ... but refuses to train with silently equal weights
        missing.train_model.fit(mixture, truth, epochs=1, verbose=0, callbacks=list(missing.training.callbacks))


# ------------------------------------------------------------------------------ Spleeter checkpoint import


def _write_tf1_checkpoint(prefix: pathlib.Path, values: dict):
    """A TF1 name-based checkpoint (what tf.compat.v1.train.Saver writes) with `values` under their names."""
    names = sorted(values)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(values[name]) for name in names])


@pytest.mark.parametrize("case", ["2stems", "4stems", "5stems"])
def test_spleeter_checkpoint_import_matches_spleeter_output(case, tmp_path):
    """Spleeter's own TF1 separator (make_reference.py) vs ours with the imported weights: >= 80 dB SDR."""
    script = harness.fixture_script(FIXTURES / "make_reference.py")
    spec = json.loads((FIXTURES / "variables.json").read_text())
    base, details = spec["base"], spec["cases"][case]
    values = script.seeded_weights(details["variables"], details["seed"])
    # training state a released checkpoint carries: ignored
    values.update({"global_step": np.int64(1000), "beta1_power": np.float32(0.9),
                   "conv2d/kernel/Adam": np.zeros_like(values["conv2d/kernel"]),
                   "conv2d/kernel/Adam_1": np.zeros_like(values["conv2d/kernel"])})
    _write_tf1_checkpoint(tmp_path / "model", values)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model"\n')

    released = unet.read_released(tmp_path)
    assert sorted(released.tensors) == sorted(name for name, _ in details["variables"])
    overrides = nested(released.config_overrides)
    assert overrides["data"]["targets"] == details["params"]["instrument_list"]
    overrides["model"]["unet"].update(patch_frames=base["T"], max_bin=base["F"])  # the fixture's shrunk T, F
    config = harness.tiny_config("unet", preset=overrides)
    model = registry.build(config.model, data=config.data, stats={})
    nb_stems = len(model.targets)
    settings = config.model.params("unet")  # the release is recognised by its number of stems (resources/*.json)
    assert (settings["conv_activation"], settings["deconv_activation"], settings["mask_activation"]) == {
        "2stems": ("leaky_relu", "relu", "sigmoid"), "4stems": ("elu", "elu", "sigmoid"),
        "5stems": ("elu", "elu", "softmax")}[case]
    mapping = unet.assign_released(model, released)
    assert (mapping["tensors_mapped"], len(mapping["tensors_ignored"])) == (70 * nb_stems, 4 * nb_stems)

    waveform = script.seeded_waveform(details["nb_timesteps"], details["seed"])
    separated = model.separator(waveform[None], training=False)
    reference = np.load(FIXTURES / "reference.npz")  # every STORED_EVERY-th sample of Spleeter's stems
    for target in model.targets:
        got = np.asarray(separated[target])[0]
        assert got.shape == (details["nb_timesteps"], 2)
        expected, got = reference[f"{case}/{target}"], got[::script.STORED_EVERY]
        sdr = 10 * np.log10(np.sum(expected ** 2) / np.sum((expected - got) ** 2))
        assert sdr >= 80, (target, sdr)


def test_spleeter_mapping_uses_every_tensor_once_and_reports_mismatches(tmp_path):
    rows = [row for index in range(4) for row in unet.spleeter_mapping(index, f"unet_{index}")]
    sources = [source for source, _, _ in rows] + [name for index in range(4) for name in unet.unused_tensors(index)]
    assert len(sources) == len(set(sources)) == 4 * 74  # 7 convs + 6 deconvs (2 each), 12 BNs (4 each) per stem
    assert len({(layer, weight) for _, layer, weight in rows}) == len(rows)
    assert unet.unused_tensors(1) == [f"batch_normalization_17/{w}" for w in
                                      ("gamma", "beta", "moving_mean", "moving_variance")]

    model = tiny("unet", targets=("vocals", "accompaniment"))
    names = {}
    for index, target in enumerate(model.targets):
        net = model.inference.networks[target]
        for source, layer, weight in unet.spleeter_mapping(index, net.name):
            names[source] = next(w for w in net.get_layer(layer).weights if w.name == weight)
    tensors = {source: np.full(tuple(weight.shape), 0.5, np.float32) for source, weight in names.items()}
    def release(found):
        return unet.ReleasedCheckpoint(family="unet", config_overrides={}, tensors=found, files=[])

    mapping = unet.assign_released(model, release(tensors))
    assert (mapping["tensors_mapped"], mapping["weights_assigned"]) == (140, 140)
    with pytest.raises(CheckpointError, match="'conv2d_99/kernel' .* is not used"):
        unet.assign_released(model, release({**tensors, "conv2d_99/kernel": np.zeros(1)}))
    short = dict(tensors)
    del short["conv2d_7/bias"]
    with pytest.raises(CheckpointError, match="no tensor 'conv2d_7/bias'"):
        unet.assign_released(model, release(short))
    wrong = {**tensors, "conv2d/kernel": np.zeros((5, 5, 2, 8), np.float32)}
    with pytest.raises(CheckpointError, match="'conv2d/kernel' \\(5, 5, 2, 8\\) does not fit"):
        unet.assign_released(model, release(wrong))
    with pytest.raises(CheckpointError, match="no TF checkpoint"):
        unet.read_released(tmp_path)
    with pytest.raises(ConfigError, match="model.unet.separation=ratio .* set model.unet.separation=direct"):
        tiny("unet", targets=("vocals",))
    assert tiny("unet", {"separation": "direct"}, targets=("vocals",)).targets == ("vocals",)
