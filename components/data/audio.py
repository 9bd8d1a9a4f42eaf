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
    audio = convert_channels(audio, nb_channels).astype(np.float32, copy=False)
    if rate != sample_rate:
        audio = resample(audio, rate, sample_rate)
    return np.ascontiguousarray(audio)


def convert_channels(audio: np.ndarray, nb_channels: int) -> np.ndarray:
    """`(nb_timesteps, 1 or 2)` as `nb_channels` channels: mono -> stereo duplicates; stereo -> mono averages
    (keeps the level of a centred source)."""
    if audio.shape[1] == nb_channels:
        return audio
    return np.repeat(audio, nb_channels, axis=1) if audio.shape[1] == 1 else audio.mean(axis=1, keepdims=True)


def resample_filter(rate: int, sample_rate: int, dtype=np.float32) -> Tuple[int, int, int, np.ndarray]:
    """(up, down, half_len, taps) of `resample`: scipy resample_poly's Kaiser FIR, `2 * half_len + 1` taps
    (`half_len = 10 * max(up, down)`) in `dtype`, times `up`."""
    from scipy.signal import firwin

    ratio = Fraction(int(sample_rate), int(rate))
    up, down = ratio.numerator, ratio.denominator
    half_len = 10 * max(up, down)
    taps = firwin(2 * half_len + 1, 1.0 / max(up, down), window=("kaiser", 5.0)).astype(dtype) * up
    return up, down, half_len, taps


class StreamingResampler:
    """`resample` (and `convert_channels`) block by block: the input history the filter still needs is carried
    between calls, so the concatenated outputs of `process(...)` and `flush()` are `resample` of the
    concatenated inputs, whatever the block sizes.

    Output sample `m` is `sum_i x[i] * taps[m * down + half_len - i * up]`: it is produced once input sample
    `(m * down + half_len) // up` has arrived, so the output lags by `latency` input samples (`ceil(half_len /
    up)`, 10 samples at the lower of the two rates) on top of the rate change. Blocks are float32
    `(nb_timesteps, nb_channels_in)`; outputs float32 `(n, nb_channels)`."""

    def __init__(self, rate: int, sample_rate: int, nb_channels: int):
        self.rate, self.sample_rate, self.nb_channels = int(rate), int(sample_rate), int(nb_channels)
        ratio = Fraction(self.sample_rate, self.rate)
        if ratio == 1:  # the same rate: blocks pass through (channels converted), no delay
            self.up = self.down = 1
            self.half_len, taps = 0, np.ones(1, np.float32)
        else:
            self.up, self.down, self.half_len, taps = resample_filter(rate, sample_rate)
        # zeros in front make the first output an upfirdn phase of an input start that is a multiple of `down`
        # (as `resample` does); zeros behind keep upfirdn's output long enough for the last wanted sample
        self.pre_pad = self.down - self.half_len % self.down
        self.pre_remove = (self.half_len + self.pre_pad) // self.down
        self.taps = np.concatenate([np.zeros(self.pre_pad, np.float32), taps, np.zeros(self.up + self.down, np.float32)])
        self.core = self.pre_pad + len(taps)  # padded taps up to the last nonzero one
        self.latency = -(-self.half_len // self.up) if (self.up, self.down) != (1, 1) else 0
        self.buffer = np.zeros((0, nb_channels), np.float32)
        self.buffer_start = 0  # input index of buffer[0]
        self.received = 0  # input samples so far
        self.produced = 0  # output samples so far
        self.finished = False

    def process(self, block: np.ndarray) -> np.ndarray:
        """The output samples that the input so far determines."""
        if self.finished:
            raise RuntimeError("StreamingResampler: process() after flush()")
        block = convert_channels(np.asarray(block, np.float32).reshape(len(block), -1), self.nb_channels)
        self.received += len(block)
        if (self.up, self.down) == (1, 1):
            self.produced += len(block)
            return block
        self.buffer = np.concatenate([self.buffer, block]) if len(self.buffer) else block
        # output m is ready when m * down + half_len <= received * up - 1
        ready = max(0, (self.received * self.up - 1 - self.half_len) // self.down + 1)
        return self._emit(ready)

    def flush(self) -> np.ndarray:
        """The remaining output samples, the input ending here (zeros beyond it): `resample`'s length,
        `ceil(received * up / down)` samples in all."""
        self.finished = True
        total = -(-self.received * self.up // self.down)
        if (self.up, self.down) == (1, 1):
            return np.zeros((0, self.nb_channels), np.float32)
        needed = ((total - 1) * self.down + self.half_len) // self.up + 1 - self.buffer_start
        if needed > len(self.buffer):
            self.buffer = np.concatenate([self.buffer, np.zeros((needed - len(self.buffer), self.nb_channels),
                                                                np.float32)])
        return self._emit(total)

    def _emit(self, ready: int) -> np.ndarray:
        from scipy.signal import upfirdn

        first, last = self.produced, ready
        if last <= first:
            return np.zeros((0, self.nb_channels), np.float32)
        k0, k1 = first + self.pre_remove, last + self.pre_remove  # upfirdn phases of outputs [first, last)
        start = max(0, -(-(k0 * self.down - self.core + 1) // self.up)) // self.down * self.down
        stop = ((last - 1) * self.down + self.half_len) // self.up + 1
        assert start >= self.buffer_start and stop - self.buffer_start <= len(self.buffer)
        segment = self.buffer[start - self.buffer_start:stop - self.buffer_start]
        filtered = upfirdn(self.taps, segment, self.up, self.down, axis=0)
        offset = start * self.up // self.down
        out = filtered[k0 - offset:k1 - offset]
        assert len(out) == last - first
        self.produced = last
        # keep the input from where the next output's filter starts
        keep = max(0, -(-((last + self.pre_remove) * self.down - self.core + 1) // self.up)) // self.down * self.down
        if keep > self.buffer_start:
            self.buffer = self.buffer[keep - self.buffer_start:]
            self.buffer_start = keep
        return out.astype(np.float32, copy=False)


def resample(audio: np.ndarray, rate: int, sample_rate: int, block_samples: int = 1 << 20) -> np.ndarray:
    """Band-limited polyphase resampling (Kaiser-windowed FIR) along the time axis: scipy's
    `resample_poly(audio, up, down, window=("kaiser", 5.0))` as float32, computed `block_samples` output
    samples at a time so that a 10-minute song needs one output array, not several full-length temporaries.

    Each block filters the input samples it depends on, starting at a multiple of `down` (the filter's
    phase) and zero beyond the ends, which is what the whole-signal filter sees: the same numbers."""
    from scipy.signal import upfirdn

    audio = np.asarray(audio)
    if Fraction(int(sample_rate), int(rate)) == 1:
        return audio.astype(np.float32)
    dtype = audio.dtype if np.issubdtype(audio.dtype, np.floating) else np.float64
    n_in = audio.shape[0]
    # resample_poly's filter: firwin of 2 * half_len + 1 taps in the input's dtype, times up, zero-padded
    up, down, half_len, taps = resample_filter(rate, sample_rate, dtype)
    n_out = -(-n_in * up // down)
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
