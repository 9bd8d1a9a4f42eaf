"""Open-Unmix: published parameter counts, architecture against a numpy forward pass, the shared harness."""
import numpy as np
import pytest

from configs.config import Config, DataConfig
from configs.errors import ConfigError
from models import open_unmix, registry
from tests import model_harness as harness
from tests.test_transforms import numpy_stft

TWO_TARGETS = {"data": {"targets": ["vocals", "drums"]}}


@pytest.fixture(scope="module")
def tiny():
    return harness.build_tiny("umx", overrides=TWO_TARGETS)


@pytest.mark.parametrize("changes,expected", [
    ({}, 8_893_348), ({"unidirectional": True}, 10_466_212), ({"hidden_size": 1024}, 28_257_188)])
def test_parameter_count_matches_reference(changes, expected):
    # stereo, 44.1 kHz, n_fft 4096, hop 1024, bandwidth 16 kHz -> max_bin 1487; one target
    model = open_unmix.build(open_unmix.Config(wiener_iterations=0, **changes),
                             data=DataConfig(targets=("vocals",)), stats={})
    assert model.inference.max_bin == 1487
    assert harness.count_parameters(model.inference.networks["vocals"]) == expected
    assert harness.count_parameters(model.train_model) == expected  # transforms add no parameters


def test_config_round_trip_and_registry():
    harness.check_config_round_trip(open_unmix, open_unmix.Config(hidden_size=16, unroll=True, bandwidth=8000.0))
    assert registry.default_params("umx")["n_fft"] == 4096
    assert Config().model.name == "umx"
    with pytest.raises(ConfigError, match="model.name 'nope'"):
        registry.check(Config.from_dict({"model": {"name": "nope"}}).model)
    with pytest.raises(ConfigError, match="unknown config key 'model.umxx'"):
        registry.check(Config.from_dict({"model": {"umxx": {}}}).model)
    with pytest.raises(ConfigError, match="model.umx.hiden_size"):
        harness.build_tiny("umx", overrides={"model": {"umx": {"hiden_size": 8}}})
    with pytest.raises(ConfigError, match="residual"):
        harness.build_tiny("umx", overrides={"data": {"targets": ["vocals"]}})


def numpy_forward(net, magnitude):
    """OpenUnmix.forward of the PyTorch reference in numpy (BN in inference mode); `(B, F, K, C)`."""
    def bn(layer, x):
        return ((x - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
                * layer.gamma.numpy() + layer.beta.numpy())

    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    def lstm_direction(x, weights):  # x (B, F, I)
        hidden = np.zeros((x.shape[0], weights["recurrent_kernel"].shape[0]))
        cell = np.zeros_like(hidden)
        outputs = []
        for t in range(x.shape[1]):
            gates = (x[:, t] @ weights["kernel"].numpy() + weights["bias"].numpy()
                     + hidden @ weights["recurrent_kernel"].numpy() + weights["recurrent_bias"].numpy())
            i, f, g, o = np.split(gates, 4, axis=-1)
            cell = sigmoid(f) * cell + sigmoid(i) * np.tanh(g)
            hidden = sigmoid(o) * np.tanh(cell)
            outputs.append(hidden)
        return np.stack(outputs, axis=1)

    nb_samples, nb_frames, nb_bins, nb_channels = magnitude.shape
    x = magnitude.transpose(0, 1, 3, 2)[..., : net.max_bin]  # channel-major features, as torch
    x = (x + net.input_mean.numpy()) * net.input_scale.numpy()
    x = np.tanh(bn(net.bn1, x.reshape(nb_samples, nb_frames, -1) @ net.fc1.kernel.numpy()))
    h = x
    for lstm in net.lstms:
        forward = lstm_direction(h, lstm.directions[0])
        backward = lstm_direction(h[:, ::-1], lstm.directions[1])[:, ::-1]
        h = np.concatenate([forward, backward], axis=-1)
    x = np.concatenate([x, h], axis=-1)
    x = np.maximum(bn(net.bn2, x @ net.fc2.kernel.numpy()), 0)
    x = bn(net.bn3, x @ net.fc3.kernel.numpy()).reshape(nb_samples, nb_frames, nb_channels, nb_bins)
    x = x * net.output_scale.numpy() + net.output_mean.numpy()
    return np.maximum(x, 0).transpose(0, 1, 3, 2) * magnitude


def test_network_matches_numpy_reference_forward():
    # 2 LSTM layers and a bandwidth crop (max_bin < nb_bins) exercise every path
    model = harness.build_tiny("umx", overrides={"data": {"targets": ["vocals", "drums"]},
                                                 "model": {"umx": {"nb_layers": 2, "bandwidth": 3000.0}}})
    net = model.inference.networks["vocals"]
    assert net.max_bin == 97 and net.nb_bins == 129
    rng = np.random.default_rng(0)
    for weight in net.weights:  # non-trivial BN statistics and scalers too
        weight.assign(rng.uniform(0.5, 1.5, weight.shape) if "variance" in weight.path or "scale" in weight.path
                      else rng.normal(0, 0.3, weight.shape))
    magnitude = rng.uniform(0, 2, (2, 9, 129, 2)).astype(np.float32)
    got = np.asarray(net(magnitude, training=False))
    expected = numpy_forward(net, magnitude.astype(np.float64))
    assert np.max(np.abs(got - expected)) < 1e-4 * max(1.0, np.max(np.abs(expected)))


def test_harness_shapes_weights_and_fit(tiny):
    shapes = harness.check_train_shapes(tiny, nb_timesteps=4001)
    assert shapes["vocals"] == (2, 1 + 4001 // 64, 129, 2)
    outputs = harness.check_separator_shapes(tiny, nb_timesteps=4001)
    assert set(outputs) == {"vocals", "drums"}
    assert harness.check_shared_weights(tiny) == len(tiny.train_model.trainable_weights)
    first, last = harness.check_fit_lowers_loss(tiny, steps=4)
    assert last < 0.95 * first


def test_adapt_sets_input_statistics(tiny):
    mixture, _ = harness.random_batch(tiny, 2, 4001, seed=5)
    batches = [mixture[:1], mixture[1:]]
    tiny.training.adapt(iter(batches))
    magnitudes = np.stack([np.mean([np.abs(numpy_stft(mixture[b, :, c].astype(np.float64), 256, 64))
                                    for c in range(2)], axis=0) for b in range(2)])  # (B, F, K) mono
    mean = magnitudes.reshape(-1, 129).mean(0)
    std = magnitudes.reshape(-1, 129).std(0)
    std = np.maximum(std, 1e-4 * std.max())
    for net in tiny.inference.networks.values():
        np.testing.assert_allclose(net.input_mean.numpy(), -mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(net.input_scale.numpy(), 1 / std, rtol=1e-4)


def test_soft_mask_separator_sums_to_mixture_and_residual(tiny):
    separator = tiny.inference.make_separator(wiener_iterations=0, residual=True)
    mixture, _ = harness.random_batch(tiny, 1, 3001, seed=6)
    outputs = {name: np.asarray(value) for name, value in separator(mixture, training=False).items()}
    assert set(outputs) == {"vocals", "drums", "residual"}
    total = sum(outputs.values())
    assert np.max(np.abs(total - mixture)) < 1e-4 * np.max(np.abs(mixture))


def test_unrolled_lstm_matches_loop():
    looped = harness.build_tiny("umx", overrides=TWO_TARGETS)
    unrolled = harness.build_tiny("umx", overrides={**TWO_TARGETS, "model": {"umx": {"unroll": True}}})
    unrolled.train_model.set_weights(looped.train_model.get_weights())
    mixture, _ = harness.random_batch(looped, 1, 2001, seed=7)
    static = unrolled.inference.make_separator(nb_timesteps=2001)
    expected = looped.separator(mixture, training=False)
    got = static(mixture, training=False)
    for target in looped.targets:
        assert np.max(np.abs(np.asarray(got[target]) - np.asarray(expected[target]))) < 1e-5


@pytest.mark.parametrize("changes", [{"unroll": False}, {"unroll": True}, {"unidirectional": True}])
def test_stacked_networks_match_per_target_networks(changes):
    # the separator's one-graph schedule (batched matmuls, one scan per layer over targets x directions)
    # computes exactly what every target's own network computes, on the same (non-trivial) weights
    model = harness.build_tiny("umx", overrides={"data": {"targets": ["vocals", "drums", "bass"]},
                                                 "model": {"umx": {"nb_layers": 2, "bandwidth": 3000.0, **changes}}})
    networks = list(model.inference.networks.values())
    rng = np.random.default_rng(1)
    for network in networks:
        for weight in network.weights:
            weight.assign(rng.uniform(0.5, 1.5, weight.shape) if "variance" in weight.path or "scale" in weight.path
                          else rng.normal(0, 0.3, weight.shape))
    magnitude = rng.uniform(0, 2, (2, 9, 129, 2)).astype(np.float32)
    expected = np.stack([np.asarray(network(magnitude, training=False)) for network in networks], axis=-1)
    got = np.asarray(open_unmix.StackedOpenUnmix(networks)(magnitude, training=False))
    assert got.shape == (2, 9, 129, 2, 3)
    assert np.max(np.abs(got - expected)) < 1e-6 * np.max(np.abs(expected))
    # the server separator's layout, targets first (J, F, B, C, K): the same numbers, transposed
    stacked = open_unmix.StackedOpenUnmix(networks, targets_first=True)
    targets_first = np.asarray(stacked(magnitude, training=False))
    assert targets_first.shape == stacked.compute_output_shape(magnitude.shape) == (3, 9, 2, 2, 129)
    np.testing.assert_array_equal(targets_first, np.transpose(got, [4, 1, 0, 3, 2]))
