"""Scaling out: prepare in parallel processes and on Apache Beam, training on MultiWorkerMirroredStrategy
with local worker processes, evaluation as a Beam pipeline. Everything on the `unittest` preset.

The Beam tests need apache-beam (the `beam` extra, part of `dev`); they are skipped, saying so, without it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from components.data import records
from configs.errors import ConfigError, StageError
from configs import PRESETS, Config
from configs.config import defaults
from pipeline import definition
from configs.config import deep_merge
from tests.cli import RUN, cli, environment, python, python_argv, start
from tests.shared_artifacts import DATA, copy_stages

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
    return definition.run_component(definition.component("prepare"), config, **kwargs)


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
    with pytest.raises(ConfigError, match="'prepare.runner' must be one of local, beam; got 'spark'"):
        make_config("/tmp/a", prepare={"runner": "spark"})
    with pytest.raises(ConfigError, match="prepare.beam_options takes Beam pipeline flags"):
        make_config("/tmp/a", prepare={"beam_options": ["runner=FlinkRunner"]})
    raw = deep_merge(deep_merge(defaults(), PRESETS["unittest"]), {"train": {"strategy": "parameter_server"}})
    with pytest.raises(ConfigError, match="'train.strategy' must be one of mirrored, multi_worker"):
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
    from components.data.beam_prepare import plan_shards

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
    assert [assigned.count(shard) for shard in range(len(shards))] == [s.examples for s in shards]
    assert assigned == sorted(assigned)


@pytest.mark.skipif(not MUSDB_SAMPLE.is_dir(), reason=f"real MUSDB18 sample absent: {MUSDB_SAMPLE}")
def test_one_ffmpeg_run_decodes_the_samples_musdb_decodes():
    import musdb

    from components.data import datasets

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
    again, skipped = run_prepare(make_config(tmp_path / "local", {"root": str(data_root)}, {"runner": "beam"}))
    assert skipped and again.fingerprint == local.fingerprint


@needs_beam
def test_beam_reports_bad_tracks_like_the_local_runner(tmp_path):
    root = _bad_folder_data(tmp_path / "data")
    data = {"format": "folder", "root": str(root), "targets": ["voice", "noise"]}
    beam = {"runner": "beam", "beam_options": IN_PROCESS_BEAM}
    messages = []
    for name, prepare in (("local", {"workers": 2}), ("beam", beam)):  # local: the error from a worker process
        with pytest.raises(StageError) as error:
            run_prepare(make_config(tmp_path / name, data, prepare))
        messages.append(str(error.value))
        assert not (tmp_path / name / "prepare").exists()
        assert not [p for p in (tmp_path / name).iterdir() if ".staging-" in p.name]  # nothing half-written
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{root / 'train' / 'bad' / 'noise.wav'}: unreadable audio")

    skipping = {**data, "skip_bad_tracks": True}
    local, _ = run_prepare(make_config(tmp_path / "local", skipping, {"workers": 2}))
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
    from components.data.beam_prepare import pipeline_options

    config = make_config("/tmp/a", prepare={"workers": 3}).prepare
    assert pipeline_options(config)[:3] == ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                                            "--direct_num_workers=3"]
    flink = dataclasses.replace(config, beam_options=("--runner=FlinkRunner", "--flink_master=host:8081"))
    assert pipeline_options(flink) == ["--runner=FlinkRunner", "--flink_master=host:8081"]
    mine = dataclasses.replace(config, beam_options=("--direct_num_workers=8",))
    assert "--direct_num_workers=8" in pipeline_options(mine) and "--direct_num_workers=3" not in pipeline_options(mine)


# -- training across workers: MultiWorkerMirroredStrategy, two local worker processes ----------------------------
MULTI_WORKER_STEP = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from components.training import distribute
    multi = bool(os.environ.get("TF_CONFIG"))
    strategy = distribute.multi_worker_strategy() if multi else None  # before any other TensorFlow op
    import keras, tensorflow as tf
    from components.training.trained import build_model
    from pipeline.experiment import resolve
    config = resolve({"model": {"umx": {"nb_layers": 1}}}, ["unittest"])
    rng = np.random.default_rng(0)
    samples = int(config.data.sample_rate * config.train.seq_seconds)
    stems = {t: rng.normal(0, 0.1, (8, samples, 2)).astype("float32") for t in config.data.targets}
    mixture = sum(stems.values())
    keras.utils.set_random_seed(0)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = build_model(config, {})
        model.train_model.compile(optimizer=keras.optimizers.SGD(0.1), loss=model.loss)
    before = [w.numpy() for w in model.train_model.trainable_weights]
    targets = {k: v.numpy() for k, v in model.train_targets(stems).items()}
    dataset = tf.data.Dataset.from_tensors((mixture, targets))  # one global batch of 8
    report = {"replicas": 1, "local_rows": list(range(8))}
    if multi:
        dataset = distribute.shard_by_data(dataset)
        local = strategy.experimental_local_results(next(iter(strategy.experimental_distribute_dataset(dataset)))[0])
        seen = np.concatenate([np.asarray(v) for v in local])
        report = {"replicas": strategy.num_replicas_in_sync,
                  "local_rows": [int(np.argmin(np.abs(mixture - row).sum(axis=(1, 2)))) for row in seen]}
        distribute.build_for_fit(model.train_model, dataset, strategy)
    history = model.train_model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0)
    after = [w.numpy() for w in model.train_model.trainable_weights]
    np.savez(sys.argv[1], *after)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(after, before))
    report.update(loss=history.history["loss"][0], moved=moved)
    print(json.dumps(report))
""")


def _free_ports(count: int) -> list:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _tf_config(ports, index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"localhost:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


def test_one_step_on_two_workers_matches_one_process(tmp_path):
    env = environment({**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    env.pop("TF_CONFIG", None)
    ports = _free_ports(2)
    workers = [start(python_argv(MULTI_WORKER_STEP, tmp_path / f"worker{i}.npz"),
                     env={**env, "TF_CONFIG": _tf_config(ports, i)}) for i in range(2)]
    single = python(MULTI_WORKER_STEP, tmp_path / "single.npz", env=env)
    reports = []
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    reference = json.loads(single.stdout.strip().splitlines()[-1])
    # each worker trained on its own half of the global batch, not on all of it
    assert [r["replicas"] for r in reports] == [2, 2]
    assert [r["local_rows"] for r in reports] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert reports[0]["loss"] == pytest.approx(reference["loss"], rel=1e-6)  # the global mean loss
    assert reference["moved"] > 1e-3  # the step changed the weights
    weights = [np.load(tmp_path / f"{name}.npz") for name in ("single", "worker0", "worker1")]
    keys = weights[0].files
    assert len(keys) > 10
    # the same step up to float32 rounding of the two halves' all-reduced gradient against the whole batch's. Measured
    # with the seed-0 weights: the median element 0, the largest difference 6.5e-6 (374 elements of one output-layer
    # kernel above 1e-6: rounding amplified there, not investigated) against a largest weight change of 8.0e-3
    differences = np.concatenate([np.abs(weights[0][k] - weights[1][k]).ravel() for k in keys])
    assert np.median(differences) < 1e-8, np.median(differences)
    assert differences.max() < 1e-2 * reference["moved"], (differences.max(), reference["moved"])
    assert max(float(np.max(np.abs(weights[1][k] - weights[2][k]))) for k in keys) == 0.0  # in lockstep


def _history(root: Path) -> list:
    """The chief's history (a non-chief worker keeps its own in `.train-work/<fingerprint>-worker-<i>/`)."""
    files = [path for path in (root / ".train-work").glob("*/history.json") if "-worker-" not in path.parent.name] \
        if (root / ".train-work").exists() else []
    return json.loads(files[0].read_text() or "[]") if files else []


def test_two_workers_train_and_a_killed_worker_resumes_from_the_last_epoch(tmp_path, umx_pipeline):
    """Two worker processes fine-tune the shared run's model; worker 1 is killed mid-epoch, the chief fails over its lost peer (as on a
    cluster, where the scheduler restarts failed tasks), both are restarted, and the job resumes from the
    chief's BackupAndRestore state at the last completed epoch and writes the train artifact."""
    root = copy_stages(umx_pipeline, tmp_path / "artifacts", "prepare", DATA)  # the unittest data, prepared
    ports = _free_ports(2)
    args = [*RUN, "--stage", "train", "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}",
            "train.strategy=multi_worker", "train.epochs=3", "train.steps_per_epoch=2", "model.umx.nb_layers=1",
            f"train.init_from={umx_pipeline}"]  # a fine-tune of the shared run's model: the init on every worker

    def start_worker(index):
        env = {**os.environ, "TF_CONFIG": _tf_config(ports, index), "TF_CPP_MIN_LOG_LEVEL": "3"}
        return start(args, env=env, stdout=subprocess.DEVNULL, start_new_session=True)

    chief, worker = start_worker(0), start_worker(1)
    try:
        deadline = time.time() + 400
        while len(_history(root)) < 1:
            assert time.time() < deadline, "no epoch finished in 400 s"
            if chief.poll() is not None or worker.poll() is not None:
                pytest.fail(f"training ended before the kill: {(chief.stderr.read() or '')[-2000:]}")
            time.sleep(0.05)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        done_before = _history(root)
        assert 1 <= len(done_before) < 3
        chief.wait(timeout=300)  # the chief's collectives fail once its peer is gone
        assert chief.returncode != 0
        assert not (root / "train" / "artifact.json").exists()
        chief, worker = start_worker(0), start_worker(1)  # the scheduler restarts both tasks
        for process in (chief, worker):
            _, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-3000:]
    finally:
        for process in (chief, worker):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    meta = json.loads((root / "train" / "artifact.json").read_text())
    assert meta["complete"] and meta["figures"]["replicas"] == 2 and meta["figures"]["epochs"] == 3
    assert meta["init"]["path"] == str((umx_pipeline / "train").resolve()), meta["init"]  # resumed the fine-tune
    history = json.loads((root / "train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # epochs done before the kill were not redone: they keep the first chief's process id
    killed_at = len(done_before)
    assert [h["pid"] for h in history[:killed_at]] == [h["pid"] for h in done_before]
    assert all(h["pid"] != done_before[0]["pid"] for h in history[killed_at:])
    for name in ("model.weights.h5", "best.weights.h5"):
        assert (root / "train" / name).is_file()
    # only the chief wrote: no second artifact, no worker's private work dir left behind
    assert not (root / ".train-work").exists() or not any((root / ".train-work").iterdir())


# -- evaluation on Beam -------------------------------------------------------------------------------------------
@needs_beam
def test_beam_evaluation_writes_the_metrics_of_the_process_pool(tmp_path, umx_pipeline):
    import shutil

    base = umx_pipeline  # unittest prepare and train (1 epoch of 2 steps); its cached baselines are not copied
    metrics = {}
    for name, prepare in (("pool", {}), ("beam", {"runner": "beam", "beam_options": IN_PROCESS_BEAM})):
        root = tmp_path / name
        for stage in ("prepare", "train", "default-data"):
            shutil.copytree(base / stage, root / stage)
        raw = deep_merge(deep_merge(defaults(), PRESETS["unittest"]),
                         {"artifacts_dir": str(root), "train": {"epochs": 1, "steps_per_epoch": 2},
                          "evaluate": {"workers": 2}, "prepare": prepare})
        definition.run_component(definition.component("evaluate"), Config.from_dict(raw))
        found = json.loads((root / "evaluate" / "metrics.json").read_text())
        assert found["baseline_cache"].pop("path") == str(next((root / "evaluate-baselines").glob("*.json")))
        metrics[name] = found
        assert not list((root / "evaluate").glob(".scratch-*"))
    assert metrics["beam"] == metrics["pool"]
    assert metrics["pool"]["tracks"] == ["test-000 96bpm G minor"]
    assert metrics["pool"]["baselines"]["irm"]["mean"]["SDR"] > metrics["pool"]["baselines"]["mix"]["mean"]["SDR"]
