"""Multichannel Wiener filter: ratio masks, mixture consistency, an oracle SDR check, numpy parity."""
import numpy as np
import pytest

from models import filtering


def to_complex(stacked):
    stacked = np.asarray(stacked, np.float64)
    return stacked[..., 0] + 1j * stacked[..., 1]


def to_stacked(values):
    return np.stack([values.real, values.imag], axis=-1).astype(np.float32)


def reference_wiener(magnitudes, mix, niter, residual=False, eps=1e-10, scale_factor=10.0):
    """Independent complex128 reference: magnitudes (F, K, C, J), mix complex (F, K, C) -> (F, K, C, J')."""
    nb_frames, nb_bins, nb_channels, nb_sources = magnitudes.shape
    if niter == 0:
        y = mix[..., None] * magnitudes / (eps + magnitudes.sum(-1, keepdims=True))
    else:
        y = magnitudes * np.exp(1j * np.angle(mix))[..., None]
    if residual:
        y = np.concatenate([y, (mix - y.sum(-1))[..., None]], axis=-1)
    if niter == 0:
        return y
    scale = max(1.0, np.abs(mix).max() / scale_factor)
    x, y = mix / scale, y / scale
    for _ in range(niter):
        psd = np.mean(np.abs(y) ** 2, axis=2)  # (F, K, J)
        covariances = []
        for j in range(y.shape[-1]):
            outer = np.zeros((nb_bins, nb_channels, nb_channels), complex)
            for t in range(nb_frames):
                for k in range(nb_bins):
                    outer[k] += np.outer(y[t, k, :, j], np.conj(y[t, k, :, j]))
            covariances.append(outer / (eps + psd[:, :, j].sum(0))[:, None, None])
        new = np.zeros_like(y)
        for t in range(nb_frames):
            for k in range(nb_bins):
                mixture_cov = np.sqrt(eps) * np.eye(nb_channels) + sum(
                    psd[t, k, j] * covariances[j][k] for j in range(y.shape[-1]))
                inverse = np.linalg.inv(mixture_cov)
                for j in range(y.shape[-1]):
                    new[t, k, :, j] = psd[t, k, j] * covariances[j][k] @ inverse @ x[t, k]
        y = new
    return y * scale


def random_case(seed, nb_frames=12, nb_bins=7, nb_channels=2, nb_sources=3):
    rng = np.random.default_rng(seed)
    magnitudes = rng.uniform(0.05, 2.0, (nb_frames, nb_bins, nb_channels, nb_sources))
    mix = rng.normal(size=(nb_frames, nb_bins, nb_channels)) + 1j * rng.normal(size=(nb_frames, nb_bins, nb_channels))
    return magnitudes.astype(np.float32), mix


def test_niter0_is_ratio_masking():
    magnitudes, mix = random_case(0)
    got = to_complex(filtering.wiener(magnitudes, to_stacked(mix), niter=0))
    expected = mix[..., None] * magnitudes / (1e-10 + magnitudes.sum(-1, keepdims=True))
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) < 1e-5 * np.max(np.abs(expected))


@pytest.mark.parametrize("niter,residual", [(0, False), (1, False), (2, True)])
def test_estimates_sum_to_mixture(niter, residual):
    magnitudes, mix = random_case(1)
    got = to_complex(filtering.wiener(magnitudes, to_stacked(mix), niter=niter, residual=residual))
    assert got.shape[-1] == 3 + residual
    assert np.linalg.norm(got.sum(-1) - mix) < 1e-4 * np.linalg.norm(mix)


@pytest.mark.parametrize("nb_channels,niter,residual", [(2, 1, False), (2, 2, True), (1, 2, False)])
def test_matches_numpy_reference(nb_channels, niter, residual):
    magnitudes, mix = random_case(2, nb_channels=nb_channels)
    # batched: the second item is scaled up so that the per-item scaling (scale_factor) takes effect
    batch_magnitudes = np.stack([magnitudes, 40 * magnitudes])
    batch_mix = np.stack([mix, 40 * mix])
    got = to_complex(filtering.wiener(batch_magnitudes, to_stacked(batch_mix), niter=niter, residual=residual))
    for item in range(2):
        expected = reference_wiener(batch_magnitudes[item].astype(np.float64), batch_mix[item], niter, residual)
        error = np.max(np.abs(got[item] - expected)) / np.max(np.abs(expected))
        assert error < 1e-4, f"item {item}: relative error {error:.2e}"


def sdr(reference, estimate):
    return 10 * np.log10(np.sum(np.abs(reference) ** 2) / np.sum(np.abs(reference - estimate) ** 2))


def test_em_with_oracle_magnitudes_does_not_lower_sdr():
    """Independent, differently panned random sources: the spatial model helps ratio masks (measured 3.9 -> 6.0 dB)."""
    rng = np.random.default_rng(3)
    nb_frames, nb_bins = 40, 16
    sources = []
    for pan in (0.15, 0.5, 0.85):
        spectral_shape = rng.uniform(0.2, 1.0, (1, nb_bins))
        mono = spectral_shape * (rng.normal(size=(nb_frames, nb_bins)) + 1j * rng.normal(size=(nb_frames, nb_bins)))
        gains = np.array([np.sqrt(1 - pan), np.sqrt(pan)])
        sources.append(mono[..., None] * gains)  # (F, K, C)
    sources = np.stack(sources, axis=-1)  # (F, K, C, J)
    mix = sources.sum(-1)
    oracle = np.abs(sources).astype(np.float32)
    scores = {}
    for niter in (0, 1):
        estimates = to_complex(filtering.wiener(oracle, to_stacked(mix), niter=niter))
        scores[niter] = np.mean([sdr(sources[..., j], estimates[..., j]) for j in range(sources.shape[-1])])
    assert scores[1] >= scores[0] + 1.0, scores


def test_layer_shape_and_config():
    magnitudes, mix = random_case(4)
    layer = filtering.WienerFilter(niter=1, residual=True)
    out = layer(magnitudes[None], to_stacked(mix)[None])
    assert tuple(out.shape) == (1, 12, 7, 2, 4, 2)
    assert layer.compute_output_shape((1, 12, 7, 2, 3), (1, 12, 7, 2, 2)) == (1, 12, 7, 2, 4, 2)
    assert filtering.WienerFilter.from_config(layer.get_config()).get_config() == layer.get_config()


@pytest.mark.parametrize("win_len", [0, 5])
def test_xla_compiled_layer_matches_numpy_reference(win_len):
    # the server separator's WienerFilter(jit_compile=True): the same numbers as the reference, per block
    magnitudes, mix = random_case(5)
    layer = filtering.WienerFilter(niter=2, residual=True, win_len=win_len, jit_compile=True)
    assert filtering.WienerFilter.from_config(layer.get_config()).jit_compile
    got = to_complex(layer(magnitudes[None], to_stacked(mix)[None]))[0]
    blocks = range(0, mix.shape[0], win_len or mix.shape[0])
    expected = np.concatenate([reference_wiener(magnitudes[start:start + (win_len or mix.shape[0])].astype(np.float64),
                                                mix[start:start + (win_len or mix.shape[0])], 2, True)
                               for start in blocks])
    assert got.shape == expected.shape
    assert sdr(expected, got) >= 80


@pytest.mark.parametrize("win_len,residual", [(0, False), (20, True)])
def test_fused_wiener_istft_equals_wiener_then_istft_on_umx_shapes(win_len, residual):
    """The server separator's WienerISTFT (one EM iteration, stereo: XLA statistics, then one XLA function per
    source to its waveform) against WienerFilter(jit) + ISTFT: n_fft 4096 / hop 1024 (2049 bins), 4 targets,
    ~1.4 s at 44.1 kHz (61 frames); blocks of 20 frames (a short last one) with a residual; batch of two with
    the second item loud enough for the scaling to act."""
    import tensorflow as tf

    from models import transforms

    rng = np.random.default_rng(7)
    nb_timesteps, n_fft, hop_length = 61_000, 4096, 1024
    waveform = rng.normal(0, 0.1, (2, nb_timesteps, 2)).astype(np.float32) * np.float32([[[1]], [[300]]])
    mix_stft = transforms.stft(waveform, n_fft, hop_length)
    magnitudes = (rng.uniform(0, 1, tuple(mix_stft.shape[:-1]) + (4,)) * transforms.complex_norm(mix_stft).numpy()[
        ..., None]).astype(np.float32)  # (B, F, K, C, J)
    layer = filtering.WienerISTFT(1, residual, win_len=win_len, n_fft=n_fft, hop_length=hop_length)
    assert filtering.WienerISTFT.from_config(layer.get_config()).get_config() == layer.get_config()
    got = layer(tf.transpose(magnitudes, [4, 1, 0, 3, 2]), mix_stft, waveform)  # targets first: (J, F, B, C, K)
    expected = transforms.istft(filtering.WienerFilter(1, residual, win_len=win_len, jit_compile=True)(
        magnitudes, mix_stft), n_fft, hop_length, nb_timesteps).numpy()  # (B, T, C, J')
    assert len(got) == 4 + residual
    for index, source in enumerate(got):
        assert tuple(source.shape) == waveform.shape
        for item in range(2):
            assert sdr(expected[item, ..., index], source.numpy()[item]) >= 100, (index, item)


def test_wiener_istft_other_settings_run_the_general_filter():
    # two EM iterations: WienerISTFT falls back to blockwise_wiener + istft, the same numbers exactly
    import tensorflow as tf

    from models import transforms

    magnitudes, mix = random_case(8, nb_frames=12, nb_bins=129)
    waveform = np.zeros((1, 11 * 64, 2), np.float32)
    got = filtering.WienerISTFT(2, True, n_fft=256, hop_length=64)(
        tf.transpose(magnitudes[None], [4, 1, 0, 3, 2]), to_stacked(mix)[None], waveform)
    expected = transforms.istft(filtering.blockwise_wiener(magnitudes[None], to_stacked(mix)[None], 0, 2, True),
                                256, 64, waveform.shape[1]).numpy()
    for index, source in enumerate(got):
        np.testing.assert_allclose(source.numpy(), expected[..., index], rtol=0, atol=1e-6)


@pytest.mark.parametrize("niter,residual,win_len", [(1, False, 0), (2, True, 0), (1, True, 5)])
def test_tflite_form_matches_numpy_reference(niter, residual, win_len):
    # the form traced for TFLite (component-major tensors, bins last): the reference's numbers, per block and
    # per batch item (the second scaled up so that scale_factor acts), silent mixture bins included
    from models.transforms import tflite_graph

    magnitudes, mix = random_case(6)
    mix[3, 2, 0] = 0  # angle(0) = 0
    mix[:, 4] = 0  # a bin silent in both channels for every frame
    batch_magnitudes = np.stack([magnitudes, 40 * magnitudes])[..., :]
    batch_mix = np.stack([mix, 40 * mix])
    with tflite_graph():
        got = to_complex(filtering.blockwise_wiener(batch_magnitudes, to_stacked(batch_mix), win_len, niter, residual))
    default = to_complex(filtering.blockwise_wiener(batch_magnitudes, to_stacked(batch_mix), win_len, niter, residual))
    assert got.shape == default.shape == (2, 12, 7, 2, 3 + residual)
    assert np.isfinite(got).all()
    block = win_len or mix.shape[0]
    for item in range(2):
        expected = np.concatenate([reference_wiener(batch_magnitudes[item, start:start + block].astype(np.float64),
                                                    batch_mix[item, start:start + block], niter, residual)
                                   for start in range(0, mix.shape[0], block)])
        assert sdr(expected, got[item]) >= 100, item
        assert sdr(default[item], got[item]) >= 110, item
