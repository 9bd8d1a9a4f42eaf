"""C-U-Net (Meseguer-Brocal & Peeters 2019): one U-Net whose encoder is modulated by FiLM from a control network on
the one-hot target vector, run once per target.

As the authors' code (github.com/gabolsgabs/cunet, commit 56210332: cunet/train/models/cunet_model.py,
unet_model.py, control_models.py, FiLM_utils.py), on magnitude patches `(N, T, F, C)`:

    encoder  6 x [Conv2D 5x5 stride 2 (16 ... 512) -> BN -> FiLM (gamma * x + beta) -> LeakyReLU(0.2)]
    decoder  6 x [concat(x, encoder output) (not in the first) -> Conv2DTranspose 5x5 stride 2 (256, 128, 64, 32,
             16, then nb_channels) -> BN (-> Dropout 0.5 in blocks 2-4) -> ReLU (sigmoid in the last)]
    control  one-hot -> Dense+ReLU (16) -> [Dense+ReLU -> Dropout 0.5 -> BN] (256, 1024 complex; 64, 256 simple)
             -> linear gammas, betas: one per encoder layer ("simple") or per feature map ("complex", 1,008)
    estimate = mask x |X|
    kernels N(0, 0.02); BN momentum 0.9 in Keras's convention (= PyTorch's 0.1), epsilon 1e-3 (Keras default)

Input (cunet/preprocess/spectrogram.py `spec_mag`): mono 8,192 Hz, n_fft 1024, hop 256, the first 512 bins,
128-frame patches (config.INPUT_SHAPE), magnitude min-max normalised per track. With `input_norm="minmax"`
the network sees the magnitude normalised over the whole input (a whole track at separation, the excerpt in
training) and its mask multiplies the raw magnitude (the normalisation is affine, the mask unchanged).

`train_model` runs the U-Net once per target by tiling the batch nb_targets times with the one-hot vectors: every
example trains every condition (nb_targets U-Net passes per example) instead of sampling one condition per
example as the authors' generator does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import keras
import tensorflow as tf

from configs.config import bounded, check_fields, choice
from configs.errors import ConfigError
from models import unet_core
from models.layers import MergePatches, SpectrogramPatches, check_stft
from models.loss_weighting import WeightedL1
from models.transforms import ComplexNorm, Float32Layer, complex_norm

NB_LAYERS = 6
MULTIPLE = 2 ** NB_LAYERS
FILMS = ("simple", "complex")
INPUT_NORMS = ("minmax", "none")
BN_MOMENTUM = 0.9  # the code's BatchNormalization(momentum=0.9): Keras convention


@dataclass(frozen=True)
class Config:
    """Defaults: the C-U-Net code's (n_fft 1024, hop 256, 512 bins x 128 frames, complex dense control)."""

    n_fft: int = 1024
    hop_length: int = 256
    max_bin: int = bounded(512, 0)
    patch_frames: int = bounded(128, 1)
    first_filters: int = bounded(16, 1)
    dropout: float = bounded(0.5, 0, 1, high_open=True)  # decoder blocks 2-4
    # minmax: magnitude normalised to [0, 1] over the whole input | none
    input_norm: str = choice("minmax", INPUT_NORMS)
    mask_extension: str = choice("zeros", unet_core.MASK_EXTENSIONS)
    wiener_iterations: int = bounded(0, 0)
    # simple: one gamma, beta per encoder layer; complex: one per feature map
    film: str = choice("complex", FILMS)
    # dense control layers (ReLU; dropout 0.5 + BN after all but the first). C-U-Net code: simple (16, 64, 256),
    # complex (16, 256, 1024)
    control_units: Tuple[int, ...] = bounded((16, 256, 1024), 1, each=True)

    def __post_init__(self):
        key = "model.c_unet."
        check_fields(self, key)
        check_stft(key, self.n_fft, self.hop_length)
        unet_core.check_max_bin(key, self)
        unet_core.check_patches(key, self.patch_frames, MULTIPLE, "six stride-2 layers")
        if not self.control_units:
            raise ConfigError(f"config key '{key}control_units' must list at least one layer size; got []")


# ---------------------------------------------------------------------------------------------- layers


class FiLM(keras.layers.Layer):
    """[features `(N, F, K, D)`, gamma `(N, D or 1)`, beta `(N, D or 1)`] -> gamma * features + beta (global)."""

    def call(self, features, gamma, beta):
        return features * gamma[:, None, None, :] + beta[:, None, None, :]

    def compute_output_shape(self, features_shape, gamma_shape, beta_shape):
        return tuple(features_shape)


class TileTargets(keras.layers.Layer):
    """Patches `(N, F, K, C)` -> [`(J * N, F, K, C)` target-major, one-hot conditions `(J * N, J)`]."""

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
    """Masks `(J * N, F, K, C)` target-major -> `(N, F, K, C, J)`."""

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


class MinMaxNorm(Float32Layer):
    """`(B, F, K, C)` -> (x - min) / (max - min) over all but the batch axis (`spec_mag(norm=True)`); 0 if constant."""

    def call(self, magnitude):
        low = tf.reduce_min(magnitude, axis=[1, 2, 3], keepdims=True)
        high = tf.reduce_max(magnitude, axis=[1, 2, 3], keepdims=True)
        return tf.math.divide_no_nan(magnitude - low, high - low)


class ApplyPatchMasks(Float32Layer):
    """[masks `(B, F, K, C, J)`, magnitude `(B, F, K, C)`] -> estimates mask x magnitude."""

    def call(self, masks, magnitude):
        return masks * magnitude[..., None]

    def compute_output_shape(self, masks_shape, magnitude_shape):
        return tuple(masks_shape)


class EstimateMasks(Float32Layer):
    """[estimates `(B, F, max_bin, C, J)`, mixture STFT] -> masks estimate / |X| (the sigmoid masks back)."""

    def call(self, estimates, mix_stft):
        magnitude = complex_norm(mix_stft)[:, :, : estimates.shape[2], :, None]
        return tf.math.divide_no_nan(estimates, magnitude)

    def compute_output_shape(self, estimates_shape, mix_stft_shape):
        return tuple(estimates_shape)


# ---------------------------------------------------------------------------------------------- network


def encoder_filters(first_filters: int) -> Tuple[int, ...]:
    return tuple(first_filters * 2 ** layer for layer in range(NB_LAYERS))


def control_network(condition, config: Config, filters, name: str):
    """C-U-Net's dense control: one-hot -> Dense+ReLU (-> Dropout 0.5 -> BN after the first) -> linear gammas, betas."""
    init = lambda: keras.initializers.RandomNormal(stddev=0.02)  # noqa: E731  one per layer: an instance repeats its values
    x = condition
    for index, units in enumerate(config.control_units):
        x = keras.layers.Dense(units, activation="relu", kernel_initializer=init(),
                               name=f"{name}_control{index + 1}")(x)
        if index:
            x = keras.layers.Dropout(0.5, name=f"{name}_control{index + 1}_dropout")(x)
            x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_control{index + 1}_bn")(x)
    nb_conditions = sum(filters) if config.film == "complex" else len(filters)
    gammas = keras.layers.Dense(nb_conditions, kernel_initializer=init(), name=f"{name}_gammas")(x)
    betas = keras.layers.Dense(nb_conditions, kernel_initializer=init(), name=f"{name}_betas")(x)
    return gammas, betas


def cunet(patch_frames: int, padded_bins: int, nb_channels: int, nb_targets: int, config: Config,
          name: str = "c_unet") -> keras.Model:
    """[patch `(N, T, F, C)`, one-hot `(N, J)`] -> masks `(N, T, F, C)` in [0, 1] (cunet_model.py)."""
    filters = encoder_filters(config.first_filters)
    init = lambda: keras.initializers.RandomNormal(stddev=0.02)  # noqa: E731
    spectrogram = keras.Input((patch_frames, padded_bins, nb_channels), name="spectrogram")
    condition = keras.Input((nb_targets,), name="condition")
    gammas, betas = control_network(condition, config, filters, name)

    x, encoded, offset = spectrogram, [], 0
    for index, f in enumerate(filters):
        x = keras.layers.Conv2D(f, 5, strides=2, padding="same", kernel_initializer=init(),
                                name=f"{name}_conv{index + 1}")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_conv{index + 1}_bn")(x)
        width = f if config.film == "complex" else 1
        start = offset if config.film == "complex" else index
        x = FiLM(name=f"{name}_film{index + 1}")(x, gammas[:, start:start + width], betas[:, start:start + width])
        offset += width
        x = keras.layers.LeakyReLU(0.2, name=f"{name}_conv{index + 1}_act")(x)
        encoded.append(x)
    for index in range(NB_LAYERS):
        final = index == NB_LAYERS - 1
        if index:
            x = keras.layers.Concatenate(name=f"{name}_skip{index}")([x, encoded[NB_LAYERS - index - 1]])
        units = nb_channels if final else filters[NB_LAYERS - index - 1] // 2
        x = keras.layers.Conv2DTranspose(units, 5, strides=2, padding="same", kernel_initializer=init(),
                                         name=f"{name}_deconv{index + 1}")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_deconv{index + 1}_bn")(x)
        if 1 <= index <= 3 and config.dropout:  # "not dropout in the first block and the last two"
            x = keras.layers.Dropout(config.dropout, name=f"{name}_deconv{index + 1}_dropout")(x)
        x = keras.layers.Activation("sigmoid" if final else "relu", name=f"{name}_deconv{index + 1}_act")(x)
    return keras.Model([spectrogram, condition], x, name=name)


# ------------------------------------------------------------------------------------------------ build


def build(config: Config, *, data, stats=None):
    """One FiLM-conditioned U-Net run once per target -> `models.base.SeparationModel`."""
    targets = tuple(data.targets)
    nb_targets, nb_channels = len(targets), data.nb_channels
    nb_bins = config.n_fft // 2 + 1
    max_bin = config.max_bin or nb_bins
    padded_bins = MULTIPLE * math.ceil(max_bin / MULTIPLE)

    analysis = unet_core.Analysis(config.n_fft, config.hop_length, name="stft")
    norm = ComplexNorm(name="magnitude")
    input_norm = MinMaxNorm(name="input_norm") if config.input_norm == "minmax" else None
    patches_layer = SpectrogramPatches(config.patch_frames, max_bin, padded_bins, name="patches")
    network = cunet(config.patch_frames, padded_bins, nb_channels, nb_targets, config)
    tile = TileTargets(nb_targets, name="tile_targets")
    untile = UntileTargets(nb_targets, name="untile_targets")
    merge = MergePatches(max_bin, name="merge_patches")
    apply_masks = ApplyPatchMasks(name="apply_masks")
    to_masks = EstimateMasks(name="estimate_masks")
    synthesis = unet_core.ApplyMasks(config.n_fft, config.hop_length, "centered", config.mask_extension,
                                     config.wiener_iterations, name="reconstruct")

    def estimate(mix_stft):
        """Mixture STFT -> magnitude estimates `(B, F, max_bin, C, J)`."""
        magnitude = norm(mix_stft)
        features = input_norm(magnitude) if input_norm is not None else magnitude
        tiled, conditions = tile(patches_layer(features))
        return apply_masks(merge(untile(network([tiled, conditions])), magnitude), magnitude[:, :, :max_bin])

    def train_targets(stems):
        return {target: complex_norm(unet_core.analyse(stems[target], config.n_fft, config.hop_length))[:, :, :max_bin]
                for target in targets}

    def input_samples(n: int) -> int:
        return unet_core.whole_patches(n, n_fft=config.n_fft, hop_length=config.hop_length,
                                       patch_frames=config.patch_frames)

    return unet_core.assemble(
        name="c_unet", config=config, data=data, analysis=analysis, estimate=estimate, to_masks=to_masks,
        synthesis=synthesis, train_targets=train_targets, input_samples=input_samples,
        loss={target: WeightedL1(name=f"l1_{target}") for target in targets},
        network=network, max_bin=max_bin)


# ------------------------------------------------------------------------------ weights from the authors


def cunet_mapping(nb_control: int, name: str = "c_unet"):
    """THE mapping table of the authors' `cunet_model()` (tf.keras auto names, in its creation order: the dense
    control, then encoder convs and BNs, then decoder transposed convs and BNs) -> our network:
    (source, our layer, our weight, kind); kind "swap" transposes the two spatial kernel axes (their
    `(freq, time)` input is our `(time, freq)`)."""
    def auto(kind, number):
        return kind if number == 0 else f"{kind}_{number}"

    bn_weights = ("gamma", "beta", "moving_mean", "moving_variance")
    rows = []
    for index in range(nb_control):
        layer = f"{name}_control{index + 1}"
        rows += [(f"{auto('dense', index)}/{w}", layer, w, "copy") for w in ("kernel", "bias")]
        if index:
            rows += [(f"{auto('batch_normalization', index - 1)}/{w}", f"{layer}_bn", w, "copy") for w in bn_weights]
    for offset, layer in ((0, "gammas"), (1, "betas")):
        dense = auto("dense", nb_control + offset)
        rows += [(f"{dense}/{w}", f"{name}_{layer}", w, "copy") for w in ("kernel", "bias")]
    first_bn = nb_control - 1
    for index in range(NB_LAYERS):
        rows += [(f"{auto('conv2d', index)}/kernel", f"{name}_conv{index + 1}", "kernel", "swap"),
                 (f"{auto('conv2d', index)}/bias", f"{name}_conv{index + 1}", "bias", "copy")]
        rows += [(f"{auto('batch_normalization', first_bn + index)}/{w}", f"{name}_conv{index + 1}_bn", w, "copy")
                 for w in bn_weights]
        rows += [(f"{auto('conv2d_transpose', index)}/kernel", f"{name}_deconv{index + 1}", "kernel", "swap"),
                 (f"{auto('conv2d_transpose', index)}/bias", f"{name}_deconv{index + 1}", "bias", "copy")]
        rows += [(f"{auto('batch_normalization', first_bn + NB_LAYERS + index)}/{w}", f"{name}_deconv{index + 1}_bn",
                  w, "copy") for w in bn_weights]
    return rows


def assign_cunet(network: keras.Model, tensors: dict, nb_control: int) -> int:
    """Copies the authors' weights {name (":0" optional): value} into `network` (`cunet`); every tensor used once,
    every weight set once, shapes checked (`checkpoints.assign_layers`). Returns the number assigned."""
    import numpy as np

    from models.checkpoints import assign_layers

    return assign_layers(network, cunet_mapping(nb_control, network.name),
                         {key.split(":")[0]: value for key, value in tensors.items()}, family="c_unet",
                         where="c_unet.assign_cunet", converts={"swap": lambda k: np.transpose(k, (1, 0, 2, 3))})
