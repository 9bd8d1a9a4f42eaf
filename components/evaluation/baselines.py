"""The oracle baselines every model is scored against, and their cache.

  MIX  the mixture as the estimate of every target (the floor)
  IRM  the IRM2 oracle of sigsep-mus-oracle: per channel, STFT (Hann, 46 ms frames, 50 % overlap),
       mask_j = |S_j|^2 / (eps + sum_k |S_k|^2) over every stem of the track, applied to the mixture

They depend only on the data, so their museval frames and uSDR are cached per track in
`artifacts_dir/evaluate-baselines/<fingerprint of baseline_key>.json` and reused when another model is
evaluated on the same prepared split.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from components import artifacts
from components.evaluation import scoring
from components.evaluation.report import json_safe

BASELINES = ("mix", "irm")
METHODS = ("model",) + BASELINES  # what evaluate scores: the model, then the baselines
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
# Baseline cache
# --------------------------------------------------------------------------------------------
def baseline_key(prepare_fingerprint: str, *, split: str, window_seconds: float, sample_rate: int,
                 targets: Sequence[str]) -> dict:
    return {"prepare": prepare_fingerprint, "split": split, "window_seconds": float(window_seconds),
            "sample_rate": int(sample_rate), "targets": list(targets), "irm": IRM_DEFINITION,
            "irm_alpha": IRM_ALPHA, "version": BASELINE_VERSION}


CACHE = "evaluate-baselines"  # the evaluate stage's side cache, `artifacts_dir/evaluate-baselines/`


def baseline_cache_path(cache_dir, key: Mapping) -> Path:
    """The cache file of `key` in the side cache directory `cache_dir` (`context.side_cache(CACHE)`)."""
    return Path(cache_dir) / f"{artifacts.fingerprint(key)}.json"


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


def add_to_cache(path: Path, key: Mapping, tracks: Mapping) -> None:
    """The cache at `path` with the baselines of `tracks` added (or replaced), written back."""
    merged = dict(load_baselines(path, key))
    merged.update(tracks)
    save_baselines(path, key, merged)


def save_baselines(path: Path, key: Mapping, tracks: Mapping) -> None:
    """Atomic write (temp file + rename) so concurrent evaluations never read half a cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{int(time.time() * 1000)}.tmp")
    tmp.write_text(json.dumps(json_safe({"key": dict(key), "tracks": tracks}), sort_keys=True))
    os.replace(tmp, path)



def estimates(track: str, stems: Mapping[str, np.ndarray], mixture: np.ndarray, targets: Sequence[str], *,
              sample_rate: int) -> Dict[str, Dict[str, np.ndarray]]:
    """{"mix": estimates, "irm": estimates} of one track, each checked like a model's (shape, finite)."""
    found = {"mix": mix_estimates(mixture, targets),
             "irm": {t: e for t, e in irm_estimates(stems, sample_rate=sample_rate).items() if t in targets}}
    for method, method_estimates in found.items():
        scoring.check_estimates(track, method, method_estimates, targets, mixture.shape)
    return found
