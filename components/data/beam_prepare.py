"""`prepare` as an Apache Beam pipeline (`prepare.runner=beam`): the same artifact as the local runner.

    list tracks -> Reshuffle -> read/validate/resample/cut + serialize (one element per track)
        -> plan the shards (sizes of every example, in track-list order, cut like `records.ShardWriter`)
        -> key each example by its shard -> GroupByKey -> write one TFRecord shard per group
    + a summary (track entries, bad tracks, shard checksums) the driver turns into the manifest

Shards hold the same examples in the same order as the local runner's, so the files, their checksums and
the manifest are identical; the stage's fingerprint, skip and atomic commit are the pipeline driver's,
untouched. The default runner is Beam's DirectRunner in multi-processing mode on every core;
`prepare.beam_options` passes any Beam flag (`--runner=FlinkRunner`, `--flink_master=...`, ...). On a
cluster, `artifacts_dir` must be a path every worker can write (shared file system or `gs://`-style via
`tf.io.gfile`), and the workers need this package installed (`--setup_file`, or a container image).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

from components.data import datasets, prepare_tracks, records
from components.artifacts import file_digest
from configs.errors import StageError
from components.base import StageContext
from components.data.manifest import Shard, TrackEntry

SUMMARY_FILE = ".beam-summary.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def require_beam():
    try:
        import apache_beam
    except ImportError:
        raise StageError("prepare.runner=beam needs Apache Beam; pip install 'music-separation[beam]' "
                         "(or apache-beam), or set prepare.runner=local") from None
    return apache_beam


def pipeline_options(prepare_config) -> List[str]:
    """Beam flags: the DirectRunner on every core unless `prepare.beam_options` names another runner."""
    options = list(prepare_config.beam_options)
    runner = next((o.split("=", 1)[1] for o in options if o.startswith("--runner=")), "DirectRunner")
    if runner in ("DirectRunner", "direct"):
        defaults = {"--runner": "DirectRunner", "--direct_running_mode": "multi_processing",
                    "--direct_num_workers": str(prepare_config.workers or prepare_tracks.available_cores()),
                    "--default_sdk_harness_log_level": "WARNING"}
        given = {o.split("=", 1)[0] for o in options}
        options = [f"{key}={value}" for key, value in defaults.items() if key not in given] + options
    return options


@contextlib.contextmanager
def project_on_worker_path():
    """Beam's local worker processes import `components` from this checkout (not another installed copy)."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([previous] if previous else []))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


@contextlib.contextmanager
def quiet_beam_logs():
    """Beam's runner logs every worker's start and stop at INFO; the stage's own progress is enough."""
    logger = logging.getLogger("apache_beam")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


# -- the pipeline's steps (module-level functions: Beam pickles them to its workers) -------------------------------
def prepare_element(element, data, segment_samples: int):
    """(index, TrackRef) -> (index, record): the track's serialized examples and manifest entry, or its error."""
    index, ref = element
    outcome = prepare_tracks.prepare_or_error(ref, data, segment_samples)
    if isinstance(outcome, StageError):
        return index, {"split": ref.split, "name": ref.name, "error": str(outcome)}
    # a training track's pitch/tempo-shifted copies follow it, as the local runner writes them
    examples = [example for track in (outcome, *outcome.copies) for example in track.examples(data.sample_rate)]
    return index, {"split": ref.split, "name": ref.name, "error": None, "entry": outcome.entry.to_dict(),
                   "copies": [dataclasses.replace(copy.entry, augmented_from=outcome.name).to_dict()
                              for copy in outcome.copies],
                   "examples": examples}


def example_sizes(element):
    index, record = element
    return index, record["split"], [len(example) for example in record.get("examples", [])]


def plan_shards(sizes: Iterable[Tuple[int, str, List[int]]], splits: Sequence[str], shard_bytes: float) -> dict:
    """Which shard each example goes to: the cut `records.ShardWriter` makes writing the tracks in list order.

    Returns {"shard": {index: [shard of each example]}, "total": {split: number of shards}}.
    """
    shard_bytes = max(1.0, float(shard_bytes))
    by_split: Dict[str, list] = {split: [] for split in splits}
    for index, split, lengths in sizes:
        by_split[split].append((index, lengths))
    plan = {"shard": {}, "total": {}}
    for split, tracks in by_split.items():
        shard, size, open_ = -1, 0, False
        for index, lengths in sorted(tracks):
            assigned = []
            for length in lengths:
                if not open_:
                    shard, size, open_ = shard + 1, 0, True
                size += length
                assigned.append(shard)
                if size >= shard_bytes:
                    open_ = False
            plan["shard"][index] = assigned
        plan["total"][split] = shard + 1
    return plan


def key_by_shard(element, plan):
    index, record = element
    for position, (shard, example) in enumerate(zip(plan["shard"].get(index, []), record.get("examples", []))):
        yield (record["split"], shard), (index, position, example)


def write_shard(element, output_dir: str, compression: str, plan) -> dict:
    """One group of examples -> `<split>-NNNNN-of-NNNNN<suffix>`, in track-list then offset order."""
    import tensorflow as tf

    (split, shard), examples = element
    total = plan["total"][split]
    path = Path(output_dir) / f"{split}-{shard:05d}-of-{total:05d}{records.SUFFIXES[compression]}"
    partial = path.with_name(f".{path.name}.partial")
    ordered = sorted(examples, key=lambda item: (item[0], item[1]))
    with tf.io.TFRecordWriter(str(partial), options=tf.io.TFRecordOptions(compression or None)) as writer:
        for _, _, example in ordered:
            writer.write(example)
    os.replace(partial, path)
    return {"split": split, "index": shard, "file": path.name, "examples": len(ordered),
            "bytes": path.stat().st_size, "sha256": file_digest(path)}


def track_summary(element) -> dict:
    index, record = element
    return {"index": index, **{k: v for k, v in record.items() if k != "examples"}}


def write_summary(_, path: str, tracks: list, shards: list) -> None:
    Path(path).write_text(json.dumps({"tracks": tracks, "shards": shards}))


def build_pipeline(pipeline, items, data, segment_samples: int, output_dir: str):
    """The Beam graph; `items` is [(index, TrackRef)] in the local runner's order."""
    import apache_beam as beam

    shard_bytes = data.shard_megabytes * 1e6
    prepared = (pipeline
                | "ListTracks" >> beam.Create(items)
                | "Spread" >> beam.Reshuffle()
                | "ReadValidateResampleCut" >> beam.Map(prepare_element, data, segment_samples))
    plan = (prepared
            | "ExampleSizes" >> beam.Map(example_sizes)
            | "AllSizes" >> beam.combiners.ToList()
            | "PlanShards" >> beam.Map(plan_shards, tuple(data.splits), shard_bytes))
    shards = (prepared
              | "KeyByShard" >> beam.FlatMap(key_by_shard, beam.pvalue.AsSingleton(plan))
              | "GroupShards" >> beam.GroupByKey()
              | "WriteShards" >> beam.Map(write_shard, output_dir, data.compression, beam.pvalue.AsSingleton(plan)))
    tracks = prepared | "TrackSummary" >> beam.Map(track_summary)
    _ = (pipeline
         | "One" >> beam.Create([None])
         | "WriteSummary" >> beam.Map(write_summary, str(Path(output_dir) / SUMMARY_FILE),
                                      beam.pvalue.AsList(tracks), beam.pvalue.AsList(shards)))


def run(context: StageContext) -> dict:
    """The `prepare` executor with `prepare.runner=beam`."""
    beam = require_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    config, logger = context.config, context.logger
    data = config.data
    started = time.time()
    found = datasets.find_tracks(data, config.artifacts_dir, logger=logger)
    segment_samples = prepare_tracks.segment_samples_of(data)
    items = list(enumerate(ref for refs in found.values() for ref in refs))
    options = pipeline_options(config.prepare)
    logger.info("prepare: %d tracks (%s) from %s data, Apache Beam %s", len(items),
                ", ".join(f"{split} {len(refs)}" for split, refs in found.items()), data.format, " ".join(options))
    output_dir = str(Path(context.output_dir).resolve())
    with project_on_worker_path(), quiet_beam_logs():
        with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
            build_pipeline(pipeline, items, data, segment_samples, output_dir)
    summary_path = Path(output_dir) / SUMMARY_FILE
    summary = json.loads(summary_path.read_text())
    summary_path.unlink()

    manifest = prepare_tracks.new_manifest(data, segment_samples)
    tracks = {split: [] for split in found}
    for track in sorted(summary["tracks"], key=lambda t: t["index"]):
        if track["error"] is not None:
            prepare_tracks.record_bad_track(manifest, track["split"], track["name"], StageError(track["error"]), data,
                                     logger)
            continue
        prepare_tracks.record_track(manifest, tracks[track["split"]], TrackEntry.from_dict(track["entry"]), track["split"],
                             logger)
        for copy in track.get("copies", []):
            prepare_tracks.record_track(manifest, tracks[track["split"]], TrackEntry.from_dict(copy), track["split"], logger)
    for split in found:
        shards = sorted((s for s in summary["shards"] if s["split"] == split), key=lambda s: s["index"])
        shards = [Shard.from_dict(s) for s in shards]
        manifest.splits[split] = prepare_tracks.split_entry(tracks[split], shards, data.targets)
    return prepare_tracks.finish(manifest, data, started, logger)
