"""The per-track work of `prepare`, shared by the local runner (worker processes) and the Beam runner.

`prepare_track` reads, validates, resamples and cuts one track into PCM segments with numpy only, so a
worker process never imports TensorFlow; the process that writes the shards turns the segments into
`tf.train.Example`s (`PreparedTrack.examples`). `prepared_in_order` runs it for many tracks on every core
and hands the results back in the order of the track list, so the shards are the same whatever the
number of processes.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple, Union

from components import records
from components.manifest import TrackEntry
from configs.errors import StageError


@dataclass
class PreparedTrack:
    """One validated track cut into segments: PCM blobs plus the manifest entry (statistics) of the track."""

    name: str
    split: str
    nb_channels: int
    clipped: int
    silent: Tuple[str, ...]
    entry: TrackEntry  # the manifest's per-track entry (prepare._track_entry)
    segments: List[Tuple[int, int, Dict[str, bytes]]]  # (offset, valid length, {target: PCM bytes})
    copies: List["PreparedTrack"] = field(default_factory=list)  # pitch/tempo-shifted copies (training split)

    def examples(self, sample_rate: int) -> Iterator[bytes]:
        """The serialized `tf.train.Example` of every segment, in offset order."""
        for offset, length, blobs in self.segments:
            yield records.serialize_segment(self.name, self.split, offset, length, blobs, sample_rate=sample_rate,
                                            nb_channels=self.nb_channels)


def prepare_track(ref, data, segment_samples: int) -> PreparedTrack:
    """Read, validate, resample and segment one `datasets.TrackRef`; StageError when the track is bad."""
    from components.prepare import _augmented_copies

    track = ref.load()
    prepared = _cut(track, data, segment_samples)
    if track.split == "train":
        prepared.copies = [_cut(copy, data, segment_samples) for copy in _augmented_copies(track, data)]
    return prepared


def _cut(track, data, segment_samples: int) -> PreparedTrack:
    from components.prepare import _track_entry

    segments, clipped = [], 0
    for offset, length, blobs, count in records.encode_segments(track.stems, segment_samples=segment_samples,
                                                                pcm=data.pcm):
        segments.append((offset, length, blobs))
        clipped += count
    nb_channels = next(iter(track.stems.values())).shape[1]
    return PreparedTrack(name=track.name, split=track.split, nb_channels=nb_channels, clipped=clipped,
                         silent=tuple(track.silent), segments=segments,
                         entry=_track_entry(track, len(segments), data.sample_rate, clipped))


def _prepare_or_error(ref, data, segment_samples: int) -> Union[PreparedTrack, StageError]:
    try:
        return prepare_track(ref, data, segment_samples)
    except StageError as error:
        return error


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Source bytes per automatic worker: a spawned worker costs ~1-3 s of start-up (numpy, scipy, soundfile);
# 64 MB is ~1.5 min of 4-stem wav or ~7 min of stem mp4, several times that cost to process
BYTES_PER_AUTO_WORKER = 64e6


def resolve_workers(workers: int, refs: Sequence) -> int:
    """Processes for `refs`: `prepare.workers` when set (at most one per track); with 0, every core, but no
    more than one per BYTES_PER_AUTO_WORKER of source files, so a small data set is not slowed by start-ups."""
    if workers:
        return max(1, min(workers, len(refs)))
    total = sum(os.path.getsize(p) for ref in refs for p in ref.paths if os.path.isfile(p))
    return max(1, min(available_cores(), len(refs), int(total // BYTES_PER_AUTO_WORKER)))


def prepared_in_order(refs: Sequence, data, segment_samples: int, workers: int
                      ) -> Iterator[Tuple[object, Union[PreparedTrack, StageError]]]:
    """(ref, PreparedTrack or the StageError of a bad track) for every ref, in the order of `refs`.

    workers > 1: that many spawned processes (not forked: the parent may hold TensorFlow's threads), at most
    2 tracks per process in flight so memory stays bounded on a large catalogue.
    """
    if workers <= 1 or len(refs) <= 1:
        for ref in refs:
            yield ref, _prepare_or_error(ref, data, segment_samples)
        return
    import multiprocessing

    window = 2 * workers
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = []
        upcoming = iter(refs)
        for ref in upcoming:
            pending.append((ref, pool.submit(_prepare_or_error, ref, data, segment_samples)))
            if len(pending) >= window:
                break
        while pending:
            ref, future = pending.pop(0)
            result = future.result()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(_prepare_or_error, following, data, segment_samples)))
            yield ref, result
    finally:  # also when the caller stops early (a bad track): queued tracks are dropped, not prepared
        pool.shutdown(wait=True, cancel_futures=True)
