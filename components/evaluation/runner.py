"""The evaluation loop, independent of the pipeline (tests drive it with fakes), and the per-track work the
local loop and the Beam runner (`components.evaluation.beam_evaluate`) share: separate a track, check it,
score it with museval next to the MIX/IRM baselines, aggregate into metrics.json."""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from components.evaluation import baselines, report, scoring
from configs.errors import StageError
from components.evaluation.baselines import BASELINES, METHODS
from components.evaluation.scoring import METRICS
from components.inference.separation import separate_array

log = logging.getLogger("pipeline.evaluate")


# --------------------------------------------------------------------------------------------
# One track (shared with the Beam runner)
# --------------------------------------------------------------------------------------------
def separate_track(index: int, track: str, stems: Mapping[str, np.ndarray], separate_fn: Callable, *,
                   targets: Sequence[str], sample_rate: int, settings, input_samples
                   ) -> Tuple[np.ndarray, Dict[str, np.ndarray], List[str]]:
    """Check the references, separate the mixture (the sum of every stem, not only the targets) and check
    the estimates: (mixture, {target: estimate}, warnings). A silent estimate is dithered (see `scoring.dither`)."""
    scoring.check_references(track, stems, targets, sample_rate=sample_rate, window_seconds=settings.window_seconds)
    mixture = np.zeros(np.shape(stems[targets[0]]), dtype=np.float32)
    for stem in stems.values():
        mixture += np.asarray(stem, dtype=np.float32)
    estimates = separate_array(separate_fn, mixture, sample_rate=sample_rate, chunk_seconds=settings.chunk_seconds,
                               overlap=settings.overlap, input_samples=input_samples)
    warnings = []
    for target in scoring.check_estimates(track, "model", estimates, targets, mixture.shape):
        warnings.append(f"track '{track}', target '{target}': the model estimate is silent; scored "
                        f"with a -180 dBFS noise floor")
        estimates[target] = scoring.dither(estimates[target], seed=index)
    return mixture, estimates, warnings


# --------------------------------------------------------------------------------------------
# The evaluation loop (independent of the pipeline: tests drive it with fakes)
# --------------------------------------------------------------------------------------------
def evaluate_tracks(
    tracks: Iterable[Tuple[str, Mapping[str, np.ndarray]]],
    separate_fn: Callable,
    *,
    targets: Sequence[str],
    sample_rate: int,
    settings,
    output_dir,
    baseline_cache: Optional[Path] = None,
    cache_key: Optional[Mapping] = None,
    input_samples: Optional[Callable[[int], int]] = None,
    nb_tracks: Optional[int] = None,
    logger: Optional[logging.Logger] = None,
    log_scalar: Optional[Callable] = None,
) -> Dict[str, Any]:
    """Separate, score and aggregate; write metrics.json, museval JSON and the box plot; return the metrics.

    tracks:      iterable of (name, {stem: (nb_timesteps, nb_channels)}); the mixture is the sum of all stems
    separate_fn: `(batch, chunk_samples, nb_channels)` -> {target: same shape}
    settings:    an EvaluateConfig (split, max_tracks, chunk_seconds, overlap, window_seconds, workers)
    """
    logger = logger or log
    log_scalar = log_scalar or (lambda *args, **kwargs: None)
    output_dir = Path(output_dir)
    targets = tuple(targets)
    key = dict(cache_key or {})
    cached = baselines.load_baselines(baseline_cache, key) if baseline_cache is not None else {}
    if settings.max_tracks is not None:
        tracks = itertools.islice(tracks, settings.max_tracks)
        nb_tracks = settings.max_tracks if nb_tracks is None else min(nb_tracks, settings.max_tracks)

    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=output_dir))
    queue = scoring.ScoringQueue(settings.workers, scratch, sample_rate, settings.window_seconds, logger)
    names: List[str] = []
    usdrs: Dict[str, Dict[str, Dict[str, float]]] = {method: {} for method in METHODS}
    warnings: List[str] = []
    fresh: List[str] = []
    try:
        for index, (track, stems) in enumerate(tracks):
            started = time.time()
            if track in names:
                raise StageError(f"track '{track}' appears twice in split '{settings.split}'; re-run prepare")
            names.append(track)
            mixture, estimates, silent = separate_track(index, track, stems, separate_fn, targets=targets,
                                                        sample_rate=sample_rate, settings=settings,
                                                        input_samples=input_samples)
            shape = mixture.shape
            logger.info("evaluate: track %d%s '%s' (%.1f s of audio): separated in %.1f s%s", index + 1,
                        f"/{nb_tracks}" if nb_tracks else "", track, shape[0] / sample_rate, time.time() - started,
                        "" if track not in cached else "; MIX/IRM baselines from the cache")
            warnings.extend(silent)
            usdrs["model"][track] = {t: scoring.usdr(stems[t], estimates[t]) for t in targets}
            references = {t: stems[t] for t in targets}
            parallel = queue.workers > 1
            if parallel:
                references = {t: queue.save(index, f"reference-{t}", stems[t]) for t in targets}
                model_estimates = {t: queue.save(index, f"model-{t}", estimates[t]) for t in targets}
            else:
                model_estimates = {t: estimates[t] for t in targets}
            del estimates
            queue.submit(track, index, "model", references, model_estimates)

            if track not in cached:
                fresh.append(track)
                baseline_sets = baselines.estimates(track, stems, mixture, targets, sample_rate=sample_rate)
                for method, method_estimates in baseline_sets.items():
                    usdrs[method][track] = {t: scoring.usdr(stems[t], method_estimates[t]) for t in targets}
                    if parallel:
                        if method == "mix":  # one file for every target
                            path = queue.save(index, "mixture", mixture)
                            method_estimates = {t: path for t in targets}
                        else:
                            method_estimates = {t: queue.save(index, f"{method}-{t}", method_estimates[t])
                                                for t in targets}
                    queue.submit(track, index, method, references, method_estimates)
        results = queue.drain()
    finally:
        queue.close()
        shutil.rmtree(scratch, ignore_errors=True)

    return finish_metrics(names, fresh, results, usdrs, cached, warnings, targets=targets, sample_rate=sample_rate,
                          settings=settings, output_dir=output_dir, baseline_cache=baseline_cache, key=key,
                          logger=logger, log_scalar=log_scalar)


def finish_metrics(names: List[str], fresh: List[str], results: Mapping[Tuple[str, str], Dict],
                   usdrs: Dict[str, Dict[str, Dict[str, float]]], cached: Mapping, warnings: List[str], *,
                   targets: Sequence[str], sample_rate: int, settings, output_dir: Path,
                   baseline_cache: Optional[Path], key: Mapping, logger, log_scalar) -> Dict[str, Any]:
    """Scores of every track -> cached baselines, aggregation, metrics.json, museval JSON and the box plot.

    names: tracks in order; fresh: tracks whose MIX/IRM baselines were scored now (others come from
    `cached`); results: {(track, method): museval scores}; usdrs: {method: {track: {target: uSDR}}}.
    """
    if not names:
        raise StageError(f"the evaluate split '{settings.split}' has no tracks; choose a split that has some, "
                         f"e.g. `with evaluate.split=train` (the MUSDB sample has only a train track)")

    # frames stored as museval stores them (inf -> NaN, 1e-5 quantised)
    frames: Dict[str, Dict[str, Dict]] = {method: {} for method in METHODS}
    for track in names:
        for method in METHODS:
            if method != "model" and track not in fresh:
                frames[method][track] = cached[track][method]["frames"]
                usdrs[method][track] = cached[track][method]["uSDR"]
                continue
            scores = results[(track, method)]
            frames[method][track] = {t: {m: scoring.museval_frames(scores[t][m]).tolist() for m in METRICS}
                                     for t in targets}
    if fresh and baseline_cache is not None:
        baselines.add_to_cache(baseline_cache, key, {track: {method: {"frames": frames[method][track],
                                                                       "uSDR": usdrs[method][track]}
                                                              for method in BASELINES} for track in fresh})
        logger.info("evaluate: cached the MIX and IRM baselines of %d track(s) in %s", len(fresh), baseline_cache)

    per_track = {method: {track: scoring.track_summary(scoring.as_float(frames[method][track]), usdrs[method][track])
                          for track in names} for method in METHODS}
    summary = {method: scoring.aggregate(per_track[method], targets) for method in METHODS}
    normalized = scoring.normalized_scores(summary, targets)
    for target in targets:
        if not math.isfinite(normalized[target]):
            warnings.append(f"target '{target}': q is undefined (SDR_irm <= SDR_mix or a non-finite SDR)")
    if any(math.isnan(summary[m]["mean"]["SDR"]) for m in METHODS):
        warnings.append("a mean SDR is NaN: some target had no scorable frame (e.g. perfect estimates: museval "
                        "stores an infinite SDR as NaN)")

    metrics = {
        "model": {t: summary["model"][t] for t in targets},
        "mean": summary["model"]["mean"],
        "baselines": {method: summary[method] for method in BASELINES},
        "normalized": normalized,
        "tracks": names,
        "per_track": per_track,
        "settings": {"split": settings.split, "sample_rate": sample_rate, "targets": list(targets),
                     "window_seconds": settings.window_seconds, "chunk_seconds": settings.chunk_seconds,
                     "overlap": settings.overlap, "aggregation": "median over frames (NaN ignored), median over "
                     "tracks, mean over targets; uSDR: mean over tracks; q mean: mean of per-target q",
                     "irm": baselines.IRM_DEFINITION, "irm_fft_size": baselines.irm_fft_size(sample_rate)},
        "baseline_cache": {"path": str(baseline_cache) if baseline_cache else None,
                           "reused_tracks": [t for t in names if t not in fresh]},
        "warnings": warnings,
    }
    for warning in warnings:
        logger.warning("evaluate: %s", warning)

    report.write(output_dir, metrics, frames, names, targets, settings)
    report.log_metrics(metrics, per_track, names, targets, log_scalar)
    return metrics
