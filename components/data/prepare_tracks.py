"""The per-track work of `prepare`, shared by the local runner (worker processes) and the Beam runner.

`prepare_track` reads, validates, resamples and cuts one track into PCM segments with numpy only, so a
worker process never imports TensorFlow; the process that writes the shards turns the segments into
`tf.train.Example`s (`PreparedTrack.examples`). `prepared_in_order` runs it for many tracks on every core
and hands the results back in the order of the track list, so the shards are the same whatever the
number of processes.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import numpy as np

from components.data import datasets, pitch_tempo, records
from components.data.manifest import Manifest, Shard, SilentStem, Skipped, Split, Stats, TrackEntry
from configs.errors import StageError


@dataclass
class PreparedTrack:
    """One validated track cut into segments: PCM blobs plus the manifest entry (statistics) of the track."""

    name: str
    split: str
    nb_channels: int
    clipped: int
    silent: Tuple[str, ...]
    entry: TrackEntry  # the manifest's per-track entry (track_entry)
    segments: List[Tuple[int, int, Dict[str, bytes]]]  # (offset, valid length, {target: PCM bytes})
    copies: List["PreparedTrack"] = field(default_factory=list)  # pitch/tempo-shifted copies (training split)

    def examples(self, sample_rate: int) -> Iterator[bytes]:
        """The serialized `tf.train.Example` of every segment, in offset order."""
        for offset, length, blobs in self.segments:
            yield records.serialize_segment(self.name, self.split, offset, length, blobs, sample_rate=sample_rate,
                                            nb_channels=self.nb_channels)


def prepare_track(ref, data, segment_samples: int) -> PreparedTrack:
    """Read, validate, resample and segment one `datasets.TrackRef`; StageError when the track is bad."""
    track = ref.load()
    prepared = _cut(track, data, segment_samples)
    if track.split == "train":
        prepared.copies = [_cut(copy, data, segment_samples) for copy in augmented_copies(track, data)]
    return prepared


def _cut(track, data, segment_samples: int) -> PreparedTrack:
    segments, clipped = [], 0
    for offset, length, blobs, count in records.encode_segments(track.stems, segment_samples=segment_samples,
                                                                pcm=data.pcm):
        segments.append((offset, length, blobs))
        clipped += count
    nb_channels = next(iter(track.stems.values())).shape[1]
    return PreparedTrack(name=track.name, split=track.split, nb_channels=nb_channels, clipped=clipped,
                         silent=tuple(track.silent), segments=segments,
                         entry=track_entry(track, len(segments), data.sample_rate, clipped))


def prepare_or_error(ref, data, segment_samples: int) -> Union[PreparedTrack, StageError]:
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
            yield ref, prepare_or_error(ref, data, segment_samples)
        return
    import multiprocessing

    window = 2 * workers
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = []
        upcoming = iter(refs)
        for ref in upcoming:
            pending.append((ref, pool.submit(prepare_or_error, ref, data, segment_samples)))
            if len(pending) >= window:
                break
        while pending:
            ref, future = pending.pop(0)
            result = future.result()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(prepare_or_error, following, data, segment_samples)))
            yield ref, result
    finally:  # also when the caller stops early (a bad track): queued tracks are dropped, not prepared
        pool.shutdown(wait=True, cancel_futures=True)


# The manifest while tracks arrive, shared by the local and the Beam runner

def segment_samples_of(data) -> int:
    segment_samples = int(round(data.segment_seconds * data.sample_rate))
    if segment_samples <= 0:
        raise StageError("data.segment_seconds must be positive")
    return segment_samples


@dataclass
class Draft:
    """The manifest while the tracks arrive: per-split entries, bad tracks, silent stems, clipped samples."""

    segment_samples: int
    pcm: str  # data.pcm, named when samples are clipped
    splits: Dict[str, Split] = field(default_factory=dict)
    skipped: List[Skipped] = field(default_factory=list)
    silent: List[SilentStem] = field(default_factory=list)
    clipped_samples: int = 0


def new_manifest(data, segment_samples: int) -> Draft:
    return Draft(segment_samples=segment_samples, pcm=data.pcm)


def record_bad_track(manifest: Draft, split: str, name: str, error: StageError, data, logger) -> None:
    """A track that failed validation: the stage fails on it, or (data.skip_bad_tracks) lists it as skipped."""
    if not data.skip_bad_tracks:
        raise error
    logger.warning("prepare: skipping %s/%s: %s", split, name, error)
    manifest.skipped.append(Skipped(track=name, split=split, reason=str(error)))


def record_track(manifest: Draft, split_tracks: list, entry: TrackEntry, split: str, logger) -> None:
    """A prepared track's entry into its split's list, its clipped samples and silent stems into the manifest."""
    clipped = entry.clipped_samples
    if clipped:
        logger.warning("prepare: %s/%s: %d samples beyond full scale were clipped to %s range",
                       split, entry.name, clipped, manifest.pcm)
    manifest.clipped_samples += clipped
    manifest.silent.extend(SilentStem(track=entry.name, split=split, target=t) for t in entry.silent)
    split_tracks.append(entry)


def finish(draft: Draft, data, started: float, logger) -> dict:
    """Checks over the whole data set, training statistics and the figures: the stage's meta."""
    splits = draft.splits
    empty_splits = [split for split, entry in splits.items() if not entry.tracks]
    if empty_splits:
        logger.warning("prepare: no tracks for split(s) %s in %s; they are prepared empty",
                       ", ".join(empty_splits), data.root or "the default data")
    if not any(entry.tracks for entry in splits.values()):
        raise StageError(f"{data.root or 'default data'}: every track failed validation "
                         f"({len(draft.skipped)} skipped); fix the files listed in the warnings above")

    # what model builders read for loss weighting: the train split's mean energy per target
    train = splits.get("train")
    manifest = Manifest(
        format=data.format, root=data.root, targets=tuple(data.targets), sample_rate=data.sample_rate,
        nb_channels=data.nb_channels, segment_samples=draft.segment_samples, pcm=data.pcm,
        compression=data.compression, splits=dict(splits), empty_splits=tuple(empty_splits),
        skipped=tuple(draft.skipped), silent=tuple(draft.silent), clipped_samples=draft.clipped_samples,
        stats=Stats(split="train", energy=train.energy, rms=train.rms) if train and train.tracks else None)
    elapsed = max(time.time() - started, 1e-9)
    audio_seconds = sum(entry.seconds for entry in splits.values())
    figures = {
        "tracks": {split: len(entry.tracks) for split, entry in splits.items()},
        "segments": {split: entry.segments for split, entry in splits.items()},
        "seconds": {split: round(entry.seconds, 3) for split, entry in splits.items()},
        "total_seconds": round(audio_seconds, 3),
        "audio_seconds_per_second": round(audio_seconds / elapsed, 2),
        "wall_seconds": round(elapsed, 3),
        "skipped_tracks": len(manifest.skipped),
        "silent_stems": len(manifest.silent),
        "megabytes": round(sum(s.bytes for e in splits.values() for s in e.shards) / 1e6, 3),
    }
    logger.info("prepare: %.1f s of audio in %.1f s (%.1f audio s per s), %s MB of shards",
                audio_seconds, elapsed, figures["audio_seconds_per_second"], figures["megabytes"])
    return {"figures": figures, "manifest": manifest.to_dict(), "result": round(audio_seconds, 3)}


def augmented_copies(track, data):
    """Pitch/tempo-shifted copies of a training track, named `<track>_p=<P>_t=<T>` as DTTNet's folders."""
    for semitones, percent in pitch_tempo.variants(data.pitch_shifts, data.tempo_changes):
        stems = {target: pitch_tempo.shift(audio, semitones, percent) for target, audio in track.stems.items()}
        yield datasets.Track(name=f"{track.name}_p={semitones}_t={percent}", split=track.split, stems=stems,
                             paths=track.paths, silent=track.silent)


def track_entry(track, segments: int, sample_rate: int, clipped: int) -> TrackEntry:
    energy = {t: float(np.mean(np.square(a, dtype=np.float64))) for t, a in track.stems.items()}
    return TrackEntry(name=track.name, nb_timesteps=track.nb_timesteps,
                      seconds=round(track.nb_timesteps / sample_rate, 6), segments=segments,
                      energy=energy, rms={t: float(np.sqrt(e)) for t, e in energy.items()},
                      peak={t: float(np.abs(a).max()) for t, a in track.stems.items()},
                      silent=tuple(track.silent), clipped_samples=clipped, sources=tuple(track.paths))


def split_entry(tracks: Sequence[TrackEntry], shards: Sequence[Shard], targets) -> Split:
    """Per-split totals; `energy` is the duration-weighted mean square per target over the split."""
    timesteps = sum(t.nb_timesteps for t in tracks)
    energy = {target: (sum(t.energy[target] * t.nb_timesteps for t in tracks) / timesteps if timesteps else 0.0)
              for target in targets}
    return Split(tracks=tuple(tracks), seconds=sum(t.seconds for t in tracks),
                 segments=sum(t.segments for t in tracks), energy=energy,
                 rms={target: float(np.sqrt(e)) for target, e in energy.items()}, shards=tuple(shards))
