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
    """Every N steps: a quick SDR of the separator on a few validation excerpts (seed 000)."""

    def __init__(self, separation_model, tracks, every: int, log_scalar):
        super().__init__()
        self.separation_model = separation_model
        self.tracks = tracks
        self.every = every
        self.log_scalar = log_scalar
        self.step = 0
        self.snapshots = []
        self.separate_fn = None

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            value = self.measure()
            self.snapshots.append({"step": self.step, "sdr": value})
            self.log_scalar("train.snapshot_sdr", value, self.step)
            log.info("step %d: validation snapshot SDR %.2f dB", self.step, value)

    def measure(self) -> float:
        from components.evaluation.metrics import global_sdr
        from components.inference.separation import compiled

        if self.separate_fn is None:
            self.separate_fn = compiled(self.separation_model.separator, self.separation_model.nb_channels)
        scores = []
        for mixture, stems in self.tracks:
            estimates = self.separate_fn(mixture[None])
            for target, truth in stems.items():
                scores.append(global_sdr(truth, np.asarray(estimates[target])[0]))
        return float(np.mean(scores))


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
