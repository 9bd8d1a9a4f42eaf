"""The typed prepare manifest (`components.data.manifest`): the on-disk JSON round-trips exactly, older and damaged
manifests are one-line errors naming the file, and the questions stages ask get the prepared figures."""
from __future__ import annotations

import json

import pytest

from components.data import records
from components.artifacts import META_FILE
from configs.errors import StageError
from components.data.manifest import Manifest, Shard, Split, TrackEntry
from configs import PRESETS, Config
from configs.config import defaults
from pipeline import definition
from configs.config import deep_merge

REDO = "redo it with `python pipeline/run.py --stage prepare --force`"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The unittest preset prepared once (2 + 1 + 1 generated tracks of 4 s at 8 kHz, 2 s segments)."""
    raw = deep_merge(defaults(), PRESETS["unittest"])
    raw["artifacts_dir"] = str(tmp_path_factory.mktemp("artifacts"))
    artifact, _ = definition.run_component(definition.component("prepare"), Config.from_dict(raw))
    return artifact


def on_disk(artifact) -> dict:
    return json.loads((artifact.path / META_FILE).read_text())


def test_prepare_writes_what_the_manifest_reads_back_exactly(prepared):
    written = on_disk(prepared)["manifest"]
    manifest = Manifest.read(prepared.path)
    assert manifest.to_dict() == written
    assert Manifest.read(prepared) == Manifest.read(prepared.path / META_FILE) == manifest
    assert (manifest.format, manifest.sample_rate, manifest.nb_channels, manifest.pcm) == ("default", 8000, 2, "int16")
    assert manifest.targets == ("vocals", "drums", "bass", "other")
    assert manifest.segment_samples == 16000  # 2 s at 8 kHz
    train = manifest.splits["train"]
    assert len(train.tracks) == manifest.nb_tracks("train") == 2 and manifest.nb_tracks("absent") == 0
    assert [t.segments for t in train.tracks] == [2, 2] and train.segments == train.nb_examples == 4
    assert all(t.nb_timesteps == 32000 and t.seconds == 4.0 for t in train.tracks)
    assert manifest.stats.energy == train.energy == records.target_energy(prepared)
    assert manifest.stats_dict() == written["stats"] == {"split": "train", "energy": written["splits"]["train"]
                                                         ["energy"], "rms": written["splits"]["train"]["rms"]}
    assert all(len(shard.sha256) == 64 for split in manifest.splits.values() for shard in split.shards)
    assert manifest.shard_digests == {s["file"]: s["sha256"] for e in written["splits"].values() for s in e["shards"]}
    assert manifest.first_split_with_tracks(("test", "valid", "train")) == "test"


def test_an_older_manifest_without_stats_and_checksums_still_reads(prepared, tmp_path):
    meta = on_disk(prepared)
    del meta["manifest"]["stats"]
    for split in meta["manifest"]["splits"].values():
        for shard in split["shards"]:
            del shard["sha256"]
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    manifest = Manifest.read(tmp_path)
    assert manifest.stats is None and manifest.stats_dict() == {} and manifest.shard_digests == {}
    assert manifest.splits["train"].shards[0].to_dict().keys() == {"file", "examples", "bytes"}
    assert manifest.to_dict() == dict(meta["manifest"], stats={})


@pytest.mark.parametrize("damage, problem", [
    (lambda m: m.pop("segment_samples"), "no 'segment_samples'"),
    (lambda m: m["splits"]["train"]["tracks"][1].pop("energy"), "no 'splits.train.tracks[1].energy'"),
    (lambda m: m["splits"]["valid"].update(shards="x"), "'splits.valid.shards' is 'x'"),
    (lambda m: m.update(sample_rate="8000"), "'sample_rate' is '8000'"),
])
def test_a_damaged_manifest_is_a_one_line_error_naming_the_file(prepared, tmp_path, damage, problem):
    meta = on_disk(prepared)
    damage(meta["manifest"])
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(StageError) as error:
        Manifest.read(tmp_path)
    assert str(error.value) == f"{tmp_path / META_FILE}: damaged or older prepare manifest ({problem}); {REDO}"


def test_a_missing_or_foreign_artifact_json_is_a_one_line_error(tmp_path):
    with pytest.raises(StageError) as error:
        Manifest.read(tmp_path)
    assert str(error.value) == f"{tmp_path}: no {META_FILE}; run `python pipeline/run.py --stage prepare` first"
    (tmp_path / META_FILE).write_text('{"fingerprint": "abc"}')
    with pytest.raises(StageError) as error:
        records.shard_paths(tmp_path, "train")
    assert str(error.value) == f"{tmp_path}: not a prepare artifact (no manifest); run --stage prepare"
    (tmp_path / META_FILE).write_text('{"manifest": ')
    with pytest.raises(StageError) as error:
        Manifest.read(tmp_path)
    assert str(error.value) == f"{tmp_path / META_FILE}: unreadable (JSONDecodeError); {REDO}"


def test_an_unprepared_split_names_the_prepared_ones(prepared):
    with pytest.raises(StageError) as error:
        records.shard_paths(prepared, "holdout")
    assert str(error.value) == (f"{prepared.path}: split 'holdout' was not prepared (prepared: train, valid, test); "
                                "add it to data.splits and rerun prepare")


def test_shards_holding_a_track_follow_the_track_list_order():
    def track(name, segments):
        return TrackEntry(name=name, nb_timesteps=segments, seconds=0.0, segments=segments, energy={}, rms={},
                          peak={}, silent=(), clipped_samples=0, sources=())

    # examples: a -> 0, 1; b -> 2, 3, 4; c -> 5 over shards of 2 examples [0, 1], [2, 3], [4, 5]
    split = Split(tracks=(track("a", 2), track("b", 3), track("c", 1)), seconds=0.0, segments=6, energy={}, rms={},
                  shards=tuple(Shard(file=f"s{i}", examples=2, bytes=1) for i in range(3)))
    assert split.shards_holding("a") == ["s0"]
    assert split.shards_holding("b") == ["s1", "s2"]
    assert split.shards_holding("c") == ["s2"]
    assert split.names == ["a", "b", "c"] and split.nb_examples == 6
    with pytest.raises(KeyError):
        split.shards_holding("d")


def test_the_driver_reports_a_damaged_manifest_in_one_line(tmp_path, umx_pipeline):
    from tests.cli import cli_here
    from tests.shared_artifacts import DATA, copy_stages

    run = ["--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={tmp_path}"]
    copy_stages(umx_pipeline, tmp_path, "prepare", DATA)  # a `--stage prepare` run's artifact, copied
    meta_path = tmp_path / "prepare" / META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["manifest"]["splits"]["train"]["shards"][0]["examples"]
    meta_path.write_text(json.dumps(meta))
    result = cli_here("--stage", "train", *run)  # the driver's main in this process
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"error: {meta_path}: damaged or older prepare manifest (no 'splits.train.shards[0].examples'); {REDO}"]


def test_a_committed_manifest_is_parsed_once_and_shared(umx_pipeline):
    """Every reader of one prepare artifact (data, statistics, validation, evaluation) gets the same object."""
    import dataclasses

    from components import artifacts

    prepare = artifacts.load(umx_pipeline, "prepare")
    first = Manifest.read(prepare)
    assert Manifest.read(artifacts.load(umx_pipeline, "prepare")) is first
    other = dataclasses.replace(prepare, meta={**prepare.meta, "fingerprint": "another"})
    assert Manifest.read(other) is not first and Manifest.read(other) == first
