"""The data layer and the `prepare` stage: synth, validation, TFRecords round trip, tf.data reader, CLI.

Every test runs on the `unittest` preset (8 kHz, 4 s tracks) or on the 6.8 s MUSDB18 sample in
`../shared/data` (skipped, with the reason, when that folder is absent).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile

from components.data import audio, records, synth
from configs.errors import StageError
from configs import PRESETS, Config
from configs.config import defaults
from pipeline import definition
from configs.config import deep_merge
from tests.cli import cli, python

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
MUSDB_SAMPLE = SHARED_DATA / "musdb18-sample"
MUSDB_HQ_SAMPLE = SHARED_DATA / "musdb18hq-sample"
needs_shared_data = pytest.mark.skipif(
    not (MUSDB_SAMPLE.is_dir() and MUSDB_HQ_SAMPLE.is_dir()),
    reason=f"real MUSDB18 sample audio not found at {SHARED_DATA} (see ../shared/data/README.md)")
SUBPROCESS_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def make_config(artifacts_dir, evaluate=None, **data) -> Config:
    raw = deep_merge(defaults(), PRESETS["unittest"])
    raw = deep_merge(raw, {"artifacts_dir": str(artifacts_dir), "data": data, "evaluate": evaluate or {}})
    return Config.from_dict(raw)


def prepare(config, **kwargs):
    return definition.run_component(definition.component("prepare"), config, **kwargs)


def no_artifact(artifacts_dir) -> bool:
    return not (Path(artifacts_dir) / "prepare" / "artifact.json").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The unittest preset prepared once: 2 train tracks of 4 s = 4 segments of 2 s."""
    config = make_config(tmp_path_factory.mktemp("artifacts"))
    artifact, skipped = prepare(config)
    assert not skipped
    return config, artifact


# -- synth -------------------------------------------------------------------------------------------
def _centroid(stereo, sample_rate):
    power = np.abs(np.fft.rfft(stereo.mean(axis=1))) ** 2
    return float((power * np.fft.rfftfreq(len(stereo), 1 / sample_rate)).sum() / power.sum())


def _peakiness(stereo, sample_rate):
    """Median over 0.5 s windows of max/mean of the 20 ms energy envelope: high for percussive sounds."""
    mono, hop = stereo.mean(axis=1), int(sample_rate * 0.01)
    energy = np.square(mono[: len(mono) // hop * hop]).reshape(-1, hop).mean(axis=1)
    energy = np.convolve(energy, [0.5, 0.5], "valid")
    windows = energy[: len(energy) // 50 * 50].reshape(-1, 50)
    windows = windows[windows.mean(axis=1) > 1e-3 * energy.mean()]  # skip the rests of the voice
    return float(np.median(windows.max(axis=1) / windows.mean(axis=1)))


def test_resample_in_blocks_is_bitwise_scipy_resample_poly():
    """`audio.resample` filters block by block (bounded memory on long songs): the same bits as scipy's
    whole-signal resample_poly, at every block size, down and up, at the edges."""
    from fractions import Fraction

    from scipy.signal import resample_poly

    rng = np.random.default_rng(0)
    for n, rate, sample_rate in ((10007, 44100, 22050), (7001, 8000, 44100), (3001, 44100, 48000)):
        x = rng.normal(0.0, 0.1, (n, 2)).astype(np.float32)
        ratio = Fraction(sample_rate, rate)
        expected = resample_poly(x, ratio.numerator, ratio.denominator, axis=0, window=("kaiser", 5.0))
        for block in (1 << 20, 997, 61):
            got = audio.resample(x, rate, sample_rate, block_samples=block)
            assert got.dtype == np.float32 and np.array_equal(got, expected.astype(np.float32)), (n, block)


def test_synth_sources_differ_and_do_not_clip():
    for index in range(3):
        _, stems = synth.synthesize_track(np.random.default_rng([7, 0, index]), sample_rate=22050, seconds=4.0)
        centroid = {name: _centroid(audio_, 22050) for name, audio_ in stems.items()}
        peakiness = {name: _peakiness(audio_, 22050) for name, audio_ in stems.items()}
        hats = np.abs(np.fft.rfft(stems["drums"].mean(axis=1))) ** 2
        hats_share = hats[np.fft.rfftfreq(len(stems["drums"]), 1 / 22050) > 5000].sum() / hats.sum()
        assert centroid["bass"] < 300, centroid
        assert centroid["bass"] + 200 < centroid["vocals"] < 3000, centroid  # between bass and the hi-hats (> 5 kHz)
        assert hats_share > 0.005  # hi-hats put real energy above 5 kHz
        assert peakiness["drums"] > 3.0 and all(peakiness["drums"] > 1.5 * v for k, v in peakiness.items()
                                                 if k != "drums"), peakiness
        mixture = sum(stems.values())
        assert np.abs(mixture).max() <= synth.PEAK + 1e-6
        assert all(np.abs(a).max() <= synth.PEAK + 1e-6 for a in stems.values())
        levels = {name: 20 * np.log10(np.sqrt(np.mean(np.square(a)))) for name, a in stems.items()}
        assert min(levels["vocals"], levels["drums"]) > max(levels["bass"], levels["other"]) - 3, levels
        assert not np.allclose(stems["other"][:, 0], stems["other"][:, 1])  # spread in stereo


def test_synth_is_deterministic_and_tracks_differ(tmp_path):
    params = dict(sample_rate=8000, tracks=(2, 1, 0), seconds=1.5, seed=3)
    synth.generate(tmp_path / "a", **params)
    synth.generate(tmp_path / "b", **params)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.wav"))
    assert len(files) == 3 * 5
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    synth.generate(tmp_path / "c", **dict(params, seed=4))
    vocals = {run: [p.read_bytes() for p in sorted((tmp_path / run).rglob("vocals.wav"))] for run in "ac"}
    assert vocals["a"] != vocals["c"]  # another seed, other tracks
    first, second = (soundfile.read(str(p))[0] for p in sorted((tmp_path / "a" / "train").rglob("vocals.wav")))
    assert first.shape == second.shape == (12000, 2) and not np.allclose(first, second, atol=1e-2)


def test_default_data_is_generated_once(tmp_path):
    config = make_config(tmp_path)
    root = synth.ensure(tmp_path / "data", synth.params_of(config.data))
    marker = (root / synth.MARKER).stat().st_mtime_ns
    assert synth.ensure(tmp_path / "data", synth.params_of(config.data)) == root
    assert (root / synth.MARKER).stat().st_mtime_ns == marker
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "song.wav").write_bytes(b"x")
    with pytest.raises(StageError, match="not made by the synthesizer"):
        synth.ensure(tmp_path / "user", synth.params_of(config.data))


# -- audio checks ------------------------------------------------------------------------------------------
def test_resampling_is_band_limited(tmp_path):
    rate, seconds = 48000, 0.5
    t = np.arange(int(rate * seconds)) / rate
    low, high = 0.5 * np.sin(2 * np.pi * 1000 * t), 0.5 * np.sin(2 * np.pi * 15000 * t)
    soundfile.write(str(tmp_path / "tones.wav"), np.stack([low, high], axis=1), rate, subtype="FLOAT")
    out = audio.read_audio(tmp_path / "tones.wav", sample_rate=16000, nb_channels=2)
    assert out.shape == (8000, 2) and out.dtype == np.float32
    core = out[1000:-1000]
    assert abs(np.sqrt(np.mean(core[:, 0] ** 2)) - 0.5 / np.sqrt(2)) < 0.01  # 1 kHz passes at full level
    assert np.sqrt(np.mean(core[:, 1] ** 2)) < 1e-3  # 15 kHz is above the new Nyquist: removed, not aliased


def test_pcm_codecs():
    values = np.array([[-1.0, 1.0], [0.5, -0.25], [1 / 32768, 1.5]], dtype=np.float32)
    blob, clipped = records.encode_pcm(values, "int16")
    decoded = records.decode_pcm(blob, "int16", 2)
    assert clipped == 1 and decoded[0, 0] == -1.0 and decoded[2, 0] == values[2, 0]
    assert np.abs(decoded - values)[:, :][values <= 1].max() <= 1 / 32768
    blob, _ = records.encode_pcm(values, "float16")
    assert np.allclose(records.decode_pcm(blob, "float16", 2), values, rtol=2 ** -11, atol=0)


# -- TFRecords round trip --------------------------------------------------------------------------------------
@pytest.mark.parametrize("pcm, compression", [("int16", ""), ("float16", "GZIP"), ("float32", "ZLIB")])
def test_round_trip(tmp_path, pcm, compression):
    # 3.3 s tracks: segments of 2.0 s + 1.3 s (zero-padded)
    config = make_config(tmp_path, pcm=pcm, compression=compression, synth_tracks=[1, 1, 0], synth_seconds=3.3)
    artifact, _ = prepare(config)
    manifest = artifact.meta["manifest"]
    assert manifest["empty_splits"] == ["test"] and manifest["splits"]["test"]["shards"] == []
    assert manifest["stats"]["energy"] == manifest["splits"]["train"]["energy"] == records.target_energy(artifact)
    assert all(energy > 1e-4 for energy in manifest["stats"]["energy"].values())
    suffix = records.SUFFIXES[compression]
    assert all(s["file"].endswith(suffix) for s in manifest["splits"]["train"]["shards"])
    root = tmp_path / "default-data"
    for split in ("train", "valid"):
        tracks = dict(records.read_tracks(artifact, split))
        assert len(tracks) == 1
        for name, stems in tracks.items():
            entry = manifest["splits"][split]["tracks"][0]
            assert entry["name"] == name and entry["segments"] == 2 and entry["nb_timesteps"] == 26400
            for target, decoded in stems.items():
                original = audio.read_audio(root / split / name / f"{target}.wav", sample_rate=8000, nb_channels=2)
                assert decoded.shape == original.shape == (26400, 2)
                error = np.abs(decoded - original)
                if pcm == "int16":
                    assert error.max() <= 1 / 32768
                elif pcm == "float16":
                    assert np.all(error <= np.abs(original) * 2 ** -11 + 2 ** -24)
                else:
                    assert error.max() == 0


@needs_shared_data
def test_musdb_mp4_and_hq_give_the_same_segments(tmp_path):
    import tensorflow as tf

    prepared_ = {}
    for data_format, root in (("musdb", MUSDB_SAMPLE), ("musdb-hq", MUSDB_HQ_SAMPLE)):
        config = make_config(tmp_path / data_format, format=data_format, root=str(root), sample_rate=44100)
        artifact, _ = prepare(config)
        manifest = artifact.meta["manifest"]
        assert manifest["empty_splits"] == ["valid", "test"]  # the sample is one train track (not a valid one)
        assert artifact.figures["tracks"] == {"train": 1, "valid": 0, "test": 0}
        keys = []
        files = records.shard_paths(artifact, "train")
        for serialized in tf.data.TFRecordDataset(files).as_numpy_iterator():
            feature = tf.train.Example.FromString(serialized).features.feature
            keys.append((feature["track"].bytes_list.value[0].decode(), feature["offset"].int64_list.value[0],
                         feature["length"].int64_list.value[0]))
        prepared_[data_format] = keys, dict(records.read_tracks(artifact, "train")), manifest
    (mp4_keys, mp4_tracks, mp4_manifest), (hq_keys, hq_tracks, hq_manifest) = prepared_["musdb"], prepared_["musdb-hq"]
    name = "Music Delta - 80s Rock"
    assert mp4_keys == hq_keys == [(name, 0, 88200), (name, 88200, 88200), (name, 176400, 88200),
                                   (name, 264600, 300032 - 264600)]
    worst = max(np.abs(mp4_tracks[name][t] - hq_tracks[name][t]).max() for t in mp4_tracks[name])
    # measured: 0.0 (stempeg decodes the AAC to 16-bit like the HQ wavs); 4 LSB leaves room for another ffmpeg
    assert worst <= 4 / 32768, worst
    assert all(hq_tracks[name][t].shape == (300032, 2) for t in hq_tracks[name])
    energy_mp4, energy_hq = mp4_manifest["splits"]["train"]["energy"], hq_manifest["splits"]["train"]["energy"]
    assert all(abs(energy_mp4[t] - energy_hq[t]) <= 1e-6 + 1e-3 * energy_hq[t] for t in energy_hq)
    assert min(energy_hq.values()) > 1e-5  # four real, non-silent stems


# -- tf.data reader ----------------------------------------------------------------------------------------------
def _take(dataset, nb_batches):
    return [(m.numpy(), {t: s.numpy() for t, s in stems.items()}) for m, stems in dataset.take(nb_batches)]


def test_reader_mixture_is_sum_and_shapes(prepared):
    config, artifact = prepared
    data = dataclasses.replace(config.data, remix_probability=0.5)
    batches = _take(records.load_dataset(artifact, "train", seq_samples=8000, batch_size=3, augment=True,
                                         data_config=data, seed=1), 4)
    for mixture, stems in batches:
        assert mixture.shape == (3, 8000, 2) and mixture.dtype == np.float32
        assert set(stems) == set(config.data.targets)
        expected = sum(stems[t].astype(np.float64) for t in config.data.targets).astype(np.float32)
        assert np.array_equal(mixture, expected)  # the correctly rounded sum of the returned sources
    valid = _take(records.load_dataset(artifact, "valid", seq_samples=8000, batch_size=3, augment=False,
                                       data_config=config.data, repeat=False), 10)
    # 1 valid track of 4 s -> 2 segments -> 4 windows of 1 s, in order: batches of 3 and 1, unaugmented
    assert [m.shape[0] for m, _ in valid] == [3, 1]
    (valid_track,) = [stems for _, stems in records.read_tracks(artifact, "valid")]
    stacked = np.concatenate([stems["bass"] for _, stems in valid]).reshape(-1, 2)
    assert np.array_equal(stacked, valid_track["bass"])


def test_reader_gains_swaps_and_remix(prepared):
    config, artifact = prepared
    low, high = config.data.gain_range
    originals = []  # the 4 train segments of 2 s
    for _, stems in records.read_tracks(artifact, "train"):
        for offset in (0, 16000):
            originals.append({t: a[offset:offset + 16000] for t, a in stems.items()})

    def match(source, target):
        """(index of the original segment, gain, swapped) for an augmented source."""
        mono = source.sum(axis=1)
        scores = []
        for original in originals:
            reference = original[target].sum(axis=1)
            norm = np.linalg.norm(mono) * np.linalg.norm(reference) + 1e-12
            scores.append(float(mono @ reference) / norm)
        index = int(np.argmax(scores))
        reference = originals[index][target]
        assert scores[index] > 0.9999
        gain = float(mono @ reference.sum(axis=1)) / float(np.square(reference.sum(axis=1)).sum())
        straight = np.abs(source - gain * reference).max()
        crossed = np.abs(source - gain * reference[:, ::-1]).max()
        return index, gain, crossed < straight

    batches = _take(records.load_dataset(artifact, "train", seq_samples=16000, batch_size=4, augment=True,
                                         data_config=config.data, seed=5), 4)
    gains, swaps = [], []
    for _, stems in batches:
        for b in range(4):
            for target in ("drums", "bass", "other"):  # vocals are near-centre: a swap is invisible
                _, gain, swapped = match(stems[target][b], target)
                gains.append(gain)
                swaps.append(swapped)
    assert low - 1e-4 <= min(gains) and max(gains) <= high + 1e-4
    assert max(gains) - min(gains) > 0.3 * (high - low)  # gains really vary across the range
    assert 0 < sum(swaps) < len(swaps)

    remixed = dataclasses.replace(config.data, remix_probability=1.0)
    batches = _take(records.load_dataset(artifact, "train", seq_samples=16000, batch_size=4, augment=True,
                                         data_config=remixed, seed=5), 3)
    origins = [{match(stems[t][b], t)[0] for t in ("drums", "bass", "other")} for _, stems in batches for b in range(4)]
    assert any(len(found) > 1 for found in origins)  # some examples mix sources of different segments


def test_reader_is_deterministic_with_a_seed(prepared):
    config, artifact = prepared

    def batches(seed):
        return _take(records.load_dataset(artifact, "train", seq_samples=4000, batch_size=2, augment=True,
                                          data_config=config.data, seed=seed), 3)

    first, again, other = batches(11), batches(11), batches(12)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


# -- bad inputs ----------------------------------------------------------------------------------------------
def _write_track(folder, **stems):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, subtype) in stems.items():
        soundfile.write(str(folder / f"{name}.wav"), data, 8000, subtype=subtype)


def _tone(seconds=1.0, channels=2, frequency=220.0):
    t = np.arange(int(8000 * seconds)) / 8000
    return np.repeat((0.3 * np.sin(2 * np.pi * frequency * t))[:, None], channels, axis=1)


BAD_CASES = {
    "corrupt": ("noise", "unreadable audio"),
    "lengths": ("voice", "differ in length (samples: voice=8000, noise=4000)"),
    "channels": ("noise", "3 channels, expected mono or stereo"),
    "nan": ("noise", "NaN/Inf samples"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_track_is_a_clear_error(tmp_path, case):
    root = tmp_path / "data"
    good = {"voice": (_tone(), "PCM_16"), "noise": (_tone(frequency=440.0), "PCM_16")}
    _write_track(root / "train" / "good", **good)
    bad = dict(good)
    if case == "lengths":
        bad["noise"] = (_tone(seconds=0.5), "PCM_16")
    elif case == "channels":
        bad["noise"] = (_tone(channels=3), "PCM_16")
    elif case == "nan":
        noise = _tone()
        noise[100, 1] = np.nan
        bad["noise"] = (noise, "FLOAT")
    _write_track(root / "train" / "bad", **bad)
    if case == "corrupt":
        (root / "train" / "bad" / "noise.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    config = make_config(tmp_path / "artifacts", format="folder", root=str(root), targets=["voice", "noise"])
    with pytest.raises(StageError) as error:
        prepare(config)
    message = str(error.value)
    file_name, problem = BAD_CASES[case]
    where = root / "train" / "bad" if case == "lengths" else root / "train" / "bad" / f"{file_name}.wav"
    assert message.startswith(f"{where}: ") and problem in message and "; " in message and "\n" not in message
    assert no_artifact(tmp_path / "artifacts")
    # nothing hidden is left but the artifacts directory's (released) run lock
    assert not [p for p in (tmp_path / "artifacts").iterdir() if p.name.startswith(".") and p.name != ".lock"]

    # skip_bad_tracks: the good track is prepared, the bad one listed with its reason
    artifact, _ = prepare(dataclasses.replace(config, data=dataclasses.replace(config.data, skip_bad_tracks=True)))
    manifest = artifact.meta["manifest"]
    assert [t["name"] for t in manifest["splits"]["train"]["tracks"]] == ["good"]
    assert manifest["skipped"] == [{"track": "bad", "split": "train", "reason": message}]


def test_folder_any_targets_mono_and_silent(tmp_path):
    root = tmp_path / "data"
    _write_track(root / "valid" / "song", voice=(_tone(channels=1), "PCM_16"),
                 noise=(np.zeros((8000, 2)), "PCM_16"), mixture=(np.zeros((10, 2)), "PCM_16"))
    config = make_config(tmp_path / "artifacts", format="folder", root=str(root), targets=["voice", "noise"])
    artifact, _ = prepare(config)
    manifest = artifact.meta["manifest"]
    assert manifest["empty_splits"] == ["train", "test"]
    assert manifest["silent"] == [{"track": "song", "split": "valid", "target": "noise"}]
    ((name, stems),) = list(records.read_tracks(artifact, "valid"))
    assert name == "song" and stems["voice"].shape == (8000, 2)
    assert np.array_equal(stems["voice"][:, 0], stems["voice"][:, 1])  # mono duplicated to stereo
    assert manifest["splits"]["valid"]["energy"]["noise"] == 0.0
    assert abs(manifest["splits"]["valid"]["rms"]["voice"] - 0.3 / np.sqrt(2)) < 1e-3


def test_empty_root_is_an_error(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    config = make_config(tmp_path / "artifacts", format="folder", root=str(tmp_path / "data"))
    with pytest.raises(StageError, match="no tracks for splits train, valid, test"):
        prepare(config)
    assert no_artifact(tmp_path / "artifacts")


def test_unknown_config_key_via_cli(tmp_path):
    result = cli("--stage", "prepare", "--no-file-observer", "with", "unittest", "data.sample_rat=8000",
                 f"artifacts_dir={tmp_path}", check=False, timeout=120, env=SUBPROCESS_ENV)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # minus TF's own logging
    assert len(lines) == 1 and "unknown config key 'data.sample_rat'" in lines[0], result.stderr
    assert no_artifact(tmp_path)


# -- fingerprint, force, interruption ------------------------------------------------------------------------------
def test_fingerprint_skip_and_force(tmp_path):
    config = make_config(tmp_path)
    first, skipped = prepare(config)
    assert not skipped
    again, skipped = prepare(config)
    assert skipped and again.fingerprint == first.fingerprint
    forced, skipped = prepare(config, force=True)
    assert not skipped and forced.meta["created"] >= first.meta["created"] and forced.fingerprint == first.fingerprint
    changed, skipped = prepare(dataclasses.replace(config, data=dataclasses.replace(config.data, pcm="float16")))
    assert not skipped and changed.fingerprint != first.fingerprint

    # an outside input changing (a source file touched) invalidates a folder data set
    folder_config = make_config(tmp_path / "folder", format="folder", root=str(tmp_path / "default-data"))
    base, _ = prepare(folder_config)
    _, skipped = prepare(folder_config)
    assert skipped
    touched = next((tmp_path / "default-data" / "train").rglob("bass.wav"))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10 ** 9))
    rerun, skipped = prepare(folder_config)
    assert not skipped and rerun.fingerprint != base.fingerprint


def test_failure_inside_the_executor_leaves_nothing(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    calls = []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    original = records.serialize_segment
    monkeypatch.setattr(records, "serialize_segment", fail_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(config)
    assert no_artifact(tmp_path) and not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    monkeypatch.setattr(records, "serialize_segment", original)
    artifact, skipped = prepare(config)
    assert not skipped and artifact.figures["tracks"]["train"] == 2


def test_killed_prepare_leaves_no_complete_artifact(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(PROJECT_ROOT)!r})
        from components.data import records
        from tests.test_data import make_config, prepare
        close = records.ShardWriter.close
        def close_then_die(self):
            close(self)
            os.kill(os.getpid(), signal.SIGKILL)  # killed after the train shards, before the commit
        records.ShardWriter.close = close_then_die
        prepare(make_config({str(tmp_path)!r}))
    """)
    result = python(script, check=False, timeout=120, env=SUBPROCESS_ENV)
    assert result.returncode == -9, result.stderr[-2000:]
    leftovers = [p for p in tmp_path.iterdir() if ".prepare.staging-" in p.name]
    assert len(leftovers) == 1 and list(leftovers[0].glob("train-*.tfrecord"))  # it was killed mid-way
    assert no_artifact(tmp_path)
    artifact, skipped = prepare(make_config(tmp_path))
    assert not skipped and artifact.meta["complete"]
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


# -- Sacred observers --------------------------------------------------------------------------------------------
def test_cli_records_the_run_in_file_and_sql_observers(tmp_path):
    cli("--stage", "prepare", "-q", "--runs-dir", tmp_path / "runs", "--sql", f"sqlite:///{tmp_path / 'runs.db'}",
        "with", "unittest", f"artifacts_dir={tmp_path / 'artifacts'}", timeout=300, env=SUBPROCESS_ENV)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name.isdigit()]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "COMPLETED" and run["command"] == "prepare" and run["result"] == 16.0
    assert json.loads((run_dir / "config.json").read_text())["data"]["sample_rate"] == 8000
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["prepare.tracks.train"]["values"] == [2.0]
    assert "prepare.audio_seconds_per_second" in metrics
    with sqlite3.connect(tmp_path / "runs.db") as db:
        rows = db.execute("SELECT status, command FROM run").fetchall()
    assert rows == [("COMPLETED", "prepare")]
