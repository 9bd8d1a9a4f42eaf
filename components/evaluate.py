"""The evaluate stage: BSSEval v4 (museval) of the trained separator on full tracks, SiSEC18 style.

Reads the prepare artifact (full tracks of `evaluate.split`) and the train artifact (the separator).
Every track is separated at full length with `components.separation.separate_array` and scored with
museval against the true stems, next to two baselines scored by the same code on the same tracks:

  MIX  the mixture as the estimate of every target (the floor)
  IRM  the IRM2 oracle of sigsep-mus-oracle: per channel, STFT (Hann, 46 ms frames, 50 % overlap),
       mask_j = |S_j|^2 / (eps + sum_k |S_k|^2) over every stem of the track, applied to the mixture

Aggregation is SiSEC18's: median over frames per track (NaN frames ignored; museval stores an
infinite ratio as NaN), then median over tracks per target, and the mean over targets. The MDX
utterance-level uSDR (whole track) is averaged over tracks. q = (SDR - SDR_mix) / (SDR_irm - SDR_mix).

The baselines depend only on the data, so they are cached per track in
`artifacts_dir/evaluate-baselines/<fingerprint>.json` and reused when another model is evaluated.

Writes `metrics.json`, museval's per-track JSON under `museval/<method>/<split>/<track>.json` and
`sdr_boxplot.png`.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import importlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from components import artifacts
from components.artifacts import StageError
from components.base import ComponentSpec, StageContext
from components.separation import compiled, separate_array

log = logging.getLogger("pipeline.evaluate")

METRICS = ("SDR", "SIR", "ISR", "SAR")
METHODS = ("model", "mix", "irm")
BASELINES = ("mix", "irm")
BASELINE_VERSION = 1  # bump when the baseline definitions change: old caches are then ignored
IRM_ALPHA = 2.0  # IRM2 (power ratio); 1.0 would be IRM1 (magnitude ratio)
IRM_FRAME_SECONDS = 2048 / 44100  # sigsep-mus-oracle's nperseg=2048 at 44.1 kHz
IRM_DEFINITION = ("IRM2 oracle (sigsep-mus-oracle): per channel, mask_j = |S_j|^2 / (eps + sum_k |S_k|^2) "
                  "over all stems, scipy.signal.stft Hann, 50% overlap, ~46 ms frames")


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------
def irm_fft_size(sample_rate: int) -> int:
    """The oracle's frame length: 2048 at 44.1 kHz, the nearest power of two to 46 ms otherwise."""
    return int(2 ** round(math.log2(IRM_FRAME_SECONDS * sample_rate)))


def irm_estimates(stems: Mapping[str, np.ndarray], *, sample_rate: int, alpha: float = IRM_ALPHA) -> Dict[str, np.ndarray]:
    """Ideal ratio mask oracle. stems {name: (nb_timesteps, nb_channels)} -> {name: same shape}.

    The mixture is the sum of all stems; channels are processed one at a time to bound memory.
    """
    from scipy.signal import istft, stft

    names = list(stems)
    nb_timesteps, nb_channels = np.shape(stems[names[0]])
    nperseg = irm_fft_size(sample_rate)
    eps = np.finfo(np.float64).eps  # as sigsep-mus-oracle: only guards 0/0
    estimates = {name: np.zeros((nb_timesteps, nb_channels), dtype=np.float32) for name in names}
    for channel in range(nb_channels):
        sources = [np.asarray(stems[name][:, channel], dtype=np.float32) for name in names]
        _, _, mixture_spec = stft(np.sum(sources, axis=0), nperseg=nperseg)
        powers = [np.abs(stft(source, nperseg=nperseg)[2]) ** alpha for source in sources]
        total = np.sum(powers, axis=0) + eps
        for name, power in zip(names, powers):
            _, waveform = istft(mixture_spec * (power / total), nperseg=nperseg)
            length = min(nb_timesteps, len(waveform))
            estimates[name][:length, channel] = waveform[:length]
    return estimates


def mix_estimates(mixture: np.ndarray, targets: Sequence[str]) -> Dict[str, np.ndarray]:
    """The MIX baseline: the mixture as the estimate of every target (one shared array)."""
    return {target: mixture for target in targets}


# --------------------------------------------------------------------------------------------
# Scoring and aggregation
# --------------------------------------------------------------------------------------------
def score_track(
    references: Mapping[str, np.ndarray],
    estimates: Mapping[str, np.ndarray],
    *,
    sample_rate: int,
    window_seconds: float,
) -> Dict[str, Dict[str, np.ndarray]]:
    """museval BSSEval v4 of one track: {target: {metric: (nb_frames,)}}, window = hop = window_seconds.

    The references are scored jointly (targets in `references` order), as `museval.eval_mus_track`
    does. Raw values: a perfect frame is +inf here; `museval_frames` applies museval's storage rule.
    """
    import museval

    targets = list(references)
    window = int(window_seconds * sample_rate)
    sdr, isr, sir, sar = museval.evaluate(
        [np.asarray(references[t]) for t in targets],
        [np.asarray(estimates[t]) for t in targets],
        win=window, hop=window, mode="v4",
    )
    values = {"SDR": sdr, "ISR": isr, "SIR": sir, "SAR": sar}
    return {target: {metric: np.asarray(values[metric][i], dtype=np.float64) for metric in METRICS}
            for i, target in enumerate(targets)}


def museval_frames(values) -> np.ndarray:
    """museval's stored frame values (TrackStore): infinite -> NaN, quantised to 1e-5."""
    values = np.array(values, dtype=np.float64)
    values[np.isinf(values)] = np.nan
    return np.round(values, 5)


def frame_median(values) -> float:
    """Median over the frames of one track, NaN frames ignored (NaN when every frame is NaN)."""
    values = museval_frames(values)
    if values.size == 0 or np.all(np.isnan(values)):
        return float("nan")
    return float(np.nanmedian(values))


def usdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """MDX utterance-level SDR over the whole track: 10 log10((sum s^2 + eps) / (sum (s - s_hat)^2 + eps))."""
    from components.metrics import global_sdr

    return global_sdr(reference, estimate)


def track_summary(frames: Mapping[str, Mapping[str, Sequence[float]]], usdrs: Mapping[str, float]) -> Dict[str, Dict[str, float]]:
    """{target: {metric: frames}} and {target: uSDR} -> {target: {SDR, SIR, ISR, SAR, uSDR}} of one track."""
    return {target: dict({metric: frame_median(frames[target][metric]) for metric in METRICS},
                         uSDR=float(usdrs[target]))
            for target in frames}


def aggregate(per_track: Mapping[str, Mapping[str, Mapping[str, float]]], targets: Sequence[str]) -> Dict[str, Any]:
    """SiSEC18 aggregation of {track: {target: {metric: frame median, uSDR: value}}}.

    Returns {target: {metric: median over tracks (NaN tracks ignored), uSDR: mean over tracks},
             "mean": {metric: mean over targets}}.
    """
    result: Dict[str, Any] = {}
    for target in targets:
        row = {}
        for metric in METRICS:
            values = np.array([per_track[track][target][metric] for track in per_track], dtype=np.float64)
            row[metric] = float(np.nanmedian(values)) if np.any(~np.isnan(values)) else float("nan")
        row["uSDR"] = float(np.mean([per_track[track][target]["uSDR"] for track in per_track]))
        result[target] = row
    result["mean"] = {metric: float(np.mean([result[t][metric] for t in targets])) for metric in METRICS + ("uSDR",)}
    return result


def normalized_score(model_sdr: float, mix_sdr: float, irm_sdr: float) -> float:
    """q = (SDR_model - SDR_mix) / (SDR_irm - SDR_mix): 0 at the mixture, 1 at the oracle; NaN if undefined."""
    span = irm_sdr - mix_sdr
    if not all(math.isfinite(v) for v in (model_sdr, mix_sdr, irm_sdr)) or span <= 0:
        return float("nan")
    return float((model_sdr - mix_sdr) / span)


# --------------------------------------------------------------------------------------------
# Checks: one-line errors naming the track, the target and the fix
# --------------------------------------------------------------------------------------------
def check_references(track: str, stems: Mapping[str, np.ndarray], targets: Sequence[str], *,
                     sample_rate: int, window_seconds: float) -> None:
    missing = [t for t in targets if t not in stems]
    if missing:
        raise StageError(f"track '{track}' has no stem for target(s) {', '.join(missing)} (stems: "
                         f"{', '.join(stems)}); evaluate a model trained on data.targets of this data set")
    window = int(window_seconds * sample_rate)
    for target in targets:
        stem = np.asarray(stems[target])
        if stem.ndim != 2:
            raise StageError(f"track '{track}', target '{target}': stem has shape {stem.shape}, "
                             f"expected (nb_timesteps, nb_channels)")
        if stem.shape[0] < window:
            raise StageError(
                f"track '{track}' is {stem.shape[0] / sample_rate:.2f} s long, shorter than one BSSEval window "
                f"({window_seconds} s); lower evaluate.window_seconds or leave the track out of the split")
        if not np.all(np.isfinite(stem)):
            raise StageError(f"track '{track}', target '{target}': the reference stem contains NaN/Inf; "
                             f"re-run prepare on clean audio")
        if np.all(np.sum(stem, axis=1) == 0):
            raise StageError(f"track '{track}', target '{target}': the reference stem is silent, which BSSEval "
                             f"cannot score; leave the track out of evaluate.split or the target out of data.targets")


def check_estimates(track: str, method: str, estimates: Mapping[str, np.ndarray], targets: Sequence[str],
                    shape: Tuple[int, int]) -> List[str]:
    """Raise on a missing target, a wrong shape or NaN/Inf; return the targets whose estimate is silent."""
    missing = [t for t in targets if t not in estimates]
    if missing:
        raise StageError(f"track '{track}': the {method} estimates lack target(s) {', '.join(missing)} "
                         f"(got {', '.join(estimates) or 'none'}); the separator must output every target in "
                         f"{', '.join(targets)} — retrain with matching data.targets")
    silent = []
    for target in targets:
        estimate = np.asarray(estimates[target])
        if estimate.shape != tuple(shape):
            raise StageError(f"track '{track}', target '{target}': the {method} estimate has shape "
                             f"{estimate.shape}, the reference {tuple(shape)}; the separator must keep the length")
        bad = int(np.size(estimate) - np.count_nonzero(np.isfinite(estimate)))
        if bad:
            raise StageError(f"track '{track}', target '{target}': the {method} estimate contains {bad} NaN/Inf "
                             f"samples; the trained weights are numerically broken — retrain (e.g. lower train.lr "
                             f"or set train.clip_norm)")
        if np.all(np.sum(estimate, axis=1) == 0):
            silent.append(target)
    return silent


def _dither(estimate: np.ndarray, seed: int) -> np.ndarray:
    """A silent estimate gets a -180 dBFS noise floor: museval refuses all-zero estimates, and its SDR
    is then the ~0 dB of "no estimate" instead of the whole track being unscorable."""
    noise = np.random.default_rng(seed).standard_normal(estimate.shape).astype(np.float32)
    return estimate + 1e-9 * noise


# --------------------------------------------------------------------------------------------
# Scoring queue: museval in worker processes (CPU bound), arrays handed over as .npy files
# --------------------------------------------------------------------------------------------
def _load(value):
    return np.load(value, mmap_mode="r") if isinstance(value, str) else value


def _score_job(references, estimates, sample_rate: int, window_seconds: float):
    """Run in a worker: load the arrays (paths or arrays) and score; returns (scores, seconds)."""
    started = time.time()
    scores = score_track({t: _load(v) for t, v in references.items()},
                         {t: _load(v) for t, v in estimates.items()},
                         sample_rate=sample_rate, window_seconds=window_seconds)
    return scores, time.time() - started


class _ScoringQueue:
    """Scores jobs in up to `workers` spawned processes (in this process when workers <= 1).

    At most 2 x workers jobs are in flight, so memory and scratch disk stay bounded on long test sets.
    """

    def __init__(self, workers: int, scratch: Path, sample_rate: int, window_seconds: float, logger):
        self.workers = max(1, int(workers))
        self.scratch = scratch
        self.sample_rate = sample_rate
        self.window_seconds = window_seconds
        self.logger = logger
        self.pool = None
        self.pending: Dict[Any, Tuple[str, str, Path]] = {}
        self.results: Dict[Tuple[str, str], Dict] = {}
        self.track_jobs: Dict[str, int] = {}

    def save(self, track_index: int, name: str, array: np.ndarray) -> str:
        folder = self.scratch / f"{track_index:05d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.npy"
        np.save(path, np.asarray(array, dtype=np.float32))
        return str(path)

    def submit(self, track: str, track_index: int, method: str, references: Mapping, estimates: Mapping) -> None:
        if self.workers <= 1:
            started = time.time()
            scores = score_track(references, estimates, sample_rate=self.sample_rate,
                                 window_seconds=self.window_seconds)
            self._done(track, method, scores, time.time() - started)
            return
        if self.pool is None:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        future = self.pool.submit(_score_job, dict(references), dict(estimates), self.sample_rate, self.window_seconds)
        self.pending[future] = (track, method, self.scratch / f"{track_index:05d}")
        self.track_jobs[track] = self.track_jobs.get(track, 0) + 1
        while len(self.pending) >= 2 * self.workers:
            self._collect(concurrent.futures.FIRST_COMPLETED)

    def _collect(self, when) -> None:
        finished, _ = concurrent.futures.wait(list(self.pending), return_when=when)
        for future in finished:
            track, method, folder = self.pending.pop(future)
            try:
                scores, seconds = future.result()
            except concurrent.futures.process.BrokenProcessPool as error:
                raise StageError(f"a museval worker died while scoring track '{track}' ({method} estimates): out of "
                                 f"memory, or a calling script without an `if __name__ == '__main__':` guard; "
                                 f"retry with evaluate.workers=1") from error
            except Exception as error:  # museval's own ValueError: name the track
                raise StageError(f"museval failed on track '{track}' ({method} estimates): "
                                 f"{' '.join(str(error).split())}") from error
            self._done(track, method, scores, seconds)
            self.track_jobs[track] -= 1
            if self.track_jobs[track] == 0:
                shutil.rmtree(folder, ignore_errors=True)

    def _done(self, track: str, method: str, scores, seconds: float) -> None:
        self.results[(track, method)] = scores
        self.logger.info("evaluate: scored '%s' (%s) in %.1f s", track, method, seconds)

    def drain(self) -> Dict[Tuple[str, str], Dict]:
        while self.pending:
            self._collect(concurrent.futures.ALL_COMPLETED)
        return self.results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# --------------------------------------------------------------------------------------------
# Baseline cache
# --------------------------------------------------------------------------------------------
def baseline_key(prepare_fingerprint: str, *, split: str, window_seconds: float, sample_rate: int,
                 targets: Sequence[str]) -> dict:
    return {"prepare": prepare_fingerprint, "split": split, "window_seconds": float(window_seconds),
            "sample_rate": int(sample_rate), "targets": list(targets), "irm": IRM_DEFINITION,
            "irm_alpha": IRM_ALPHA, "version": BASELINE_VERSION}


def baseline_cache_path(artifacts_dir, key: Mapping) -> Path:
    return Path(artifacts_dir) / "evaluate-baselines" / f"{artifacts.fingerprint(key)}.json"


def load_baselines(path: Optional[Path], key: Mapping) -> Dict[str, Dict]:
    """{track: {method: {"frames": {target: {metric: [..]}}, "uSDR": {target: v}}}} of a matching cache."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        cached = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if cached.get("key") != dict(key):
        return {}
    return cached.get("tracks", {})


def save_baselines(path: Path, key: Mapping, tracks: Mapping) -> None:
    """Atomic write (temp file + rename) so concurrent evaluations never read half a cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{int(time.time() * 1000)}.tmp")
    tmp.write_text(json.dumps(_json_safe({"key": dict(key), "tracks": tracks}), sort_keys=True))
    os.replace(tmp, path)


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
    cached = load_baselines(baseline_cache, key) if baseline_cache is not None else {}
    if settings.max_tracks is not None:
        tracks = itertools.islice(tracks, settings.max_tracks)
        nb_tracks = settings.max_tracks if nb_tracks is None else min(nb_tracks, settings.max_tracks)

    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=output_dir))
    queue = _ScoringQueue(settings.workers, scratch, sample_rate, settings.window_seconds, logger)
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
            check_references(track, stems, targets, sample_rate=sample_rate, window_seconds=settings.window_seconds)
            mixture = np.zeros(np.shape(stems[targets[0]]), dtype=np.float32)
            for stem in stems.values():  # the mixture is the sum of every stem (not only the targets)
                mixture += np.asarray(stem, dtype=np.float32)
            shape = mixture.shape
            estimates = separate_array(separate_fn, mixture, sample_rate=sample_rate,
                                       chunk_seconds=settings.chunk_seconds, overlap=settings.overlap,
                                       input_samples=input_samples)
            logger.info("evaluate: track %d%s '%s' (%.1f s of audio): separated in %.1f s%s", index + 1,
                        f"/{nb_tracks}" if nb_tracks else "", track, shape[0] / sample_rate, time.time() - started,
                        "" if track not in cached else "; MIX/IRM baselines from the cache")
            for target in check_estimates(track, "model", estimates, targets, shape):
                warnings.append(f"track '{track}', target '{target}': the model estimate is silent; scored "
                                f"with a -180 dBFS noise floor")
                estimates[target] = _dither(estimates[target], seed=index)
            usdrs["model"][track] = {t: usdr(stems[t], estimates[t]) for t in targets}
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
                baseline_sets = {"mix": mix_estimates(mixture, targets),
                                 "irm": {t: e for t, e in irm_estimates(stems, sample_rate=sample_rate).items()
                                         if t in targets}}
                for method, method_estimates in baseline_sets.items():
                    check_estimates(track, method, method_estimates, targets, shape)
                    usdrs[method][track] = {t: usdr(stems[t], method_estimates[t]) for t in targets}
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
            frames[method][track] = {t: {m: museval_frames(scores[t][m]).tolist() for m in METRICS} for t in targets}
    if fresh and baseline_cache is not None:
        merged = dict(load_baselines(baseline_cache, key))
        for track in fresh:
            merged[track] = {method: {"frames": frames[method][track], "uSDR": usdrs[method][track]}
                             for method in BASELINES}
        save_baselines(baseline_cache, key, merged)
        logger.info("evaluate: cached the MIX and IRM baselines of %d track(s) in %s", len(fresh), baseline_cache)

    per_track = {method: {track: track_summary(_as_float(frames[method][track]), usdrs[method][track])
                          for track in names} for method in METHODS}
    summary = {method: aggregate(per_track[method], targets) for method in METHODS}
    normalized = {t: normalized_score(summary["model"][t]["SDR"], summary["mix"][t]["SDR"], summary["irm"][t]["SDR"])
                  for t in targets}
    normalized["mean"] = float(np.mean([normalized[t] for t in targets]))
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
                     "irm": IRM_DEFINITION, "irm_fft_size": irm_fft_size(sample_rate)},
        "baseline_cache": {"path": str(baseline_cache) if baseline_cache else None,
                           "reused_tracks": [t for t in names if t not in fresh]},
        "warnings": warnings,
    }
    for warning in warnings:
        logger.warning("evaluate: %s", warning)

    _write_museval(output_dir / "museval", frames, names, targets, settings)
    _plot(output_dir / "sdr_boxplot.png", per_track, targets)
    (output_dir / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2))
    _log_metrics(metrics, per_track, names, targets, log_scalar)
    return metrics


def _as_float(frames):
    return {t: {m: [np.nan if v is None else v for v in values] for m, values in row.items()}
            for t, row in frames.items()}


def _write_museval(folder: Path, frames, names, targets, settings) -> None:
    """museval's own per-track JSON (TrackStore format, schema-validated): museval/<method>/<split>/<track>.json."""
    import museval

    for method in METHODS:
        split_dir = folder / method / settings.split
        split_dir.mkdir(parents=True, exist_ok=True)
        for track in names:
            store = museval.TrackStore(track_name=track, win=settings.window_seconds, hop=settings.window_seconds)
            for target in targets:
                store.add_target(target_name=target, values=_as_float(frames[method][track])[target])
            store.validate()
            store.save(str(split_dir / f"{track.replace(os.sep, '_')}.json"))


def _plot(path: Path, per_track, targets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    colours = {"model": "tab:blue", "mix": "tab:gray", "irm": "tab:green"}
    figure, axes = plt.subplots(figsize=(2.2 * len(targets) + 2, 4))
    width = 0.25
    for offset, method in enumerate(METHODS):
        data = []
        for target in targets:
            values = [per_track[method][track][target]["SDR"] for track in per_track[method]]
            data.append([v for v in values if math.isfinite(v)] or [np.nan])
        positions = [i + (offset - 1) * width for i in range(len(targets))]
        boxes = axes.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=False,
                             medianprops={"color": "black"})
        for box in boxes["boxes"]:
            box.set_facecolor(colours[method])
            box.set_alpha(0.6)
        for position, values in zip(positions, data):  # the tracks themselves: visible even for one track
            axes.scatter([position] * len(values), values, color=colours[method], edgecolor="black", s=18, zorder=3)
        axes.plot([], [], color=colours[method], linewidth=8, label=method.upper() if method != "model" else "model")
    axes.set_xticks(range(len(targets)))
    axes.set_xticklabels(targets)
    axes.set_ylabel("SDR (dB)")
    nb_tracks = len(next(iter(per_track.values())))
    axes.set_title(f"BSSEval v4 SDR per track (median over frames), {nb_tracks} track(s)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _log_metrics(metrics, per_track, names, targets, log_scalar) -> None:
    def emit(name, value, step=None):
        if value is not None and math.isfinite(value):
            log_scalar(name, float(value), step)

    sections = {"model": dict(metrics["model"], mean=metrics["mean"]), **metrics["baselines"]}
    for method, rows in sections.items():
        for target, row in rows.items():
            for metric, value in row.items():
                emit(f"{method}.{target}.{metric}", value)
    for target, value in metrics["normalized"].items():
        emit(f"normalized.{target}", value)
    for step, track in enumerate(names):
        for target in targets:
            emit(f"track.model.{target}.SDR", per_track["model"][track][target]["SDR"], step)


def _json_safe(value):
    """NaN/inf -> None, numpy scalars -> Python: metrics.json stays strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# --------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------
def _split_size(prepare, split: str) -> Optional[int]:
    found = prepare.meta.get("manifest", {}).get("splits", {}).get(split, {}).get("tracks")
    if isinstance(found, (list, tuple, dict)):
        return len(found)
    return found if isinstance(found, int) else None


def _evaluate_locally(context, prepare, records, model, separate_fn, targets, key):
    """The default: separate in this process, museval in `evaluate.workers` processes."""
    config, settings = context.config, context.config.evaluate
    return evaluate_tracks(
        records.read_tracks(prepare, settings.split), separate_fn,
        targets=targets, sample_rate=config.data.sample_rate, settings=settings,
        output_dir=context.output_dir, baseline_cache=baseline_cache_path(config.artifacts_dir, key),
        cache_key=key, input_samples=model.input_samples, nb_tracks=_split_size(prepare, settings.split),
        logger=context.logger, log_scalar=context.log_scalar,
    )


def run(context: StageContext) -> dict:
    config = context.config
    settings = config.evaluate
    prepare = context.inputs["prepare"]
    records = importlib.import_module("components.records")
    train = importlib.import_module("components.train")

    splits = prepare.meta.get("manifest", {}).get("splits")
    if splits is not None and settings.split not in splits:
        raise StageError(f"the evaluate split '{settings.split}' was not prepared (prepared: {', '.join(splits)}); "
                         f"set evaluate.split to one of them or add it to data.splits and rerun prepare")
    if _split_size(prepare, settings.split) == 0:
        having = [name for name in splits or {} if _split_size(prepare, name)]
        raise StageError(f"the evaluate split '{settings.split}' of the prepare artifact has no tracks; choose a split "
                         f"that has some ({', '.join(having) or 'none'}), e.g. `with evaluate.split=train` "
                         f"(the MUSDB sample has only train)")
    records.verify_shards(prepare, (settings.split,))
    model = train.load_trained(context.inputs["train"], config)
    if int(model.sample_rate) != int(config.data.sample_rate):
        raise StageError(f"the model works at {model.sample_rate} Hz but the data is at {config.data.sample_rate} Hz; "
                         f"retrain with the same data.sample_rate")
    targets = tuple(model.targets)
    key = baseline_key(prepare.fingerprint, split=settings.split, window_seconds=settings.window_seconds,
                       sample_rate=config.data.sample_rate, targets=targets)
    separate_fn = compiled(model.separator, model.nb_channels)

    if config.prepare.runner == "beam":  # one Beam element per track: separate and score on the workers
        from components import beam_evaluate

        metrics = beam_evaluate.evaluate(context, targets=targets, key=key)
    else:
        metrics = _evaluate_locally(context, prepare, records, model, separate_fn, targets, key)
    figures = {
        "SDR": metrics["mean"]["SDR"],
        "uSDR": metrics["mean"]["uSDR"],
        "q": metrics["normalized"]["mean"],
        "mix_SDR": metrics["baselines"]["mix"]["mean"]["SDR"],
        "irm_SDR": metrics["baselines"]["irm"]["mean"]["SDR"],
        "tracks": len(metrics["tracks"]),
        "targets": {t: {"SDR": metrics["model"][t]["SDR"], "uSDR": metrics["model"][t]["uSDR"],
                        "q": metrics["normalized"][t]} for t in targets},
    }
    return _json_safe({"figures": figures, "result": metrics["mean"]["SDR"], "metrics": "metrics.json",
                       "baseline_cache": metrics["baseline_cache"]["path"]})


SPEC = ComponentSpec(
    name="evaluate",
    inputs=("prepare", "train"),
    config_sections=("data", "model", "train", "evaluate"),
    executor=run,
)
