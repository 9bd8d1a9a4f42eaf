"""Nothing lost, nothing half-done (issue 16): concurrent runs, damaged artifacts, late config checks,
unreachable observers, interrupted or failing `separate`, and every model family through `--stage all`.

Real processes and real signals where a signal, a lock or the command line is the point (`separate`'s file handling
runs its `main` in this process); the pipelines run the `unittest` preset.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from components import artifacts
from configs.errors import LockedError, UserError
from tests.cli import RUN, SEPARATE, cli, cli_here, environment, interrupt_when, python_argv, separate_here, start

TARGETS = ("vocals", "drums", "bass", "other")


def unittest_run(artifacts_dir, *extra, family="wave_u_net"):
    return ["--no-file-observer", "-q", *extra, "with", "unittest", f"model.name={family}",
            f"artifacts_dir={artifacts_dir}"]


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.strip()]


def noise_wav(path: Path, seconds: float, rate: int = 8000, seed: int = 0) -> Path:
    audio = 0.1 * np.random.default_rng(seed).standard_normal((int(seconds * rate), 2))
    soundfile.write(str(path), audio.astype("float32"), rate)
    return path


# --------------------------------------------------------------------------------------------
# 1. Two runs on one artifacts directory
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A Wave-U-Net `--stage all` run (process A) while a second run (process B) on the same artifacts
    directory starts as soon as A holds the lock; returns (artifacts dir, A's result, B's result, B's
    seconds, A's pid)."""
    folder = tmp_path_factory.mktemp("shared") / "artifacts"
    first = start([*RUN, "--stage", "all", *unittest_run(folder)])
    lock = folder / artifacts.LOCK_FILE
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not (lock.is_file() and lock.read_text().strip()):
        time.sleep(0.1)
    started = time.time()
    second = cli("--stage", "all", *unittest_run(folder), check=False)
    second_seconds = time.time() - started
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    return folder, subprocess.CompletedProcess(first.args, 0, out, err), second, second_seconds, first.pid


def test_a_second_run_on_a_held_artifacts_dir_stops_at_once_and_the_first_commits_verified_artifacts(exported):
    folder, first, second, second_seconds, first_pid = exported
    assert second.returncode == 2
    (line,) = error_lines(second.stderr)
    assert line.startswith(f"error: another run (pid {first_pid} on host {socket.gethostname()}, started ")
    assert line.endswith(f") holds {folder}; wait for it to finish or use another artifacts_dir")
    assert second_seconds < 120  # it did not wait for the first run (which trains, evaluates and exports)
    for stage in ("prepare", "train", "evaluate", "export"):
        artifact = artifacts.load(folder, stage)
        assert artifact is not None and artifact.meta["files"], stage
        artifacts.verify(artifact)  # every listed file exists with its recorded size and sha256
    listed = artifacts.load(folder, "train").meta["files"]
    assert {"best.weights.h5", "model.weights.h5", "history.json"} <= set(listed)
    assert listed["best.weights.h5"]["sha256"] == artifacts.file_digest(folder / "train" / "best.weights.h5")
    assert not (folder / ".train-work").exists() or not any((folder / ".train-work").iterdir())
    assert (folder / artifacts.LOCK_FILE).read_text() == ""  # released
    # a newcomer's first run: no TensorFlow start-up notices, no Keras shuffle notice
    for notice in ("oneDNN", "cudart_stub", "cuInit", "absl::InitializeLog", "shuffle=True", "Traceback"):
        assert notice not in first.stderr, notice


def test_the_lock_names_its_holder_is_reentrant_and_dies_with_its_process(tmp_path):
    holder = start(python_argv("import sys, time; from components import artifacts\n"
                               "with artifacts.exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
                               tmp_path), stderr=None, env=environment())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"another run \(pid {holder.pid} on host "
                                               rf"{socket.gethostname()}, started .*\) holds {tmp_path};"):
            with artifacts.exclusive(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel releases the flock
        holder.wait()
    with artifacts.exclusive(tmp_path):
        with artifacts.exclusive(tmp_path):  # re-entrant: run_component inside the driver's lock
            assert json.loads((tmp_path / artifacts.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / artifacts.LOCK_FILE).read_text() == ""


def test_ctrl_c_during_a_stage_exits_130_without_a_traceback_and_keeps_the_previous_artifact(exported, tmp_path):
    folder = tmp_path / "artifacts"
    shutil.copytree(exported[0], folder)
    result = interrupt_when([*RUN, "--stage", "train", "--force", *unittest_run(folder)],
                            lambda: list(folder.glob(".train.staging-*")))
    err = result.stderr
    assert result.returncode == 130
    assert "Traceback" not in err
    assert error_lines(err)[-1] == ("interrupted; finished stages are kept, the interrupted one resumes (train) or "
                                    "restarts on the next run")
    assert not list(folder.glob(".train.staging-*"))
    artifacts.verify(artifacts.load(folder, "train"))  # the previous train artifact, whole
    assert (folder / artifacts.LOCK_FILE).read_text() == ""


# --------------------------------------------------------------------------------------------
# 6. Damaged weights and shards
# --------------------------------------------------------------------------------------------
@pytest.fixture
def damaged_copy(exported, tmp_path):
    folder = tmp_path / "artifacts"
    shutil.copytree(exported[0], folder)
    return folder


def test_damaged_weights_are_one_line_errors_and_the_train_artifact_is_no_longer_complete(damaged_copy):
    folder = damaged_copy
    best = folder / "train" / "best.weights.h5"
    size = best.stat().st_size
    blob = best.read_bytes()
    best.write_bytes(blob[: size // 2])  # truncated
    assert artifacts.load(folder, "train") is None
    # the driver's refusals run its main in this process (the same exit code and line; the CLI process is tested
    # by test_a_bad_value_stops_the_cli...): no TensorFlow import per refusal
    for stage in ("evaluate", "export"):
        result = cli_here("--stage", stage, *unittest_run(folder))
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = error_lines(result.stderr)
        assert line == (f"error: stage '{stage}' needs the 'train' artifact but {best} has {size // 2} bytes, "
                        f"{size} when it was written (truncated or replaced); redo it with "
                        "`python pipeline/run.py --stage train --force` (same artifacts_dir)")
    # same size, other bytes: caught by the sha256 before the weights are loaded
    flipped = bytearray(blob)
    flipped[size // 2] ^= 0xFF
    best.write_bytes(bytes(flipped))
    assert artifacts.load(folder, "train") is not None  # sizes match: the cheap check passes
    result = cli_here("--stage", "evaluate", "--force", *unittest_run(folder))
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line == (f"error: {best} has changed since it was written (sha256 differs); redo the train stage "
                    "with `python pipeline/run.py --stage train --force`")
    # missing: the pipeline redoes train by itself (no --force needed), then everything is verified
    (folder / "train" / "model.weights.h5").unlink()
    assert artifacts.load(folder, "train") is None
    cli("--stage", "train", *unittest_run(folder))
    artifacts.verify(artifacts.load(folder, "train"))


def test_a_corrupt_tfrecord_shard_is_named_before_training_reads_it(damaged_copy):
    folder = damaged_copy
    manifest = artifacts.load(folder, "prepare").meta["manifest"]
    shard = folder / "prepare" / manifest["splits"]["train"]["shards"][0]["file"]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    result = cli_here("--stage", "train", "--force", *unittest_run(folder))  # the driver's main, in this process
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line == (f"error: {shard}: damaged TFRecord shard (sha256 differs from the prepare manifest); redo the "
                    "prepare stage with `python pipeline/run.py --stage prepare --force`")
    assert artifacts.load(folder, "train") is not None  # the previous, verified train artifact is untouched
    assert not list(folder.glob(".train.staging-*"))


# --------------------------------------------------------------------------------------------
# 4. Configuration checked when it is resolved
# --------------------------------------------------------------------------------------------
BAD_VALUES = [
    ("train.batch_size=0", "config key 'train.batch_size' must be >= 1; got 0"),
    ("evaluate.overlap=2", "config key 'evaluate.overlap' must be in [0, 1); got 2.0"),
    ("export.quantize=foo", "config key 'export.quantize' must be one of float16, dynamic; got 'foo'"),
    ("model.wave_u_net.upsampling=foo",
     "config key 'model.wave_u_net.upsampling' must be one of linear, learned; got 'foo'"),
    ("model.wave_u_net.num_layers=0", "config key 'model.wave_u_net.num_layers' must be >= 1; got 0"),
    ("model.umx.nb_layers=0", "config key 'model.umx.nb_layers' must be >= 1; got 0"),
    ("model.unet.n_fft=3", "model.unet.n_fft must be a positive even number, got 3"),
    ("model.tfc_tdf_v3.quantile=1.5", "config key 'model.tfc_tdf_v3.quantile' must be in (0, 1); got 1.5"),
    ("model.unet.dropout=1", "config key 'model.unet.dropout' must be in [0, 1); got 1.0"),
    ("model.m_unet.weighting=sum", "config key 'model.m_unet.weighting' must be one of equal, dwa, ebw; got 'sum'"),
    ("model.c_unet.film=local", "config key 'model.c_unet.film' must be one of simple, complex; got 'local'"),
    ("model.unetx.dropout=1", "unknown config key 'model.unetx'; valid keys here: name, umx, wave_u_net, unet"),
    ("train.lr=0", "config key 'train.lr' must be > 0; got 0.0"),
    ("train.lr_decay_gamma=1", "config key 'train.lr_decay_gamma' must be in (0, 1); got 1.0"),
    ("train.epochs=0", "config key 'train.epochs' must be >= 1; got 0"),
    ("train.steps_per_epoch=0", "config key 'train.steps_per_epoch' must be >= 1; got 0"),
    ("train.workers=0", "config key 'train.workers' must be >= 1; got 0"),
    ("train.weight_decay=-1", "config key 'train.weight_decay' must be >= 0; got -1.0"),
    ("train.lr_scaling=square", "config key 'train.lr_scaling' must be one of none, linear; got 'square'"),
    ("train.clip_norm=0", "config key 'train.clip_norm' must be > 0; got 0.0"),
    ("train.replicas=3", "train.batch_size=4 must be a multiple of train.replicas=3 (the global batch is split "
                         "over the replicas)"),
    ("evaluate.chunk_seconds=0", "config key 'evaluate.chunk_seconds' must be > 0; got 0.0"),
    ("evaluate.workers=0", "config key 'evaluate.workers' must be >= 1; got 0"),
    ("evaluate.split=holdout", "config key 'evaluate.split' must be one of data.splits (train, valid, test); "
                               "got 'holdout'"),
    ("export.version=0", "config key 'export.version' must be >= 1; got 0"),
    ("export.tflite_chunk_seconds=-1", "config key 'export.tflite_chunk_seconds' must be > 0; got -1.0"),
    ("data.nb_channels=3", "config key 'data.nb_channels' must be one of 1, 2; got 3"),
    ("data.sample_rate=0", "config key 'data.sample_rate' must be >= 1; got 0"),
    ("data.pcm=int8", "config key 'data.pcm' must be one of int16, float16, float32; got 'int8'"),
    ("data.compression=zip", "config key 'data.compression' must be one of '', GZIP, ZLIB; got 'zip'"),
    ("data.segment_seconds=0", "config key 'data.segment_seconds' must be > 0; got 0.0"),
    ("data.remix_probability=2", "config key 'data.remix_probability' must be in [0, 1]; got 2.0"),
    ("data.synth_tracks=[2,-1,1]", "config key 'data.synth_tracks' must be all entries >= 0; got [2, -1, 1]"),
    ("data.shuffle_buffer=0", "config key 'data.shuffle_buffer' must be >= 1; got 0"),
    ("data.splits=[]", "data.splits must be a non-empty list of distinct names; got []"),
    ("model.name=nope", "model.name 'nope' is not a registered model; choose one of "),
]


@pytest.mark.parametrize("update,message", BAD_VALUES, ids=[u for u, _ in BAD_VALUES])
def test_bad_config_values_are_refused_when_the_configuration_is_resolved(update, message):
    from sacred.arg_parser import get_config_updates

    from pipeline.experiment import resolve

    updates, _ = get_config_updates([update])
    with pytest.raises(UserError) as caught:
        resolve(updates, ["unittest"])
    assert str(caught.value).startswith(message)


def test_every_preset_and_the_defaults_pass_validation():
    """Every preset resolves, and the resolved configuration holds every value the preset states (427 keys)."""
    from configs import PRESETS
    from configs.config import to_plain
    from pipeline.experiment import resolve

    def leaves(tree, path=()):
        for key, value in tree.items():
            yield from leaves(value, path + (key,)) if isinstance(value, dict) else [(path + (key,), value)]

    assert resolve({}, []).section("model")["name"] == "umx"
    checked = 0
    for name in PRESETS:
        config = resolve({}, [name])
        for path, value in leaves(PRESETS[name]):
            resolved = config.section(path[0])
            for key in path[1:]:
                resolved = resolved[key]
            assert resolved == to_plain(value), (name, ".".join(path), value, resolved)
            checked += 1
    assert checked >= 400, checked


def test_a_bad_value_stops_the_cli_before_anything_is_written(tmp_path):
    started = time.time()
    result = cli("--stage", "all", "--runs-dir", str(tmp_path / "runs"), "--sql", f"sqlite:///{tmp_path}/runs.db",
                 "with", "unittest", "train.batch_size=0", f"artifacts_dir={tmp_path / 'artifacts'}", check=False)
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: config key 'train.batch_size' must be >= 1; got 0"]
    assert list(tmp_path.iterdir()) == []  # no artifacts dir, no runs dir, no database
    assert time.time() - started < 120


def test_an_option_after_with_says_where_options_go(tmp_path):
    result = cli("--stage", "all", "with", "unittest", "--force", check=False)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "error: --force after `with` is read as configuration; put options before `with`, e.g. "
        "`python pipeline/run.py --stage all --force with unittest`"]


# --------------------------------------------------------------------------------------------
# 5. Database observers
# --------------------------------------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the probe is: connections are refused


@pytest.fixture
def silent_server():
    """A port whose listen backlog completes the TCP handshake but whose server never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


def observer_args(**given):
    return argparse.Namespace(**{"no_file_observer": True, "runs_dir": "runs", "sql": None, "mongo": None, **given})


def refused_quickly(monkeypatch, bound: float, **given):
    from pipeline import experiment

    monkeypatch.setattr(experiment, "CONNECT_TIMEOUT", 2.0)
    started = time.time()
    with pytest.raises(UserError) as caught:
        experiment.observers(observer_args(**given))
    assert time.time() - started < bound
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_unreachable_postgresql_is_refused_in_seconds(monkeypatch, silent_server):
    pytest.importorskip("psycopg")
    url = f"postgresql+psycopg://user:secret@127.0.0.1:{closed_port()}/runs"
    message = refused_quickly(monkeypatch, 5, sql=url)
    shown = url.replace(":secret@", ":***@")  # never the password
    assert message.startswith(f"--sql {shown}: cannot reach the database (") and "secret" not in message
    assert message.endswith("); start it, fix the URL, or drop the option")
    url = f"postgresql+psycopg://user:secret@127.0.0.1:{silent_server}/runs"  # accepts, never answers
    message = refused_quickly(monkeypatch, 6, sql=url)
    assert message.startswith(f"--sql {url.replace(':secret@', ':***@')}: cannot reach the database (")


def test_a_sqlite_database_in_a_missing_folder_or_without_its_driver_is_refused(monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path}/missing/runs.db"
    assert refused_quickly(monkeypatch, 2, sql=url) == (
        f"--sql {url}: the folder {tmp_path / 'missing'} does not exist; create it or choose another path")
    url = "mysql://user@127.0.0.1/runs"  # MySQLdb is not installed here
    pytest.importorskip("sqlalchemy")
    try:
        import MySQLdb  # noqa: F401
        pytest.skip("MySQLdb installed")
    except ImportError:
        pass
    assert refused_quickly(monkeypatch, 2, sql=url).startswith(
        f"--sql {url}: the database driver is not installed (no module 'MySQLdb')")


def test_mongodb_unreachable_or_pymongo_missing_is_refused_in_seconds(monkeypatch, silent_server):
    import importlib.util

    if importlib.util.find_spec("pymongo") is None:
        url = f"mongodb://127.0.0.1:{closed_port()}/sacred"
        assert refused_quickly(monkeypatch, 2, mongo=url) == (
            f"--mongo {url}: needs pymongo, which is not installed; pip install 'music-separation[db]'")
        return
    for port in (closed_port(), silent_server):
        url = f"mongodb://127.0.0.1:{port}/sacred"
        message = refused_quickly(monkeypatch, 6, mongo=url)
        assert message.startswith(f"--mongo {url}: cannot reach MongoDB (")
        assert len(message) < 200, message  # not pymongo's 450-character topology description


def test_an_observer_failure_is_one_line_from_the_cli_before_any_stage(tmp_path):
    url = f"sqlite:///{tmp_path}/missing/runs.db"
    result = cli("--stage", "all", "--no-file-observer", "--sql", url, "with", "unittest",
                 f"artifacts_dir={tmp_path / 'artifacts'}", check=False)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"error: --sql {url}: the folder {tmp_path / 'missing'} does not exist; create it or choose another path"]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# 2, 3. separate: interrupted, incomplete, failing writes
# --------------------------------------------------------------------------------------------
def separate(exported, *args):
    # `separate`'s main in this process: the same exit codes and one-line errors as the command (whose process
    # is the point only where a signal is: those tests start it), without TensorFlow's import per call
    return separate_here(*args, "--artifacts-dir", exported[0], "-q")


def stems_of(folder: Path) -> dict:
    return {p.name: soundfile.info(str(p)).frames for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def test_ctrl_c_during_separate_leaves_no_stems_no_part_files_and_a_rerun_finishes(exported, tmp_path):
    song = noise_wav(tmp_path / "song.wav", 120.0)
    out = tmp_path / "stems"
    result = interrupt_when([*SEPARATE, song, "-o", out, "--artifacts-dir", exported[0], "--chunk-seconds", "0.25",
                             "-q"], lambda: list((out / "song").glob(".*.part.*")))
    err = result.stderr
    assert result.returncode == 130
    assert "Traceback" not in err
    assert error_lines(err) == ["interrupted; finished tracks are kept, the unfinished one left no files"]
    assert not (out / "song").exists()  # no stems, no .part files, no empty folder
    result = separate(exported, str(song), "-o", str(out), "--chunk-seconds", "2")
    assert result.returncode == 0, result.stderr
    assert stems_of(out / "song") == {f"{t}.wav": 120 * 8000 for t in sorted(TARGETS)}


def test_a_track_with_only_some_stems_is_finished_without_force(exported, tmp_path):
    song = noise_wav(tmp_path / "song.wav", 1.0)
    out = tmp_path / "stems"
    (out / "song").mkdir(parents=True)
    noise_wav(out / "song" / "vocals.wav", 0.1)  # as a SIGKILL between two renames would leave it
    (out / "song" / ".drums.part.wav").write_bytes(b"half")
    result = separate(exported, str(song), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert error_lines(result.stderr) == [f"{song}: {out / 'song'} has 1 of 4 stems; finishing the track"]
    assert stems_of(out / "song") == {f"{t}.wav": 8000 for t in sorted(TARGETS)}
    result = separate(exported, str(song), "-o", str(out))  # complete now: kept unless --force
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"error: {song}: {out / 'song' / 'vocals.wav'} exists; use --force to "
                                          "overwrite or --skip-existing to skip it"]


def test_bad_inputs_and_an_output_that_is_a_file_are_one_line_each_and_the_others_still_run(exported, tmp_path):
    good = noise_wav(tmp_path / "good.wav", 1.0)
    nan = tmp_path / "nan.wav"
    audio = np.zeros((800, 2), "float32")
    audio[10, 0] = np.nan
    soundfile.write(str(nan), audio, 8000, subtype="FLOAT")
    out = tmp_path / "stems"
    result = separate(exported, str(nan), str(good), "-o", str(out))
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"error: {nan}: 1 NaN/Inf samples; re-export the file from its source"]
    assert "skip_bad_tracks" not in result.stderr
    assert stems_of(out / "good") == {f"{t}.wav": 8000 for t in sorted(TARGETS)} and not (out / "nan").exists()
    regular = tmp_path / "a-file"
    regular.write_text("not a folder")
    result = separate(exported, str(good), "-o", str(regular))
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"error: -o {regular}: exists and is not a directory; choose a folder "
                                          "for the stems"]


@pytest.fixture
def small_mount(tmp_path):
    """A 1 MB tmpfs (needs root and mount rights); yields (mount point, remount read-only function)."""
    point = tmp_path / "mnt"
    point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield point, lambda: subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_disk_fails_the_track_that_does_not_fit_and_others_still_run(exported, small_mount, tmp_path):
    point, _ = small_mount
    big = noise_wav(tmp_path / "big.wav", 30.0)  # 4 float32 stereo stems at 8 kHz: 7.7 MB
    small = noise_wav(tmp_path / "small.wav", 1.0)  # 256 KB
    result = separate(exported, str(big), str(small), "-o", str(point))
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: {big}: {point / 'big'} has ")
    assert line.endswith("MB free, the stems need about 7.7 MB; free some space or choose another -o")
    assert sorted(p.name for p in point.iterdir()) == ["small"]
    assert stems_of(point / "small") == {f"{t}.wav": 8000 for t in sorted(TARGETS)}
    assert not [p for p in point.rglob(".*") if p.is_file()]


def test_a_read_only_output_is_one_line_per_file_and_keeps_the_stems_it_has(exported, small_mount, tmp_path):
    point, read_only = small_mount
    songs = [noise_wav(tmp_path / f"song{i}.wav", 0.5, seed=i) for i in range(2)]
    assert separate(exported, str(songs[0]), "-o", str(point)).returncode == 0
    before = {p.name: p.read_bytes() for p in (point / "song0").iterdir()}
    read_only()
    result = separate(exported, *map(str, songs), "-o", str(point), "--force")
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"error: {songs[0]}: cannot write {point / 'song0' / '.vocals.part.wav'} (read-only file system); "
        "no stems of this track were written",  # libsndfile's own reason is only "System error"
        f"error: {songs[1]}: cannot create {point / 'song1'} (read-only file system)"]
    assert {p.name: p.read_bytes() for p in (point / "song0").iterdir()} == before  # the old stems, whole


def test_a_full_disk_under_the_pipeline_is_one_line_and_leaves_nothing_half_written(small_mount):
    point, _ = small_mount  # 1 MB: the unittest data set alone takes 2.6 MB
    folder = point / "artifacts"
    result = cli("--stage", "prepare", *unittest_run(folder), check=False)
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: stage prepare: cannot write ") and "the disk is full, " in line
    assert line.endswith("; free some space or choose another artifacts_dir (the stage left nothing behind)")
    assert sorted(p.name for p in folder.iterdir()) == [artifacts.LOCK_FILE]


# --------------------------------------------------------------------------------------------
# 7. Every registered family through the whole pipeline from the CLI
# --------------------------------------------------------------------------------------------
def _families():
    from models.registry import FAMILIES

    return list(FAMILIES)


@pytest.mark.parametrize("family", _families())
def test_every_registered_family_runs_all_stages_from_the_cli(family, family_runs, request):
    # Open-Unmix and Wave-U-Net ran `--stage all with unittest` from the CLI for other tests (the shared pipeline of
    # tests/conftest.py, this file's lock-race run): their artifacts are checked, not made again. The others ran in
    # the background since the session started (family_runs, tests/conftest.py).
    if family == "umx":
        family_dir = request.getfixturevalue("umx_pipeline")
    elif family == "wave_u_net":
        family_dir = request.getfixturevalue("exported")[0]
    else:
        family_dir = family_runs[family].result()
    export = artifacts.load(family_dir, "export")
    assert export is not None and export.meta["config"]["model"]["name"] == family
    sidecar = json.loads(export.file("model.json").read_text())
    assert sidecar["model"] == family and sidecar["targets"] == list(TARGETS)
    assert export.figures["saved_model_max_abs_diff"] < 1e-4
    # stock TensorFlow Serving runs with XLA's CPU JIT off: no function of the serving graph may need XLA
    from components.inference.exported import xla_functions

    assert xla_functions(export.path / "saved_model" / family / "1") == [] and sidecar["xla"] is False
    # measured (unittest preset): wave_u_net 97 dB, unet 120 dB (float32); dttnet's 59 dB was the old parity_db's
    # epsilon on quiet outputs (untrained, without it: 118 dB in test_model_contract)
    if sidecar["tflite"]:
        assert export.figures["tflite_float32_parity_db"] > 50, export.figures
        # the quantized file against Keras: float16 > 25 dB; dynamic-range int8 weights (the default) lose more on
        # the untrained convolutional families (m_unet measured 14.8 dB), so > 10 dB: a broken file is near 0 dB
        quantize = export.meta["config"]["export"]["quantize"]
        if family != "m_unet":
            assert export.figures[f"tflite_{quantize}_parity_db"] > (25 if quantize == "float16" else 10), \
                export.figures
        # m_unet's file is its whole separator: the untrained ReLU masks are near zero, and int8 weights move them
        # by as much as they are (measured -11 dB against Keras); the trained model's loss is what
        # test_quantized_tflite_loses_at_most_half_a_db_on_real_musdb measures (Open-Unmix). Here: a finite file
        assert np.isfinite(export.figures[f"tflite_{quantize}_parity_db"]), export.figures
    for stage in ("prepare", "train", "evaluate", "export"):
        artifacts.verify(artifacts.load(family_dir, stage))


@pytest.mark.parametrize("family", [f for f in _families() if f != "umx"])  # umx: test_export's own test
def test_every_familys_tflite_separates_real_musdb_as_its_saved_model(family, family_runs, request):
    """Each family's exported TFLite files on the real MUSDB18-HQ excerpt (8 kHz, 6.8 s), chunk by chunk as
    `separate --model x.tflite` runs them: the float32 file equals the SavedModel (SDR between their stems), and
    the quantized file scores (SDR against the true stems) within 0.5 dB of the float32 file. The models are
    the `unittest` runs (one training step): the figures compare the files, not a trained model's quality."""
    from components.inference.exported import TFLiteChunkRunner
    from components.inference.separation import separate_array
    from components.inference.separators import SavedModelSeparator
    from pipeline.benchmark import MUSDB_EXCERPT, _mean_sdr, musdb_excerpt

    if MUSDB_EXCERPT is None:
        pytest.skip("real MUSDB18-HQ excerpt absent (../shared/data/musdb18hq-sample)")
    family_dir = request.getfixturevalue("exported")[0] if family == "wave_u_net" else family_runs[family].result()
    export = artifacts.load(family_dir, "export")
    sidecar = json.loads(export.file("model.json").read_text())
    if not sidecar["tflite"]:
        pytest.skip(f"{family} exports no TFLite file")
    description = json.loads((export.path / "tflite" / f"{family}.json").read_text())
    mixture, stems = musdb_excerpt(sidecar["sample_rate"], sidecar["nb_channels"], TARGETS)
    chunk = description["chunk_seconds"]
    saved = SavedModelSeparator(export.path / "saved_model" / family / "1")
    reference = separate_array(saved, mixture, sample_rate=sidecar["sample_rate"], chunk_seconds=chunk, overlap=0.0)
    sdr, parity = {}, {}
    for variant, info in description["variants"].items():
        runner = TFLiteChunkRunner(model_path=str(export.path / "tflite" / info["file"]), workers=1)
        estimates = separate_array(runner, mixture, sample_rate=sidecar["sample_rate"], chunk_seconds=chunk,
                                   overlap=0.0)
        sdr[variant] = _mean_sdr(stems, estimates)
        # without global_sdr's epsilon: an untrained family's stems are quiet (m_unet's RMS 1e-3), where the
        # epsilon alone would cap the figure near 70 dB
        parity[variant] = min(10 * np.log10(np.sum(np.square(reference[t], dtype=np.float64))
                                            / max(np.sum(np.square(reference[t] - estimates[t], dtype=np.float64)),
                                                  1e-30)) for t in TARGETS)
    print(f"{family}: TFLite vs SavedModel (min over targets, dB) {parity}; mean SDR vs true stems {sdr}")
    assert parity["float32"] >= 80.0, parity
    quantized = next(variant for variant in sdr if variant != "float32")
    assert np.isfinite(sdr[quantized]) and abs(sdr["float32"] - sdr[quantized]) <= 0.5, sdr
