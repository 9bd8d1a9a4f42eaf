"""The train stage's Keras callbacks: Sacred logging, validation snapshots and SDR, the time budget.

Imported by `components/train.py` when a stage runs (this module imports Keras; the stage module does not).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import keras
import numpy as np

log = logging.getLogger("pipeline.train")


class SacredLogger(keras.callbacks.Callback):
    """Every epoch's losses, metrics and learning rate to Sacred (log_scalar)."""

    def __init__(self, log_scalar, history_path: Path):
        super().__init__()
        self.log_scalar = log_scalar
        self.history_path = history_path
        self.history = json.loads(history_path.read_text()) if history_path.is_file() else []

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        lr = self.model.optimizer.learning_rate
        logs["learning_rate"] = float(np.asarray(lr.numpy() if hasattr(lr, "numpy") else lr))
        entry = {"epoch": epoch + 1, "pid": os.getpid(), **{k: float(v) for k, v in logs.items()}}
        self.history = [h for h in self.history if h["epoch"] < epoch + 1] + [entry]
        tmp = self.history_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.history, indent=1))
        os.replace(tmp, self.history_path)
        for key, value in logs.items():
            self.log_scalar(f"train.{key}", float(value), epoch + 1)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.5g}" for k, v in logs.items()))


class ValidationSnapshot(keras.callbacks.Callback):
    """Every N steps: a quick SDR of the separator on a few validation excerpts (seed 000), logged to Sacred by
    step, kept in `record` (JSON) and, with `tensorboard`, written there with the audio of the first excerpt's
    estimate of every target."""

    def __init__(self, separation_model, tracks, every: int, log_scalar, record=None, tensorboard=None,
                 sample_rate: int = 44100):
        super().__init__()
        self.separation_model = separation_model
        self.tracks = tracks
        self.every = every
        self.log_scalar = log_scalar
        self.step = 0
        self.record = Path(record) if record else None
        self.snapshots = json.loads(self.record.read_text()) if self.record and self.record.is_file() else []
        self.tensorboard = tensorboard
        self.sample_rate = sample_rate
        self.writer = None
        self.separate_fn = None

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            value, estimates = self.measure()
            step = int(self.model.optimizer.iterations.numpy()) if self.model is not None else self.step
            self.snapshots.append({"step": step, "sdr": value})
            self.log_scalar("train.snapshot_sdr", value, step)
            log.info("step %d: validation snapshot SDR %.2f dB", step, value)
            if self.record is not None:
                tmp = self.record.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.snapshots))
                os.replace(tmp, self.record)
            if self.tensorboard is not None:
                self.summarise(step, value, estimates)

    def summarise(self, step: int, value: float, estimates) -> None:
        import tensorflow as tf

        if self.writer is None:
            self.writer = tf.summary.create_file_writer(str(Path(self.tensorboard) / "snapshots"))
        with self.writer.as_default(step=step):
            tf.summary.scalar("snapshot_sdr", value)
            for target, audio in estimates.items():  # (nb_timesteps, nb_channels) of the first excerpt
                clipped = np.clip(np.asarray(audio, np.float32), -1.0, 1.0)[None]
                tf.summary.audio(f"estimate/{target}", clipped, self.sample_rate, max_outputs=1)
        self.writer.flush()

    def measure(self):
        """(mean SDR over excerpts and targets, {target: estimate of the first excerpt})."""
        from components.evaluation.metrics import global_sdr
        from components.inference.separation import compiled

        if self.separate_fn is None:
            self.separate_fn = compiled(self.separation_model.separator, self.separation_model.nb_channels)
        scores, first = [], None
        for mixture, stems in self.tracks:
            estimates = self.separate_fn(mixture[None])
            if first is None:
                first = {target: np.asarray(estimates[target])[0] for target in stems}
            for target, truth in stems.items():
                scores.append(global_sdr(truth, np.asarray(estimates[target])[0]))
        return float(np.mean(scores)), first


class TimeBudget(keras.callbacks.Callback):
    """Stops training after the batch that exceeds `max_seconds` of wall clock (same CPU budget for all)."""

    def __init__(self, max_seconds: float):
        super().__init__()
        self.max_seconds = max_seconds
        self.started = None

    def on_train_begin(self, logs=None):
        self.started = time.time()

    def on_train_batch_end(self, batch, logs=None):
        if time.time() - self.started > self.max_seconds:
            self.model.stop_training = True


class ValidationSdr(keras.callbacks.Callback):
    """At the end of every epoch: `val_sdr` in the logs, the mean over validation tracks and targets of the
    whole-track global SDR (DTTNet's `val/usdr`, src/dp_tdf/abstract.py), for checkpoint selection."""

    def __init__(self, separation_model, tracks, chunk_seconds: float, overlap: float):
        super().__init__()
        self.separation_model = separation_model
        self.tracks = tracks
        self.chunk_seconds = chunk_seconds
        self.overlap = overlap
        self.separate_fn = None

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["val_sdr"] = self.measure()

    def measure(self) -> float:
        from components.evaluation.metrics import global_sdr
        from components.inference.separation import compiled, separate_array

        model = self.separation_model
        if self.separate_fn is None:
            self.separate_fn = compiled(model.separator, model.nb_channels)
        scores = []
        for mixture, stems in self.tracks:
            estimates = separate_array(self.separate_fn, mixture, sample_rate=model.sample_rate,
                                       chunk_seconds=self.chunk_seconds, overlap=self.overlap,
                                       input_samples=model.input_samples)
            scores.extend(global_sdr(truth, estimates[target]) for target, truth in stems.items())
        return float(np.mean(scores))


class TorchPlateau:
    """torch.optim.lr_scheduler.ReduceLROnPlateau's bookkeeping (mode min/max, threshold_mode rel/abs, cooldown,
    min_lr, eps 1e-8): `step(value, lr)` returns the new rate. Torch reduces after `patience + 1` epochs
    without improvement (Keras' callback after `patience`); rel: better means value < best * (1 - threshold)."""

    def __init__(self, *, mode="min", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel", cooldown=0,
                 min_lr=0.0, eps=1e-8):
        self.mode, self.factor, self.patience = mode, factor, patience
        self.threshold, self.threshold_mode, self.cooldown = threshold, threshold_mode, cooldown
        self.min_lr, self.eps = min_lr, eps
        self.best = float("inf") if mode == "min" else -float("inf")
        self.bad_epochs = self.cooldown_counter = 0

    def is_better(self, value, best) -> bool:
        if self.mode == "min":
            return value < (best * (1 - self.threshold) if self.threshold_mode == "rel" else best - self.threshold)
        return value > (best * (1 + self.threshold) if self.threshold_mode == "rel" else best + self.threshold)

    def step(self, value: float, lr: float) -> float:
        if self.is_better(value, self.best):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience:
            new = max(lr * self.factor, self.min_lr)
            if lr - new > self.eps:
                lr = new
            self.cooldown_counter, self.bad_epochs = self.cooldown, 0
        return lr


class TorchEarlyStopping(TorchPlateau):
    """open-unmix's utils.EarlyStopping / the same rel-or-abs test: stop once `patience` epochs passed without
    improvement. `stop(value)` is True when training should end."""

    def stop(self, value: float) -> bool:
        if self.is_better(value, self.best):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


class TorchPlateauCallback(keras.callbacks.Callback):
    """TorchPlateau on `monitor` (e.g. the training `loss`, as M-U-Net's `scheduler.step(self.loss)`) at each
    epoch's end; sets the optimizer's learning rate."""

    def __init__(self, monitor: str, **kwargs):
        super().__init__()
        self.monitor, self.plateau = monitor, TorchPlateau(**kwargs)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        optimizer = self.model.optimizer
        lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        new = self.plateau.step(float(value), lr)
        if new != lr:
            optimizer.learning_rate = new
            log.info("epoch %d: %s did not improve; learning rate %.3g -> %.3g", epoch + 1, self.monitor, lr, new)


def plot_curves(path: Path, history, snapshots=()) -> None:
    """training_curves.png: loss and validation loss per epoch (and every per-target loss), the validation SDR per
    epoch when measured, and the snapshot SDR by step when taken."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    sdr_epochs = [h for h in history if "val_sdr" in h]
    panels = 1 + bool(sdr_epochs or snapshots)
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    epochs = [h["epoch"] for h in history]
    losses = sorted({k for h in history for k in h if k.endswith("loss")})
    for key in losses:
        axes[0][0].plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key,
                        linewidth=2 if key in ("loss", "val_loss") else 1)
    axes[0][0].set(xlabel="epoch", ylabel="loss", title="training and validation loss")
    axes[0][0].legend(fontsize="small")
    if panels > 1:
        axis = axes[0][1]
        if sdr_epochs:
            axis.plot([h["epoch"] for h in sdr_epochs], [h["val_sdr"] for h in sdr_epochs], marker="o",
                      label="validation SDR (epoch)")
        if snapshots:
            twin = axis.twiny()
            twin.plot([s["step"] for s in snapshots], [s["sdr"] for s in snapshots], color="tab:orange",
                      marker=".", label="snapshot SDR (step)")
            twin.set_xlabel("step")
        axis.set(xlabel="epoch", ylabel="SDR (dB)", title="validation SDR")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
