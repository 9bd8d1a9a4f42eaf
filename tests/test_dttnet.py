"""DTTNet: published parameter count, config, shapes, the dual-path module, one training step,
chunked overlap-add, SavedModel and TFLite export. Everything but the parameter counts uses the
`unittest` preset's tiny model."""
from __future__ import annotations

import numpy as np
import pytest

from configs.config import DataConfig, ModelConfig
from configs.errors import ConfigError
from models import dttnet
from models import registry
from tests import model_harness as harness

# --------------------------------------------------------------------------------------------
# One target's weight count, derived from DTTNet-Pytorch (configs/model/vocals.yaml, dp_tdf_net.py,
# modules.py TFC_TDF_Res2, bandsequence.py): stereo -> 4 features, g = 32, 2 scales (c = 32, 64, 96),
# l = 3, k = 3, bn = 8, f = 2048 / 1024 / 512 bins. Convs and BN have biases, TDF linears do not.
#
#   TFC_l(c -> c):            l · (9c² + c  +  2c)          (conv + bias, BN)
#   TFC_TDF_Res2(c, f):       2 TFC_3 + TFC_1 + f·f/bn + 2c + f/bn·f + 2c
#   first conv 4·32 + 32 + BN 64 = 224; down conv 4·c·(c+32) + (c+32) + BN; up conv 4·c·(c−32) + (c−32) + BN
#   dual-path module (C = 96, H = 2: N = 48 features, hidden 96, GroupNorm 48 // 16 = 3 groups), 4 layers x
#   (time, frequency) x [GroupNorm 2N + BLSTM 2·(4·96·(48 + 96) + 2·4·96) + linear 192·48 + 48] = 8 · 121,488
#   final conv 32·4 + 4
# --------------------------------------------------------------------------------------------


def _tfc(c, layers):
    return layers * (9 * c * c + c + 2 * c)


def _res2(c, f, bn, l=3):
    return 2 * _tfc(c, l) + _tfc(c, 1) + 2 * f * (f // bn) + 4 * c


def derived_parameters(dim_f=2048, bn=8, g=32, scales=2, heads=2, layers=4):
    total, c, f = 4 * g + g + 2 * g, g, dim_f
    for _ in range(scales):
        total += _res2(c, f, bn) + 4 * c * (c + g) + (c + g) + 2 * (c + g)
        c, f = c + g, f // 2
    total += _res2(c, f, bn)
    n, hidden = c // heads, 2 * c // heads
    total += layers * 2 * (2 * n + 2 * (4 * hidden * (n + hidden) + 2 * 4 * hidden) + 2 * hidden * n + n)
    for _ in range(scales):
        total += 4 * c * (c - g) + (c - g) + 2 * (c - g)
        c, f = c - g, f * 2
        total += _res2(c, f, bn)
    return total + 4 * c + 4


VOCALS_PARAMETERS = 4_958_468  # also drums and other
BASS_PARAMETERS = 4_184_388  # 864 bins, bn = 2
# The paper's "4.97M": PyTorch's sum over `parameters()` also counts two frozen nn.Parameters of the
# reference's AbstractModel, the Hann window (n_fft = 6144) and the zero frequency pad (4 · (3073 − 2048)).
PAPER_COUNT = VOCALS_PARAMETERS + 6144 + 4 * (3073 - 2048)  # 4,968,712


def noise(shape, seed=0, scale=0.1):
    return np.random.default_rng(seed).normal(0.0, scale, shape).astype("float32")


@pytest.fixture(scope="module")
def tiny():
    # one network: tracing the scanned BLSTMs' training graph costs ~20 s per network on 2 shared cores
    return harness.build_tiny("dttnet", overrides={"data": {"targets": ["vocals"]}})


def test_vocals_and_bass_networks_have_the_derived_parameter_counts():
    assert derived_parameters() == VOCALS_PARAMETERS
    assert derived_parameters(dim_f=864, bn=2) == BASS_PARAMETERS
    assert round(PAPER_COUNT / 1e6, 2) == 4.97
    for target, expected in (("vocals", VOCALS_PARAMETERS), ("bass", BASS_PARAMETERS)):
        model = dttnet.build(dttnet.Config(), data=DataConfig(targets=(target,)), stats={})
        assert harness.count_parameters(model.train_model) == expected


def test_config_round_trip_validation_and_paper_preset():
    assert harness.family_module("dttnet") is dttnet
    harness.check_config_round_trip(dttnet)
    params = {"growth": 16, "num_dual_path_layers": 2}
    assert registry.family_config(ModelConfig(name="dttnet", families={"dttnet": params})) == dttnet.Config(**params)
    with pytest.raises(ConfigError, match="model.dttnet.grow"):
        registry.family_config(ModelConfig(name="dttnet", families={"dttnet": {"grow": 16}}))
    with pytest.raises(ConfigError, match="bass_dim_f"):
        dttnet.Config(bass_dim_f=866)
    with pytest.raises(ConfigError, match="num_heads"):
        dttnet.Config(num_heads=5)
    assert dttnet.Config().target_bins("bass") == (864, 2) and dttnet.Config().target_bins("other") == (2048, 8)

    paper = harness.tiny_config("dttnet", "dttnet_paper")
    assert (paper.train.lr, paper.train.batch_size, paper.train.weight_decay) == (2e-4, 8, 0.01)
    family = registry.family_config(paper.model)
    assert dttnet.valid_samples(family, round(paper.train.seq_seconds * 44100)) == 1024 * 255
    assert dttnet.valid_samples(family, round(paper.evaluate.chunk_seconds * 44100)) == 1024 * 511


def test_one_network_per_target_shapes_and_shared_weights(tiny):
    four = harness.build_tiny("dttnet")  # the unittest preset: all four MUSDB targets
    nets = four.inference.networks
    assert set(nets) == set(four.targets) == {"vocals", "drums", "bass", "other"}
    assert nets["bass"].inputs[0].shape[2] == 32 and nets["vocals"].inputs[0].shape[2] == 64
    counts = {t: harness.count_parameters(n) for t, n in nets.items()}
    assert sum(counts.values()) == harness.count_parameters(four.train_model)
    assert counts["vocals"] == counts["drums"] == counts["other"] > counts["bass"]
    assert {tuple(v.shape) for v in four.separator(noise((1, 700, 2))).values()} == {(1, 700, 2)}
    harness.check_train_shapes(tiny, nb_timesteps=2000)
    harness.check_separator_shapes(tiny, nb_timesteps=2001)
    harness.check_shared_weights(tiny)
    for length in (129, 3001):  # any length: frames zero-padded to a multiple of 4, then cropped
        assert {tuple(v.shape) for v in tiny.separator(noise((1, length, 2))).values()} == {(1, length, 2)}


def test_separator_runs_the_networks_in_turn_with_the_training_graphs_numbers(tmp_path):
    """`separate`'s graph runs one target's network after another (its peak memory: one network's activations,
    not all of them) and computes exactly what the training graph (the networks side by side) computes."""
    import tensorflow as tf

    three = harness.build_tiny("dttnet", overrides={"data": {"targets": ["vocals", "bass", "drums"]}})  # 3 of 4: time
    assert three.separator is not three.train_model
    mixture = noise((2, 3001, 2), 4)
    separated, trained = three.separator(mixture, training=False), three.train_model(mixture, training=False)
    for target in three.targets:
        np.testing.assert_array_equal(np.asarray(separated[target]), np.asarray(trained[target]))
    graph = tf.function(lambda batch: three.separator(batch, training=False)).get_concrete_function(
        tf.TensorSpec([None, None, 2], tf.float32)).graph
    # every network but the first waits (a control edge) for the previous target's waveform, the ISTFT output
    waits = {op.name: [c.name for c in op.control_inputs]
             for op in graph.get_operations() if op.type == "Identity" and "/after_" in op.name}
    assert len(waits) == len(three.targets) - 1
    for target in three.targets[1:]:
        (controls,) = [c for name, c in waits.items() if f"/after_{target}" in name]
        assert controls and all("/istft" in name for name in controls), waits
    assert three.inference.separation_chunk_samples == 64 * 127  # separate_dim_t 128 frames
    harness.check_saved_model_parity(three, tmp_path / "saved", lengths=(3001,), nb_samples=1)  # what `separate` loads


def test_dual_path_module_is_residual_and_shares_weights_across_heads():
    import keras

    module = dttnet.DualPathModule(8, num_heads=2, num_layers=1, group_size=4)
    x = noise((2, 5, 6, 8), 1)
    module(x)
    # 2 paths x (GroupNorm 2·4 + BLSTM 2·(4·8·(4 + 8) + 2·4·8) + linear 16·4 + 4): heads share them
    assert harness.count_parameters(module) == 2 * (8 + 2 * (384 + 64) + 68)
    for path in module.paths:
        for _, _, dense in path.values():
            dense.set_weights([np.zeros_like(w) for w in dense.get_weights()])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(module(x)), x, atol=1e-7)


def test_loss_is_l1_on_waveforms_and_one_fit_lowers_it(tiny):
    stems = {t: noise((1, 1000, 2), i) for i, t in enumerate(tiny.targets)}
    assert all(tiny.train_targets(stems)[t] is stems[t] for t in tiny.targets)
    assert all(type(loss).__name__ == "MeanAbsoluteError" for loss in tiny.loss.values())
    harness.check_fit_lowers_loss(tiny, steps=2, nb_timesteps=1000)


def test_overlap_add_with_the_family_chunk_is_exact_for_an_identity_model(tiny):
    from components.inference.separation import separate_array

    chunk = tiny.inference.chunk_samples
    assert chunk == 64 * 31 and tiny.input_samples(chunk) == chunk and tiny.inference.overlap == 0.75
    mixture = noise((9_000, 2), 3)
    out = separate_array(lambda batch: {t: batch for t in tiny.targets}, mixture, sample_rate=8000,
                         chunk_seconds=chunk / 8000, overlap=tiny.inference.overlap, batch_size=3,
                         input_samples=tiny.input_samples)
    for target in tiny.targets:
        assert np.max(np.abs(out[target] - mixture)) < 1e-6


@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_fused_batch_norm_trains_as_keras_batch_norm_in_one_op(axis):
    """The first-step speed-up of DTTNet: one FusedBatchNormV3 per training batch norm, same numbers as
    keras.layers.BatchNormalization (output, gradients, biased moving variance), inference untouched."""
    import keras
    import tensorflow as tf

    from models.layers import FusedBatchNormalization

    x = tf.constant(noise((3, 5, 6, 7), 4) * 2.0 + 0.5)
    d_y = tf.constant(noise((3, 5, 6, 7), 5))
    gamma = noise((x.shape[axis],), 6)
    results = []
    for layer in (keras.layers.BatchNormalization(axis=axis, momentum=0.9, epsilon=1e-5),
                  FusedBatchNormalization(axis=axis, momentum=0.9, epsilon=1e-5)):
        layer.build(x.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(0.3 * gamma)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * d_y)
        results.append([layer(x, training=True), *tape.gradient(loss, [x, layer.gamma, layer.beta]),
                        layer.moving_mean, layer.moving_variance, layer(x, training=False)])
        graph = tf.function(lambda inputs: layer(inputs, training=True)).get_concrete_function(x).graph
        ops = [op.type for op in graph.get_operations()]
        if isinstance(layer, FusedBatchNormalization):
            assert ops.count("FusedBatchNormV3") == 1 and "Mean" not in ops and "Rsqrt" not in ops
    for keras_value, fused_value in zip(*results):  # measured: at most 5.3e-6 (gradients of gamma, beta)
        np.testing.assert_allclose(np.asarray(fused_value), np.asarray(keras_value), rtol=0, atol=2e-5)
    # the moving variance is Keras's biased one: 0.9 + 0.1 var (two updates), not Bessel's n / (n - 1) var
    count = x.shape.num_elements() // x.shape[axis]
    variance = np.var(np.moveaxis(np.asarray(x), axis, -1).reshape(-1, x.shape[axis]), axis=0)
    np.testing.assert_allclose(np.asarray(results[1][5]), 0.81 + 0.19 * variance, rtol=1e-5)
    assert count > 1

