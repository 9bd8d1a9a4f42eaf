"""Faults found by probing as a hostile user: a torn training backup, clashing output folders, NaN or malformed
PCM on a stream, an interrupted stream, broken yaml configs, truncated inputs, reruns of finished tracks.

Each test reproduces the fault as the user met it and asserts what is left behind and what is said.
"""
from __future__ import annotations

import json
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
