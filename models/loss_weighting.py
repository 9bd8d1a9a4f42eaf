"""Multi-task loss weighting of M-U-Net (Kadandale et al. 2020, Sec. 3): lambda_k per target in
loss = sum_k lambda_k L_k, either Dynamic Weight Average (per epoch, from the per-target training losses)
or Energy Based Weighting (fixed, from the training-set energy of each target).

The lambdas live in a `LossWeighting` layer of the train model (non-trainable weights, so they are
checkpointed and survive a resume) and are reported by metrics as `lambda_<target>` in every epoch's logs.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

WEIGHTINGS = ("equal", "dwa", "ebw")


def l1_distance(y_true, y_pred):
    """Mean |y_true - y_pred| per example `(nb_samples,)`."""
    rank = len(y_pred.shape)
    return tf.reduce_mean(tf.abs(tf.cast(y_true, y_pred.dtype) - y_pred), axis=list(range(1, rank)))


DWA_VARIANTS = ("softmax", "first_two")


def dwa_weights(loss_history: Sequence[Sequence[float]], temperature: float = 2.0,
                variant: str = "softmax") -> np.ndarray:
    """Dynamic Weight Average (Liu et al. 2019, as in M-U-Net): lambda for the next epoch `(nb_targets,)`.

    `loss_history`: the epoch-average loss of each target, one row per finished epoch, oldest first.
    `softmax` (the paper, and multichannel-unet-bss train/dwa.py since its K = 4 fix): lambda_k =
    K exp(w_k / T) / sum_i exp(w_i / T), w_k = L_k(t-1) / L_k(t-2); all ones before two epochs.
    `first_two` (train/dwa.py at the authors' "EUSIPCO final configuration" commit 9eb7032, before the fix
    2e74e61): the two-target formula on the first two targets, every other lambda 1.
    """
    if variant not in DWA_VARIANTS:
        raise ValueError(f"DWA variant {variant!r}: choose one of {', '.join(DWA_VARIANTS)}")
    if variant == "first_two":
        history = np.asarray(loss_history, np.float64)
        weights = np.ones(history.shape[1] if history.ndim == 2 else 0)
        if history.ndim == 2 and history.shape[1] >= 2:
            weights[:2] = dwa_weights(history[:, :2], temperature)
        return weights
    history = np.asarray(loss_history, np.float64)
    if history.ndim != 2:
        raise ValueError(f"loss_history must be (nb_epochs, nb_targets), got shape {history.shape}")
    nb_targets = history.shape[1]
    if history.shape[0] < 2:
        return np.ones(nb_targets)
    ratios = history[-1] / history[-2]
    scaled = ratios / temperature
    exp = np.exp(scaled - scaled.max())  # softmax, shifted for stability
    return nb_targets * exp / exp.sum()


def ebw_weights(energies: Sequence[float], power: float = 1.0) -> np.ndarray:
    """Energy Based Weighting: lambda_k = (E_max / E_k) ** power; E_k the mean energy of target k."""
    energies = np.asarray(energies, np.float64)
    if energies.ndim != 1 or not np.all(np.isfinite(energies)) or np.any(energies <= 0):
        raise ValueError(f"EBW needs a positive finite energy per target, got {energies.tolist()}")
    return (energies.max() / energies) ** power


def target_energies(stats, targets: Sequence[str]) -> Optional[np.ndarray]:
    """Mean energy per target over the training set from the train stage's `stats`, or None when absent.

    `stats.energy[target]` (models.base.Stats; its dict form is accepted too) is the duration-weighted mean square
    of each stem over the training split: the prepare manifest's `stats`.
    """
    from models.base import Stats

    stats = Stats.of(stats)
    energy = stats.energy if stats is not None else None
    if isinstance(energy, Mapping) and all(target in energy for target in targets):
        return np.asarray([float(energy[target]) for target in targets], np.float64)
    return None


class WeightReading(keras.metrics.Metric):
    """Reports one entry of a weight vector as a metric: lands in every epoch's logs before the callbacks run."""

    def __init__(self, variable, index: int, name: str):
        super().__init__(name=name)
        self._read = lambda: variable.value[index]  # a closure: the metric must not track (own) the variable

    def update_state(self, *args, **kwargs):
        pass

    def reset_state(self):
        pass

    def result(self):
        return self._read()


class LossWeighting(keras.layers.Layer):
    """Identity on the estimates dict; holds the multi-task loss weights and the DWA loss history.

    Non-trainable weights: `loss_weights` (nb_targets,) lambda in use; `epoch_losses` (2, nb_targets) the
    epoch-average losses L(t-2), L(t-1); `running_losses` (nb_targets,) the epoch in progress;
    `epochs_recorded` and `pending` (the running losses belong to an epoch not yet moved into the history).
    """

    def __init__(self, targets: Sequence[str] = (), initial: Optional[Sequence[float]] = None, **kwargs):
        super().__init__(**kwargs)
        self.targets = tuple(targets)
        self.initial = [1.0] * len(self.targets) if initial is None else [float(v) for v in initial]

    def build(self, input_shape=None):
        nb_targets = len(self.targets)
        self.loss_weights = self.add_weight(shape=(nb_targets,), trainable=False, name="loss_weights",
                                            initializer=keras.initializers.Constant(self.initial))
        self.epoch_losses = self.add_weight(shape=(2, nb_targets), initializer="zeros", trainable=False,
                                            name="epoch_losses")
        self.running_losses = self.add_weight(shape=(nb_targets,), initializer="zeros", trainable=False,
                                              name="running_losses")
        self.epochs_recorded = self.add_weight(shape=(), initializer="zeros", trainable=False, name="epochs_recorded")
        self.pending = self.add_weight(shape=(), initializer="zeros", trainable=False, name="pending")
        self.readings = [WeightReading(self.loss_weights, index, f"lambda_{target}")
                         for index, target in enumerate(self.targets)]

    def call(self, estimates):
        return {target: tf.identity(estimates[target]) for target in self.targets}

    def compute_output_shape(self, input_shape):
        return dict(input_shape)

    def get_config(self):
        return {**super().get_config(), "targets": list(self.targets), "initial": list(self.initial)}


class WeightedL1(keras.losses.Loss):
    """`weight * distance(truth, estimate)` per example (L1 by default); `weight` read from a variable at every step."""

    def __init__(self, weights=None, index: int = 0, distance: Optional[Callable] = None, name: str = "weighted_l1",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.weights = weights
        self.index = index
        self.distance = distance or l1_distance  # (y_true, y_pred) -> (nb_samples,)

    def call(self, y_true, y_pred):
        loss = self.distance(y_true, y_pred)
        if self.weights is not None:
            loss = tf.convert_to_tensor(self.weights)[self.index] * loss
        return loss


class DynamicWeightAverage(keras.callbacks.Callback):
    """Sets `LossWeighting.loss_weights` at every epoch start from the per-target training losses (DWA).

    The per-target loss of the epoch is Keras's running mean `<target>_loss` (= lambda_k L_k; divided by
    the lambda in use), copied after every batch into the layer's weights, so that BackupAndRestore
    (which saves at epoch end, before later callbacks) keeps it and a resumed run continues the history.
    """

    def __init__(self, weighting: LossWeighting, temperature: float = 2.0, variant: str = "softmax"):
        super().__init__()
        self.weighting = weighting
        self.temperature = temperature
        self.variant = variant
        self.history = []  # (epoch, lambda) pairs set by this callback, for inspection

    def on_epoch_begin(self, epoch, logs=None):
        layer = self.weighting
        if float(layer.pending.numpy()) > 0:
            previous = layer.epoch_losses.numpy()
            layer.epoch_losses.assign(np.stack([previous[1], layer.running_losses.numpy()]))
            layer.epochs_recorded.assign(layer.epochs_recorded.numpy() + 1)
            layer.pending.assign(0.0)
        recorded = min(int(layer.epochs_recorded.numpy()), 2)
        weights = dwa_weights(layer.epoch_losses.numpy()[2 - recorded:], self.temperature, self.variant)
        layer.loss_weights.assign(weights.astype(np.float32))
        self.history.append((epoch, weights))

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        layer = self.weighting
        keys = [f"{target}_loss" for target in layer.targets]
        if len(keys) == 1:
            return  # one target: DWA is constant 1
        missing = [key for key in keys if key not in logs]
        if missing:
            raise KeyError(f"DWA needs the per-target training losses {missing} in the batch logs; "
                           f"got {sorted(logs)}")
        weights = layer.loss_weights.numpy()
        layer.running_losses.assign(np.asarray([float(logs[key]) for key in keys], np.float32) / weights)
        layer.pending.assign(1.0)


class RequireEnergies(keras.callbacks.Callback):
    """EBW without training-set energies would silently train with equal weights: fail at the start instead."""

    def __init__(self, found: bool, key: str = "model.m_unet"):
        super().__init__()
        self.found = found
        self.key = key

    def on_train_begin(self, logs=None):
        if not self.found:
            raise ValueError(f"{self.key}.weighting=ebw needs the mean energy per target over the training set: "
                             "the train stage passes the prepare manifest's training statistics (models.base.Stats: "
                             "energy per target)")


def weighted_losses(weighting: str, targets: Sequence[str], stats: Optional[Mapping], *, temperature: float = 2.0,
                    power: float = 1.0, distance: Optional[Callable] = None, key: str = "model.m_unet",
                    dwa_variant: str = "softmax"):
    """(LossWeighting layer, {target: WeightedL1}, callbacks) for `weighting` in equal | dwa | ebw.

    EBW takes the training-set energies from `stats` (see `target_energies`); without them the model
    still builds (inference needs none) but training refuses to start.
    """
    targets = tuple(targets)
    initial = np.ones(len(targets))
    callbacks = []
    if weighting == "ebw":
        energies = target_energies(stats, targets)
        if energies is None:
            log.warning("%s: weighting=ebw but stats hold no per-target training energy; lambda = 1 (fine for "
                        "inference; training refuses to start)", key)
            callbacks.append(RequireEnergies(found=False, key=key))
        else:
            initial = ebw_weights(energies, power)
    layer = LossWeighting(targets, initial.tolist(), name="loss_weighting")
    layer.build()  # the losses read its `loss_weights` variable
    if weighting == "dwa":
        callbacks.append(DynamicWeightAverage(layer, temperature, dwa_variant))
    losses = {target: WeightedL1(layer.loss_weights, index, distance, name=f"l1_{target}")
              for index, target in enumerate(targets)}
    return layer, losses, callbacks
