"""Stage `prepare`: audio -> validated, sharded TFRecords of fixed-length segments + a manifest.

Reads: the data set named by `data.format`/`data.root` (outside input, fingerprinted by file stats or
synth parameters). Writes: `<split>-NNNNN-of-NNNNN.tfrecord[.gz]` per split and, in `artifact.json`,
`manifest` (tracks, statistics, shards with checksums) and `figures`.
"""
from __future__ import annotations

import time

import numpy as np

from components import datasets, records
from components.artifacts import StageError
from components.base import ComponentSpec, StageContext


def run(context: StageContext) -> dict:
    config, logger = context.config, context.logger
    data = config.data
    started = time.time()
    found = datasets.find_tracks(data, config.artifacts_dir, logger=logger)
    segment_samples = int(round(data.segment_seconds * data.sample_rate))
    if segment_samples <= 0:
        raise StageError("data.segment_seconds must be positive")
    total = sum(len(refs) for refs in found.values())
    logger.info("prepare: %d tracks (%s) from %s data", total,
                ", ".join(f"{split} {len(refs)}" for split, refs in found.items()), data.format)

    manifest = {"format": data.format, "root": data.root, "targets": list(data.targets),
                "sample_rate": data.sample_rate, "nb_channels": data.nb_channels,
                "segment_samples": segment_samples, "pcm": data.pcm, "compression": data.compression,
                "splits": {}, "empty_splits": [], "skipped": [], "silent": [], "clipped_samples": 0}
    done, audio_seconds = 0, 0.0
    for split, refs in found.items():
        writer = records.ShardWriter(context.output_dir, split, compression=data.compression,
                                     shard_bytes=data.shard_megabytes * 1e6)
        tracks = []
        for ref in refs:
            try:
                track = ref.load()
            except StageError as error:
                if not data.skip_bad_tracks:
                    raise
                logger.warning("prepare: skipping %s/%s: %s", split, ref.name, error)
                manifest["skipped"].append({"track": ref.name, "split": split, "reason": str(error)})
                done += 1
                continue
            segments, clipped = 0, 0
            for serialized, nb_clipped in records.track_examples(track, segment_samples=segment_samples,
                                                                 pcm=data.pcm, sample_rate=data.sample_rate):
                writer.write(serialized)
                segments += 1
                clipped += nb_clipped
            if clipped:
                logger.warning("prepare: %s/%s: %d samples beyond full scale were clipped to %s range",
                               split, track.name, clipped, data.pcm)
            manifest["clipped_samples"] += clipped
            manifest["silent"].extend({"track": track.name, "split": split, "target": t} for t in track.silent)
            tracks.append(_track_entry(track, segments, data.sample_rate, clipped))
            if split == "train":
                for copy in _augmented_copies(track, data):  # data.pitch_shifts x data.tempo_changes (DTTNet)
                    copy_segments, copy_clipped = 0, 0
                    for serialized, nb_clipped in records.track_examples(copy, segment_samples=segment_samples,
                                                                         pcm=data.pcm, sample_rate=data.sample_rate):
                        writer.write(serialized)
                        copy_segments += 1
                        copy_clipped += nb_clipped
                    manifest["clipped_samples"] += copy_clipped
                    tracks.append({**_track_entry(copy, copy_segments, data.sample_rate, copy_clipped),
                                   "augmented_from": track.name})
            done += 1
            seconds = track.nb_timesteps / data.sample_rate
            audio_seconds += seconds
            elapsed = time.time() - started
            logger.info("prepare: %d/%d tracks, %s/%s (%.1f s audio, %d segments), %.1f s elapsed, "
                        "%.1f audio s per s", done, total, split, track.name, seconds, segments, elapsed,
                        audio_seconds / max(elapsed, 1e-9))
            context.log_scalar("prepare.tracks_done", float(done), done)
            context.log_scalar("prepare.audio_seconds_per_second", audio_seconds / max(elapsed, 1e-9), done)
        shards = writer.close()
        manifest["splits"][split] = _split_entry(tracks, shards, data.targets)
        if not tracks:
            manifest["empty_splits"].append(split)
    if manifest["empty_splits"]:
        logger.warning("prepare: no tracks for split(s) %s in %s; they are prepared empty",
                       ", ".join(manifest["empty_splits"]), data.root or "the default data")
    if not any(entry["tracks"] for entry in manifest["splits"].values()):
        raise StageError(f"{data.root or 'default data'}: every track failed validation "
                         f"({len(manifest['skipped'])} skipped); fix the files listed in the warnings above")

    # what model builders read for loss weighting: the train split's mean energy per target
    train = manifest["splits"].get("train")
    manifest["stats"] = ({"split": "train", "energy": train["energy"], "rms": train["rms"]}
                         if train and train["tracks"] else {})
    elapsed = max(time.time() - started, 1e-9)
    splits = manifest["splits"]
    figures = {
        "tracks": {split: len(entry["tracks"]) for split, entry in splits.items()},
        "segments": {split: entry["segments"] for split, entry in splits.items()},
        "seconds": {split: round(entry["seconds"], 3) for split, entry in splits.items()},
        "total_seconds": round(audio_seconds, 3),
        "audio_seconds_per_second": round(audio_seconds / elapsed, 2),
        "wall_seconds": round(elapsed, 3),
        "skipped_tracks": len(manifest["skipped"]),
        "silent_stems": len(manifest["silent"]),
        "megabytes": round(sum(s["bytes"] for e in splits.values() for s in e["shards"]) / 1e6, 3),
    }
    logger.info("prepare: %.1f s of audio in %.1f s (%.1f audio s per s), %s MB of shards",
                audio_seconds, elapsed, figures["audio_seconds_per_second"], figures["megabytes"])
    return {"figures": figures, "manifest": manifest, "result": round(audio_seconds, 3)}


def _augmented_copies(track, data):
    """Pitch/tempo-shifted copies of a training track, named `<track>_p=<P>_t=<T>` as DTTNet's folders."""
    from components import pitch_tempo

    for semitones, percent in pitch_tempo.variants(data.pitch_shifts, data.tempo_changes):
        stems = {target: pitch_tempo.shift(audio, semitones, percent) for target, audio in track.stems.items()}
        yield datasets.Track(name=f"{track.name}_p={semitones}_t={percent}", split=track.split, stems=stems,
                             paths=track.paths, silent=track.silent)


def _track_entry(track, segments: int, sample_rate: int, clipped: int) -> dict:
    energy = {t: float(np.mean(np.square(a, dtype=np.float64))) for t, a in track.stems.items()}
    return {"name": track.name, "nb_timesteps": track.nb_timesteps,
            "seconds": round(track.nb_timesteps / sample_rate, 6), "segments": segments,
            "energy": energy, "rms": {t: float(np.sqrt(e)) for t, e in energy.items()},
            "peak": {t: float(np.abs(a).max()) for t, a in track.stems.items()},
            "silent": list(track.silent), "clipped_samples": clipped, "sources": list(track.paths)}


def _split_entry(tracks, shards, targets) -> dict:
    """Per-split totals; `energy` is the duration-weighted mean square per target over the split."""
    timesteps = sum(t["nb_timesteps"] for t in tracks)
    energy = {target: (sum(t["energy"][target] * t["nb_timesteps"] for t in tracks) / timesteps if timesteps else 0.0)
              for target in targets}
    return {"tracks": tracks, "seconds": sum(t["seconds"] for t in tracks),
            "segments": sum(t["segments"] for t in tracks), "energy": energy,
            "rms": {target: float(np.sqrt(e)) for target, e in energy.items()}, "shards": shards}


SPEC = ComponentSpec(name="prepare", inputs=(), config_sections=("data",), executor=run,
                     input_payload=datasets.input_payload)
