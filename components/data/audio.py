"""Reading and validating the audio of one track.

Every check fails with one line, `<path>: <problem>; <fix>`, raised as `StageError`, so a bad file in a
data set of hundreds is found by name. Arrays are float32 `(nb_timesteps, nb_channels)`.
"""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import numpy as np

from configs.errors import StageError

log = logging.getLogger("pipeline")

AUDIO_SUFFIXES = (".wav", ".flac")
SILENCE_RMS = 1e-5  # -100 dBFS: quieter than 16-bit dither, i.e. nothing audible in the stem


def read_audio(path, *, sample_rate: int, nb_channels: int) -> np.ndarray:
    """A wav/flac file as float32 `(nb_timesteps, nb_channels)` at `sample_rate`."""
    import soundfile

    path = Path(path)
    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, TypeError... by format
        reason = " ".join(str(error).split()) or type(error).__name__
        raise StageError(f"{path}: unreadable audio ({reason}); replace the file with a valid wav/flac "
                         f"or set data.skip_bad_tracks=true") from None
    return conform(audio, rate, path, sample_rate=sample_rate, nb_channels=nb_channels)


def conform(audio: np.ndarray, rate: int, path, *, sample_rate: int, nb_channels: int) -> np.ndarray:
    """Check decoded audio `(nb_timesteps, nb_channels_in)` and bring it to the configured rate and channels."""
    audio = np.asarray(audio)
    if audio.ndim == 1:
        audio = audio[:, None]
    if audio.ndim != 2 or audio.shape[0] == 0:
        raise StageError(f"{path}: no audio samples (shape {audio.shape}); replace the file or remove the track")
    if not np.all(np.isfinite(audio)):
        bad = int(np.count_nonzero(~np.isfinite(audio)))
        raise StageError(f"{path}: {bad} NaN/Inf samples; re-export the file, or set data.skip_bad_tracks=true")
    channels = audio.shape[1]
    if channels > 2:
        raise StageError(f"{path}: {channels} channels, expected mono or stereo; downmix it to "
                         f"{nb_channels} channel(s) (e.g. ffmpeg -ac {nb_channels})")
    if channels != nb_channels:
        # mono -> stereo duplicates; stereo -> mono averages (keeps the level of a centred source)
        audio = np.repeat(audio, nb_channels, axis=1) if channels == 1 else audio.mean(axis=1, keepdims=True)
    audio = audio.astype(np.float32, copy=False)
    if rate != sample_rate:
        audio = resample(audio, rate, sample_rate)
    return np.ascontiguousarray(audio)


def resample(audio: np.ndarray, rate: int, sample_rate: int, block_samples: int = 1 << 20) -> np.ndarray:
    """Band-limited polyphase resampling (Kaiser-windowed FIR) along the time axis: scipy's
    `resample_poly(audio, up, down, window=("kaiser", 5.0))` as float32, computed `block_samples` output
    samples at a time so that a 10-minute song needs one output array, not several full-length temporaries.

    Each block filters the input samples it depends on, starting at a multiple of `down` (the filter's
    phase) and zero beyond the ends, which is what the whole-signal filter sees: the same numbers."""
    from scipy.signal import firwin, upfirdn

    ratio = Fraction(int(sample_rate), int(rate))
    up, down = ratio.numerator, ratio.denominator
    audio = np.asarray(audio)
    if up == down == 1:
        return audio.astype(np.float32)
    dtype = audio.dtype if np.issubdtype(audio.dtype, np.floating) else np.float64
    n_in = audio.shape[0]
    n_out = -(-n_in * up // down)
    # resample_poly's filter: firwin of 2 * half_len + 1 taps in the input's dtype, times up, zero-padded
    half_len = 10 * max(up, down)
    taps = firwin(2 * half_len + 1, 1.0 / max(up, down), window=("kaiser", 5.0)).astype(dtype) * up
    pre_pad = down - half_len % down
    pre_remove = (half_len + pre_pad) // down
    post_pad = 0
    while ((n_in - 1) * up + len(taps) + pre_pad + post_pad - 1) // down + 1 < n_out + pre_remove:
        post_pad += 1
    taps = np.concatenate([np.zeros(pre_pad, dtype), taps, np.zeros(post_pad, dtype)])
    out = np.empty((n_out,) + audio.shape[1:], np.float32)
    for first in range(0, n_out, block_samples):
        last = min(first + block_samples, n_out)  # outputs [first, last) are the filter's [k0, k1)
        k0, k1 = first + pre_remove, last + pre_remove
        start = max(0, -(-(k0 * down - len(taps) + 1) // up)) // down * down
        stop = min(n_in, (k1 - 1) * down // up + 1)
        filtered = upfirdn(taps, audio[start:stop], up, down, axis=0)
        offset = start * up // down
        out[first:last] = filtered[k0 - offset:k1 - offset]
    return out


class StreamingResampler:
    """`resample` one block at a time, for a stream whose end is not known: every block in gives the output
    samples that the blocks so far determine, `flush()` the rest at the end, and the concatenation equals
    `resample` of the whole signal (the same taps, the same per-sample sums).

    An output sample needs the input up to `half_len / up` samples after its own time (the Kaiser filter is
    symmetric, half_len = 10 max(up, down)), so the outputs trail the input by `delay_in_samples` input samples:
    10 when upsampling, 10 output samples' worth when downsampling (44.1 kHz -> 8 kHz: 56 samples, 1.3 ms).
    Only the input a future output still needs is kept."""

    def __init__(self, rate: int, sample_rate: int, nb_channels: int):
        from scipy.signal import firwin

        ratio = Fraction(int(sample_rate), int(rate))
        self.up, self.down = ratio.numerator, ratio.denominator
        self.nb_channels = nb_channels
        self._buffer = np.zeros((0, nb_channels), np.float32)  # input samples [_base, received)
        self._base = self.received = self.emitted = 0
        if self.identity:  # the same rate: blocks pass through
            self.delay_in_samples = 0
            return
        half_len = 10 * max(self.up, self.down)
        taps = firwin(2 * half_len + 1, 1.0 / max(self.up, self.down), window=("kaiser", 5.0)).astype(np.float32)
        pre_pad = self.down - half_len % self.down
        self.pre_remove = (half_len + pre_pad) // self.down
        self.taps = np.concatenate([np.zeros(pre_pad, np.float32), taps * self.up])  # as `resample`, float32 input
        self.delay_in_samples = -(-half_len // self.up)

    @property
    def identity(self) -> bool:
        return self.up == self.down == 1

    def __call__(self, block: np.ndarray) -> np.ndarray:
        """The output samples `block` completes, float32 `(n, nb_channels)` (n may be 0)."""
        block = np.asarray(block, np.float32).reshape(-1, self.nb_channels)
        if self.identity:
            self.received += len(block)
            self.emitted += len(block)
            return block
        self._buffer = np.concatenate([self._buffer, block])
        self.received += len(block)
        # output j needs the input up to (j + pre_remove) * down // up
        ready = max(self.emitted, (self.received * self.up - 1) // self.down - self.pre_remove + 1)
        return self._outputs(ready)

    def flush(self) -> np.ndarray:
        """The last output samples, the input being zero after its end: `resample`'s length in total."""
        total = -(-self.received * self.up // self.down)
        if self.identity or total <= self.emitted:
            return np.zeros((0, self.nb_channels), np.float32)
        tail = len(self.taps) // self.up + 2  # zeros after the end, as many as the last output's filter reaches
        self._buffer = np.concatenate([self._buffer, np.zeros((tail, self.nb_channels), np.float32)])
        return self._outputs(total)

    def _outputs(self, last: int) -> np.ndarray:
        from scipy.signal import upfirdn

        first = self.emitted
        if last <= first:
            return np.zeros((0, self.nb_channels), np.float32)
        k0, k1 = first + self.pre_remove, last + self.pre_remove
        start = max(self._base, max(0, -(-(k0 * self.down - len(self.taps) + 1) // self.up)) // self.down * self.down)
        stop = (k1 - 1) * self.down // self.up + 1
        filtered = upfirdn(self.taps, self._buffer[start - self._base:stop - self._base], self.up, self.down, axis=0)
        offset = start * self.up // self.down
        out = filtered[k0 - offset:k1 - offset].astype(np.float32)
        self.emitted = last
        # keep the input from where the next output's filter starts (a multiple of `down`, as `resample` starts)
        keep = max(0, -(-((last + self.pre_remove) * self.down - len(self.taps) + 1) // self.up)) // self.down * self.down
        if keep > self._base:
            self._buffer = self._buffer[keep - self._base:]
            self._base = keep
        return out


def check_track(name: str, stems: Mapping[str, np.ndarray], paths: Mapping[str, str]) -> Tuple[Dict, List[str]]:
    """Equal stem lengths within a track; returns (stems, names of silent stems)."""
    lengths = {target: int(audio.shape[0]) for target, audio in stems.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{target}={length}" for target, length in lengths.items())
        where = Path(next(iter(paths.values()))).parent if paths else name
        raise StageError(f"{where}: stems of track '{name}' differ in length (samples: {described}); "
                         f"trim or pad them to one length")
    silent = [target for target, audio in stems.items() if rms(audio) < SILENCE_RMS]
    for target in silent:
        log.warning("%s: stem '%s' of track '%s' is silent (RMS < %.0e); kept, and listed in the manifest",
                    paths.get(target, name), target, name, SILENCE_RMS)
    return dict(stems), silent


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
