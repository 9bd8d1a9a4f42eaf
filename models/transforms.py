"""Shared signal code: STFT, ISTFT and magnitude, as pure functions and thin Keras layers.

One implementation serves training (`train_targets` inside tf.data), evaluation, SavedModel export
and TFLite: every op used here converts to TFLite builtins (MirrorPad, RFFT2D, Real/Imag,
overlap-add as strided slices). In particular `tf.signal.irfft` does *not* convert, so graphs traced
for the TFLite converter (inside `tflite_graph()`) compute the inverse transform with a forward real
FFT (see `irfft`); everywhere else `istft` uses TensorFlow's own inverse FFT, measured 1.8x faster for
UMX-HQ's four-target ISTFT on 2 CPU cores (134 dB between the two).

Complex spectra never cross a Keras layer boundary as complex dtype: they are float32 tensors with
real and imaginary parts stacked on a last axis of size 2,
`(nb_samples, nb_frames, nb_bins, nb_channels, 2)` (open-unmix's "complex last" layout, frames
first so that the time axis is axis 1 like the waveform). Keras 3 layers, losses and SavedModel
signatures then only ever see real tensors.

Framing follows `torch.stft(center=True, pad_mode="reflect")` with a periodic Hann window, so
`nb_frames = 1 + nb_timesteps // hop_length` and frame `t` is centred on sample `t * hop_length`,
as in open-unmix's `Separator`.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Union

import keras
import numpy as np
import tensorflow as tf


def bandwidth_to_max_bin(sample_rate: int, n_fft: int, bandwidth: float) -> int:
    """Number of STFT bins whose centre frequency is at most `bandwidth` Hz (open-unmix's rule)."""
    freqs = np.linspace(0, float(sample_rate) / 2, n_fft // 2 + 1, endpoint=True)
    return int(np.max(np.where(freqs <= bandwidth)[0])) + 1


def hann_window(n_fft: int, dtype=tf.float32) -> tf.Tensor:
    """Periodic Hann window (torch.hann_window(periodic=True)), `(n_fft,)`."""
    return tf.signal.hann_window(n_fft, periodic=True, dtype=dtype)


def stft(waveform, n_fft: int, hop_length: int, center: bool = True) -> tf.Tensor:
    """Waveform `(nb_samples, nb_timesteps, nb_channels)` -> `(nb_samples, nb_frames, nb_bins, nb_channels, 2)`.

    With `center`, the signal is reflect-padded by `n_fft // 2` on both sides (needs
    `nb_timesteps > n_fft // 2`).
    """
    waveform = tf.convert_to_tensor(waveform, tf.float32)
    if _TFLITE_GRAPH.get() and waveform.shape[1] is not None and n_fft % hop_length == 0:
        return _stft_tflite(waveform, n_fft, hop_length, center)
    signal = tf.transpose(waveform, [0, 2, 1])  # (nb_samples, nb_channels, nb_timesteps)
    if center:
        pad = n_fft // 2
        signal = tf.pad(signal, [[0, 0], [0, 0], [pad, pad]], mode="REFLECT")
    if _TFLITE_GRAPH.get() and not _is_power_of_two(n_fft):  # TFLite's RFFT2D: powers of two only
        frames = tf.signal.frame(signal, n_fft, hop_length) * hann_window(n_fft)
        real, imag = _tflite_rfft(frames, n_fft)
        return tf.transpose(tf.stack([real, imag], axis=-1), [0, 2, 3, 1, 4])
    spectrum = tf.signal.stft(signal, frame_length=n_fft, frame_step=hop_length, fft_length=n_fft,
                              window_fn=lambda n, dtype: hann_window(n, dtype), pad_end=False)
    stacked = tf.stack([tf.math.real(spectrum), tf.math.imag(spectrum)], axis=-1)
    return tf.transpose(stacked, [0, 2, 3, 1, 4])  # (samples, frames, bins, channels, 2)



def _stft_tflite(waveform, n_fft: int, hop_length: int, center: bool = True) -> tf.Tensor:
    """`stft` for graphs traced inside `tflite_graph()` with a static length: same numbers, cheaper ops. The
    frames are `n_fft / hop_length` shifted views of the hop-sized blocks of the signal, concatenated (no
    GATHER), the window is a constant, and real and imaginary parts are stacked on a leading axis and moved
    last by the one transpose the layout needs anyway (a PACK onto the last axis cost ~4 ms at 3 s)."""
    signal = tf.transpose(waveform, [0, 2, 1])  # (nb_samples, nb_channels, nb_timesteps)
    if center:
        pad = n_fft // 2
        signal = tf.pad(signal, [[0, 0], [0, 0], [pad, pad]], mode="REFLECT")
    length = signal.shape[-1]
    nb_frames = 1 + (length - n_fft) // hop_length
    nb_blocks = nb_frames - 1 + n_fft // hop_length
    blocks = tf.reshape(signal[..., :nb_blocks * hop_length],
                        tf.concat([tf.shape(signal)[:2], [nb_blocks, hop_length]], 0))  # (samples, channels, blocks, hop)
    frames = tf.concat([blocks[..., index:index + nb_frames, :] for index in range(n_fft // hop_length)], axis=-1)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann, as `hann_window`
    real, imag = _tflite_rfft(frames * window.astype(np.float32), n_fft)  # (samples, channels, frames, bins) each
    stacked = tf.stack([real, imag], axis=0)
    return tf.transpose(stacked, [1, 3, 4, 2, 0])  # (samples, frames, bins, channels, 2)


_TFLITE_GRAPH = contextvars.ContextVar("tflite_graph", default=False)


_TFLITE_LSTM_LOOP = contextvars.ContextVar("tflite_lstm_loop", default=False)


@contextlib.contextmanager
def tflite_graph(lstm_loop: bool = False):
    """Graphs traced inside this block use only TFLite built-in ops (the inverse FFT built from RFFT2D).

    `lstm_loop`: recurrences as hoisted FULLY_CONNECTED input projections plus one WHILE loop per layer
    (see `models.open_unmix._tflite_lstm_loop`) instead of fused UNIDIRECTIONAL_SEQUENCE_LSTM ops."""
    token = _TFLITE_GRAPH.set(True)
    loop_token = _TFLITE_LSTM_LOOP.set(lstm_loop)
    try:
        yield
    finally:
        _TFLITE_LSTM_LOOP.reset(loop_token)
        _TFLITE_GRAPH.reset(token)


def in_tflite_graph() -> bool:
    """True while tracing inside `tflite_graph()`."""
    return _TFLITE_GRAPH.get()


# --------------------------------------------------------------------------------------------
# XLA: in-process graphs only
# --------------------------------------------------------------------------------------------
_XLA_ALLOWED = contextvars.ContextVar("xla_allowed", default=True)


def xla_allowed() -> bool:
    """Whether graphs traced now may hold XLA-compiled functions (`jit_compile=True`); see `without_xla`."""
    return _XLA_ALLOWED.get()


@contextlib.contextmanager
def without_xla():
    """Trace graphs without any function that must be XLA-compiled: the same ops, run by TensorFlow's executor.

    For graphs that leave this process: TensorFlow Serving, the C API and TF Java run with XLA's CPU JIT off by
    default and fail a function marked `_XlaMustCompile` on its first call. Layers choose their compiled or
    plain function when they are traced (`xla_allowed()`), so a SavedModel written inside this block holds
    none (the export stage's serving graph; `export.xla=true` keeps them)."""
    token = _XLA_ALLOWED.set(False)
    try:
        yield
    finally:
        _XLA_ALLOWED.reset(token)


def compiled_or_plain(function):
    """`function` as two tf.functions, XLA-compiled and plain: calling the result traces the one `xla_allowed()`
    picks."""
    compiled, plain = tf.function(function, jit_compile=True), tf.function(function)

    @tf.autograph.experimental.do_not_convert  # a Python choice at trace time; each tf.function converts itself
    def call(*args, **kwargs):
        return (compiled if xla_allowed() else plain)(*args, **kwargs)

    call.__doc__ = function.__doc__
    return call


# --------------------------------------------------------------------------------------------
# Precision: mixed precision applies to the networks, never to the signal processing
# --------------------------------------------------------------------------------------------
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@contextlib.contextmanager
def precision(policy: str = "float32"):
    """Layers created inside this block take Keras' dtype policy `policy` (`train.precision`): a mixed policy
    keeps float32 variables and computes in float16 / bfloat16; `keras.Model.compile` then adds dynamic loss
    scaling for float16. `Float32Layer`s stay float32 whatever the policy."""
    if policy not in PRECISIONS:
        raise ValueError(f"precision {policy!r}: choose one of {', '.join(PRECISIONS)}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


class Float32Layer(keras.layers.Layer):
    """A layer that computes in float32 under any dtype policy (STFT/ISTFT, spectrogram norms, masks, Wiener
    filtering, signal clipping): its inputs are cast to float32 and its outputs are float32, so the networks
    between such layers are what a mixed policy speeds up, and the losses see float32."""

    def __init__(self, **kwargs):
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = "float32"
        super().__init__(**kwargs)


def in_tflite_lstm_loop() -> bool:
    """True while tracing inside `tflite_graph(lstm_loop=True)`."""
    return _TFLITE_GRAPH.get() and _TFLITE_LSTM_LOOP.get()


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _tflite_rfft(signal, n_fft: int):
    """Real and imaginary parts `(..., n_fft // 2 + 1)` of the real FFT of `signal` `(..., n_fft)`, with ops
    TFLite has: its RFFT2D for a power of two, else the DFT as two matrix products with constant cosine and
    sine tables (TFLite's RFFT2D refuses other lengths when the file is loaded: `IsPowerOfTwo(fft_length)`; e.g.
    M-U-Net's n_fft 1022). The tables are built in float64 and rounded once, so the products are as accurate
    as an FFT in float32 (tests/test_transforms.py)."""
    if _is_power_of_two(n_fft):
        spectrum = tf.signal.rfft(signal)
        return tf.math.real(spectrum), tf.math.imag(spectrum)
    # the index product modulo n_fft keeps the angles small, so the float64 tables are exact to rounding
    angles = 2.0 * np.pi * (np.outer(np.arange(n_fft), np.arange(n_fft // 2 + 1)) % n_fft) / n_fft
    flat = tf.reshape(signal, [-1, n_fft])
    shape = tf.concat([tf.shape(signal)[:-1], [n_fft // 2 + 1]], 0)
    return tuple(tf.reshape(tf.matmul(flat, table.astype(np.float32)), shape)
                 for table in (np.cos(angles), -np.sin(angles)))


def irfft(real, imag, n_fft: int) -> tf.Tensor:
    """Inverse real FFT of a one-sided spectrum `(..., n_fft // 2 + 1)` -> `(..., n_fft)` with one forward rfft.

    Equals `tf.signal.irfft(tf.complex(real, imag))` (imaginary parts of the DC and Nyquist bins are
    ignored) but uses only a forward real FFT as TFLite has it (`_tflite_rfft`). With `a` the even and `b` the odd extension of
    the real and imaginary parts, `rfft(a + b) = c + i d` is the cosine and sine sums:
    `x[n] = (c[n] + d[n]) / N` and `x[N - n] = (c[n] - d[n]) / N`.
    """
    if n_fft % 2:
        raise ValueError(f"n_fft must be even, got {n_fft}")
    inner_re = real[..., 1:-1]
    inner_im = imag[..., 1:-1]
    zero = tf.zeros_like(real[..., :1])
    even = tf.concat([real, tf.reverse(inner_re, axis=[-1])], axis=-1)
    odd = tf.concat([zero, inner_im, zero, -tf.reverse(inner_im, axis=[-1])], axis=-1)
    cos_sum, sin_sum = _tflite_rfft(even + odd, n_fft)
    head = cos_sum + sin_sum  # n = 0 .. N/2
    tail = tf.reverse((cos_sum - sin_sum)[..., 1:-1], axis=[-1])  # n = N/2 + 1 .. N - 1
    return tf.concat([head, tail], axis=-1) / float(n_fft)


def istft(spectrogram, n_fft: int, hop_length: int, length: Union[int, tf.Tensor],
          center: bool = True) -> tf.Tensor:
    """`(nb_samples, nb_frames, nb_bins, *extra, 2)` -> waveform `(nb_samples, length, *extra)`.

    `extra` is usually `(nb_channels,)` or `(nb_channels, nb_sources)`. Weighted overlap-add with the
    analysis window, divided by the overlap-added squared window (torch.istft's normalisation), so
    `istft(stft(x)) == x` up to float32 rounding wherever the window sum is non-zero.
    """
    spectrogram = tf.convert_to_tensor(spectrogram, tf.float32)
    rank = spectrogram.shape.rank
    if rank is None or rank < 4:
        raise ValueError(f"istft needs (nb_samples, nb_frames, nb_bins, ..., 2), got shape {spectrogram.shape}")
    extra_axes = list(range(3, rank - 1))
    # (..., 2) -> real, imag with frames and bins last: (nb_samples, *extra, nb_frames, nb_bins)
    perm = [0] + extra_axes + [1, 2]
    if _TFLITE_GRAPH.get() and spectrogram.shape[1] is not None and n_fft % hop_length == 0:
        return _istft_tflite(spectrogram, n_fft, hop_length, length, center)
    if _TFLITE_GRAPH.get():
        frames = irfft(tf.transpose(spectrogram[..., 0], perm), tf.transpose(spectrogram[..., 1], perm), n_fft)
        signal = _overlap_add(frames * hann_window(n_fft), n_fft, hop_length, length, center)
    else:  # one complex tensor transposed once, TensorFlow's inverse FFT
        signal = inverse_stft(tf.transpose(tf.complex(spectrogram[..., 0], spectrogram[..., 1]), perm), n_fft,
                              hop_length, length, center)
    # (nb_samples, *extra, length) -> (nb_samples, length, *extra)
    return tf.transpose(signal, [0, rank - 3] + list(range(1, rank - 3)))


def inverse_stft(spectrum, n_fft: int, hop_length: int, length: Union[int, tf.Tensor],
                 center: bool = True) -> tf.Tensor:
    """Complex one-sided frames `(..., nb_frames, nb_bins)` -> waveform `(..., length)`: `istft` in the
    frames-last layout of `tf.signal` (TensorFlow's inverse FFT: not for graphs the TFLite converter reads)."""
    return _overlap_add(tf.signal.irfft(spectrum, fft_length=[n_fft]) * hann_window(n_fft), n_fft, hop_length,
                        length, center)


def _overlap_add(frames, n_fft: int, hop_length: int, length: Union[int, tf.Tensor], center: bool) -> tf.Tensor:
    """Windowed frames `(..., nb_frames, n_fft)` -> waveform `(..., length)`: their overlap-add divided by the
    overlap-added squared window, without the centre padding.

    With `hop_length` dividing `n_fft` the overlap-add is `n_fft // hop_length` shifted adds of hop-sized
    blocks, which XLA fuses with the normalisation into one pass over the frames (`tf.signal.overlap_and_add`
    is several reshapes and pads, each a pass); otherwise that op is used.
    """
    window = hann_window(n_fft)
    shape = tf.shape(frames)
    nb_frames = shape[-2]
    lead = [[0, 0]] * (len(frames.shape) - 2)
    tiny = 1e-11
    if n_fft % hop_length == 0:
        overlap = n_fft // hop_length
        blocks = tf.reshape(frames, tf.concat([shape[:-1], [overlap, hop_length]], 0))
        squares = tf.reshape(window * window, [overlap, hop_length])
        # frame t's block k lands on output block t + k: (..., nb_frames + overlap - 1, hop_length)
        signal = tf.add_n([tf.pad(blocks[..., k, :], lead + [[k, overlap - 1 - k], [0, 0]]) for k in range(overlap)])
        window_sum = tf.add_n([tf.pad(tf.tile(squares[k:k + 1], [nb_frames, 1]), [[k, overlap - 1 - k], [0, 0]])
                               for k in range(overlap)])
        signal = tf.where(window_sum > tiny, signal / tf.maximum(window_sum, tiny), signal)
        signal = tf.reshape(signal, tf.concat([shape[:-2], [-1]], 0))
    else:
        signal = tf.signal.overlap_and_add(frames, hop_length)
        window_sum = tf.signal.overlap_and_add(tf.tile((window * window)[None, :], [nb_frames, 1]), hop_length)
        signal = tf.where(window_sum > tiny, signal / tf.maximum(window_sum, tiny), signal)
    start = n_fft // 2 if center else 0
    missing = tf.maximum(0, start + length - tf.shape(signal)[-1])
    signal = tf.pad(signal, lead + [[0, missing]])[..., start:start + length]
    if isinstance(length, int):
        signal = tf.ensure_shape(signal, signal.shape[:-1].concatenate([length]))
    return signal


def _istft_tflite(spectrogram, n_fft: int, hop_length: int, length: Union[int, tf.Tensor],
                  center: bool = True) -> tf.Tensor:
    """`istft` for graphs traced inside `tflite_graph()` with a static number of frames: same numbers, fewer
    and cheaper ops (TFLite runs each op on its own, and data movement is what costs there).

    - One transpose to `(nb_samples, *extra, 2, nb_frames, nb_bins)`, so the real and imaginary parts are
      two contiguous halves (slicing them out of a last axis of 2 took ~8 ms each at UMX-HQ's 3 s chunk).
    - The input of the forward RFFT2D that inverts the spectrum (see `irfft`) is one concatenation of
      `re + im` (bins 0 .. N/2) and the reversed `re - im` (bins N/2 - 1 .. 1), the imaginary parts of the
      DC and Nyquist bins zeroed by a constant mask; the frame is `c + d` then the reversed `c - d`.
    - The synthesis window and 1/N are one constant; the overlap-add sums `n_fft / hop_length` shifted
      hop-sized blocks, computed only for the output samples kept; the division by the overlap-added squared
      window is a multiplication by a constant.
    """
    rank = spectrogram.shape.rank
    extra_axes = list(range(3, rank - 1))
    nb_frames, nb_bins = spectrogram.shape[1], n_fft // 2 + 1
    nb_blocks = n_fft // hop_length  # hop-sized blocks per frame
    parts = tf.transpose(spectrogram, [0] + extra_axes + [rank - 1, 1, 2])  # (B, *extra, 2, F, K)
    real, imag = tf.split(parts, 2, axis=-3)  # (B, *extra, 1, F, K)
    imag = imag * np.pad(np.ones(nb_bins - 2, np.float32), 1)  # DC and Nyquist: real parts only
    even_plus_odd = real + imag  # samples 0 .. N/2 of the RFFT input
    mirrored = tf.reverse((real - imag)[..., 1:-1], axis=[-1])  # samples N/2 + 1 .. N - 1
    cos_sum, sin_sum = _tflite_rfft(tf.concat([even_plus_odd, mirrored], axis=-1), n_fft)
    frames = tf.concat([cos_sum + sin_sum, tf.reverse((cos_sum - sin_sum)[..., 1:-1], axis=[-1])], axis=-1)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann, as `hann_window`
    frames = frames * (window / n_fft).astype(np.float32)
    frames = tf.reshape(frames, [-1, nb_frames, n_fft])  # (B * prod(extra), F, N): TFLite pads up to rank 5

    # overlap-add of the output blocks [first, first + nb_out): block b = sum_i frames[b - i, block i]
    start = n_fft // 2 if center else 0
    first = start // hop_length
    offset = start - first * hop_length
    nb_out = -(-(offset + length) // hop_length) if isinstance(length, int) else nb_frames + nb_blocks - 1 - first
    blocks = tf.split(frames, nb_blocks, axis=-1)  # nb_blocks x (B, *extra, 1, F, H)
    signal = None
    for index, block in enumerate(blocks):
        lo, hi = first - index, first - index + nb_out  # frames lo .. hi - 1 feed these output blocks
        piece = block[..., max(lo, 0):min(hi, nb_frames), :]
        piece = tf.pad(piece, [[0, 0], [max(-lo, 0), max(hi - nb_frames, 0)], [0, 0]])
        signal = piece if signal is None else signal + piece  # (B * prod(extra), nb_out, H)
    # torch.istft's normalisation by the overlap-added squared window, as a constant
    window_sum = np.zeros((nb_frames + nb_blocks - 1) * hop_length, np.float64)
    for frame in range(nb_frames):
        window_sum[frame * hop_length:frame * hop_length + n_fft] += window ** 2
    window_sum = window_sum.astype(np.float32)
    tiny = 1e-11
    norm = np.where(window_sum > tiny, 1.0 / np.maximum(window_sum, tiny), 1.0).astype(np.float32)
    norm = np.pad(norm, [0, max(0, (first + nb_out) * hop_length - len(norm))])
    norm = norm[first * hop_length:(first + nb_out) * hop_length].reshape(nb_out, hop_length)
    signal = tf.reshape(signal * norm, tf.concat([tf.shape(parts)[:-3], [nb_out * hop_length]], 0))
    signal = signal[..., offset:offset + length]
    if isinstance(length, int):
        signal = tf.ensure_shape(signal, signal.shape[:-1].concatenate([length]))
    # (nb_samples, *extra, length) -> (nb_samples, length, *extra)
    return tf.transpose(signal, [0, rank - 3] + list(range(1, rank - 3)))


def complex_norm(spectrogram, power: float = 1.0, mono: bool = False) -> tf.Tensor:
    """`(..., nb_channels, 2)` -> `|X| ** power`, `(..., nb_channels)`; `mono` averages over channels (keeping the axis)."""
    spectrogram = tf.convert_to_tensor(spectrogram, tf.float32)
    energy = tf.reduce_sum(tf.square(spectrogram), axis=-1)
    if power == 1.0:
        magnitude = tf.sqrt(energy)
    elif power == 2.0:
        magnitude = energy
    else:
        magnitude = tf.pow(energy, power / 2.0)
    if mono:
        magnitude = tf.reduce_mean(magnitude, axis=-1, keepdims=True)
    return magnitude


# --------------------------------------------------------------------------------------------- layers


@keras.saving.register_keras_serializable(package="musicsep")
class STFT(Float32Layer):
    """Waveform `(nb_samples, nb_timesteps, nb_channels)` -> `(nb_samples, nb_frames, nb_bins, nb_channels, 2)`.

    `jit_compile`: one XLA function (in-process graphs; TFLite and `layers.without_xla` graphs get plain ops): the
    same numbers, measured 1.8x less CPU for 30 s stereo at n_fft 4096 (framing, window, stacking, transpose fused).
    """

    def __init__(self, n_fft: int = 4096, hop_length: int = 1024, center: bool = True, jit_compile: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.center = center
        self.jit_compile = jit_compile
        self._compiled = tf.function(stft, jit_compile=True) if jit_compile else None

    def call(self, waveform):
        compiled = self._compiled is not None and xla_allowed()
        return (self._compiled if compiled else stft)(waveform, self.n_fft, self.hop_length, self.center)

    def compute_output_shape(self, input_shape):
        nb_samples, nb_timesteps, nb_channels = input_shape
        nb_frames = None
        if nb_timesteps is not None:
            padded = nb_timesteps + (2 * (self.n_fft // 2) if self.center else 0)
            nb_frames = 1 + (padded - self.n_fft) // self.hop_length
        return (nb_samples, nb_frames, self.n_fft // 2 + 1, nb_channels, 2)

    def get_config(self):
        return {**super().get_config(), "n_fft": self.n_fft, "hop_length": self.hop_length, "center": self.center,
                "jit_compile": self.jit_compile}


@keras.saving.register_keras_serializable(package="musicsep")
class ISTFT(Float32Layer):
    """`(nb_samples, nb_frames, nb_bins, *extra, 2)` -> `(nb_samples, nb_timesteps, *extra)`.

    The output length is `length` (an int) or, when `reference` (a waveform
    `(nb_samples, nb_timesteps, ...)`) is given, its `nb_timesteps`, static when known.
    """

    def __init__(self, n_fft: int = 4096, hop_length: int = 1024, center: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.center = center

    def call(self, spectrogram, reference=None, length=None):
        if reference is not None:
            length = reference.shape[1]
            if length is None:
                length = tf.shape(reference)[1]
        if length is None:
            raise ValueError("ISTFT needs `length` or a `reference` waveform")
        return istft(spectrogram, self.n_fft, self.hop_length, length, self.center)

    def get_config(self):
        return {**super().get_config(), "n_fft": self.n_fft, "hop_length": self.hop_length, "center": self.center}


@keras.saving.register_keras_serializable(package="musicsep")
class ComplexNorm(Float32Layer):
    """`(..., nb_channels, 2)` -> magnitude `(..., nb_channels)` (`|X| ** power`, optionally channel-averaged)."""

    def __init__(self, power: float = 1.0, mono: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.power = power
        self.mono = mono

    def call(self, spectrogram):
        return complex_norm(spectrogram, self.power, self.mono)

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape[:-1])
        return shape[:-1] + (1,) if self.mono else shape

    def get_config(self):
        return {**super().get_config(), "power": self.power, "mono": self.mono}
