"""Chunked separation and the evaluate stage: figures checked against hand-computed numbers.

museval calls are kept tiny (3 s at 8 kHz, mono, 2 targets, 1 s windows: ~0.2 s each).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import butter, sosfilt

from components.evaluation import baselines, runner, scoring
from components import evaluate
from components.training import trained
from components.data import records
from components.artifacts import Artifact
from configs.errors import StageError
from components.base import StageContext
from components.data.manifest import Manifest, Split, TrackEntry
from components.inference.separation import chunk_layout, chunk_weights, separate_array
from configs.config import Config, EvaluateConfig

SAMPLE_RATE = 8000
TARGETS = ("bass", "vocals")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_TRACK = SHARED_DATA / "musdb18hq-sample" / "train" / "Music Delta - 80s Rock"


def synthetic_track(seed: int, seconds: float = 3.0, nb_channels: int = 1):
    """Two random sources with different spectra: low-passed and (quieter) high-passed noise."""
    rng = np.random.default_rng(seed)
    length = int(seconds * SAMPLE_RATE)
    low = sosfilt(butter(4, 500, fs=SAMPLE_RATE, output="sos"), rng.standard_normal((length, nb_channels)), axis=0)
    high = sosfilt(butter(4, 1500, "high", fs=SAMPLE_RATE, output="sos"), rng.standard_normal((length, nb_channels)), axis=0)
    return {"bass": low.astype(np.float32), "vocals": (0.3 * high).astype(np.float32)}


def fixed_split_separator(batch):
    """A fake model: 60 % of the mixture is bass, 40 % vocals."""
    return {"bass": 0.6 * batch, "vocals": 0.4 * batch}


def settings(**overrides):
    values = dict(split="test", chunk_seconds=1.0, overlap=0.25, window_seconds=1.0, workers=1)
    values.update(overrides)
    return EvaluateConfig(**values)


def run_tracks(tracks, output_dir, separate_fn=fixed_split_separator, cache=None, **overrides):
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return runner.evaluate_tracks(tracks, separate_fn, targets=TARGETS, sample_rate=SAMPLE_RATE,
                                    settings=settings(**overrides), output_dir=output_dir,
                                    baseline_cache=cache, cache_key={"test": 1})


# --------------------------------------------------------------------------------------------
# separate_array
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("nb_timesteps", [1, 37, 99, 100, 101, 333, 1001])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_identity_separator_reconstructs_input_exactly(overlap, nb_timesteps, batch_size):
    rng = np.random.default_rng(nb_timesteps)
    mixture = rng.uniform(-1, 1, (nb_timesteps, 2)).astype(np.float32)
    shapes = set()

    def identity(batch):
        shapes.add(batch.shape)
        return {"same": batch, "double": 2 * batch}

    out = separate_array(identity, mixture, sample_rate=100, chunk_seconds=1.0, overlap=overlap, batch_size=batch_size)
    assert out["same"].shape == mixture.shape and out["same"].dtype == np.float32
    assert np.max(np.abs(out["same"] - mixture)) < 1e-6
    assert np.max(np.abs(out["double"] - 2 * mixture)) < 2e-6
    # memory is bounded by the chunk: every call sees (batch_size, 100 samples, 2 channels)
    assert shapes == {(batch_size, 100, 2)}


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_crossfade_weights_sum_to_one(overlap):
    nb_timesteps, chunk = 1234, 100
    overlap_samples, hop, nb_chunks = chunk_layout(nb_timesteps, chunk, overlap)
    assert overlap_samples == round(overlap * chunk)
    assert (nb_chunks - 1) * hop + chunk >= nb_timesteps > (nb_chunks - 1) * hop
    total = np.zeros((nb_chunks - 1) * hop + chunk)
    for index in range(nb_chunks):
        total[index * hop:index * hop + chunk] += chunk_weights(index, nb_chunks, chunk, overlap_samples)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_separate_array_chunks_overlap_and_uses_the_length_rule():
    starts = []

    def ramp_probe(batch):
        starts.append(int(round(batch[0, 0, 0])))
        return {"x": batch}

    mixture = np.arange(1000, dtype=np.float32)[:, None]
    out = separate_array(ramp_probe, mixture, sample_rate=100, chunk_seconds=2.0, overlap=0.5)
    assert starts == [0, 100, 200, 300, 400, 500, 600, 700, 800]  # 200-sample chunks, hop 100
    assert np.max(np.abs(out["x"] - mixture)) < 1e-3  # exact up to float32 rounding of values up to 999
    seen = []
    separate_array(lambda b: seen.append(b.shape) or {"x": b}, mixture, sample_rate=100, chunk_seconds=2.0,
                   overlap=0.0, input_samples=lambda n: n + 28)
    assert seen[0] == (1, 228, 1)


def test_separate_array_rejects_bad_outputs_and_settings():
    mixture = np.zeros((50, 1), np.float32)
    with pytest.raises(ValueError, match="target 'x'.*keep"):
        separate_array(lambda b: {"x": b[:, :10]}, mixture, sample_rate=10, chunk_seconds=2.0, overlap=0.0)
    with pytest.raises(ValueError, match="overlap"):
        separate_array(lambda b: {"x": b}, mixture, sample_rate=10, chunk_seconds=2.0, overlap=1.0)
    with pytest.raises(ValueError, match="nb_timesteps, nb_channels"):
        separate_array(lambda b: {"x": b}, np.zeros(50, np.float32), sample_rate=10, chunk_seconds=2.0, overlap=0.0)


# --------------------------------------------------------------------------------------------
# museval scores and baselines
# --------------------------------------------------------------------------------------------
def test_museval_true_stems_score_very_high_and_mix_scores_the_energy_ratio():
    stems = synthetic_track(0)
    perfect = scoring.score_track(stems, stems, sample_rate=SAMPLE_RATE, window_seconds=1.0)
    for target in TARGETS:
        frames = perfect[target]["SDR"]
        assert len(frames) == 3 and np.all((frames > 60) | np.isposinf(frames))
    # museval stores +inf as NaN: a track whose every frame is perfect has no median
    assert math.isnan(scoring.frame_median(perfect["bass"]["SDR"]))

    noisy = {t: s + 1e-4 * np.random.default_rng(1).standard_normal(s.shape).astype(np.float32)
             for t, s in stems.items()}
    close = scoring.score_track(stems, noisy, sample_rate=SAMPLE_RATE, window_seconds=1.0)
    assert min(close[t]["SDR"].min() for t in TARGETS) > 60

    # with the mixture as estimate, BSSEval v4's SDR is exactly 10 log10(|s|^2 / |other stem|^2) per frame
    mixture = stems["bass"] + stems["vocals"]
    mix = scoring.score_track(stems, baselines.mix_estimates(mixture, TARGETS), sample_rate=SAMPLE_RATE,
                               window_seconds=1.0)
    for target, other in (("bass", "vocals"), ("vocals", "bass")):
        expected = [10 * np.log10(np.sum(stems[target][f * 8000:(f + 1) * 8000].astype(np.float64) ** 2)
                                  / np.sum(stems[other][f * 8000:(f + 1) * 8000].astype(np.float64) ** 2))
                    for f in range(3)]
        np.testing.assert_allclose(mix[target]["SDR"], expected, atol=1e-4)
    assert mix["bass"]["SDR"].mean() > 2 and mix["vocals"]["SDR"].mean() < -2


def test_irm_oracle_beats_mix_on_random_sources():
    stems = synthetic_track(3, nb_channels=2)
    mixture = stems["bass"] + stems["vocals"]
    irm = baselines.irm_estimates(stems, sample_rate=SAMPLE_RATE)
    assert baselines.irm_fft_size(SAMPLE_RATE) == 512 and baselines.irm_fft_size(44100) == 2048
    np.testing.assert_allclose(irm["bass"] + irm["vocals"], mixture, atol=1e-4)  # masks sum to one
    irm_scores = scoring.score_track(stems, irm, sample_rate=SAMPLE_RATE, window_seconds=1.0)
    mix_scores = scoring.score_track(stems, baselines.mix_estimates(mixture, TARGETS), sample_rate=SAMPLE_RATE,
                                      window_seconds=1.0)
    for target in TARGETS:
        assert np.median(irm_scores[target]["SDR"]) > np.median(mix_scores[target]["SDR"]) + 15
        assert scoring.usdr(stems[target], irm[target]) > scoring.usdr(stems[target], mixture) + 15


# --------------------------------------------------------------------------------------------
# Aggregation and q, against hand-computed numbers
# --------------------------------------------------------------------------------------------
def test_frame_median_ignores_nan_and_inf_frames():
    assert scoring.frame_median([1.0, np.nan, 3.0, np.inf]) == 2.0
    assert scoring.frame_median([5.0, 1.0, 2.0]) == 2.0
    assert scoring.frame_median([1.123456789]) == 1.12346  # museval's 1e-5 quantisation
    assert math.isnan(scoring.frame_median([np.nan, np.inf]))


def test_aggregate_is_median_of_medians_and_mean_over_targets():
    def row(sdr, usdr_value):
        return {"SDR": sdr, "SIR": sdr + 1, "ISR": sdr + 2, "SAR": sdr + 3, "uSDR": usdr_value}

    per_track = {
        "a": {"bass": row(1.0, 1.0), "vocals": row(10.0, 4.0)},
        "b": {"bass": row(3.0, 2.0), "vocals": row(np.nan, 5.0)},  # a track without a scorable frame
        "c": {"bass": row(8.0, 6.0), "vocals": row(20.0, 9.0)},
    }
    result = scoring.aggregate(per_track, TARGETS)
    assert result["bass"]["SDR"] == 3.0  # median(1, 3, 8)
    assert result["vocals"]["SDR"] == 15.0  # median(10, 20), the NaN track ignored
    assert result["bass"]["SAR"] == 6.0
    assert result["bass"]["uSDR"] == 3.0  # mean(1, 2, 6)
    assert result["vocals"]["uSDR"] == 6.0  # mean(4, 5, 9)
    assert result["mean"]["SDR"] == 9.0  # mean(3, 15)
    assert result["mean"]["uSDR"] == 4.5


def test_usdr_formula():
    reference = np.array([[1.0], [1.0], [0.0]])
    estimate = np.array([[1.0], [0.0], [0.0]])
    assert scoring.usdr(reference, estimate) == pytest.approx(10 * np.log10(2.0), abs=1e-6)
    assert scoring.usdr(reference, 0.5 * reference) == pytest.approx(10 * np.log10(2.0 / 0.5), abs=1e-6)
    assert scoring.usdr(reference, reference) > 80  # eps keeps it finite


def test_normalized_score():
    assert scoring.normalized_score(5.0, 1.0, 9.0) == 0.5
    assert scoring.normalized_score(1.0, 1.0, 9.0) == 0.0
    assert scoring.normalized_score(9.0, 1.0, 9.0) == 1.0
    assert scoring.normalized_score(-1.0, 1.0, 5.0) == -0.5
    assert math.isnan(scoring.normalized_score(5.0, 3.0, 3.0))
    assert math.isnan(scoring.normalized_score(np.nan, 1.0, 3.0))


# --------------------------------------------------------------------------------------------
# The evaluation loop: outputs, cache, errors
# --------------------------------------------------------------------------------------------
def test_evaluate_writes_metrics_and_reuses_the_baseline_cache(tmp_path, monkeypatch):
    import museval

    calls = []
    real_score = scoring.score_track

    def counting(references, estimates, **kwargs):
        calls.append(id(estimates))
        return real_score(references, estimates, **kwargs)

    monkeypatch.setattr(scoring, "score_track", counting)
    tracks = [(f"song {i}", synthetic_track(10 + i)) for i in range(2)]
    cache = tmp_path / "baselines" / "key.json"
    first = run_tracks(tracks, tmp_path / "first", cache=cache)
    assert len(calls) == 6  # model, MIX and IRM of two tracks
    assert cache.is_file() and first["baseline_cache"]["reused_tracks"] == []

    metrics = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert metrics["tracks"] == ["song 0", "song 1"]
    for target in TARGETS:
        assert set(metrics["model"][target]) == {"SDR", "SIR", "ISR", "SAR", "uSDR"}
    model, mix, irm = (metrics["mean"]["SDR"], metrics["baselines"]["mix"]["mean"]["SDR"],
                       metrics["baselines"]["irm"]["mean"]["SDR"])
    assert mix < model < irm and irm > 20
    # the fake model scales the mixture: the bass estimate 0.6 * (b + v) -> uSDR by hand
    b, v = tracks[0][1]["bass"].astype(np.float64), tracks[0][1]["vocals"].astype(np.float64)
    expected = 10 * np.log10(np.sum(b ** 2) / np.sum((b - 0.6 * (b + v)) ** 2))
    assert metrics["per_track"]["model"]["song 0"]["bass"]["uSDR"] == pytest.approx(expected, abs=1e-4)
    for target in TARGETS:
        q = (metrics["model"][target]["SDR"] - metrics["baselines"]["mix"][target]["SDR"]) / (
            metrics["baselines"]["irm"][target]["SDR"] - metrics["baselines"]["mix"][target]["SDR"])
        assert metrics["normalized"][target] == pytest.approx(q)
        assert 0 < q < 1
    assert metrics["normalized"]["mean"] == pytest.approx(np.mean([metrics["normalized"][t] for t in TARGETS]))

    # museval's own files and aggregation agree with ours
    store = museval.EvalStore()
    for path in sorted((tmp_path / "first" / "museval" / "model" / "test").glob("*.json")):
        store.add_track(museval.aggregate.json2df(json.loads(path.read_text()), path.stem))
    theirs = store.agg_frames_tracks_scores()
    for target in TARGETS:
        for metric in ("SDR", "SIR", "ISR", "SAR"):
            assert theirs[(target, metric)] == pytest.approx(metrics["model"][target][metric], abs=1e-9)
    assert sorted(p.name for p in (tmp_path / "first" / "museval").iterdir()) == ["irm", "mix", "model"]
    png = (tmp_path / "first" / "sdr_boxplot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list((tmp_path / "first").glob(".scratch-*"))

    # another model on the same data: only the model is scored, the baselines come from the cache
    calls.clear()
    second = run_tracks(tracks, tmp_path / "second", cache=cache,
                        separate_fn=lambda x: {"bass": 0.9 * x, "vocals": 0.1 * x})
    assert len(calls) == 2
    assert second["baseline_cache"]["reused_tracks"] == ["song 0", "song 1"]
    assert second["baselines"] == first["baselines"]
    assert second["mean"]["SDR"] != first["mean"]["SDR"]
    assert (tmp_path / "second" / "museval" / "irm" / "test" / "song 1.json").is_file()


def test_parallel_workers_give_the_serial_numbers(tmp_path):
    tracks = [("t0", synthetic_track(20))]
    serial = run_tracks(tracks, tmp_path / "serial")
    parallel = run_tracks(tracks, tmp_path / "parallel", workers=2)
    assert parallel["per_track"] == serial["per_track"]
    assert parallel["normalized"] == serial["normalized"]


def test_nan_estimate_is_a_clear_error(tmp_path):
    def broken(batch):
        out = {"bass": 0.5 * batch, "vocals": 0.5 * batch.copy()}
        out["vocals"][0, 3, 0] = np.nan
        return out

    with pytest.raises(StageError, match=r"track 'song', target 'vocals'.*NaN/Inf.*retrain"):
        run_tracks([("song", synthetic_track(1))], tmp_path, separate_fn=broken)


def test_missing_target_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match=r"track 'song'.*lack target\(s\) vocals"):
        run_tracks([("song", synthetic_track(1))], tmp_path, separate_fn=lambda b: {"bass": b})


def test_track_shorter_than_a_window_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match=r"track 'tiny' is 0.50 s long.*window_seconds"):
        run_tracks([("tiny", synthetic_track(1, seconds=0.5))], tmp_path)


def test_empty_split_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match=r"split 'test' has no tracks.*evaluate.split=train"):
        run_tracks([], tmp_path)


def test_silent_estimate_is_scored_not_fatal(tmp_path):
    metrics = run_tracks([("song", synthetic_track(2))], tmp_path,
                         separate_fn=lambda b: {"bass": b, "vocals": np.zeros_like(b)})
    assert "silent" in metrics["warnings"][0]
    assert abs(metrics["model"]["vocals"]["SDR"]) < 0.01  # "no estimate": |s|^2 / |0 - s|^2 = 0 dB


def prepare_meta(splits, fingerprint="p1"):
    """The meta of a prepare artifact whose manifest lists `splits` {split: [track name]} (3 s tracks, no shards).

    A committed artifact's manifest is cached per (folder, fingerprint): another manifest needs another fingerprint."""
    zero = {t: 0.0 for t in TARGETS}
    tracks = {split: tuple(TrackEntry(name=name, nb_timesteps=3 * SAMPLE_RATE, seconds=3.0, segments=0, energy=zero,
                                      rms=zero, peak=zero, silent=(), clipped_samples=0, sources=())
                           for name in names) for split, names in splits.items()}
    manifest = Manifest(format="synth", root=None, targets=TARGETS, sample_rate=SAMPLE_RATE, nb_channels=1,
                        segment_samples=SAMPLE_RATE, pcm="int16", compression="",
                        splits={split: Split(tracks=entries, seconds=3.0 * len(entries), segments=0, energy=zero,
                                             rms=zero, shards=()) for split, entries in tracks.items()})
    return {"fingerprint": fingerprint, "manifest": manifest.to_dict()}


def test_stage_executor_uses_records_and_train(tmp_path, monkeypatch):
    """`run` with stand-ins for records.read_tracks and trained.load_trained (their own tests cover them)."""
    from models.base import SeparationModel

    tracks = [("one", synthetic_track(30)), ("two", synthetic_track(31))]
    seen = {}

    def read_tracks(prepare, split):
        seen["split"] = split
        yield from tracks

    def load_trained(train_artifact, config):
        seen["train"] = train_artifact.path
        separator = lambda batch, training=False: fixed_split_separator(batch)  # noqa: E731
        return SeparationModel(targets=TARGETS, sample_rate=SAMPLE_RATE, nb_channels=1, train_model=None,
                               train_targets=None, loss=None, separator=separator, config=None)

    monkeypatch.setattr(records, "read_tracks", read_tracks)
    monkeypatch.setattr(records, "verify_shards", lambda *args: None)
    monkeypatch.setattr(trained, "load_trained", load_trained)
    config = Config.from_dict({"artifacts_dir": str(tmp_path / "artifacts"),
                               "data": {"sample_rate": SAMPLE_RATE, "nb_channels": 1, "targets": list(TARGETS)},
                               "evaluate": {"chunk_seconds": 1.0, "workers": 1, "max_tracks": 1}})
    inputs = {"prepare": Artifact("prepare", tmp_path / "prepare", prepare_meta({"test": ["one", "two"]})),
              "train": Artifact("train", tmp_path / "train", {"fingerprint": "t1"})}
    logged = {}
    context = StageContext(config=config, inputs=inputs, output_dir=tmp_path / "out",
                           log_scalar=lambda name, value, step=None: logged.setdefault(name, value),
                           side_caches={baselines.CACHE: tmp_path / "artifacts" / baselines.CACHE})
    context.output_dir.mkdir()
    meta = evaluate.run(context)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert seen == {"split": "test", "train": tmp_path / "train"}
    assert metrics["tracks"] == ["one"]  # evaluate.max_tracks=1
    assert meta["result"] == metrics["mean"]["SDR"] == meta["figures"]["SDR"]
    assert meta["figures"]["q"] == metrics["normalized"]["mean"]
    assert logged["model.mean.SDR"] == metrics["mean"]["SDR"]
    assert logged["irm.vocals.SAR"] == metrics["baselines"]["irm"]["vocals"]["SAR"]
    assert "normalized.bass" in logged and "track.model.vocals.SDR" in logged
    caches = list((tmp_path / "artifacts" / "evaluate-baselines").glob("*.json"))
    assert len(caches) == 1 and json.loads(caches[0].read_text())["key"]["prepare"] == "p1"

    # the MUSDB sample has only `train`: the message says how to evaluate on it
    inputs["prepare"] = Artifact("prepare", tmp_path / "prepare", prepare_meta({"train": ["one"], "test": []}, "p2"))
    with pytest.raises(StageError, match=r"split 'test' .* has no tracks; .*\(train\).*evaluate.split=train"):
        evaluate.run(context)
    inputs["prepare"] = Artifact("prepare", tmp_path / "prepare", prepare_meta({"train": ["one"]}, "p3"))
    with pytest.raises(StageError, match=r"split 'test' was not prepared \(prepared: train\)"):
        evaluate.run(context)


@pytest.mark.skipif(not REAL_TRACK.is_dir(), reason=f"real audio not found at {REAL_TRACK} (see ../shared/data)")
def test_real_excerpt_irm_beats_mix():
    """3 s of 'Music Delta - 80s Rock' as vocals vs accompaniment (2 stereo sources keep museval quick)."""
    import soundfile as sf

    start, length = 2 * 44100, 3 * 44100
    stems = {name: sf.read(REAL_TRACK / f"{name}.wav", dtype="float32", always_2d=True, start=start,
                           frames=length)[0] for name in ("vocals", "drums", "bass", "other")}
    pair = {"vocals": stems["vocals"], "accompaniment": stems["drums"] + stems["bass"] + stems["other"]}
    mixture = pair["vocals"] + pair["accompaniment"]
    irm = baselines.irm_estimates(pair, sample_rate=44100)
    irm_scores = scoring.score_track(pair, irm, sample_rate=44100, window_seconds=1.0)
    mix_scores = scoring.score_track(pair, baselines.mix_estimates(mixture, pair), sample_rate=44100,
                                      window_seconds=1.0)
    for target in pair:
        irm_sdr = scoring.frame_median(irm_scores[target]["SDR"])
        mix_sdr = scoring.frame_median(mix_scores[target]["SDR"])
        assert irm_sdr > mix_sdr + 5, (target, irm_sdr, mix_sdr)
        # MIX: the estimate error is the other source, so SDR is their energy ratio per 1 s frame
        other = pair["accompaniment" if target == "vocals" else "vocals"].astype(np.float64)
        own = pair[target].astype(np.float64)
        expected = [10 * np.log10(np.sum(own[f * 44100:(f + 1) * 44100] ** 2) / np.sum(other[f * 44100:(f + 1) * 44100] ** 2))
                    for f in range(3)]
        np.testing.assert_allclose(mix_scores[target]["SDR"], expected, atol=1e-3)
