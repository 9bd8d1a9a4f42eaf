"""The evaluate stage as an Apache Beam pipeline (with `prepare.runner=beam`): one element per track.

    tracks of the split -> Reshuffle -> per track, on a worker: read its segments from the shards that
    hold it, separate it with the trained model (loaded once per worker), compute the MIX/IRM baselines
    unless cached, score everything with museval -> the driver aggregates with `runner.finish_metrics`

The per-track steps are `runner.separate_track`, `baselines.estimates` and `scoring.score_track`, as in
`runner.evaluate_tracks`, and the aggregation is the same function, so metrics.json is the process pool's. Runner and flags as for prepare
(`prepare.beam_options`); on a cluster `artifacts_dir` must be storage every worker reads.
"""
from __future__ import annotations

import json
import pickle
import tempfile
import time
from pathlib import Path
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from components.evaluation import baselines, runner, scoring
from components.data import records
from components.artifacts import META_FILE, Artifact
from components.data.manifest import Manifest


# -- reading one track without scanning the whole split --------------------------------------------------------
def read_track(prepare: Artifact, split: str, name: str) -> Dict[str, np.ndarray]:
    """{target: float32 (nb_timesteps, nb_channels)} of one track, as `records.read_tracks` assembles it."""
    import tensorflow as tf

    manifest = Manifest.read(prepare)
    files = [str(prepare.path / f) for f in manifest.splits[split].shards_holding(name)]
    pcm, nb_channels, targets = manifest.pcm, manifest.nb_channels, manifest.targets
    segments = []
    dataset = tf.data.TFRecordDataset(files, compression_type=manifest.compression or None)
    for serialized in dataset.as_numpy_iterator():
        feature = tf.train.Example.FromString(serialized).features.feature
        if feature["track"].bytes_list.value[0].decode() != name:
            continue
        audio = {t: records.decode_pcm(feature[records.STEM_KEY.format(t)].bytes_list.value[0], pcm, nb_channels)
                 for t in targets}
        segments.append((feature["offset"].int64_list.value[0], feature["length"].int64_list.value[0], audio))
    segments.sort(key=lambda item: item[0])
    return {t: np.concatenate([audio[t][:length] for _, length, audio in segments], axis=0) for t in targets}


# -- one track, start to finish ----------------------------------------------------------------------------------
def evaluate_track(index: int, track: str, stems: Mapping[str, np.ndarray], separate_fn, *, targets: Sequence[str],
                   sample_rate: int, settings, input_samples, with_baselines: bool) -> dict:
    """What `runner.evaluate_tracks` does for one track: separate, check, score model (and baselines)."""
    started = time.time()
    mixture, estimates, warnings = runner.separate_track(index, track, stems, separate_fn, targets=targets,
                                                        sample_rate=sample_rate, settings=settings,
                                                        input_samples=input_samples)
    references = {t: np.asarray(stems[t], dtype=np.float32) for t in targets}
    sets = {"model": {t: np.asarray(estimates[t], dtype=np.float32) for t in targets}}
    if with_baselines:
        sets.update(baselines.estimates(track, stems, mixture, targets, sample_rate=sample_rate))
    usdrs, scores = {}, {}
    for method, method_estimates in sets.items():
        usdrs[method] = {t: scoring.usdr(stems[t], method_estimates[t]) for t in targets}
        scores[method] = scoring.score_track(references, method_estimates, sample_rate=sample_rate,
                                             window_seconds=settings.window_seconds)
    return {"index": index, "track": track, "usdrs": usdrs, "scores": scores, "warnings": warnings,
            "fresh": with_baselines, "seconds": time.time() - started}


def _artifact(path: str) -> Artifact:
    path = Path(path)
    return Artifact(stage=path.name, path=path, meta=json.loads((path / META_FILE).read_text()))


def _track_evaluator():
    import apache_beam as beam

    class EvaluateTrack(beam.DoFn):
        """Loads the trained separator once per worker, then evaluates one track per element."""

        def __init__(self, config: dict, prepare_path: str, train_path: str, cached: Sequence[str]):
            self.config, self.prepare_path, self.train_path, self.cached = config, prepare_path, train_path, set(cached)

        def setup(self):
            from components.training import trained
            from components.inference.separation import compiled
            from configs import Config

            self.settings = Config.from_dict(self.config)
            self.prepare = _artifact(self.prepare_path)
            self.model = trained.load_trained(_artifact(self.train_path), self.settings)
            self.separate_fn = compiled(self.model.separator, self.model.nb_channels)

        def process(self, element):
            index, track = element
            config = self.settings
            stems = read_track(self.prepare, config.evaluate.split, track)
            yield evaluate_track(index, track, stems, self.separate_fn, targets=tuple(self.model.targets),
                                 sample_rate=config.data.sample_rate, settings=config.evaluate,
                                 input_samples=self.model.input_samples, with_baselines=track not in self.cached)

    return EvaluateTrack


def _write_results(_, path: str, results: list) -> None:
    Path(path).write_bytes(pickle.dumps(results))


def evaluate(context, *, targets: Sequence[str], key: Mapping) -> dict:
    """`runner.evaluate_tracks` on Beam; writes and returns the same metrics."""
    from components.data import beam_prepare

    beam = beam_prepare.require_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    config, logger = context.config, context.logger
    settings = config.evaluate
    prepare, train = context.inputs["prepare"], context.inputs["train"]
    names = Manifest.read(prepare).splits[settings.split].names
    if settings.max_tracks is not None:
        names = names[: settings.max_tracks]
    cache_path = baselines.baseline_cache_path(context.side_cache(baselines.CACHE), key)
    cached = baselines.load_baselines(cache_path, key)
    options = beam_prepare.pipeline_options(config.prepare)
    logger.info("evaluate: %d tracks of '%s' on Apache Beam %s", len(names), settings.split, " ".join(options))
    output_dir = Path(context.output_dir).resolve()
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=output_dir))
    results_path = scratch / "results.pickle"
    evaluator = _track_evaluator()(config.to_dict(), str(prepare.path.resolve()), str(train.path.resolve()),
                                   sorted(cached))
    with beam_prepare.project_on_worker_path(), beam_prepare.quiet_beam_logs():
        with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
            evaluated = (pipeline
                         | "ListTracks" >> beam.Create(list(enumerate(names)))
                         | "Spread" >> beam.Reshuffle()
                         | "SeparateAndScore" >> beam.ParDo(evaluator))
            _ = (pipeline
                 | "One" >> beam.Create([None])
                 | "Collect" >> beam.Map(_write_results, str(results_path), beam.pvalue.AsList(evaluated)))
    done = sorted(pickle.loads(results_path.read_bytes()), key=lambda r: r["index"])
    results_path.unlink()
    scratch.rmdir()

    results: Dict[Tuple[str, str], Dict] = {}
    usdrs: Dict[str, Dict[str, Dict[str, float]]] = {method: {} for method in baselines.METHODS}
    warnings, fresh = [], []
    for record in done:
        logger.info("evaluate: track %d/%d '%s': separated and scored in %.1f s", record["index"] + 1, len(names),
                    record["track"], record["seconds"])
        warnings.extend(record["warnings"])
        if record["fresh"]:
            fresh.append(record["track"])
        for method, scores in record["scores"].items():
            results[(record["track"], method)] = scores
            usdrs[method][record["track"]] = record["usdrs"][method]
    return runner.finish_metrics([r["track"] for r in done], fresh, results, usdrs, cached, warnings,
                                targets=tuple(targets), sample_rate=config.data.sample_rate, settings=settings,
                                output_dir=output_dir, baseline_cache=cache_path, key=key, logger=logger,
                                log_scalar=context.log_scalar)
