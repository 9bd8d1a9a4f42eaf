"""Offline pitch and tempo changes of training tracks (DTTNet's augmentation), in numpy/scipy.

DTTNet-Pytorch (src/utils/data_augmentation.py) writes pitch/tempo-shifted copies of every training track
with SoundTouch's `soundstretch -pitch=P -tempo=T` (a binary, WSOLA). Here, without outside binaries:

    tempo T % and pitch P semitones = a phase-vocoder time stretch by rate (1 + T/100) / 2^(P/12)
    followed by a polyphase resampling that plays the result 2^(P/12) times faster:
    duration / (1 + T/100), frequencies x 2^(P/12).

The phase vocoder (Flanagan & Golden 1966; the form of librosa's `phase_vocoder`): Hann-windowed STFT
(n_fft 2048, hop 512, centred), magnitudes interpolated between neighbouring frames at the new time steps,
phases accumulated from the measured per-bin phase advance, then weighted overlap-add. Every stem of a track
is shifted with the same parameters, so the stems stay aligned; the mixture is their sum, as always.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np


def _stft(signal: np.ndarray, n_fft: int, hop: int, window: np.ndarray) -> np.ndarray:
    """1-D signal -> `(nb_frames, n_fft // 2 + 1)` complex, frames centred (n_fft // 2 zeros each side)."""
    padded = np.pad(signal, n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    return np.fft.rfft(frames * window, axis=-1)


def _istft(spectrogram: np.ndarray, n_fft: int, hop: int, window: np.ndarray, length: int) -> np.ndarray:
    """Weighted overlap-add inverse of `_stft`, `length` samples."""
    frames = np.fft.irfft(spectrogram, n=n_fft, axis=-1) * window
    total = n_fft + hop * (len(frames) - 1)
    out = np.zeros(total)
    norm = np.zeros(total)
    for index, frame in enumerate(frames):
        out[index * hop:index * hop + n_fft] += frame
        norm[index * hop:index * hop + n_fft] += window ** 2
    out = out / np.where(norm > 1e-8, norm, 1.0)
    out = out[n_fft // 2:]
    if len(out) < length:
        out = np.pad(out, (0, length - len(out)))
    return out[:length]


def time_stretch(audio: np.ndarray, rate: float, n_fft: int = 2048, hop: int = 512) -> np.ndarray:
    """`(nb_timesteps, nb_channels)` -> `(round(nb_timesteps / rate), nb_channels)`, same pitch; rate > 1 is faster."""
    audio = np.asarray(audio, dtype=np.float64)
    length = int(round(audio.shape[0] / rate))
    if rate == 1.0:
        return audio.astype(np.float32)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    advance = 2 * np.pi * hop * np.arange(n_fft // 2 + 1) / n_fft  # expected phase advance per hop
    out = np.zeros((length, audio.shape[1]))
    for channel in range(audio.shape[1]):
        spectrogram = _stft(audio[:, channel], n_fft, hop, window)
        spectrogram = np.concatenate([spectrogram, np.zeros_like(spectrogram[:1])])  # the last step's neighbour
        steps = np.arange(0, len(spectrogram) - 1, rate)
        lower = np.floor(steps).astype(int)
        fraction = (steps - lower)[:, None]
        magnitude = (1 - fraction) * np.abs(spectrogram[lower]) + fraction * np.abs(spectrogram[lower + 1])
        measured = np.angle(spectrogram[lower + 1]) - np.angle(spectrogram[lower]) - advance
        measured -= 2 * np.pi * np.round(measured / (2 * np.pi))
        phase = np.angle(spectrogram[0]) + np.concatenate(
            [np.zeros((1, len(advance))), np.cumsum(advance + measured, axis=0)[:-1]])
        out[:, channel] = _istft(magnitude * np.exp(1j * phase), n_fft, hop, window, length)
    return out.astype(np.float32)


def resample_faster(audio: np.ndarray, factor: float) -> np.ndarray:
    """Play `factor` times faster (higher pitch, shorter) by polyphase resampling: about len / factor samples."""
    from scipy.signal import resample_poly

    if factor == 1.0:
        return np.asarray(audio, dtype=np.float32)
    ratio = Fraction(1.0 / factor).limit_denominator(1000)
    return resample_poly(np.asarray(audio, dtype=np.float64), ratio.numerator, ratio.denominator,
                         axis=0).astype(np.float32)


def shift(audio: np.ndarray, semitones: float, tempo_percent: float) -> np.ndarray:
    """`(nb_timesteps, nb_channels)` with pitch x 2^(semitones/12) and tempo x (1 + tempo_percent/100)
    (soundstretch's `-pitch` and `-tempo`): about nb_timesteps / (1 + tempo_percent/100) samples."""
    factor = 2.0 ** (semitones / 12.0)
    rate = (1.0 + tempo_percent / 100.0) / factor
    stretched = time_stretch(audio, rate)
    shifted = resample_faster(stretched, factor)
    length = int(round(np.shape(audio)[0] / (1.0 + tempo_percent / 100.0)))
    if len(shifted) < length:
        shifted = np.pad(shifted, [(0, length - len(shifted)), (0, 0)])
    return shifted[:length]


def variants(pitch_shifts, tempo_changes):
    """[(semitones, percent)] of the augmented copies: every pair but (0, 0), as DTTNet's loops."""
    return [(p, t) for p in (pitch_shifts or [0]) for t in (tempo_changes or [0]) if (p, t) != (0, 0)]
