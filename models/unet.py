"""Spectrogram U-Nets: dedicated (Jansson et al. 2017 / Spleeter), multi-channel (M-U-Net, Kadandale et al.
2020) and conditioned (C-U-Net, Meseguer-Brocal & Peeters 2019), three registered families in one file.

The U-Net (Jansson et al. 2017, Sec. 3), on magnitude patches `(nb_patches, patch_frames, nb_bins, nb_channels)`
with time and frequency as the two conv axes and the audio channels as input feature maps (Spleeter):

    encoder  6 x [Conv2D 5x5 stride 2 (16, 32, 64, 128, 256, 512 filters) -> BN -> LeakyReLU(0.2)]
    decoder  5 x [Conv2DTranspose 5x5 stride 2 (256, 128, 64, 32, 16) -> BN -> ReLU (-> Dropout 0.5 on the
             first three)] each followed by concat with the encoder output of the same size,
             then Conv2DTranspose 5x5 stride 2 to the mask channels -> sigmoid
    estimate = mask * |X|  (the L1 loss compares it with the target magnitude)

Six stride-2 layers need both spectrogram axes to be multiples of 64. The model does that itself: bins
above `max_bin` are cropped (Spleeter's F = 1024), the rest zero-padded to a multiple of 64, and the
frames are cut into patches of `patch_frames` (Spleeter's T = 512; a multiple of 64), the last one
zero-padded; masks are cropped back. So any input length works, and inference sees the same patch
size as training (as Spleeter's separator does).

Families (the training domain is the magnitude `(nb_samples, nb_frames, max_bin, nb_channels)` per target):

    unet    one U-Net per target (nb_channels masks each); losses independent, summed by Keras.
    m_unet  one U-Net whose last layer has nb_channels x nb_targets masks; loss sum_k lambda_k L1_k with
            lambda from `weighting`: equal, DWA (per epoch, from the per-target training losses) or EBW
            (fixed, from the training-set energy of each target). The lambdas live in a `LossWeighting`
            layer of `train_model` (non-trainable weights, so they are checkpointed and survive a resume)
            and are reported by metrics as `lambda_<target>` in every epoch's logs, before any callback.
    c_unet  one U-Net with nb_channels masks whose encoder is modulated by FiLM (after BN, before the
            activation): gamma, beta per encoder layer ("simple") or per feature map ("complex") from a
            dense control network on the one-hot target vector; the same for every time-frequency point
            (global conditioning). `train_model` runs the U-Net once per target by tiling the batch
            nb_targets times with the one-hot vectors (one conv call on nb_targets x batch patches): every
            example trains every condition, which costs nb_targets U-Net passes per example (the C-U-Net
            cost M-U-Net avoids) instead of sampling one condition per example as the paper does.

Separation (`SeparationModel.separator`): STFT -> masks -> full-band estimates (bins above `max_bin`: zero,
or the frame's mean mask with `mask_extension="average"`) -> mixture phase (`wiener_iterations` = 0, the
published mask application) or the multichannel Wiener EM -> ISTFT to the input length. `postprocess`
does the same from the `mobile` model's outputs, with the same function (`reconstruct`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Mapping, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from configs.config import ConfigError
from models.base import SeparationModel
from models.filtering import wiener
from models.transforms import STFT, ComplexNorm, complex_norm, istft, stft

log = logging.getLogger(__name__)

NB_LAYERS = 6  # stride-2 layers: both spectrogram axes must be multiples of 2 ** NB_LAYERS
MULTIPLE = 2 ** NB_LAYERS
WEIGHTINGS = ("equal", "dwa", "ebw")
MASK_EXTENSIONS = ("zeros", "average")
FILMS = ("simple", "complex")


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class UNetConfig:
    """Dedicated U-Net; defaults are Spleeter's 44.1 kHz setting (STFT 4096 / 1024, F = 1024 bins, T = 512)."""

    n_fft: int = 4096
    hop_length: int = 1024
    max_bin: int = 1024  # bins fed to the U-Net (from DC); 0: all n_fft // 2 + 1, zero-padded to a multiple of 64
    patch_frames: int = 512  # frames per U-Net patch; a multiple of 64
    first_filters: int = 16  # encoder filters: first_filters * 2 ** layer (Jansson: 16 ... 512)
    dropout: float = 0.5  # on the first three decoder layers
    mask_extension: str = "zeros"  # bins above max_bin at separation: zeros | average (mean mask of the frame)
    wiener_iterations: int = 0  # 0: mask x mixture (published); > 0: EM iterations of the multichannel Wiener filter

    def __post_init__(self):
        _check_common(self, "unet")


@dataclass(frozen=True)
class MUNetConfig:
    """M-U-Net; STFT defaults are the paper code's (10,880 Hz audio, n_fft 1022, hop 256, 512 bins x 256 frames)."""

    n_fft: int = 1022
    hop_length: int = 256
    max_bin: int = 512
    patch_frames: int = 256
    first_filters: int = 16
    dropout: float = 0.5
    mask_extension: str = "zeros"
    wiener_iterations: int = 0
    weighting: str = "dwa"  # equal | dwa | ebw
    dwa_temperature: float = 2.0
    ebw_power: float = 1.0  # EBW: lambda_k = (E_max / E_k) ** ebw_power (the paper uses 1 and 2)

    def __post_init__(self):
        _check_common(self, "m_unet")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"model.m_unet.weighting must be one of {', '.join(WEIGHTINGS)}; got '{self.weighting}'")
        if self.dwa_temperature <= 0:
            raise ConfigError(f"model.m_unet.dwa_temperature must be positive, got {self.dwa_temperature}")
        if self.ebw_power <= 0:
            raise ConfigError(f"model.m_unet.ebw_power must be positive, got {self.ebw_power}")


@dataclass(frozen=True)
class CUNetConfig:
    """C-U-Net at the M-U-Net paper's STFT setting (its baseline); control net as the C-U-Net code's dense one."""

    n_fft: int = 1022
    hop_length: int = 256
    max_bin: int = 512
    patch_frames: int = 256
    first_filters: int = 16
    dropout: float = 0.5
    mask_extension: str = "zeros"
    wiener_iterations: int = 0
    film: str = "complex"  # simple: one gamma, beta per encoder layer; complex: one per feature map
    # dense control layers (ReLU; dropout 0.5 + BN after all but the first). C-U-Net code: simple (16, 64, 256),
    # complex (16, 256, 1024)
    control_units: Tuple[int, ...] = (16, 256, 1024)

    def __post_init__(self):
        _check_common(self, "c_unet")
        if self.film not in FILMS:
            raise ConfigError(f"model.c_unet.film must be simple or complex; got '{self.film}'")
        if not self.control_units or any(units <= 0 for units in self.control_units):
            raise ConfigError(f"model.c_unet.control_units must be positive layer sizes, got {list(self.control_units)}")


def _check_common(config, name: str) -> None:
    key = f"model.{name}."
    if config.n_fft <= 0 or config.n_fft % 2:
        raise ConfigError(f"{key}n_fft must be a positive even number, got {config.n_fft}")
    if not 0 < config.hop_length <= config.n_fft // 2:
        raise ConfigError(f"{key}hop_length must lie in (0, n_fft/2] for a perfect ISTFT, got {config.hop_length}")
    if not 0 <= config.max_bin <= config.n_fft // 2 + 1:
        raise ConfigError(f"{key}max_bin must lie in [0, n_fft/2 + 1] (0: all bins), got {config.max_bin}")
    if config.patch_frames <= 0 or config.patch_frames % MULTIPLE:
        raise ConfigError(f"{key}patch_frames must be a positive multiple of {MULTIPLE} (six stride-2 layers), "
                          f"got {config.patch_frames}")
    if config.first_filters <= 0:
        raise ConfigError(f"{key}first_filters must be positive, got {config.first_filters}")
    if not 0 <= config.dropout < 1:
        raise ConfigError(f"{key}dropout must lie in [0, 1), got {config.dropout}")
    if config.mask_extension not in MASK_EXTENSIONS:
        raise ConfigError(f"{key}mask_extension must be zeros or average; got '{config.mask_extension}'")
    if config.wiener_iterations < 0:
        raise ConfigError(f"{key}wiener_iterations must be >= 0, got {config.wiener_iterations}")


# ------------------------------------------------------------------------------------ loss weighting


def dwa_weights(loss_history: Sequence[Sequence[float]], temperature: float = 2.0) -> np.ndarray:
    """Dynamic Weight Average (Liu et al. 2019, as in M-U-Net): lambda for the next epoch `(nb_targets,)`.

    `loss_history`: the epoch-average loss of each target, one row per finished epoch, oldest first.
    lambda_k = K exp(w_k / T) / sum_i exp(w_i / T), w_k = L_k(t-1) / L_k(t-2); all ones before two epochs.
    """
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


def target_energies(stats: Optional[Mapping], targets: Sequence[str]) -> Optional[np.ndarray]:
    """Mean energy per target over the training set from the train stage's `stats`, or None when absent.

    Accepted: `stats["energy"][target]`, or a whole prepare manifest, whose training split has
    `splits.train.energy[target]` (the duration-weighted mean square of each stem).
    """
    stats = stats or {}
    for energy in (stats.get("energy"), (stats.get("splits") or {}).get("train", {}).get("energy")):
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
    """`weight * mean |truth - estimate|` per example; `weight` read from a variable at every step."""

    def __init__(self, weights=None, index: int = 0, name: str = "weighted_l1", **kwargs):
        super().__init__(name=name, **kwargs)
        self.weights = weights
        self.index = index

    def call(self, y_true, y_pred):
        rank = len(y_pred.shape)
        loss = tf.reduce_mean(tf.abs(tf.cast(y_true, y_pred.dtype) - y_pred), axis=list(range(1, rank)))
        if self.weights is not None:
            loss = tf.convert_to_tensor(self.weights)[self.index] * loss
        return loss


class DynamicWeightAverage(keras.callbacks.Callback):
    """Sets `LossWeighting.loss_weights` at every epoch start from the per-target training losses (DWA).

    The per-target loss of the epoch is Keras's running mean `<target>_loss` (= lambda_k L_k; divided by
    the lambda in use), copied after every batch into the layer's weights, so that BackupAndRestore
    (which saves at epoch end, before later callbacks) keeps it and a resumed run continues the history.
    """

    def __init__(self, weighting: LossWeighting, temperature: float = 2.0):
        super().__init__()
        self.weighting = weighting
        self.temperature = temperature
        self.history = []  # (epoch, lambda) pairs set by this callback, for inspection

    def on_epoch_begin(self, epoch, logs=None):
        layer = self.weighting
        if float(layer.pending.numpy()) > 0:
            previous = layer.epoch_losses.numpy()
            layer.epoch_losses.assign(np.stack([previous[1], layer.running_losses.numpy()]))
            layer.epochs_recorded.assign(layer.epochs_recorded.numpy() + 1)
            layer.pending.assign(0.0)
        recorded = min(int(layer.epochs_recorded.numpy()), 2)
        weights = dwa_weights(layer.epoch_losses.numpy()[2 - recorded:], self.temperature)
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

    def __init__(self, found: bool):
        super().__init__()
        self.found = found

    def on_train_begin(self, logs=None):
        if not self.found:
            raise ValueError("model.m_unet.weighting=ebw needs the mean energy per target over the training set: "
                             "the train stage must pass stats={'energy': {target: mean square}} (the prepare "
                             "manifest's splits.train.energy)")


# --------------------------------------------------------------------------------------------- layers


class SpectrogramPatches(keras.layers.Layer):
    """Magnitude `(nb_samples, nb_frames, nb_bins, nb_channels)` -> `(nb_samples * nb_patches, patch_frames, padded_bins, nb_channels)`.

    Bins are cropped at `max_bin` and zero-padded to `padded_bins`; frames zero-padded to whole patches.
    Patches of one example are consecutive rows.
    """

    def __init__(self, patch_frames: int = 512, max_bin: int = 1024, padded_bins: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.patch_frames = patch_frames
        self.max_bin = max_bin
        self.padded_bins = padded_bins

    def call(self, magnitude):
        x = magnitude[:, :, : self.max_bin, :]
        nb_frames = x.shape[1] if x.shape[1] is not None else tf.shape(x)[1]
        nb_patches = -(-nb_frames // self.patch_frames)
        x = tf.pad(x, [[0, 0], [0, nb_patches * self.patch_frames - nb_frames],
                       [0, self.padded_bins - self.max_bin], [0, 0]])
        return tf.reshape(x, [-1, self.patch_frames, self.padded_bins, magnitude.shape[-1]])

    def compute_output_shape(self, input_shape):
        nb_samples, nb_frames = input_shape[0], input_shape[1]
        rows = None
        if nb_samples is not None and nb_frames is not None:
            rows = nb_samples * -(-nb_frames // self.patch_frames)
        return (rows, self.patch_frames, self.padded_bins, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "patch_frames": self.patch_frames, "max_bin": self.max_bin,
                "padded_bins": self.padded_bins}


class MergePatches(keras.layers.Layer):
    """[masks `(nb_samples * nb_patches, patch_frames, padded_bins, nb_channels, nb_targets)`, magnitude
    `(nb_samples, nb_frames, nb_bins, nb_channels)`] -> estimates `(nb_samples, nb_frames, max_bin, nb_channels, nb_targets)`:
    patches joined, padding cropped, times the mixture magnitude."""

    def __init__(self, max_bin: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.max_bin = max_bin

    def call(self, masks, magnitude):
        nb_samples = tf.shape(magnitude)[0]
        nb_frames = magnitude.shape[1] if magnitude.shape[1] is not None else tf.shape(magnitude)[1]
        shape = masks.shape
        masks = tf.reshape(masks, [nb_samples, -1, shape[2], shape[3], shape[4]])
        masks = masks[:, :nb_frames, : self.max_bin]
        return masks * magnitude[:, :, : self.max_bin, :, None]

    def compute_output_shape(self, masks_shape, magnitude_shape):
        return (magnitude_shape[0], magnitude_shape[1], self.max_bin, masks_shape[3], masks_shape[4])

    def get_config(self):
        return {**super().get_config(), "max_bin": self.max_bin}


class StackTargets(keras.layers.Layer):
    """Per-target masks `[(N, F, K, C)] * J` -> `(N, F, K, C, J)`."""

    def call(self, masks):
        return tf.stack(list(masks), axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0]) + (len(input_shape),)


class SplitChannels(keras.layers.Layer):
    """M-U-Net's last layer `(N, F, K, C * J)` (channel-major) -> `(N, F, K, C, J)`."""

    def __init__(self, nb_channels: int = 2, nb_targets: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.nb_channels = nb_channels
        self.nb_targets = nb_targets

    def call(self, masks):
        shape = tf.shape(masks)
        return tf.reshape(masks, tf.concat([shape[:3], [self.nb_channels, self.nb_targets]], 0))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:3]) + (self.nb_channels, self.nb_targets)

    def get_config(self):
        return {**super().get_config(), "nb_channels": self.nb_channels, "nb_targets": self.nb_targets}


class TileTargets(keras.layers.Layer):
    """C-U-Net: patches `(N, F, K, C)` -> [`(J * N, F, K, C)` target-major, one-hot conditions `(J * N, J)`]."""

    def __init__(self, nb_targets: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.nb_targets = nb_targets

    def call(self, patches):
        rows = tf.shape(patches)[0]
        tiled = tf.tile(patches[None], [self.nb_targets, 1, 1, 1, 1])
        tiled = tf.reshape(tiled, tf.concat([[-1], tf.shape(patches)[1:]], 0))
        tiled = tf.ensure_shape(tiled, (None,) + tuple(patches.shape[1:]))
        eye = tf.eye(self.nb_targets, dtype=patches.dtype)
        conditions = tf.broadcast_to(eye[:, None, :], tf.stack([self.nb_targets, rows, self.nb_targets]))
        return tiled, tf.reshape(conditions, [-1, self.nb_targets])

    def compute_output_shape(self, input_shape):
        rows = None if input_shape[0] is None else input_shape[0] * self.nb_targets
        return (rows,) + tuple(input_shape[1:]), (rows, self.nb_targets)

    def get_config(self):
        return {**super().get_config(), "nb_targets": self.nb_targets}


class UntileTargets(keras.layers.Layer):
    """C-U-Net: masks `(J * N, F, K, C)` target-major -> `(N, F, K, C, J)`."""

    def __init__(self, nb_targets: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.nb_targets = nb_targets

    def call(self, masks):
        split = tf.reshape(masks, tf.concat([[self.nb_targets, -1], tf.shape(masks)[1:]], 0))
        return tf.transpose(split, [1, 2, 3, 4, 0])

    def compute_output_shape(self, input_shape):
        rows = None if input_shape[0] is None else input_shape[0] // self.nb_targets
        return (rows,) + tuple(input_shape[1:]) + (self.nb_targets,)

    def get_config(self):
        return {**super().get_config(), "nb_targets": self.nb_targets}


class FiLM(keras.layers.Layer):
    """[features `(N, F, K, D)`, gamma `(N, D or 1)`, beta `(N, D or 1)`] -> gamma * features + beta (global)."""

    def call(self, features, gamma, beta):
        return features * gamma[:, None, None, :] + beta[:, None, None, :]

    def compute_output_shape(self, features_shape, gamma_shape, beta_shape):
        return tuple(features_shape)


class SplitTargets(keras.layers.Layer):
    """`(..., nb_targets)` -> {target: `(...)`}, the output dict of every graph."""

    def __init__(self, targets: Sequence[str] = (), **kwargs):
        super().__init__(**kwargs)
        self.targets = tuple(targets)

    def call(self, stacked):
        return {target: stacked[..., index] for index, target in enumerate(self.targets)}

    def compute_output_shape(self, input_shape):
        return {target: tuple(input_shape[:-1]) for target in self.targets}

    def get_config(self):
        return {**super().get_config(), "targets": list(self.targets)}


# ------------------------------------------------------------------------------------- reconstruction


def reconstruct(estimates, mix_stft, length, *, n_fft: int, hop_length: int, mask_extension: str = "zeros",
                wiener_iterations: int = 0) -> tf.Tensor:
    """Cropped magnitude estimates -> waveforms `(nb_samples, length, nb_channels, nb_targets)`.

    estimates: `(nb_samples, nb_frames, max_bin, nb_channels, nb_targets)` (the training domain, stacked)
    mix_stft:  `(nb_samples, nb_frames, nb_bins, nb_channels, 2)`
    Bins above max_bin get zero or the frame's mean mask (`mask_extension`); then the mixture phase
    (`wiener_iterations` = 0) or EM Wiener filtering (a residual source is added when there is one target).
    """
    estimates = tf.convert_to_tensor(estimates, tf.float32)
    mix_stft = tf.convert_to_tensor(mix_stft, tf.float32)
    max_bin = estimates.shape[2]
    nb_bins = mix_stft.shape[2]
    nb_targets = estimates.shape[-1]
    mix_magnitude = complex_norm(mix_stft)  # (B, F, K, C)
    if max_bin < nb_bins:
        high = mix_magnitude[:, :, max_bin:, :, None]
        if mask_extension == "average":
            masks = tf.math.divide_no_nan(estimates, mix_magnitude[:, :, :max_bin, :, None])
            high = high * tf.reduce_mean(masks, axis=2, keepdims=True)
        else:
            high = tf.zeros_like(high) * tf.zeros_like(estimates[:, :, :1])  # (B, F, K - max_bin, C, J)
        estimates = tf.concat([estimates, high], axis=2)
    if wiener_iterations == 0:
        sources = _with_mixture_phase(estimates, mix_stft)
    else:
        sources = wiener(estimates, mix_stft, niter=wiener_iterations, residual=nb_targets == 1)[..., :nb_targets, :]
    return istft(sources, n_fft, hop_length, length)


def _with_mixture_phase(magnitudes, mix_stft):
    """`(B, F, K, C, J)` magnitudes with the mixture's phase -> `(B, F, K, C, J, 2)`; phase 0 where |X| = 0."""
    mix_re, mix_im = mix_stft[..., 0], mix_stft[..., 1]
    mix_abs = tf.sqrt(tf.square(mix_re) + tf.square(mix_im))
    cos = tf.where(mix_abs > 0, tf.math.divide_no_nan(mix_re, mix_abs), tf.ones_like(mix_abs))
    sin = tf.math.divide_no_nan(mix_im, mix_abs)
    return tf.stack([magnitudes * cos[..., None], magnitudes * sin[..., None]], axis=-1)


class Reconstruct(keras.layers.Layer):
    """[estimates `(B, F, max_bin, C, J)`, mixture STFT, mixture waveform `(B, T, C)`] -> `(B, T, C, J)`."""

    def __init__(self, n_fft: int = 4096, hop_length: int = 1024, mask_extension: str = "zeros",
                 wiener_iterations: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.mask_extension = mask_extension
        self.wiener_iterations = wiener_iterations

    def call(self, estimates, mix_stft, waveform):
        length = waveform.shape[1] if waveform.shape[1] is not None else tf.shape(waveform)[1]
        return reconstruct(estimates, mix_stft, length, n_fft=self.n_fft, hop_length=self.hop_length,
                           mask_extension=self.mask_extension, wiener_iterations=self.wiener_iterations)

    def compute_output_shape(self, estimates_shape, mix_stft_shape, waveform_shape):
        return tuple(waveform_shape) + (estimates_shape[-1],)

    def get_config(self):
        return {**super().get_config(), "n_fft": self.n_fft, "hop_length": self.hop_length,
                "mask_extension": self.mask_extension, "wiener_iterations": self.wiener_iterations}


# ------------------------------------------------------------------------------------------- networks


def encoder_filters(first_filters: int) -> Tuple[int, ...]:
    return tuple(first_filters * 2 ** layer for layer in range(NB_LAYERS))


def unet_core(patch_frames: int, padded_bins: int, nb_in: int, nb_out: int, first_filters: int = 16,
              dropout: float = 0.5, control: Optional[dict] = None, name: str = "unet") -> keras.Model:
    """The U-Net on one patch: `(N, patch_frames, padded_bins, nb_in)` [+ one-hot `(N, nb_targets)`] -> masks
    `(N, patch_frames, padded_bins, nb_out)` in [0, 1].

    `control` (C-U-Net): {"nb_targets", "film": simple|complex, "units": dense layer sizes}.
    """
    filters = encoder_filters(first_filters)
    # layers
    encoder = [(keras.layers.Conv2D(f, 5, strides=2, padding="same", name=f"{name}_conv{i + 1}"),
                keras.layers.BatchNormalization(name=f"{name}_conv{i + 1}_bn"),
                keras.layers.LeakyReLU(0.2, name=f"{name}_conv{i + 1}_act"))
               for i, f in enumerate(filters)]
    decoder = [(keras.layers.Conv2DTranspose(f, 5, strides=2, padding="same", name=f"{name}_deconv{i + 1}"),
                keras.layers.BatchNormalization(name=f"{name}_deconv{i + 1}_bn"),
                keras.layers.ReLU(name=f"{name}_deconv{i + 1}_act"),
                keras.layers.Dropout(dropout, name=f"{name}_deconv{i + 1}_dropout") if i < 3 and dropout else None)
               for i, f in enumerate(reversed(filters[:-1]))]
    last = keras.layers.Conv2DTranspose(nb_out, 5, strides=2, padding="same", activation="sigmoid",
                                        name=f"{name}_deconv{NB_LAYERS}")

    # functional graph
    spectrogram = keras.Input((patch_frames, padded_bins, nb_in), name="spectrogram")
    inputs = [spectrogram]
    gammas = betas = None
    if control is not None:
        condition = keras.Input((control["nb_targets"],), name="condition")
        inputs.append(condition)
        gammas, betas = _control_network(condition, control, filters, name)
    x, skips, offset = spectrogram, [], 0
    for index, (conv, norm, activation) in enumerate(encoder):
        x = norm(conv(x))
        if gammas is not None:
            width = filters[index] if control["film"] == "complex" else 1
            start = offset if control["film"] == "complex" else index
            gamma = gammas[:, start:start + width]
            beta = betas[:, start:start + width]
            offset += width
            x = FiLM(name=f"{name}_film{index + 1}")(x, gamma, beta)
        x = activation(x)
        skips.append(x)
    for index, (deconv, norm, activation, drop) in enumerate(decoder):
        x = activation(norm(deconv(x)))
        if drop is not None:
            x = drop(x)
        x = keras.layers.Concatenate(name=f"{name}_skip{index + 1}")([x, skips[-(index + 2)]])
    masks = last(x)
    return keras.Model(inputs if len(inputs) > 1 else spectrogram, masks, name=name)


def _control_network(condition, control: dict, filters, name: str):
    """C-U-Net's dense control: one-hot -> Dense+ReLU (-> Dropout 0.5 -> BN after the first) -> linear gammas, betas."""
    x = condition
    for index, units in enumerate(control["units"]):
        x = keras.layers.Dense(units, activation="relu", name=f"{name}_control{index + 1}")(x)
        if index:
            x = keras.layers.Dropout(0.5, name=f"{name}_control{index + 1}_dropout")(x)
            x = keras.layers.BatchNormalization(name=f"{name}_control{index + 1}_bn")(x)
    nb_conditions = sum(filters) if control["film"] == "complex" else len(filters)
    gammas = keras.layers.Dense(nb_conditions, name=f"{name}_gammas")(x)
    betas = keras.layers.Dense(nb_conditions, name=f"{name}_betas")(x)
    return gammas, betas


# ---------------------------------------------------------------------------------------------- build


def _frames_rule(config, n: int) -> int:
    """Samples giving a whole number (>= 1) of patches, at most `n` when one patch fits in `n`."""
    nb_frames = 1 + n // config.hop_length
    patches = max(1, nb_frames // config.patch_frames)
    return (patches * config.patch_frames - 1) * config.hop_length


def _build(kind: str, config, data, stats) -> SeparationModel:
    targets = tuple(data.targets)
    nb_targets = len(targets)
    nb_channels = data.nb_channels
    nb_bins = config.n_fft // 2 + 1
    max_bin = config.max_bin or nb_bins
    padded_bins = MULTIPLE * math.ceil(max_bin / MULTIPLE)
    core_args = dict(patch_frames=config.patch_frames, padded_bins=padded_bins, nb_in=nb_channels,
                     first_filters=config.first_filters, dropout=config.dropout)

    # layers (shared by every graph below)
    stft_layer = STFT(config.n_fft, config.hop_length, name="stft")
    norm_layer = ComplexNorm(name="magnitude")
    patches_layer = SpectrogramPatches(config.patch_frames, max_bin, padded_bins, name="patches")
    merge_layer = MergePatches(max_bin, name="merge_patches")
    split_layer = SplitTargets(targets, name="targets")
    if kind == "unet":
        cores = {target: unet_core(nb_out=nb_channels, name=f"unet_{target}", **core_args) for target in targets}
        stack_layer = StackTargets(name="stack_targets")
    elif kind == "m_unet":
        core = unet_core(nb_out=nb_channels * nb_targets, name="m_unet", **core_args)
        channels_layer = SplitChannels(nb_channels, nb_targets, name="split_channels")
    else:
        control = {"nb_targets": nb_targets, "film": config.film, "units": tuple(config.control_units)}
        core = unet_core(nb_out=nb_channels, control=control, name="c_unet", **core_args)
        tile_layer = TileTargets(nb_targets, name="tile_targets")
        untile_layer = UntileTargets(nb_targets, name="untile_targets")

    def estimate(magnitude):
        """Magnitude `(B, F, K, C)` -> stacked estimates `(B, F, max_bin, C, J)`."""
        patches = patches_layer(magnitude)
        if kind == "unet":
            masks = stack_layer([cores[target](patches) for target in targets])
        elif kind == "m_unet":
            masks = channels_layer(core(patches))
        else:
            tiled, conditions = tile_layer(patches)
            masks = untile_layer(core([tiled, conditions]))
        return merge_layer(masks, magnitude)

    # functional graphs
    mixture = keras.Input((None, nb_channels), name="mixture")
    train_outputs = split_layer(estimate(norm_layer(stft_layer(mixture))))
    callbacks = []
    if kind == "m_unet":
        energies = target_energies(stats, targets)
        initial = np.ones(nb_targets)
        if config.weighting == "ebw":
            if energies is None:
                log.warning("m_unet: weighting=ebw but stats hold no per-target training energy; lambda = 1 "
                            "(fine for inference; training refuses to start)")
                callbacks.append(RequireEnergies(found=False))
            else:
                initial = ebw_weights(energies, config.ebw_power)
        weighting = LossWeighting(targets, initial.tolist(), name="loss_weighting")
        train_outputs = weighting(train_outputs)
        if config.weighting == "dwa":
            callbacks.append(DynamicWeightAverage(weighting, config.dwa_temperature))
        loss = {target: WeightedL1(weighting.loss_weights, index, name=f"l1_{target}")
                for index, target in enumerate(targets)}
    else:
        loss = {target: WeightedL1(name=f"l1_{target}") for target in targets}
    train_model = keras.Model(mixture, train_outputs, name=kind)

    reconstruct_layer = Reconstruct(config.n_fft, config.hop_length, config.mask_extension,
                                    config.wiener_iterations, name="reconstruct")

    def make_separator(nb_timesteps: Optional[int] = None, batch_size: Optional[int] = None) -> keras.Model:
        """Mixture `(nb_samples, nb_timesteps, nb_channels)` -> {target: waveform, same shape}; shares the weights."""
        waveform = keras.Input((nb_timesteps, nb_channels), batch_size=batch_size, name="mixture")
        mix_stft = stft_layer(waveform)
        waveforms = reconstruct_layer(estimate(norm_layer(mix_stft)), mix_stft, waveform)
        return keras.Model(waveform, split_layer(waveforms), name=f"{kind}_separator")

    def mobile(chunk: int) -> keras.Model:
        """Static `(1, chunk, nb_channels)` -> the train outputs; STFT, convs, BN, pads, reshapes: builtins only."""
        waveform = keras.Input((chunk, nb_channels), batch_size=1, name="mixture")
        return keras.Model(waveform, split_layer(estimate(norm_layer(stft_layer(waveform)))), name=f"{kind}_mobile")

    def postprocess(mixture_chunk, outputs):
        waveform = tf.convert_to_tensor(mixture_chunk, tf.float32)
        estimates = tf.stack([tf.convert_to_tensor(outputs[target], tf.float32) for target in targets], axis=-1)
        waveforms = reconstruct(estimates, stft(waveform, config.n_fft, config.hop_length), waveform.shape[1],
                                n_fft=config.n_fft, hop_length=config.hop_length,
                                mask_extension=config.mask_extension, wiener_iterations=config.wiener_iterations)
        return {target: waveforms[..., index] for index, target in enumerate(targets)}

    def train_targets(stems):
        return {target: complex_norm(stft(stems[target], config.n_fft, config.hop_length))[:, :, :max_bin, :]
                for target in targets}

    extra = {"make_separator": make_separator, "max_bin": max_bin, "padded_bins": padded_bins, "nb_bins": nb_bins}
    if kind == "unet":
        extra["cores"] = cores
    else:
        extra["core"] = core
    if kind == "m_unet":
        extra["weighting"] = weighting
    return SeparationModel(
        targets=targets,
        sample_rate=data.sample_rate,
        nb_channels=nb_channels,
        train_model=train_model,
        train_targets=train_targets,
        loss=loss,
        separator=make_separator(),
        config=config,
        input_samples=lambda n: _frames_rule(config, n),
        callbacks=callbacks,
        mobile=mobile,
        postprocess=postprocess,
        extra=extra,
    )


def build_unet(config: UNetConfig, *, data, stats=None) -> SeparationModel:
    """One dedicated U-Net per target in `data.targets`."""
    return _build("unet", config, data, stats)


def build_m_unet(config: MUNetConfig, *, data, stats=None) -> SeparationModel:
    """One U-Net, one mask per target; `stats` gives the training-set energies for EBW (see `target_energies`)."""
    return _build("m_unet", config, data, stats)


def build_c_unet(config: CUNetConfig, *, data, stats=None) -> SeparationModel:
    """One FiLM-conditioned U-Net run once per target."""
    return _build("c_unet", config, data, stats)


# registry entries (`models.unet:<name>`): each exposes `Config` and `build` like a family module
dedicated = SimpleNamespace(Config=UNetConfig, build=build_unet)
multi_channel = SimpleNamespace(Config=MUNetConfig, build=build_m_unet)
conditioned = SimpleNamespace(Config=CUNetConfig, build=build_c_unet)
