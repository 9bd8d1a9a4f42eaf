"""Stage `prepare`: audio -> validated, sharded TFRecords of fixed-length segments + a manifest.

Reads: the data set named by `data.format`/`data.root` (outside input, fingerprinted by file stats or
synth parameters). Writes: `<split>-NNNNN-of-NNNNN.tfrecord[.gz]` per split and, in `artifact.json`,
`manifest` (`components.data.manifest.Manifest`: tracks, statistics, shards with checksums) and `figures`.
"""
from __future__ import annotations

import dataclasses
import time

from components.base import ComponentSpec, StageContext
from components.data import datasets, prepare_tracks, records
from configs.errors import StageError


def run(context: StageContext) -> dict:
    if context.config.prepare.runner == "beam":
        from components.data import beam_prepare

        return beam_prepare.run(context)
    config, logger = context.config, context.logger
    data = config.data
    started = time.time()
    found = datasets.find_tracks(data, config.artifacts_dir, logger=logger)
    segment_samples = prepare_tracks.segment_samples_of(data)
    every_ref = [ref for refs in found.values() for ref in refs]
    total = len(every_ref)
    workers = prepare_tracks.resolve_workers(config.prepare.workers, every_ref)
    logger.info("prepare: %d tracks (%s) from %s data, %d process(es)", total,
                ", ".join(f"{split} {len(refs)}" for split, refs in found.items()), data.format, workers)

    manifest = prepare_tracks.new_manifest(data, segment_samples)
    writers = {split: records.ShardWriter(context.output_dir, split, compression=data.compression,
                                          shard_bytes=data.shard_megabytes * 1e6) for split in found}
    tracks = {split: [] for split in found}
    done, audio_seconds = 0, 0.0
    # tracks are read, resampled and cut in parallel processes, and written here in list order
    for ref, prepared in prepare_tracks.prepared_in_order(every_ref, data, segment_samples, workers):
        split = ref.split
        done += 1
        if isinstance(prepared, StageError):
            prepare_tracks.record_bad_track(manifest, split, ref.name, prepared, data, logger)
            continue
        for serialized in prepared.examples(data.sample_rate):
            writers[split].write(serialized)
        prepare_tracks.record_track(manifest, tracks[split], prepared.entry, split, logger)
        for copy in prepared.copies:  # data.pitch_shifts x data.tempo_changes (DTTNet), training tracks only
            for serialized in copy.examples(data.sample_rate):
                writers[split].write(serialized)
            prepare_tracks.record_track(manifest, tracks[split], dataclasses.replace(copy.entry, augmented_from=prepared.name),
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
        manifest.splits[split] = prepare_tracks.split_entry(tracks[split], writers[split].close(), data.targets)
    return prepare_tracks.finish(manifest, data, started, logger)


SPEC = ComponentSpec(name="prepare", inputs=(), config_sections=("data",), executor=run,
                     input_payload=datasets.input_payload, check_inputs=datasets.check_inputs)
