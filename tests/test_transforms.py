"""STFT / ISTFT / magnitude: round trip, torch.stft(center=True) framing, layers, TFLite builtins."""
import numpy as np
import pytest
import tensorflow as tf

from models import transforms


def numpy_stft(signal, n_fft, hop_length):
    """torch.stft(center=True, pad_mode='reflect', window=hann(periodic)) of a 1-D signal: (nb_frames, nb_bins)."""
    padded = np.pad(signal, (n_fft // 2, n_fft // 2), mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    nb_frames = 1 + (len(padded) - n_fft) // hop_length
    return np.stack([np.fft.rfft(padded[t * hop_length: t * hop_length + n_fft] * window) for t in range(nb_frames)])


@pytest.mark.parametrize("n_fft,hop_length,nb_timesteps,nb_channels", [
    (256, 64, 1001, 2), (4096, 1024, 9001, 2), (512, 128, 777, 1)])
def test_round_trip_error_below_1e6(n_fft, hop_length, nb_timesteps, nb_channels):
    audio = np.random.default_rng(0).uniform(-1, 1, (2, nb_timesteps, nb_channels)).astype(np.float32)
    spectrogram = transforms.stft(audio, n_fft, hop_length)
    assert spectrogram.shape == (2, 1 + nb_timesteps // hop_length, n_fft // 2 + 1, nb_channels, 2)
    restored = transforms.istft(spectrogram, n_fft, hop_length, nb_timesteps).numpy()
    assert restored.shape == audio.shape
    assert np.max(np.abs(restored - audio)) < 1e-6


def test_frames_match_torch_center_reflect_framing():
    n_fft, hop_length = 256, 64
    audio = np.random.default_rng(1).normal(size=(1, 1000, 2)).astype(np.float32)
    spectrogram = transforms.stft(audio, n_fft, hop_length).numpy()
    for channel in range(2):
        expected = numpy_stft(audio[0, :, channel].astype(np.float64), n_fft, hop_length)
        got = spectrogram[0, :, :, channel, 0] + 1j * spectrogram[0, :, :, channel, 1]
        assert got.shape == expected.shape
        assert np.max(np.abs(got - expected)) < 1e-5 * np.max(np.abs(expected))


def test_irfft_by_rfft_equals_irfft():
    rng = np.random.default_rng(2)
    real, imag = rng.normal(size=(2, 3, 129)).astype(np.float32)
    expected = tf.signal.irfft(tf.complex(real, imag)).numpy()
    assert np.max(np.abs(transforms.irfft(real, imag, 256).numpy() - expected)) < 1e-6


def test_istft_tflite_form_equals_tensorflows_inverse_fft():
    # four targets' spectra, as a separator hands them over: (samples, frames, bins, channels, sources, 2)
    spectrogram = tf.constant(np.random.default_rng(5).normal(0, 1, (1, 40, 129, 2, 4, 2)).astype(np.float32))
    native = transforms.istft(spectrogram, 256, 64, 2000).numpy()
    with transforms.tflite_graph():
        builtin = transforms.istft(spectrogram, 256, 64, 2000).numpy()
    assert native.shape == builtin.shape == (1, 2000, 2, 4)
    assert 10 * np.log10(np.sum(native ** 2) / np.sum((native - builtin) ** 2)) > 120



@pytest.mark.parametrize("shape,n_fft,hop_length,length,center", [
    ((1, 40, 129, 2, 4, 2), 256, 64, 2000, True),  # a separator's four targets
    ((2, 17, 129, 2), 256, 32, 600, True),  # 8 blocks per frame, no extra axis, two samples
    ((1, 40, 129, 1, 2), 256, 64, 2100, True),  # longer than the frames cover: zeros at the end
    ((1, 21, 65, 3, 2), 128, 64, 1300, False),  # no centre padding
    ((1, 1, 129, 2, 2), 256, 64, 256, False)])  # one frame
def test_istft_tflite_static_form_equals_tensorflows_inverse_fft(shape, n_fft, hop_length, length, center):
    # the form traced for TFLite with a static frame count (`_istft_tflite`: one RFFT2D, block overlap-add)
    spectrogram = tf.constant(np.random.default_rng(6).normal(0, 1, shape).astype(np.float32))
    native = transforms.istft(spectrogram, n_fft, hop_length, length, center).numpy()
    with transforms.tflite_graph():
        builtin = transforms.istft(spectrogram, n_fft, hop_length, length, center).numpy()
    assert native.shape == builtin.shape == (shape[0], length) + shape[3:-1]
    # without centre padding the first and last samples are divided by squared-window sums of ~1e-6, which
    # amplify float32 rounding (measured 106-108 dB there, 128+ dB with centre padding)
    assert 10 * np.log10(np.sum(native ** 2) / np.sum((native - builtin) ** 2)) > (125 if center else 100)
    assert np.array_equal(builtin == 0, native == 0)  # the same samples left silent (uncovered by frames)



@pytest.mark.parametrize("shape,n_fft,hop_length,center", [
    ((1, 2000, 2), 256, 64, True), ((2, 777, 1), 128, 32, True), ((1, 1000, 2), 256, 128, False)])
def test_stft_tflite_static_form_equals_tf_signal_stft(shape, n_fft, hop_length, center):
    # the form traced for TFLite with a static length (`_stft_tflite`: frames as shifted hop blocks, no GATHER)
    audio = tf.constant(np.random.default_rng(7).uniform(-1, 1, shape).astype(np.float32))
    native = transforms.stft(audio, n_fft, hop_length, center).numpy()
    with transforms.tflite_graph():
        builtin = transforms.stft(audio, n_fft, hop_length, center).numpy()
    assert native.shape == builtin.shape
    assert np.max(np.abs(native - builtin)) < 1e-5 * np.max(np.abs(native))


def test_layers_shapes_and_magnitude():
    audio = np.random.default_rng(3).uniform(-1, 1, (2, 999, 2)).astype(np.float32)
    stft_layer = transforms.STFT(256, 64)
    spectrogram = stft_layer(audio)
    assert tuple(spectrogram.shape) == stft_layer.compute_output_shape((2, 999, 2))
    magnitude = transforms.ComplexNorm()(spectrogram).numpy()
    complex_values = spectrogram.numpy()[..., 0] + 1j * spectrogram.numpy()[..., 1]
    np.testing.assert_allclose(magnitude, np.abs(complex_values), rtol=1e-5, atol=1e-6)
    mono = transforms.ComplexNorm(mono=True)(spectrogram).numpy()
    np.testing.assert_allclose(mono[..., 0], np.abs(complex_values).mean(-1), rtol=1e-5, atol=1e-6)
    # ISTFT over extra axes (channels, sources), length from a reference waveform
    sources = tf.stack([spectrogram, 2 * spectrogram], axis=-2)  # (B, F, K, C, 2 sources, 2)
    restored = transforms.ISTFT(256, 64)(sources, audio).numpy()
    assert restored.shape == (2, 999, 2, 2)
    assert np.max(np.abs(restored[..., 0] - audio)) < 1e-6
    assert np.max(np.abs(restored[..., 1] - 2 * audio)) < 2e-6
    assert transforms.STFT.from_config(stft_layer.get_config()).get_config() == stft_layer.get_config()


def test_bandwidth_to_max_bin_matches_open_unmix():
    assert transforms.bandwidth_to_max_bin(44100, 4096, 16000) == 1487
    assert transforms.bandwidth_to_max_bin(8000, 256, 16000) == 129


@pytest.mark.parametrize("n_fft,hop_length,nb_timesteps", [(256, 64, 1001), (1022, 256, 5000)])
def test_round_trip_converts_to_tflite_builtins(n_fft, hop_length, nb_timesteps):
    # (1022, 256): M-U-Net's paper STFT. TFLite's RFFT2D loads only powers of two, so the file computes this
    # size's transform as products with DFT tables; a file with RFFT2D at 1022 converts but fails to load
    from ai_edge_litert.interpreter import Interpreter

    @tf.function(input_signature=[tf.TensorSpec([1, nb_timesteps, 2], tf.float32)])
    def round_trip(audio):
        spectrogram = transforms.stft(audio, n_fft, hop_length)
        magnitude = transforms.complex_norm(spectrogram)
        return transforms.istft(spectrogram, n_fft, hop_length, nb_timesteps), magnitude

    with transforms.tflite_graph():
        concrete = round_trip.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], round_trip)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    audio = np.random.default_rng(4).uniform(-1, 1, (1, nb_timesteps, 2)).astype(np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], audio)
    interpreter.invoke()
    outputs = [interpreter.get_tensor(detail["index"]) for detail in interpreter.get_output_details()]
    restored = next(output for output in outputs if output.shape == audio.shape)
    assert np.max(np.abs(restored - audio)) < 1e-5
    magnitude = next(output for output in outputs if output.shape != audio.shape)  # (1, frames, bins, channels)
    expected = np.abs(numpy_stft(audio[0, :, 1].astype(np.float64), n_fft, hop_length))
    assert 10 * np.log10(np.sum(expected ** 2) / np.sum((expected - magnitude[0, ..., 1]) ** 2)) > 110
    if n_fft & (n_fft - 1):
        assert "RFFT2D" not in {op["op_name"] for op in interpreter._get_ops_details()}


@pytest.mark.parametrize("n_fft,hop_length,length", [(4096, 1024, 30001), (256, 64, 1200), (256, 96, 1000)])
def test_inverse_stft_equals_istft(n_fft, hop_length, length):
    # the server separator's ISTFT (frames last, overlap-add as shifted adds when the hop divides n_fft, XLA);
    # (256, 96): the tf.signal.overlap_and_add fallback; 1200 > the frames' span: the zero-padded tail
    nb_frames = 1 + 1000 // hop_length
    spectrogram = np.random.default_rng(6).normal(0, 1, (2, nb_frames, n_fft // 2 + 1, 2, 2)).astype(np.float32)
    expected = transforms.istft(spectrogram, n_fft, hop_length, length).numpy()  # (samples, length, channels)
    spectrum = tf.transpose(tf.complex(spectrogram[..., 0], spectrogram[..., 1]), [0, 3, 1, 2])
    compiled = tf.function(lambda s: transforms.inverse_stft(s, n_fft, hop_length, length), jit_compile=True)
    got = np.transpose(compiled(spectrum).numpy(), [0, 2, 1])
    assert got.shape == expected.shape == (2, length, 2)
    assert 10 * np.log10(np.sum(expected ** 2) / np.sum((expected - got) ** 2)) > 120


def test_compiled_stft_layer_equals_stft():
    audio = np.random.default_rng(7).uniform(-1, 1, (2, 9001, 2)).astype(np.float32)
    layer = transforms.STFT(4096, 1024, jit_compile=True)
    assert transforms.STFT.from_config(layer.get_config()).jit_compile
    np.testing.assert_allclose(layer(audio).numpy(), transforms.stft(audio, 4096, 1024).numpy(), rtol=0, atol=1e-5)
