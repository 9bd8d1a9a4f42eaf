"""Separate a full-length track in fixed-size chunks: the one chunking machinery of the project.

Evaluation, export's `separate` command and any model's own inference all go through
`separate_array`, so a track of any length is separated with memory bounded by the chunk size and
every caller gets identical numbers. Chunks of `chunk_samples` overlap by `overlap` of a chunk and are
recombined by overlap-add with complementary raised-cosine crossfades, normalised so that the weights
sum to exactly one at every sample: an identity separator gives back its input.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np


def chunk_layout(nb_timesteps: int, chunk_samples: int, overlap: float) -> tuple[int, int, int]:
    """(overlap_samples, hop_samples, nb_chunks) covering `nb_timesteps` with chunks of `chunk_samples`.

    Chunk k covers `[k * hop, k * hop + chunk_samples)`; the last one ends at or after the track end
    (the remainder is zero padding).
    """
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples must be at least 1, got {chunk_samples}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be a fraction in [0, 1), got {overlap}")
    overlap_samples = min(int(round(overlap * chunk_samples)), chunk_samples - 1)
    hop_samples = chunk_samples - overlap_samples
    nb_chunks = max(1, math.ceil((nb_timesteps - overlap_samples) / hop_samples))
    return overlap_samples, hop_samples, nb_chunks


def _raw_window(index: int, nb_chunks: int, chunk_samples: int, overlap_samples: int) -> np.ndarray:
    """Crossfade window of one chunk `(chunk_samples,)`: sin² fade-in, cos² fade-out, flat at the track ends."""
    window = np.ones(chunk_samples, dtype=np.float64)
    if overlap_samples == 0:
        return window
    # sin² + cos² = 1: the fade-out of a chunk and the fade-in of the next one are complementary
    phase = (np.arange(overlap_samples) + 0.5) / overlap_samples * (np.pi / 2)
    if index > 0:
        window[:overlap_samples] = np.sin(phase) ** 2
    if index < nb_chunks - 1:
        window[-overlap_samples:] *= np.cos(phase) ** 2
    return window


def chunk_weights(index: int, nb_chunks: int, chunk_samples: int, overlap_samples: int) -> np.ndarray:
    """Overlap-add weights of chunk `index`, `(chunk_samples,)`, normalised by every chunk covering a sample.

    With overlap <= 0.5 the crossfades already sum to one; the normalisation makes it exact for any
    overlap (several chunks per sample) without a track-length weight buffer. Read-only (cached: every chunk
    away from the track's ends has the same weights)."""
    reach = math.ceil(chunk_samples / max(1, chunk_samples - overlap_samples))
    # a chunk whose neighbours within reach are all inner chunks has the inner chunks' weights
    inner = reach < index < nb_chunks - 1 - reach
    return _chunk_weights(reach + 1 if inner else index, nb_chunks if not inner else 2 * reach + 3, chunk_samples,
                          overlap_samples)


@functools.lru_cache(maxsize=32)
def _chunk_weights(index: int, nb_chunks: int, chunk_samples: int, overlap_samples: int) -> np.ndarray:
    hop = chunk_samples - overlap_samples
    start = index * hop
    own = _raw_window(index, nb_chunks, chunk_samples, overlap_samples)
    total = own.copy()
    reach = math.ceil(chunk_samples / hop)
    for other in range(max(0, index - reach), min(nb_chunks, index + reach + 1)):
        if other == index:
            continue
        shift = other * hop - start
        lo, hi = max(0, shift), min(chunk_samples, shift + chunk_samples)
        if lo < hi:
            total[lo:hi] += _raw_window(other, nb_chunks, chunk_samples, overlap_samples)[lo - shift:hi - shift]
    weights = own / total
    weights.flags.writeable = False  # shared by every caller (cached)
    return weights


def separate_array(separate_fn: Callable[[np.ndarray], Mapping[str, object]], mixture: np.ndarray,
                   **settings) -> Dict[str, np.ndarray]:
    """Separate a full track chunk by chunk; returns {target: float32 `(nb_timesteps, nb_channels)`}.

    The arguments are those of `iter_separate` (`sample_rate`, `chunk_seconds`, `overlap`, `batch_size`,
    `input_samples`, keywords only), which this collects.
    """
    nb_timesteps, nb_channels = np.shape(mixture)[0], np.shape(mixture)[-1]
    outputs: Dict[str, np.ndarray] = {}
    for start, stop, blocks in iter_separate(separate_fn, mixture, **settings):
        for target, block in blocks.items():
            outputs.setdefault(target, np.zeros((nb_timesteps, nb_channels), dtype=np.float32))[start:stop] = block
    return outputs


def iter_separate(
    separate_fn: Callable[[np.ndarray], Mapping[str, object]],
    mixture: np.ndarray,
    *,
    sample_rate: int,
    chunk_seconds: float,
    overlap: float,
    batch_size: int = 1,
    input_samples: Optional[Callable[[int], int]] = None,
) -> Iterator[Tuple[int, int, Dict[str, np.ndarray]]]:
    """Separate a full track chunk by chunk, yielding finished pieces in order: (start, stop, {target: block}).

    separate_fn:   float32 `(batch, chunk_samples, nb_channels)` -> {target: same shape}; a keras.Model
                   (`SeparationModel.separator`) or any callable returning tensors or arrays
    mixture:       `(nb_timesteps, nb_channels)`: an array, or any object with `shape` whose `[start:stop]` slices,
                   asked for in increasing order, give float32 arrays (e.g. a file decoded as it is read)
    chunk_seconds: chunk length; memory use is bounded by it, not by the track length
    overlap:       fraction of a chunk shared with the next one, in [0, 1)
    batch_size:    chunks per call; the last batch is zero-padded so every call has the same shape
    input_samples: the model's length rule (`SeparationModel.input_samples`), applied to the chunk length
    yields         blocks float32 `(stop - start, nb_channels)` covering `[0, nb_timesteps)` once: a caller
                   can write stems to disk as they come and never hold a whole track of estimates
    """
    if not (hasattr(mixture, "shape") and hasattr(mixture, "__getitem__")):
        mixture = np.asarray(mixture)
    if len(mixture.shape) != 2 or mixture.shape[0] == 0:
        raise ValueError(f"mixture must be (nb_timesteps, nb_channels) with nb_timesteps > 0, got {mixture.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    nb_timesteps, nb_channels = mixture.shape
    chunk_samples = max(1, int(round(chunk_seconds * sample_rate)))
    if input_samples is not None:
        chunk_samples = int(input_samples(chunk_samples))
    overlap_samples, hop, nb_chunks = chunk_layout(nb_timesteps, chunk_samples, overlap)

    pending: Dict[str, np.ndarray] = {}  # overlap-add accumulators covering [base, base + len)
    base = 0
    for first in range(0, nb_chunks, batch_size):
        indices = range(first, min(first + batch_size, nb_chunks))
        batch = np.zeros((batch_size, chunk_samples, nb_channels), dtype=np.float32)
        for slot, index in enumerate(indices):
            start = index * hop
            piece = mixture[start:start + chunk_samples]
            batch[slot, :len(piece)] = piece
        estimates = separate_fn(batch)
        if not isinstance(estimates, Mapping):
            raise TypeError(f"separate_fn must return a dict {{target: waveform}}, got {type(estimates).__name__}")
        reach = min(indices[-1] * hop + chunk_samples, nb_timesteps)  # the last sample this batch touches
        for target, estimate in estimates.items():
            estimate = np.asarray(estimate)
            if estimate.shape != batch.shape:
                raise ValueError(
                    f"separate_fn returned shape {estimate.shape} for target '{target}' from an input of shape "
                    f"{batch.shape}; a separator must keep (batch, samples, channels)"
                )
            buffer = pending.get(target, np.zeros((0, nb_channels), dtype=np.float32))
            if len(buffer) < reach - base:
                buffer = np.concatenate([buffer, np.zeros((reach - base - len(buffer), nb_channels), np.float32)])
            for slot, index in enumerate(indices):
                start = index * hop
                stop = min(start + chunk_samples, nb_timesteps)
                weights = chunk_weights(index, nb_chunks, chunk_samples, overlap_samples)[:stop - start, None]
                buffer[start - base:stop - base] += (weights * estimate[slot, :stop - start]).astype(np.float32)
            pending[target] = buffer
        # samples before the next chunk's start receive nothing more
        final = nb_timesteps if indices[-1] == nb_chunks - 1 else min((indices[-1] + 1) * hop, nb_timesteps)
        if final > base:
            yield base, final, {target: buffer[:final - base].copy() for target, buffer in pending.items()}
            pending = {target: buffer[final - base:] for target, buffer in pending.items()}
            base = final


def compiled(separator, nb_channels: int) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    """A Keras separator as one traced graph: `(batch, samples, nb_channels)` float32 -> {target: array}.

    Calling a Keras model eagerly runs recurrent layers (tf.scan) step by step from Python; tracing once
    with a length-agnostic signature makes every chunk a single graph call.
    """
    import tensorflow as tf

    function = tf.function(lambda batch: separator(batch, training=False), reduce_retracing=True,
                           input_signature=[tf.TensorSpec([None, None, nb_channels], tf.float32)])

    def separate_fn(batch):
        return {k: v.numpy() for k, v in function(tf.convert_to_tensor(batch, tf.float32)).items()}

    return separate_fn
