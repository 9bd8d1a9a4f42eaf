"""Stage `prepare`: audio -> validated, sharded TFRecords of fixed-length segments + a manifest.

Reads: the data set named by `data.format`/`data.root` (outside input, fingerprinted by file stats or
synth parameters). Writes: `<split>-NNNNN-of-NNNNN.tfrecord[.gz]` per split and, in `artifact.json`,
`manifest` (`components.manifest.Manifest`: tracks, statistics, shards with checksums) and `figures`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np

from components import datasets, prepare_tracks, records
from configs.errors import StageError
from components.base import ComponentSpec, StageContext
from components.manifest import Manifest, Shard, SilentStem, Skipped, Split, Stats, TrackEntry


def run(context: StageContext) -> dict:
    if context.config.prepare.runner == "beam":
        from components import beam_prepare

        return beam_prepare.run(context)
    config, logger = context.config, context.logger
    data = config.data
    started = time.time()
    found = datasets.find_tracks(data, config.artifacts_dir, logger=logger)
    segment_samples = segment_samples_of(data)
    every_ref = [ref for refs in found.values() for ref in refs]
    total = len(every_ref)
    workers = prepare_tracks.resolve_workers(config.prepare.workers, every_ref)
    logger.info("prepare: %d tracks (%s) from %s data, %d process(es)", total,
                ", ".join(f"{split} {len(refs)}" for split, refs in found.items()), data.format, workers)

    manifest = new_manifest(data, segment_samples)
    writers = {split: records.ShardWriter(context.output_dir, split, compression=data.compression,
                                          shard_bytes=data.shard_megabytes * 1e6) for split in found}
    tracks = {split: [] for split in found}
    done, audio_seconds = 0, 0.0
    # tracks are read, resampled and cut in parallel processes, and written here in list order
    for ref, prepared in prepare_tracks.prepared_in_order(every_ref, data, segment_samples, workers):
        split = ref.split
        done += 1
        if isinstance(prepared, StageError):
            record_bad_track(manifest, split, ref.name, prepared, data, logger)
            continue
        for serialized in prepared.examples(data.sample_rate):
            writers[split].write(serialized)
        record_track(manifest, tracks[split], prepared.entry, split, logger)
        for copy in prepared.copies:  # data.pitch_shifts x data.tempo_changes (DTTNet), training tracks only
            for serialized in copy.examples(data.sample_rate):
                writers[split].write(serialized)
            record_track(manifest, tracks[split], dataclasses.replace(copy.entry, augmented_from=prepared.name),
                         split, logger)
        seconds = prepared.entry.nb_timesteps / data.sample_rate
        audio_seconds += seconds
        elapsed = time.time() - started
        logger.info("prepare: %d/%d tracks, %s/%s (%.1f s audio, %d segments), %.1f s elapsed, "
                    "%.1f audio s per s", done, total, split, prepared.name, seconds, len(prepared.segments),
                    elapsed, audio_seconds / max(elapsed, 1e-9))
        context.log_scalar("prepare.tracks_done", float(done), done)
        context.log_scalar("prepare.audio_seconds_per_second", audio_seconds / max(elapsed, 1e-9), done)
    for split in found:
        manifest.splits[split] = _split_entry(tracks[split], writers[split].close(), data.targets)
    return finish(manifest, data, started, logger)


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


def _augmented_copies(track, data):
    """Pitch/tempo-shifted copies of a training track, named `<track>_p=<P>_t=<T>` as DTTNet's folders."""
    from components import pitch_tempo

    for semitones, percent in pitch_tempo.variants(data.pitch_shifts, data.tempo_changes):
        stems = {target: pitch_tempo.shift(audio, semitones, percent) for target, audio in track.stems.items()}
        yield datasets.Track(name=f"{track.name}_p={semitones}_t={percent}", split=track.split, stems=stems,
                             paths=track.paths, silent=track.silent)


def _track_entry(track, segments: int, sample_rate: int, clipped: int) -> TrackEntry:
    energy = {t: float(np.mean(np.square(a, dtype=np.float64))) for t, a in track.stems.items()}
    return TrackEntry(name=track.name, nb_timesteps=track.nb_timesteps,
                      seconds=round(track.nb_timesteps / sample_rate, 6), segments=segments,
                      energy=energy, rms={t: float(np.sqrt(e)) for t, e in energy.items()},
                      peak={t: float(np.abs(a).max()) for t, a in track.stems.items()},
                      silent=tuple(track.silent), clipped_samples=clipped, sources=tuple(track.paths))


def _split_entry(tracks: Sequence[TrackEntry], shards: Sequence[Shard], targets) -> Split:
    """Per-split totals; `energy` is the duration-weighted mean square per target over the split."""
    timesteps = sum(t.nb_timesteps for t in tracks)
    energy = {target: (sum(t.energy[target] * t.nb_timesteps for t in tracks) / timesteps if timesteps else 0.0)
              for target in targets}
    return Split(tracks=tuple(tracks), seconds=sum(t.seconds for t in tracks),
                 segments=sum(t.segments for t in tracks), energy=energy,
                 rms={target: float(np.sqrt(e)) for target, e in energy.items()}, shards=tuple(shards))


SPEC = ComponentSpec(name="prepare", inputs=(), config_sections=("data",), executor=run,
                     input_payload=datasets.input_payload)
