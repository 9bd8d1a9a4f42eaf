"""The train stage: multi-replica parity, resume after a kill, determinism, checkpoints, Sacred metrics."""
from __future__ import annotations

import json
import logging
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.cli import RUN, cli, cli_here, kill_training_after, python, start


@pytest.fixture(scope="module")
def prepared(umx_pipeline):
    """The session's unittest-preset artifacts (tests/conftest.py); the tests copy its prepare artifact."""
    return umx_pipeline


def _copy_prepare(src: Path, dst: Path) -> Path:
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "prepare", dst / "prepare")
    if (src / "default-data").exists():
        shutil.copytree(src / "default-data", dst / "default-data")
    return dst


def _weights(path: Path) -> list:
    import h5py

    found = []
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, obj: found.append((name, np.array(obj))) if hasattr(obj, "shape") else None)
    return sorted(found, key=lambda item: item[0])


def test_train_stage_writes_checkpoints_history_and_sacred_metrics(prepared, tmp_path, caplog):
    root = _copy_prepare(prepared, tmp_path / "a")
    runs = tmp_path / "runs"
    cli("--stage", "train", "--runs-dir", str(runs), "-q", "with", "unittest", f"artifacts_dir={root}",
        "train.epochs=3", "train.snapshot_every_steps=2")
    meta = json.loads((root / "train" / "artifact.json").read_text())
    assert meta["complete"] and meta["figures"]["epochs"] == 3
    assert meta["figures"]["parameters"] == 46_112  # umx on the unittest preset
    for name in ("model.weights.h5", "best.weights.h5", "history.json"):
        assert (root / "train" / name).is_file(), name
    assert any((root / "train" / "tensorboard").rglob("events.out.tfevents.*"))
    history = json.loads((root / "train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["val_loss"]) for h in history)
    for h in history:  # the total is the sum of the per-target losses, in training and in validation
        for prefix in ("", "val_"):
            parts = [h[f"{prefix}{target}_loss"] for target in ("vocals", "drums", "bass", "other")]
            assert h[f"{prefix}loss"] == pytest.approx(sum(parts), rel=1e-4), (prefix, h)
    assert not (root / ".train-work").exists() or not any((root / ".train-work").iterdir())
    run_dir = max((p for p in runs.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train.loss"]["steps"] == [1, 2, 3]
    assert "train.val_loss" in metrics and "train.learning_rate" in metrics
    assert json.loads((run_dir / "run.json").read_text())["status"] == "COMPLETED"
    # validation snapshots: a quick SDR every 2 steps (2 steps per epoch, 3 epochs)
    assert metrics["train.snapshot_sdr"]["steps"] == [2, 4, 6]
    assert all(np.isfinite(v) and -60 < v < 60 for v in metrics["train.snapshot_sdr"]["values"])
    # same config again (the driver's main in this process): skipped, not retrained
    caplog.set_level(logging.INFO)
    again = cli_here("--stage", "train", "--no-file-observer", "with", "unittest", f"artifacts_dir={root}",
                     "train.epochs=3", "train.snapshot_every_steps=2")
    assert again.returncode == 0, again.stderr
    assert any(record.getMessage().startswith("stage train: complete artifact with fingerprint ")
               and record.getMessage().endswith("; skipping (use --force to redo)") for record in caplog.records)


def test_resume_after_kill_continues_from_last_completed_epoch(prepared, tmp_path):
    root = _copy_prepare(prepared, tmp_path / "k")
    # 12 epochs: the kill comes within 0.05 s of the second one (an epoch takes longer), the resume runs the rest
    args = ["--stage", "train", "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}",
            "train.epochs=12", "train.steps_per_epoch=3"]
    done_before = kill_training_after(args, root)
    assert not (root / "train" / "artifact.json").exists(), "a killed train stage left a complete-looking artifact"
    killed_at = len(done_before)
    assert killed_at < 12

    cli(*args)
    history = json.loads((root / "train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 13))
    # epochs finished before the kill were not redone: they keep the first process's id
    first_pid = done_before[0]["pid"]
    assert [h["pid"] for h in history[: killed_at]] == [first_pid] * killed_at
    assert all(h["pid"] != first_pid for h in history[killed_at + 1:])


def test_deterministic_mode_gives_identical_weights(prepared, tmp_path):
    # two independent processes at the same time (each mostly one busy core: half the wall time of one after
    # the other); neither can see the other's state
    roots = [_copy_prepare(prepared, tmp_path / name) for name in ("d1", "d2")]
    processes = [start([*RUN, "--stage", "train", "--no-file-observer", "-q", "with", "unittest",
                        f"artifacts_dir={root}", "train.deterministic=True", "train.epochs=2"],
                       stdout=subprocess.DEVNULL) for root in roots]
    for process in processes:
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
    weights = [_weights(root / "train" / "model.weights.h5") for root in roots]
    assert [n for n, _ in weights[0]] == [n for n, _ in weights[1]]
    for (name, a), (_, b) in zip(*weights):
        np.testing.assert_array_equal(a, b, err_msg=name)


MIRRORED_PARITY = textwrap.dedent("""
    import json, sys
    import numpy as np
    from components.train import configure_devices, make_strategy
    from components.training.trained import build_model
    configure_devices(2)
    import keras, tensorflow as tf
    from pipeline.experiment import resolve
    config = resolve({"model": {"umx": {"nb_layers": 1}}}, ["unittest"])
    rng = np.random.default_rng(0)
    samples = int(config.data.sample_rate * config.train.seq_seconds)
    stems = {t: rng.normal(0, 0.1, (8, samples, 2)).astype("float32") for t in config.data.targets}
    mixture = sum(stems.values())
    results = []
    for replicas in (1, 2):
        keras.utils.set_random_seed(0)
        strategy = make_strategy(replicas)
        with strategy.scope():
            model = build_model(config, {})
            model.train_model.compile(optimizer=keras.optimizers.SGD(0.1), loss=model.loss)
        initial = [w.numpy() for w in model.train_model.trainable_weights]
        targets = {k: v.numpy() for k, v in model.train_targets(stems).items()}
        dataset = tf.data.Dataset.from_tensors((mixture, targets))
        model.train_model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0)
        results.append((strategy.num_replicas_in_sync, initial, [w.numpy() for w in model.train_model.trainable_weights]))
    (n1, i1, w1), (n2, i2, w2) = results
    start = max(float(np.max(np.abs(a - b))) for a, b in zip(i1, i2))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2))
    # how far the step moved the weights: the largest change, and the share of variables it changed
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(w1, i1))
    changed = sum(not np.array_equal(a, b) for a, b in zip(w1, i1)) / len(w1)
    print(json.dumps({"replicas": [n1, n2], "start_diff": start, "max_diff": diff, "moved": moved,
                      "changed": changed}))
""")


def test_two_replicas_match_one_replica_on_the_same_global_batch():
    report = json.loads(python(MIRRORED_PARITY).stdout.strip().splitlines()[-1])
    assert report["replicas"] == [1, 2]
    assert report["start_diff"] == 0.0, report  # the same seeded initial weights
    # the step moved the weights (every variable, by far more than the two runs differ) and both runs agree
    assert report["changed"] == 1.0 and report["moved"] > 1e-3, report
    assert report["max_diff"] < 1e-5 and report["max_diff"] < 1e-3 * report["moved"], report


def test_batch_size_must_divide_over_replicas_and_excerpt_fit_segments(prepared, tmp_path):
    root = _copy_prepare(prepared, tmp_path / "e")
    # the driver's main in this process: both are refused before the stage runs (the same exit code and line)
    result = cli_here("--stage", "train", "--no-file-observer", "with", "unittest", f"artifacts_dir={root}",
                      "train.replicas=3")  # the unittest global batch is 4
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train.batch_size=4 must be a multiple of train.replicas=3 (the global batch is split over the "
        "replicas)")
    result = cli_here("--stage", "train", "--no-file-observer", "with", "unittest", f"artifacts_dir={root}",
                      "train.seq_seconds=30.0")
    assert result.returncode == 2
    assert "train.seq_seconds" in result.stderr.strip().splitlines()[-1]
    assert not (root / "train").exists()


def test_linear_lr_scaling_multiplies_the_rate_by_the_replicas():
    from components.train import make_optimizer
    from pipeline.experiment import resolve

    plain = resolve({}, ["unittest"]).train
    scaled = resolve({"train": {"lr_scaling": "linear", "lr": 2e-4}}, ["unittest"]).train
    assert float(make_optimizer(plain, replicas=4).learning_rate.numpy()) == pytest.approx(plain.lr)
    assert float(make_optimizer(scaled, replicas=4).learning_rate.numpy()) == pytest.approx(8e-4)


def test_the_first_step_of_a_multi_target_model_is_traced_once():
    """Keras creates the per-target loss trackers while tracing unless `_compile` builds them first, and
    variables created during a trace make TensorFlow trace the whole step again (DTTNet's default: two traces
    of ~25,000 operations before the first step ran)."""
    import types

    import keras
    import tensorflow as tf

    from components.train import compile_model
    from pipeline.experiment import resolve

    mixture = keras.Input((None, 2))
    outputs = {name: keras.layers.Dense(2, name=name)(mixture) for name in ("vocals", "bass")}
    model = types.SimpleNamespace(train_model=keras.Model(mixture, outputs),
                                  loss={name: keras.losses.MeanAbsoluteError() for name in outputs})
    traces = []
    train_step = model.train_model.train_step
    model.train_model.train_step = lambda data: traces.append(1) or train_step(data)
    compile_model(model, tf.distribute.get_strategy(), resolve({}, ["unittest"]).train)
    batch = np.ones((2, 16, 2), "float32")
    model.train_model.train_on_batch(batch, {name: batch for name in outputs})
    assert len(traces) == 1
    assert [metric.name for metric in model.train_model.metrics] == ["loss", "vocals_loss", "bass_loss"]


def test_a_model_declaring_no_graph_optimization_trains_without_grappler_and_the_same_numbers():
    """DTTNet declares `graph_optimization=False` (Grappler cost ~6 s of its first step); while the train stage runs
    it the meta optimiser is off, after it the previous setting is back, and a step's numbers are the ones
    the optimised graph gives."""
    import types

    import keras
    import tensorflow as tf

    from components.train import compile_model, with_graph_optimization
    from models.base import TrainingHooks
    from pipeline.experiment import resolve
    from tests import model_harness

    assert model_harness.build_tiny("dttnet").training.graph_optimization is False
    assert model_harness.build_tiny("umx").training.graph_optimization is True

    def one_step(declared):
        keras.utils.set_random_seed(3)
        mixture = keras.Input((None, 2))
        hidden = keras.layers.Conv1D(8, 5, padding="same", activation="tanh")(mixture)
        outputs = {name: keras.layers.Dense(2, name=name)(hidden) for name in ("vocals", "bass")}
        model = types.SimpleNamespace(train_model=keras.Model(mixture, outputs),
                                      training=TrainingHooks(graph_optimization=declared),
                                      loss={name: keras.losses.MeanAbsoluteError() for name in outputs})
        compile_model(model, tf.distribute.get_strategy(), resolve({}, ["unittest"]).train)
        batch = np.random.default_rng(0).normal(0, 1, (2, 64, 2)).astype("float32")
        def step():
            model.train_model.train_on_batch(batch, {name: batch for name in outputs})
            return tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)

        return with_graph_optimization(model, step), [w.numpy() for w in model.train_model.weights]

    on, weights_on = one_step(True)
    off, weights_off = one_step(False)
    assert (on, off) == (False, True)
    assert not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(weights_on, weights_off)) < 1e-6
