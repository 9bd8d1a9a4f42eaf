"""The evaluate stage's report: metrics.json, museval's per-track JSON, the SDR box plot, Sacred scalars.

    metrics.json                            aggregated scores of the model and the baselines, per track,
                                            q, settings, warnings (strict JSON: NaN -> null)
    museval/<method>/<split>/<track>.json   museval's own TrackStore files (schema-validated)
    sdr_boxplot.png                         SDR per track (median over frames) per target and method
    per_track.csv                           the per-track table: method, track, target, median scores
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from components.evaluation.scoring import as_float


def write(output_dir: Path, metrics: Mapping, frames, names: Sequence[str], targets: Sequence[str], settings) -> None:
    """Every file of the report; `frames` {method: {track: {target: {metric: [museval frames]}}}}."""
    write_museval(output_dir / "museval", frames, names, targets, settings)
    plot(output_dir / "sdr_boxplot.png", metrics["per_track"], targets)
    (output_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    write_table(output_dir / "per_track.csv", metrics["per_track"])


def write_table(path: Path, per_track) -> None:
    """One row per method, track and target with its scores (median over frames): the per-track table."""
    import csv

    names = sorted({metric for method in per_track.values() for track in method.values()
                    for scores in track.values() for metric in scores})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "track", "target", *names])
        for method, tracks in per_track.items():
            for track, targets in tracks.items():
                for target, scores in targets.items():
                    writer.writerow([method, track, target, *(scores.get(name) for name in names)])


def write_museval(folder: Path, frames, names, targets, settings) -> None:
    """museval's own per-track JSON (TrackStore format, schema-validated): museval/<method>/<split>/<track>.json."""
    import museval

    for method in frames:
        split_dir = folder / method / settings.split
        split_dir.mkdir(parents=True, exist_ok=True)
        for track in names:
            store = museval.TrackStore(track_name=track, win=settings.window_seconds, hop=settings.window_seconds)
            for target in targets:
                store.add_target(target_name=target, values=as_float(frames[method][track])[target])
            store.validate()
            store.save(str(split_dir / f"{track.replace(os.sep, '_')}.json"))


def plot(path: Path, per_track, targets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    colours = {"model": "tab:blue", "mix": "tab:gray", "irm": "tab:green"}
    figure, axes = plt.subplots(figsize=(2.2 * len(targets) + 2, 4))
    width = 0.25
    for offset, method in enumerate(per_track):  # model, MIX, IRM
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


def log_metrics(metrics, per_track, names, targets, log_scalar) -> None:
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


def json_safe(value):
    """NaN/inf -> None, numpy scalars -> Python: metrics.json stays strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value

