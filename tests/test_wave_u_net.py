"""Wave-U-Net: published parameter count and lengths, config round trip, separator shapes, difference
output, learned upsampling, presets and one training step. All models but the full-size ones are tiny.

The shared harness (tests/model_harness.py) runs its checks on the unittest-preset model, with and
without context: the separator takes any length and returns the same length.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from configs.config import DataConfig, ModelConfig
from configs.errors import ConfigError
from models import registry
from models import wave_u_net as wun
from tests import model_harness as harness

MUSDB = DataConfig()  # stereo, vocals/drums/bass/other
TINY = dict(num_layers=3, num_initial_filters=4, filter_size=5, merge_filter_size=3)  # as the unittest preset


def tiny(**overrides):
    return wun.Config(**{**TINY, **overrides})


def build(config, data=MUSDB):
    return wun.build(config, data=data, stats={})


def noise(shape, seed=0):
    return np.random.default_rng(seed).normal(0.0, 0.1, shape).astype("float32")


# --------------------------------------------------------------------------------------------
# The published configuration
# --------------------------------------------------------------------------------------------
# The paper's multi-instrument model is M6 (README of f90/Wave-U-Net: "M4 applied to multi-instrument
# sep."; Config.py `full_multi_instrument`): M4 = difference output + input context + stereo, linear
# upsampling, L = 12, F_c = 24, f = 15, m = 5, sources bass/drums/other/vocals (K = 4), C = 2 channels.
# The paper gives the architecture (Table 1), not a weight count; derived from it (weights + biases):
#
#   down block i = 1..12, Conv1D(F_c·i, 15) on F_c·(i−1) channels (C for i = 1):
#     i = 1:        15·2·24 + 24                                        =       744
#     i = 2..12:    Σ 15·24(i−1)·24i + 24i = 8640·Σ i(i−1) + 24·Σ i
#                   Σ_{i=2}^{12} i(i−1) = 650 − 78 = 572; Σ_{i=2}^{12} i = 77
#                   8640·572 + 24·77 = 4,942,080 + 1,848                = 4,943,928
#   bottleneck, Conv1D(312, 15) on 288:  15·288·312 + 312                = 1,348,152
#   up block i = 12..1, Conv1D(F_c·i, 5) on the upsampled F_c·(i+1) + skip F_c·i = 24(2i+1) channels:
#                   Σ 5·24(2i+1)·24i + 24i = 2880·Σ i(2i+1) + 24·Σ i
#                   Σ_{i=1}^{12} i(2i+1) = 2·650 + 78 = 1378
#                   2880·1378 + 24·78 = 3,968,640 + 1,872               = 3,970,512
#   output, difference: K−1 = 3 Conv1D(C, 1) on C + F_c = 26 channels: 3·(26·2 + 2) =       162
#   total                                                               = 10,263,498
M6_PARAMETERS = 744 + 4_943_928 + 1_348_152 + 3_970_512 + 162
# M5-HighSR (the `wave_u_net_44k` preset): M4 + learned upsampling, vocals/accompaniment (K = 2).
# Same convolutions; output K−1 = 1 head: 26·2 + 2 = 54; one interpolation weight per upsampled
# feature: the bottleneck's 312, then up blocks 12..2: 24·(2 + ... + 12) = 24·77 = 1,848 -> 2,160.
M5_PARAMETERS = 744 + 4_943_928 + 1_348_152 + 3_970_512 + 54 + 2_160


@pytest.fixture(scope="module")
def paper_model():
    return build(wun.Config())


def test_paper_multi_instrument_model_has_the_derived_parameter_count(paper_model):
    assert M6_PARAMETERS == 10_263_498
    assert harness.count_parameters(paper_model.train_model) == M6_PARAMETERS
    # the separator adds no weights: it is the same model behind padding and trimming
    assert harness.count_parameters(paper_model.separator) == M6_PARAMETERS


def test_learned_upsampling_44k_model_has_the_derived_parameter_count():
    model = build(wun.Config(upsampling="learned"), DataConfig(sample_rate=44100, targets=("accompaniment", "vocals")))
    assert M5_PARAMETERS == 10_265_550
    assert harness.count_parameters(model.train_model) == M5_PARAMETERS


def test_context_maps_147443_input_samples_to_16389_output_samples(paper_model):
    import keras

    config = wun.Config()
    assert wun.input_samples(config, 16384) == 147_443  # the paper's num_frames -> its input length
    assert wun.input_samples(config, 16389) == 147_443
    assert wun.input_samples(config, 16390) == 147_443 + 4096  # next bottleneck length
    assert wun.output_samples(config, 147_443) == 16_389
    assert wun.context_samples(config) == (147_443 - 16_389) // 2 == 65_527
    assert wun.is_valid_input(config, 147_443) and not wun.is_valid_input(config, 147_444)
    with pytest.raises(ValueError, match="not a valid"):
        wun.output_samples(config, 147_444)
    # the graph itself (static shape inference through every layer, no computation)
    spec = paper_model.train_model.compute_output_spec(keras.KerasTensor((1, 147_443, 2)))
    assert {t: tuple(s.shape) for t, s in spec.items()} == {t: (1, 16_389, 2) for t in MUSDB.targets}
    assert paper_model.input_samples(16384) == 147_443


@pytest.mark.parametrize("context", [True, False])
def test_tiny_model_output_lengths_follow_the_length_rule(context):
    config = tiny(context=context)
    model = build(config)
    for wanted in (1, 100, 1000):
        n = model.input_samples(wanted)
        out = model.train_model(noise((1, n, 2)))
        lengths = {tuple(v.shape) for v in out.values()}
        assert lengths == {(1, wun.output_samples(config, n), 2)}
        assert wun.output_samples(config, n) >= wanted
        targets = model.train_targets({t: noise((1, n, 2), i) for i, t in enumerate(MUSDB.targets)})
        assert {tuple(v.shape) for v in targets.values()} == lengths
    if context:  # I(x) = 2^L (x + 2f − 3) − (f − 2), x = m + ceil((1000 − m) / 2^L) = 3 + 125: 8·135 − 3
        assert model.input_samples(1000) == 1077 and wun.context_samples(config) == 37
    else:
        assert model.input_samples(1000) == 1000 and model.input_samples(1001) == 1008


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def test_config_round_trips_through_the_registry_and_keras():
    import keras

    params = {**TINY, "upsampling": "learned", "output_type": "direct", "output_activation": "linear"}
    harness.check_config_round_trip(wun, wun.Config(**params))
    config = registry.family_config(ModelConfig(name="wave_u_net", families={"wave_u_net": params}))
    assert config == wun.Config(**params)
    assert dataclasses.asdict(config) == {**dataclasses.asdict(wun.Config()), **params}
    assert registry.default_params("wave_u_net") == dataclasses.asdict(wun.Config())
    with pytest.raises(ConfigError, match="model.wave_u_net.nb_layers"):
        registry.family_config(ModelConfig(name="wave_u_net", families={"wave_u_net": {"nb_layers": 3}}))
    with pytest.raises(ConfigError, match="model.wave_u_net.upsampling"):
        build(tiny(upsampling="cubic"))
    with pytest.raises(ConfigError, match="odd"):
        build(tiny(filter_size=4))
    with pytest.raises(ConfigError,
                       match=r"^config key 'model.wave_u_net.predict' must be one of chunks, one_pass; got 'whole'$"):
        tiny(predict="whole")
    with pytest.raises(ConfigError, match=r"^config key 'model.wave_u_net.predict_frames' must be >= 1; got 0$"):
        tiny(predict_frames=0)
    with pytest.raises(ConfigError, match=r"^config key 'model.wave_u_net.num_layers' must be >= 1; got 0$"):
        wun.Config(num_layers=0)

    # keras: get_config -> from_config rebuilds the same graph; same weights give the same outputs
    model = build(config).train_model
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    mixture = noise((2, wun.input_samples(config, 50), 2))
    for target in MUSDB.targets:
        np.testing.assert_allclose(clone(mixture)[target], model(mixture)[target], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Separator
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context,nb_channels", [(True, 2), (False, 2), (True, 1)])
def test_separator_keeps_any_odd_length_and_shares_weights(context, nb_channels):
    data = DataConfig(nb_channels=nb_channels)
    model = build(tiny(context=context), data)
    assert {id(w) for w in model.separator.weights} == {id(w) for w in model.train_model.weights}
    for length in (1, 7, 333, 1001):
        mixture = noise((2, length, nb_channels), length)
        estimates = model.separator(mixture, training=False)
        assert set(estimates) == set(MUSDB.targets)
        assert {tuple(v.shape) for v in estimates.values()} == {(2, length, nb_channels)}


def predict_track(network, song, input_length, output_length):
    """numpy `Evaluate.predict_track` (f90/Wave-U-Net) around a network, song `(nb_timesteps, nb_channels)`: pad the
    song to at least one input, then by the context; output-length chunks, the last one ending at the song's end."""
    n = len(song)
    song = np.pad(song, [(0, max(0, input_length - n)), (0, 0)])
    context = (input_length - output_length) // 2
    padded = np.pad(song, [(context, context), (0, 0)])
    estimates = {}
    for position in range(0, len(song), output_length):
        position = min(position, len(song) - output_length)
        parts = network(padded[None, position:position + input_length], training=False)
        for target, part in parts.items():
            estimates.setdefault(target, np.zeros_like(song))[position:position + output_length] = np.asarray(part)[0]
    return {t: v[:n] for t, v in estimates.items()}


@pytest.mark.parametrize("context", [True, False])
def test_separator_is_the_references_chunked_prediction_for_static_and_dynamic_lengths(context):
    from components.inference.separation import compiled

    config = tiny(context=context, predict_frames=100)
    model = build(config)
    input_length, output_length = wun.chunk_lengths(config)
    if context:  # x = 3 + ceil(97 / 8) = 16: I = 8 (16 + 7) - 3 = 181, O = 8 (16 - 3) + 3 = 107
        assert (input_length, output_length) == (181, 107)
    else:  # same padding: one chunk is predict_frames rounded up to a multiple of 2^L
        assert (input_length, output_length) == (104, 104)
    served = compiled(model.separator, 2)  # traced once with a dynamic length, as evaluate and the SavedModel
    for length in (50, output_length, 3 * output_length, 1001):  # shorter than a chunk, whole chunks, a moved last
        mixture = noise((2, length, 2), length)
        eager = model.separator(mixture, training=False)
        graph = served(mixture)
        for b in range(2):
            reference = predict_track(model.train_model, mixture[b], input_length, output_length)
            for target in MUSDB.targets:
                np.testing.assert_allclose(np.asarray(eager[target])[b], reference[target], atol=1e-6)
                np.testing.assert_allclose(graph[target][b], reference[target], atol=1e-6)


def test_one_pass_separator_is_the_train_model_on_the_zero_padded_mixture():
    config = tiny(predict="one_pass")
    model = build(config)
    context = wun.context_samples(config)
    n = wun.output_samples(config, wun.input_samples(config, 300))  # a length the model outputs exactly
    mixture = noise((1, n, 2))
    padded = np.pad(mixture, [(0, 0), (context, context), (0, 0)])
    direct = model.train_model(padded, training=False)
    separated = model.separator(mixture, training=False)
    for target in MUSDB.targets:
        np.testing.assert_array_equal(np.asarray(separated[target]), np.asarray(direct[target]))


def test_difference_output_is_clipped_outside_training_as_the_reference():
    model = build(tiny(output_type="difference"))  # clip_difference=True by default (Utils.AudioClip)
    mixture = 10.0 * noise((1, wun.input_samples(tiny(), 40), 2), 5)
    trained = np.asarray(model.train_model(mixture, training=True)[MUSDB.targets[-1]])
    inferred = np.asarray(model.train_model(mixture, training=False)[MUSDB.targets[-1]])
    assert np.max(np.abs(trained)) > 1.5
    np.testing.assert_allclose(inferred, np.clip(trained, -1.0, 1.0), atol=1e-6)


def test_difference_output_sums_exactly_to_the_mixture():
    config = tiny(output_type="difference", clip_difference=False)
    model = build(config)
    mixture = noise((2, 777, 2), 3)
    estimates = model.separator(mixture, training=False)
    total = sum(np.asarray(v, dtype=np.float64) for v in estimates.values())
    assert np.max(np.abs(total - mixture)) < 1e-5
    # by default the rest of the mixture is clipped to [-1, 1] at inference, as the reference's difference_output
    loud = 12.0 * mixture
    clipped = build(tiny(output_type="difference"))
    clipped.train_model.set_weights(model.train_model.get_weights())
    estimates = clipped.separator(loud, training=False)
    others = sum(np.asarray(estimates[t], dtype=np.float64) for t in MUSDB.targets[:-1])
    assert np.max(np.abs(loud - others)) > 1.5
    np.testing.assert_allclose(np.asarray(estimates[MUSDB.targets[-1]]), np.clip(loud - others, -1, 1), atol=1e-5)
    # with the learned heads silenced, the last source is exactly the (centred) mixture
    for target in MUSDB.targets[:-1]:
        layer = model.train_model.get_layer(f"output_{target}")
        layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    n = wun.input_samples(config, 100)
    context = wun.context_samples(config)
    window = noise((1, n, 2), 4)
    last = np.asarray(model.train_model(window)[MUSDB.targets[-1]])
    np.testing.assert_array_equal(last, window[:, context:n - context])
    np.testing.assert_array_equal(np.asarray(model.separator(mixture)[MUSDB.targets[-1]]), mixture)


def test_direct_linear_output_clips_only_at_inference():
    model = build(tiny(output_type="direct", output_activation="linear"))
    for target in MUSDB.targets:
        layer = model.train_model.get_layer(f"output_{target}")
        kernel, bias = layer.get_weights()
        layer.set_weights([np.zeros_like(kernel), np.full_like(bias, 3.0)])  # every output 3.0
    mixture = noise((1, wun.input_samples(tiny(), 40), 2))
    assert float(np.max(model.train_model(mixture, training=True)["vocals"])) == pytest.approx(3.0)
    assert float(np.max(model.separator(mixture, training=False)["vocals"])) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Learned upsampling
# --------------------------------------------------------------------------------------------
def test_learned_upsampling_interpolates_with_sigmoid_weights():
    import keras

    upsample = wun.Upsample(learned=True, valid=True)
    x = np.array([[[0.0, 0.0], [4.0, 8.0], [8.0, 0.0]]], dtype="float32")  # (1, 3, 2)
    upsample.build(x.shape)
    upsample.logit.assign(np.array([0.0, np.log(3.0)], dtype="float32"))  # w = 0.5 and 0.75
    np.testing.assert_allclose(upsample(x)[0], [[0, 0], [2, 2], [4, 8], [6, 6], [8, 0]], atol=1e-6)
    same = wun.Upsample(learned=False, valid=False)
    np.testing.assert_allclose(same(x)[0, :, 0], [0, 2, 4, 6, 8, 8], atol=1e-6)
    assert keras.ops.shape(same(x))[1] == 6


def test_learned_upsampling_weights_start_glorot_uniform_as_the_reference():
    learned = build(tiny(upsampling="learned"))  # tf.get_variable's default: glorot_uniform, fans = F for shape [F]
    logits = [w.numpy() for w in learned.train_model.weights if "interpolation_logit" in w.path]
    for logit in logits:
        limit = np.sqrt(3.0 / logit.shape[0])
        assert np.all(np.abs(logit) <= limit) and np.std(logit) > 0.3 * limit


def test_learned_upsampling_starts_linear_adds_one_weight_per_feature_and_trains():
    linear = build(tiny())
    learned = build(tiny(upsampling="learned", interpolation_init="zeros"))
    # F_c·(L+1) for the bottleneck + F_c·(2 + ... + L) for up blocks L..2: 4·4 + 4·(2 + 3) = 36
    assert learned.train_model.count_params() - linear.train_model.count_params() == 36
    logits = [w for w in learned.train_model.weights if "interpolation_logit" in w.path]
    assert sorted(int(w.shape[0]) for w in logits) == [8, 12, 16]
    shared = {w.path: w for w in linear.train_model.weights}
    logit_ids = {id(w) for w in logits}
    for weight in learned.train_model.weights:
        if id(weight) in logit_ids:
            continue
        weight.assign(shared[weight.path].numpy())
    mixture = noise((1, wun.input_samples(tiny(), 64), 2))
    for target in MUSDB.targets:  # sigmoid(0) = 1/2: learned starts as linear interpolation
        np.testing.assert_allclose(learned.train_model(mixture)[target], linear.train_model(mixture)[target],
                                   atol=1e-6)
    before = [w.numpy().copy() for w in logits]
    _fit_once(learned, seed=1)
    assert all(np.any(w.numpy() != b) for w, b in zip(logits, before))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _batch(model, n_output=200, seed=0):
    """A fixed tiny batch: mixture of a valid length, its stems' centres as targets."""
    n = model.input_samples(n_output)
    stems = {t: noise((2, n, 2), seed + i) for i, t in enumerate(model.targets)}
    mixture = sum(stems.values())
    return mixture, {t: np.asarray(v) for t, v in model.train_targets(stems).items()}


def _loss(model, mixture, targets) -> float:
    """The paper's loss, written out: the mean over sources of each source's waveform MSE (training outputs:
    the difference output is not clipped in training)."""
    estimates = model.train_model(mixture, training=True)
    return float(np.mean([np.mean((np.asarray(estimates[t]) - targets[t]) ** 2) for t in model.targets]))


def _fit_once(model, seed=0):
    """One `fit` step on a fixed batch; returns (loss before, loss after, mixture, targets)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    mixture, targets = _batch(model, seed=seed)
    before = _loss(model, mixture, targets)
    # SGD: tracing Adam's update for every variable costs seconds on CPU; the step is what is tested
    model.train_model.compile(optimizer=keras.optimizers.SGD(0.05), loss=model.loss, jit_compile=False)
    history = model.train_model.fit(tf.data.Dataset.from_tensors((mixture, targets)), epochs=1, verbose=0,
                                    shuffle=False)
    assert history.history["loss"][0] == pytest.approx(before, rel=1e-4)  # Keras' loss is the paper's loss
    return before, _loss(model, mixture, targets), mixture, targets


def test_one_training_step_lowers_the_mean_over_sources_of_the_waveform_mse():
    model = build(tiny())
    before, after, _, _ = _fit_once(model)
    assert after < before


def test_mobile_model_is_static_and_matches_the_separator():
    config = tiny()
    model = build(config)
    for chunk in (model.input_samples(500), 500):  # a valid train-model input length, and any other
        mobile = model.inference.mobile(chunk)
        assert tuple(mobile.inputs[0].shape) == (1, chunk, 2)
        mixture = noise((1, chunk, 2))
        for target in MUSDB.targets:
            assert tuple(mobile(mixture)[target].shape) == (1, chunk, 2)  # whole chunks, as export checks
            np.testing.assert_allclose(mobile(mixture)[target], model.separator(mixture)[target], atol=1e-6)


def test_shared_harness_on_the_unittest_preset_model():
    model = harness.build_tiny("wave_u_net")
    assert model.config == wun.Config(**TINY)
    shapes = harness.check_train_shapes(model, nb_timesteps=1001)
    n = model.input_samples(1001)
    assert set(shapes.values()) == {(2, n - 2 * wun.context_samples(model.config), 2)}
    assert harness.check_shared_weights(model) == len(model.train_model.trainable_weights)
    harness.check_separator_shapes(model, nb_timesteps=1001)
    same = harness.build_tiny("wave_u_net", overrides={"model": {"wave_u_net": {"context": False}}})
    harness.check_separator_shapes(same, nb_timesteps=1001)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
def _resolve(*names, **model):
    from configs.config import Config, defaults
    from configs.presets import PRESETS
    from configs.config import deep_merge

    merged = defaults()
    merged["model"]["wave_u_net"] = registry.default_params("wave_u_net")
    for name in names:
        merged = deep_merge(merged, PRESETS[name])
    merged = deep_merge(merged, {"model": model})
    config = Config.from_dict(merged)
    return config, registry.family_config(config.model)


def test_paper_presets_state_the_published_recipe_and_fit_their_segments():
    config, family = _resolve("wave_u_net_paper")
    assert config.model.name == "wave_u_net" and family == wun.Config()
    train = config.train
    assert (train.lr, train.batch_size, train.steps_per_epoch, train.patience) == (1e-4, 16, 2000, 20)
    assert (train.finetune_lr, train.finetune_batch_size, train.weight_decay) == (1e-5, 32, 0.0)
    assert train.finetune_epochs > 0 and train.lr_schedule == "constant"  # no lr schedule in the paper
    assert (train.optimizer, train.epsilon, train.finetune_from) == ("adam_tf", 1e-8, "last")  # TF1 AdamOptimizer
    assert config.data.sample_rate == 22050 and config.data.targets[-1] == "vocals"
    seq = wun.input_samples(family, int(round(train.seq_seconds * config.data.sample_rate)))
    assert seq == 147_443 <= int(round(config.data.segment_seconds * config.data.sample_rate))

    config, family = _resolve("wave_u_net_44k")
    assert config.data.sample_rate == 44100 and family.upsampling == "learned"
    assert config.data.targets == ("accompaniment", "vocals")
    seq = wun.input_samples(family, int(round(config.train.seq_seconds * config.data.sample_rate)))
    assert seq == 147_443 <= int(round(config.data.segment_seconds * config.data.sample_rate))


def test_unittest_preset_builds_a_tiny_model_whose_excerpt_fits_the_segments():
    config, family = _resolve("unittest", name="wave_u_net")
    model = registry.build(config.model, data=config.data, stats={})
    assert model.train_model.count_params() < 5000
    seq = model.input_samples(int(round(config.train.seq_seconds * config.data.sample_rate)))
    assert seq == 8077 <= int(round(config.data.segment_seconds * config.data.sample_rate))
