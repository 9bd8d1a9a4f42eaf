"""BSSEval v4 scoring (museval) of one track, and SiSEC18 / MDX aggregation over tracks.

Per track, museval scores every target jointly on windows of `evaluate.window_seconds` (hop = window);
frames are kept as museval stores them (an infinite ratio as NaN, quantised to 1e-5). Aggregation is
SiSEC18's: median over frames per track (NaN frames ignored), median over tracks per target, mean over
targets. The MDX utterance-level uSDR (whole track) is averaged over tracks. q = (SDR - SDR_mix) /
(SDR_irm - SDR_mix) places a model between the MIX and IRM baselines (`components.evaluation.baselines`).
`ScoringQueue` runs museval in worker processes; the local and the Beam evaluation both score here.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import math
import multiprocessing
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from configs.errors import StageError
from components.evaluation.metrics import global_sdr

METRICS = ("SDR", "SIR", "ISR", "SAR")


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
    import museval  # ~2 s of imports (pandas, jsonschema): only when something is scored

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


def normalized_scores(summary: Mapping[str, Mapping[str, Mapping[str, float]]], targets: Sequence[str]
                      ) -> Dict[str, float]:
    """{target: q, "mean": mean of the per-target q} from the `aggregate` of "model", "mix" and "irm"."""
    normalized = {t: normalized_score(summary["model"][t]["SDR"], summary["mix"][t]["SDR"], summary["irm"][t]["SDR"])
                  for t in targets}
    normalized["mean"] = float(np.mean([normalized[t] for t in targets]))
    return normalized


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


def dither(estimate: np.ndarray, seed: int) -> np.ndarray:
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


class ScoringQueue:
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



def as_float(frames):
    """Frames read back from JSON (NaN stored as null) -> floats: {target: {metric: [float]}}."""
    return {t: {m: [np.nan if v is None else v for v in values] for m, values in row.items()}
            for t, row in frames.items()}
