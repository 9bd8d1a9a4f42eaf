"""Scaling out: prepare in parallel processes and on Apache Beam, training on MultiWorkerMirroredStrategy
with local worker processes, evaluation as a Beam pipeline. Everything on the `unittest` preset.

The Beam tests need apache-beam (the `beam` extra, part of `dev`); they are skipped, saying so, without it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from components import records
from components.artifacts import StageError
from configs import PRESETS, Config
from configs.config import ConfigError, defaults
from pipeline import pipeline
from pipeline.experiment import deep_merge
from tests.cli import cli

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MUSDB_SAMPLE = SHARED_DATA / "musdb18-sample"
try:
    import apache_beam  # noqa: F401

    HAVE_BEAM = True
except ImportError:
    HAVE_BEAM = False
needs_beam = pytest.mark.skipif(not HAVE_BEAM, reason="apache-beam not installed (pip install -e '.[beam]')")
# the DirectRunner in one process: the Beam graph and its results without the start-up of worker processes
IN_PROCESS_BEAM = ["--direct_running_mode=in_memory"]


def make_config(artifacts_dir, data=None, prepare=None) -> Config:
    raw = deep_merge(defaults(), PRESETS["unittest"])
    raw = deep_merge(raw, {"artifacts_dir": str(artifacts_dir), "data": data or {}, "prepare": prepare or {}})
    return Config.from_dict(raw)


def run_prepare(config, **kwargs):
    return pipeline.run_component(pipeline.component("prepare"), config, **kwargs)


def parsed_records(artifact) -> dict:
    """{split: [every feature of every example, decoded]} in shard order."""
    import tensorflow as tf

    found = {}
    for split in artifact.meta["manifest"]["splits"]:
        examples = []
        for path in records.shard_paths(artifact, split):
            for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
                feature = tf.train.Example.FromString(serialized).features.feature
                examples.append({key: (list(value.bytes_list.value) or list(value.int64_list.value))
                                 for key, value in sorted(feature.items())})
        found[split] = examples
    return found


def _bad_folder_data(root: Path) -> Path:
    """A folder data set of one good and one corrupt track (voice/noise targets, 8 kHz)."""
    import soundfile

    t = np.arange(8000) / 8000
    tone = np.repeat((0.3 * np.sin(2 * np.pi * 220 * t))[:, None], 2, axis=1)
    for name in ("bad", "good"):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for target in ("voice", "noise"):
            soundfile.write(str(folder / f"{target}.wav"), tone, 8000, subtype="PCM_16")
    (root / "train" / "bad" / "noise.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    return root


# -- configuration ----------------------------------------------------------------------------------------------
def test_runner_and_strategy_are_validated():
    assert make_config("/tmp/a").prepare.runner == "local"
    with pytest.raises(ConfigError, match="prepare.runner must be one of local, beam; got 'spark'"):
        make_config("/tmp/a", prepare={"runner": "spark"})
    with pytest.raises(ConfigError, match="prepare.beam_options takes Beam pipeline flags"):
        make_config("/tmp/a", prepare={"beam_options": ["runner=FlinkRunner"]})
    raw = deep_merge(deep_merge(defaults(), PRESETS["unittest"]), {"train": {"strategy": "parameter_server"}})
    with pytest.raises(ConfigError, match="train.strategy must be one of mirrored, multi_worker"):
        Config.from_dict(raw)


# -- local runner: parallel processes -----------------------------------------------------------------------------
def test_parallel_processes_write_what_one_process_writes(tmp_path):
    data = {"root": str(tmp_path / "data")}
    serial, _ = run_prepare(make_config(tmp_path / "one", data, {"workers": 1}))
    parallel, _ = run_prepare(make_config(tmp_path / "two", data, {"workers": 2}))
    assert serial.fingerprint == parallel.fingerprint  # prepare.* is how, not what: not in the fingerprint
    assert serial.meta["manifest"] == parallel.meta["manifest"]  # shard checksums included: the same bytes
    assert serial.meta["manifest"]["splits"]["train"]["segments"] == 4


def test_shard_plan_cuts_where_the_shard_writer_cuts(tmp_path):
    from components.beam_prepare import plan_shards

    rng = np.random.default_rng(0)
    sizes = [(index, "train", list(rng.integers(10, 400, rng.integers(0, 6)))) for index in range(12)]
    writer = records.ShardWriter(tmp_path, "train", shard_bytes=700)
    for _, _, lengths in sizes:
        for length in lengths:
            writer.write(b"x" * int(length))
    shards = writer.close()
    plan = plan_shards(reversed(sizes), ["train", "valid"], 700)  # arrival order does not matter
    assert plan["total"] == {"train": len(shards), "valid": 0}
    assigned = [shard for index, _, _ in sizes for shard in plan["shard"][index]]
    assert [assigned.count(shard) for shard in range(len(shards))] == [s["examples"] for s in shards]
    assert assigned == sorted(assigned)


@pytest.mark.skipif(not MUSDB_SAMPLE.is_dir(), reason=f"real MUSDB18 sample absent: {MUSDB_SAMPLE}")
def test_one_ffmpeg_run_decodes_the_samples_musdb_decodes():
    import musdb

    from components import datasets

    track = musdb.DB(root=str(MUSDB_SAMPLE), subsets="train").tracks[0]
    reference = track.stems  # stempeg: ffprobe, then one ffmpeg per stream
    decoded, rate = datasets.decode_stem_mp4(track.path)
    assert rate == track.rate == 44100
    for name, source in track.sources.items():
        assert decoded[name].shape == reference[source.stem_id].shape == (300032, 2)
        np.testing.assert_array_equal(decoded[name], reference[source.stem_id], err_msg=name)


# -- Beam runner --------------------------------------------------------------------------------------------------
@needs_beam
def test_beam_prepare_writes_the_local_artifact(tmp_path):
    data_root = tmp_path / "data"
    local, _ = run_prepare(make_config(tmp_path / "local", {"root": str(data_root)}))
    # the default: DirectRunner, multi-processing, every core; through the CLI like a user
    cli("--stage", "prepare", "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={tmp_path / 'beam'}",
        f"data.root={data_root}", "prepare.runner=beam")
    beam = json.loads((tmp_path / "beam" / "prepare" / "artifact.json").read_text())
    assert beam["complete"] and beam["fingerprint"] == local.fingerprint
    assert beam["manifest"] == local.meta["manifest"]  # statistics, shard names, sizes and sha256
    from components.artifacts import load

    assert parsed_records(load(tmp_path / "beam", "prepare")) == parsed_records(local)
    assert sum(len(v) for v in parsed_records(local).values()) == 8  # 4 tracks x 2 segments

    # the same stage either way: a complete artifact with this fingerprint is skipped by the other runner
    again = cli("--stage", "prepare", "--no-file-observer", "with", "unittest", f"artifacts_dir={tmp_path / 'local'}",
                f"data.root={data_root}", "prepare.runner=beam")
    assert "skipping" in again.stderr


@needs_beam
def test_beam_reports_bad_tracks_like_the_local_runner(tmp_path):
    root = _bad_folder_data(tmp_path / "data")
    data = {"format": "folder", "root": str(root), "targets": ["voice", "noise"]}
    beam = {"runner": "beam", "beam_options": IN_PROCESS_BEAM}
    messages = []
    for name, prepare in (("local", {}), ("beam", beam)):
        with pytest.raises(StageError) as error:
            run_prepare(make_config(tmp_path / name, data, prepare))
        messages.append(str(error.value))
        assert not (tmp_path / name / "prepare").exists()
        assert not [p for p in (tmp_path / name).iterdir() if ".staging-" in p.name]  # nothing half-written
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{root / 'train' / 'bad' / 'noise.wav'}: unreadable audio")

    skipping = {**data, "skip_bad_tracks": True}
    local, _ = run_prepare(make_config(tmp_path / "local", skipping))
    on_beam, _ = run_prepare(make_config(tmp_path / "beam", skipping, beam))
    assert on_beam.meta["manifest"] == local.meta["manifest"]
    assert local.meta["manifest"]["skipped"] == [{"track": "bad", "split": "train", "reason": messages[0]}]
    assert parsed_records(on_beam) == parsed_records(local)


def test_beam_runner_without_beam_is_a_one_line_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_beam(name, *args, **kwargs):
        if name.startswith("apache_beam"):
            raise ImportError("No module named 'apache_beam'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_beam)
    with pytest.raises(StageError, match=r"^prepare.runner=beam needs Apache Beam; pip install"):
        run_prepare(make_config(tmp_path, prepare={"runner": "beam"}))
    assert not (tmp_path / "prepare").exists()


def test_beam_options_default_to_the_multiprocess_direct_runner():
    from components.beam_prepare import pipeline_options

    config = make_config("/tmp/a", prepare={"workers": 3}).prepare
    assert pipeline_options(config)[:3] == ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                                            "--direct_num_workers=3"]
    flink = dataclasses.replace(config, beam_options=("--runner=FlinkRunner", "--flink_master=host:8081"))
    assert pipeline_options(flink) == ["--runner=FlinkRunner", "--flink_master=host:8081"]
    mine = dataclasses.replace(config, beam_options=("--direct_num_workers=8",))
    assert "--direct_num_workers=8" in pipeline_options(mine) and "--direct_num_workers=3" not in pipeline_options(mine)
