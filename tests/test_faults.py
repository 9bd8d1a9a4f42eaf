"""Faults found by probing as a hostile user: a torn training backup, clashing output folders, NaN or malformed
PCM on a stream, an interrupted stream, broken yaml configs, truncated inputs, reruns of finished tracks.

Each test reproduces the fault as the user met it and asserts what is left behind and what is said.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cli import environment


# --------------------------------------------------------------------------------------------
# Training backups: a kill at any moment leaves a state that resumes
# --------------------------------------------------------------------------------------------
def _tiny_model(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    return model


def _restore(backup_dir: Path):
    from components.training import distribute

    model = _tiny_model(seed=1)
    restorer = distribute.backup_callback(str(backup_dir), chief=True)
    restorer.set_model(model)
    restorer.on_train_begin()
    return model, getattr(model, "_initial_epoch", None)


def test_a_torn_or_half_renamed_training_backup_resumes_from_the_previous_good_one(tmp_path):
    from components.training import distribute

    x = np.random.default_rng(0).standard_normal((16, 3)).astype("float32")
    y = np.random.default_rng(1).standard_normal((16, 2)).astype("float32")
    model = _tiny_model()
    backup_dir = tmp_path / "backup"
    backup = distribute.backup_callback(str(backup_dir), chief=True)
    backup.set_model(model)
    weights = {}
    for epoch in range(2):
        model.fit(x, y, epochs=1, verbose=0)
        backup.on_epoch_end(epoch)
        weights[epoch + 1] = [w.copy() for w in model.get_weights()]

    restored, epoch = _restore(backup_dir)
    assert epoch == 2 and all(np.array_equal(a, b) for a, b in zip(restored.get_weights(), weights[2]))

    # a kill while a file is written in place (what Keras' own BackupAndRestore does) tears it
    latest = backup_dir / "latest.weights.h5"
    intact = latest.read_bytes()
    latest.write_bytes(intact[: len(intact) // 2])
    restored, epoch = _restore(backup_dir)
    assert epoch == 1 and all(np.array_equal(a, b) for a, b in zip(restored.get_weights(), weights[1]))

    # a kill between the renames: the latest pair moved aside, the new one not yet in place
    latest.write_bytes(intact)
    os.replace(latest, backup_dir / "previous.weights.h5")
    os.replace(backup_dir / "training_metadata.json", backup_dir / "previous_metadata.json")
    restored, epoch = _restore(backup_dir)
    assert epoch == 2 and all(np.array_equal(a, b) for a, b in zip(restored.get_weights(), weights[2]))


KILLED_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    from components.training import distribute
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(512), keras.layers.Dense(512),
                              keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.zeros((4, 3)), np.zeros((4, 2)), epochs=1, verbose=0)  # optimizer state built
    backup = distribute.backup_callback(sys.argv[1], chief=True)
    backup.set_model(model)
    epoch = 0
    while True:
        backup.on_epoch_end(epoch)
        epoch += 1
        print(epoch, flush=True)
""")


def test_sigkill_while_backups_are_written_never_leaves_an_unloadable_state(tmp_path):
    """A writer saving a backup after every 'epoch' (about 3 MB each) is SIGKILLed at five moments; after each
    kill the state loads (no h5py traceback) at an epoch the writer had finished."""
    import keras

    from components.training import distribute

    backup_dir = tmp_path / "backup"
    rng = np.random.default_rng(0)
    for kill in range(5):
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(backup_dir)], stdout=subprocess.PIPE,
                                  text=True, env=environment())
        done = int(writer.stdout.readline())  # one backup finished: from here on a good state must exist
        time.sleep(float(rng.uniform(0.05, 0.6)))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        remaining = writer.stdout.read().split()
        done = int(remaining[-1]) if remaining else done
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(512), keras.layers.Dense(512),
                                  keras.layers.Dense(2)])
        model.compile(optimizer="adam", loss="mse")
        restorer = distribute.backup_callback(str(backup_dir), chief=True)
        restorer.set_model(model)
        restorer.on_train_begin()  # raised on a torn file before atomic backups
        assert model._initial_epoch in (done, done + 1), (kill, done, model._initial_epoch)


# --------------------------------------------------------------------------------------------
# Release yaml configs (import.config): one line naming the file
# --------------------------------------------------------------------------------------------
FIXTURES = Path(__file__).resolve().parent / "fixtures"
BAD_YAML = {
    "malformed": ("audio: {sample_rate: 44100\nmodel: [", r"not valid YAML at line \d+"),
    "python_tag": ("audio: !!python/object/apply:os.system ['true']\n", r"not valid YAML at line 1 \(.*python/object"),
    "a_list": ("- audio\n- model\n", r"holds a list, not a mapping of settings"),
}


@pytest.mark.parametrize("kind", sorted(BAD_YAML))
@pytest.mark.parametrize("family, checkpoint", [("tfc_tdf_v3", "tfc_tdf_v3/multi/model.ckpt"),
                                                ("dttnet", "dttnet/vocals.ckpt")])
def test_a_broken_release_yaml_is_one_line_naming_the_file(kind, family, checkpoint, tmp_path):
    from tests.cli import cli_here

    text, message = BAD_YAML[kind]
    config = tmp_path / "config.yaml"
    config.write_text(text)
    artifacts_dir = tmp_path / "artifacts"
    result = cli_here("--stage", "import", "--no-file-observer", "-q", "with", "unittest", f"model.name={family}",
                      f"import.path={FIXTURES / checkpoint}", f"import.config={config}",
                      f"artifacts_dir={artifacts_dir}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert f"import.config={config}" in lines[0] and __import__("re").search(message, lines[0]), lines[0]
    assert "Traceback" not in result.stderr
    assert not (artifacts_dir / "import").exists() and not (artifacts_dir / "train").exists()


# --------------------------------------------------------------------------------------------
# The driver: a missing data set is refused before any lock, artifacts folder or Sacred run
# --------------------------------------------------------------------------------------------
def test_a_missing_data_root_is_one_line_before_any_lock_folder_or_sacred_run(tmp_path):
    from tests.cli import cli_here

    artifacts_dir, runs = tmp_path / "artifacts", tmp_path / "runs"
    result = cli_here("--stage", "all", "-q", "--runs-dir", str(runs), "with", "unittest", "data.format=musdb",
                      f"data.root={tmp_path / 'nope'}", f"artifacts_dir={artifacts_dir}")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {tmp_path / 'nope'}: data.root does not exist or is not a directory; "
                                     f"set data.root to the musdb data set")
    assert not artifacts_dir.exists() and not runs.exists()  # no `.lock`, no Sacred run


# --------------------------------------------------------------------------------------------
# separate: output folders, reruns, folders and truncated files as inputs
# --------------------------------------------------------------------------------------------
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _noise(path: Path, seconds: float = 1.0, rate: int = 8000) -> Path:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), 0.1 * np.random.default_rng(0).standard_normal((int(seconds * rate), 2)), rate)
    return path


def test_two_inputs_for_one_output_folder_are_refused_even_with_force(tmp_path):
    """`separate in/x/song.wav in/y/song.wav -o out --force` once wrote both into out/song/, the second over the
    first, exit 0. Refused before any model is loaded or anything written."""
    from tests.cli import separate_here

    first, second = _noise(tmp_path / "in" / "x" / "song.wav"), _noise(tmp_path / "in" / "y" / "song.flac")
    for extra in ([], ["--force"], ["--stream"]):
        result = separate_here(str(first), str(second), "-o", str(tmp_path / "out"), *extra,
                               "--artifacts-dir", str(tmp_path / "none"))
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (f"error: {first} and {second} would both write their stems to "
                                         f"{tmp_path / 'out' / 'song'}; separate them into different -o folders or "
                                         f"rename one")
        assert not (tmp_path / "out").exists()


def test_rerun_of_finished_tracks_skip_existing_exits_0_and_keeps_them(umx_pipeline, tmp_path):
    from tests.cli import separate_here

    song, out = _noise(tmp_path / "song.wav"), tmp_path / "out"
    common = ["-o", str(out), "-q", "--artifacts-dir", str(umx_pipeline)]
    assert separate_here(str(song), *common).returncode == 0
    stems = sorted((out / "song").iterdir())
    stamps = [path.stat().st_mtime_ns for path in stems]
    again = separate_here(str(song), *common)
    assert again.returncode == 1 and "use --force to overwrite or --skip-existing to skip it" in again.stderr
    skipped = separate_here(str(song), "--skip-existing", *common)
    assert skipped.returncode == 0 and skipped.stdout.strip() == f"{song} -> {out / 'song'} (already separated, skipped)"
    assert [path.stat().st_mtime_ns for path in stems] == stamps


def test_a_folder_without_audio_files_says_so(umx_pipeline, tmp_path):
    """Folders are inputs (their audio files, recursively: tests/test_separate_options.py); one without any audio
    file is one line naming it, before any model is loaded."""
    from tests.cli import separate_here

    (tmp_path / "album").mkdir()
    (tmp_path / "album" / "cover.jpg").write_bytes(b"jpeg")
    result = separate_here(str(tmp_path / "album"), "-o", str(tmp_path / "out"), "-q",
                           "--artifacts-dir", str(umx_pipeline))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'album'}: is a directory without audio files (.wav, ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source, cut, declared", [
    ("waveunet-examples/Cristina Vane - So Easy/mix.mp3", 0.5, 30.00),
    ("musdb18-sample/train/Music Delta - 80s Rock.stem.mp4", 0.6, 6.80),
])
def test_a_truncated_compressed_file_separates_with_a_warning_naming_both_durations(source, cut, declared,
                                                                                    umx_pipeline, tmp_path):
    import re
    import soundfile

    from tests.cli import separate_here

    original = SHARED_DATA / source
    if not original.is_file():
        pytest.skip(f"{original} is absent (../shared/data)")
    data = original.read_bytes()
    truncated = tmp_path / original.name.replace(" ", "_")
    truncated.write_bytes(data[: int(len(data) * cut)])
    result = separate_here(str(truncated), "-o", str(tmp_path / "out"), "-q", "--artifacts-dir", str(umx_pipeline))
    assert result.returncode == 0, result.stderr
    found = re.search(rf"warning: {re.escape(str(truncated))}: decoded ([\d.]+) s of the {declared:.2f} s its header "
                      rf"declares \(truncated\?\); the stems are ([\d.]+) s long", result.stderr)
    assert found, result.stderr
    decoded = float(found.group(1))
    assert 0 < decoded < declared - 1
    folder = tmp_path / "out" / truncated.name.split(".")[0]
    info = soundfile.info(str(folder / "vocals.wav"))
    assert abs(info.frames / info.samplerate - decoded) < 0.01


# --------------------------------------------------------------------------------------------
# separate --stream: bad PCM, NaN, interruptions, start-up noise
# --------------------------------------------------------------------------------------------
def _stream(stream_pipeline, *args, **kwargs):
    from tests.cli import separate

    return separate("--stream", *args, "--model", str(stream_pipeline / "export" / "stream"), check=False, text=False,
                    **kwargs)


def test_bad_pcm_on_standard_input_is_one_line_and_leaves_no_stems(stream_pipeline, tmp_path):
    out = tmp_path / "out"
    good = (0.1 * np.random.default_rng(0).standard_normal((4000, 2))).astype("<f4")
    nan = good.copy()
    nan[2000:2100] = np.nan
    cases = {
        "nan": (["--pcm-format", "f32le"], nan.tobytes(), 1, r"error: -: NaN/Inf samples at 0\.\d+ s; the stream is refused"),
        "empty": ([], b"", 1, r"error: -: no audio \(the stream was empty\)"),
        "odd": ([], good.astype("<i2").tobytes()[:-3], 1, r"error: -: the stream ended inside a sample frame \(1 of 4 bytes"),
        "rate0": (["--pcm-rate", "0"], good.tobytes(), 2, r"error: --pcm-rate 0: must be a positive sample rate"),
    }
    import re

    for name, (extra, data, code, message) in cases.items():
        result = _stream(stream_pipeline, "-", "--name", name, "-o", str(out), *extra, input=data)
        lines = [line for line in result.stderr.decode().splitlines() if line.strip()]
        assert result.returncode == code and len(lines) == 1 and re.match(message, lines[0]), (name, lines)
        assert not (out / name).exists(), name
    # the same stream without the NaN separates, and TensorFlow's start-up notices are not printed
    result = _stream(stream_pipeline, "-", "--name", "clean", "-o", str(out), "--pcm-format", "f32le",
                     input=good.tobytes())
    assert result.returncode == 0 and result.stderr.decode().strip() == "", result.stderr.decode()
    assert sorted(p.name for p in (out / "clean").iterdir()) == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_an_interrupted_file_stream_leaves_no_part_files_and_says_so(signum, code, word, stream_pipeline, tmp_path):
    from tests.cli import SEPARATE, interrupt_when

    song = _noise(tmp_path / "song.wav", seconds=120)
    out = tmp_path / "out"
    result = interrupt_when([*SEPARATE, "--stream", str(song), "--model", str(stream_pipeline / "export" / "stream"),
                             "-o", str(out)], lambda: list((out / "song").glob(".*.part.*")), signum)
    err = result.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith(f"{word}; "), err
    assert "Traceback" not in err and not (out / "song").exists()


# --------------------------------------------------------------------------------------------
# Configuration as users type it
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("typed, expected", [("true", True), ("True", True), ("TRUE", True), ("false", False),
                                             ("False", False)])
def test_a_boolean_key_takes_true_and_false_in_any_case(typed, expected):
    from pipeline.experiment import resolve
    from pipeline.run import split_updates

    updates, named = split_updates(["with", "unittest", f"model.umx.unidirectional={typed}"])
    assert resolve(updates, named).model.params("umx")["unidirectional"] is expected


def test_a_boolean_key_names_what_it_accepts():
    from configs.errors import UserError
    from pipeline.experiment import resolve
    from pipeline.run import split_updates

    updates, named = split_updates(["with", "unittest", "model.umx.unidirectional=maybe"])
    with pytest.raises(UserError, match=r"^config key 'model.umx.unidirectional' must be true or false \(any case\), "
                                        r"got 'maybe'$"):
        resolve(updates, named)
