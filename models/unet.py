"""Dedicated U-Nets: one spectrogram U-Net per target, Spleeter's network (Hennequin et al. 2020) by default.

`network="spleeter"` is deezer/spleeter's `apply_unet` (spleeter/model/functions/unet.py, commit 64daa5a9) layer
for layer, on magnitude patches `(nb_patches, T, F, nb_channels)` (Spleeter's T = 512 frames, F = 1024 bins):

    encoder  6 x conv_i = Conv2D 5x5 stride 2 (16, 32, 64, 128, 256, 512), he_uniform; rel_i = act(BN(conv_i))
             (the bottleneck's BN + activation exist in Spleeter's graph but feed nothing: conv6 goes on raw)
    decoder  5 x [Conv2DTranspose 5x5 stride 2 (256, 128, 64, 32, 16) -> deconv act -> BN (-> Dropout 0.5 on the
             first three)] -> concat([conv_{6-i} (before its BN), that])
             Conv2DTranspose 5x5 stride 2 to 1 channel -> deconv act -> BN
             -> Conv2D 4x4 dilation 2 to nb_channels, sigmoid ("softmax": logits, softmax across the targets,
             Spleeter's `softmax_unet` of the 5-stem model)
    estimate = mask * |X| (L1 loss against the target magnitude, Spleeter's "L1_mask")
    activations: conv LeakyReLU(0.2) | ReLU | ELU, deconv ReLU | LeakyReLU(0.2) | ELU (Spleeter's
    `conv_activation` / `deconv_activation`; its 4- and 5-stem models use ELU for both)

9,822,725 trainable parameters per stereo target network.

`network="jansson"` is our reading of Jansson et al. 2017, Sec. 3 (no reference code was published), kept as an
option: conv -> BN -> LeakyReLU(0.2); deconv -> BN -> ReLU (-> Dropout 0.5 on the first three) -> concat with the
encoder *activation*; last deconv straight to nb_channels sigmoid masks (9,824,514 parameters, stereo).

Framing and separation (defaults: Spleeter's, spleeter/model/__init__.py `_build_stft_feature`, `_build_masks`):
`framing="spleeter"`: n_fft zeros before the signal, no centring, zero padded to whole frames; ISTFT drops the
leading n_fft samples. Training uses the same framing (one graph for training, separation and TFLite), where
Spleeter's data set frames its excerpts without the leading zeros (`compute_spectrogram_tf`): the first three
frames of a training excerpt see some of the zeros there.
`separation="ratio"`: masks = (estimate_j ** 2 + eps / J) / (sum_i estimate_i ** 2 + eps),
eps 1e-10 (`separation_exponent`, `EPSILON`), bins above max_bin get mask 0 (`mask_extension`), mask x mixture
STFT. `separation="direct"`: the network's own masks (estimate / |X|). `wiener_iterations` > 0 refines either.

Released Spleeter checkpoints (2/4/5 stems) import through `read_released` / `assign_released`.
"""
from __future__ import annotations

import math
import pathlib
import re
from dataclasses import dataclass
from typing import List, Tuple

import keras
import tensorflow as tf

from configs.config import bounded, check_fields, choice
from configs.errors import CheckpointError, ConfigError
from models import unet_core
from models.layers import ACTIVATIONS, MergePatches, SpectrogramPatches, StackTargets, activation, check_stft
from models.loss_weighting import WeightedL1
from models.transforms import ComplexNorm, Float32Layer, complex_norm

NB_LAYERS = 6  # stride-2 layers: both spectrogram axes must be multiples of 2 ** NB_LAYERS
MULTIPLE = 2 ** NB_LAYERS
NETWORKS = ("spleeter", "jansson")
MASK_ACTIVATIONS = ("sigmoid", "softmax")
SEPARATIONS = ("ratio", "direct")
EPSILON = 1e-10  # Spleeter's EstimatorSpecBuilder.EPSILON


@dataclass(frozen=True)
class Config:
    """Defaults: Spleeter's 44.1 kHz network (STFT 4096 / 1024, F = 1024 bins, T = 512 frames), 2-stem activations."""

    network: str = choice("spleeter", NETWORKS)  # spleeter | jansson (see the module docstring)
    n_fft: int = 4096
    hop_length: int = 1024
    # bins fed to the U-Net (from DC); 0: all n_fft // 2 + 1, zero-padded to a multiple of 64
    max_bin: int = bounded(1024, 0)
    patch_frames: int = bounded(512, 1)  # frames per U-Net patch; a multiple of 64
    first_filters: int = bounded(16, 1)  # encoder filters: first_filters * 2 ** layer (16 ... 512)
    dropout: float = bounded(0.5, 0, 1, high_open=True)  # on the first three decoder layers
    conv_activation: str = choice("leaky_relu", ACTIVATIONS)  # spleeter: leaky_relu (0.2) | relu | elu
    deconv_activation: str = choice("relu", ACTIVATIONS)  # spleeter: relu | leaky_relu (0.2) | elu
    # spleeter: sigmoid per target | softmax across targets (5 stems)
    mask_activation: str = choice("sigmoid", MASK_ACTIVATIONS)
    framing: str = choice("spleeter", unet_core.FRAMINGS)  # spleeter | centered (torch.stft(center=True))
    # ratio (Spleeter's ratio masks) | direct (the network's masks)
    separation: str = choice("ratio", SEPARATIONS)
    separation_exponent: float = bounded(2.0, 0, low_open=True)
    # bins above max_bin at separation: zeros | average (mean mask of the frame)
    mask_extension: str = choice("zeros", unet_core.MASK_EXTENSIONS)
    # 0: mask x mixture STFT; > 0: EM iterations of the multichannel Wiener filter
    wiener_iterations: int = bounded(0, 0)

    def __post_init__(self):
        key = "model.unet."
        check_fields(self, key)
        check_stft(key, self.n_fft, self.hop_length)
        unet_core.check_max_bin(key, self)
        unet_core.check_patches(key, self.patch_frames, MULTIPLE, "six stride-2 layers")
        if self.network == "jansson" and self.mask_activation != "sigmoid":
            raise ConfigError(f"{key}mask_activation=softmax needs network=spleeter; set model.unet.network=spleeter")


# ------------------------------------------------------------------------------------------- networks


def encoder_filters(first_filters: int) -> Tuple[int, ...]:
    return tuple(first_filters * 2 ** layer for layer in range(NB_LAYERS))


def spleeter_unet(patch_frames: int, padded_bins: int, nb_channels: int, config: Config, name: str) -> keras.Model:
    """Spleeter's `apply_unet` for one target: `(N, T, F, C)` -> masks in [0, 1] (sigmoid) or mask logits (softmax)."""
    filters = encoder_filters(config.first_filters)
    init = lambda: keras.initializers.HeUniform(seed=50)  # noqa: E731  spleeter: he_uniform(seed=50)
    conv_act = lambda n: activation(config.conv_activation, n)  # noqa: E731
    deconv_act = lambda n: activation(config.deconv_activation, n)  # noqa: E731

    spectrogram = keras.Input((patch_frames, padded_bins, nb_channels), name="spectrogram")
    x, convs = spectrogram, []
    for i, f in enumerate(filters):
        conv = keras.layers.Conv2D(f, 5, strides=2, padding="same", kernel_initializer=init(),
                                   name=f"{name}_conv{i + 1}")(x)
        convs.append(conv)
        if i < NB_LAYERS - 1:  # the bottleneck's BN and activation feed nothing in Spleeter's graph
            normed = keras.layers.BatchNormalization(name=f"{name}_conv{i + 1}_bn")(conv)
            x = conv_act(f"{name}_conv{i + 1}_act")(normed)
    x = convs[-1]
    for i, f in enumerate(reversed(filters[:-1])):
        up = keras.layers.Conv2DTranspose(f, 5, strides=2, padding="same", kernel_initializer=init(),
                                          name=f"{name}_deconv{i + 1}")(x)
        up = deconv_act(f"{name}_deconv{i + 1}_act")(up)
        up = keras.layers.BatchNormalization(name=f"{name}_deconv{i + 1}_bn")(up)
        if i < 3 and config.dropout:
            up = keras.layers.Dropout(config.dropout, name=f"{name}_deconv{i + 1}_dropout")(up)
        x = keras.layers.Concatenate(name=f"{name}_skip{i + 1}")([convs[-(i + 2)], up])
    up = keras.layers.Conv2DTranspose(1, 5, strides=2, padding="same", kernel_initializer=init(),
                                      name=f"{name}_deconv{NB_LAYERS}")(x)
    up = keras.layers.BatchNormalization(name=f"{name}_deconv{NB_LAYERS}_bn")(
        deconv_act(f"{name}_deconv{NB_LAYERS}_act")(up))
    masks = keras.layers.Conv2D(nb_channels, 4, dilation_rate=2, padding="same", kernel_initializer=init(),
                                activation="sigmoid" if config.mask_activation == "sigmoid" else None,
                                name=f"{name}_masks")(up)
    return keras.Model(spectrogram, masks, name=name)


def jansson_unet(patch_frames: int, padded_bins: int, nb_channels: int, config: Config, name: str) -> keras.Model:
    """Our reading of Jansson et al. 2017 (see the module docstring): `(N, T, F, C)` -> masks in [0, 1]."""
    filters = encoder_filters(config.first_filters)
    spectrogram = keras.Input((patch_frames, padded_bins, nb_channels), name="spectrogram")
    x, skips = spectrogram, []
    for i, f in enumerate(filters):
        x = keras.layers.Conv2D(f, 5, strides=2, padding="same", name=f"{name}_conv{i + 1}")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_conv{i + 1}_bn")(x)
        x = keras.layers.LeakyReLU(0.2, name=f"{name}_conv{i + 1}_act")(x)
        skips.append(x)
    for i, f in enumerate(reversed(filters[:-1])):
        x = keras.layers.Conv2DTranspose(f, 5, strides=2, padding="same", name=f"{name}_deconv{i + 1}")(x)
        x = keras.layers.ReLU(name=f"{name}_deconv{i + 1}_act")(
            keras.layers.BatchNormalization(name=f"{name}_deconv{i + 1}_bn")(x))
        if i < 3 and config.dropout:
            x = keras.layers.Dropout(config.dropout, name=f"{name}_deconv{i + 1}_dropout")(x)
        x = keras.layers.Concatenate(name=f"{name}_skip{i + 1}")([x, skips[-(i + 2)]])
    masks = keras.layers.Conv2DTranspose(nb_channels, 5, strides=2, padding="same", activation="sigmoid",
                                         name=f"{name}_deconv{NB_LAYERS}")(x)
    return keras.Model(spectrogram, masks, name=name)


class MaskPatches(Float32Layer):
    """[masks or logits `(N, T, F, C, J)`, patches `(N, T, F, C)`] -> estimates mask x patch (softmax over J first)."""

    def __init__(self, softmax: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.softmax = softmax

    def call(self, masks, patches):
        if self.softmax:
            masks = tf.nn.softmax(masks, axis=-1)
        return masks * patches[..., None]

    def compute_output_shape(self, masks_shape, patches_shape):
        return tuple(masks_shape)

    def get_config(self):
        return {**super().get_config(), "softmax": self.softmax}


class SeparationMasks(Float32Layer):
    """[estimates `(B, F, max_bin, C, J)`, mixture STFT] -> masks: Spleeter's ratio masks or estimate / |X|."""

    def __init__(self, separation: str = "ratio", exponent: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.separation = separation
        self.exponent = exponent

    def call(self, estimates, mix_stft):
        if self.separation == "ratio":
            return unet_core.ratio_masks(estimates, self.exponent, EPSILON)
        magnitude = complex_norm(mix_stft)[:, :, : estimates.shape[2], :, None]
        return tf.math.divide_no_nan(estimates, magnitude)

    def compute_output_shape(self, estimates_shape, mix_stft_shape):
        return tuple(estimates_shape)

    def get_config(self):
        return {**super().get_config(), "separation": self.separation, "exponent": self.exponent}


# ---------------------------------------------------------------------------------------------- build


def build(config: Config, *, data, stats=None):
    """One U-Net per target in `data.targets` -> `models.base.SeparationModel`."""
    targets = tuple(data.targets)
    nb_channels = data.nb_channels
    nb_bins = config.n_fft // 2 + 1
    max_bin = config.max_bin or nb_bins
    padded_bins = MULTIPLE * math.ceil(max_bin / MULTIPLE)
    if config.mask_activation == "softmax" and len(targets) < 2:
        raise ConfigError("model.unet.mask_activation=softmax needs at least two data.targets; use sigmoid")
    if config.separation == "ratio" and len(targets) < 2:  # one target's ratio mask is 1: the mixture
        raise ConfigError("model.unet.separation=ratio normalises the masks across data.targets and needs at least "
                          "two; set model.unet.separation=direct")

    # layers
    analysis = unet_core.Analysis(config.n_fft, config.hop_length, config.framing, name="stft")
    norm = ComplexNorm(name="magnitude")
    patches_layer = SpectrogramPatches(config.patch_frames, max_bin, padded_bins, name="patches")
    network = spleeter_unet if config.network == "spleeter" else jansson_unet
    networks = {target: network(config.patch_frames, padded_bins, nb_channels, config, name=f"unet_{target}")
                for target in targets}
    stack = StackTargets(name="stack_targets")
    mask_patches = MaskPatches(config.mask_activation == "softmax", name="mask_patches")
    merge = MergePatches(max_bin, name="merge_patches")
    to_masks = SeparationMasks(config.separation, config.separation_exponent, name="separation_masks")
    synthesis = unet_core.ApplyMasks(config.n_fft, config.hop_length, config.framing, config.mask_extension,
                                     config.wiener_iterations, name="reconstruct")

    def estimate(mix_stft):
        """Mixture STFT -> magnitude estimates `(B, F, max_bin, C, J)` (the training domain, stacked)."""
        magnitude = norm(mix_stft)
        patches = patches_layer(magnitude)
        masks = stack([networks[target](patches) for target in targets])
        return merge(mask_patches(masks, patches), magnitude)

    def train_targets(stems):
        return {target: complex_norm(unet_core.analyse(stems[target], config.n_fft, config.hop_length,
                                                       config.framing))[:, :, :max_bin, :]
                for target in targets}

    def input_samples(n: int) -> int:
        return unet_core.whole_patches(n, n_fft=config.n_fft, hop_length=config.hop_length,
                                       patch_frames=config.patch_frames, framing=config.framing)

    return unet_core.assemble(
        name="unet", config=config, data=data, analysis=analysis, estimate=estimate, to_masks=to_masks,
        synthesis=synthesis, train_targets=train_targets, input_samples=input_samples,
        loss={target: WeightedL1(name=f"l1_{target}") for target in targets},
        networks=networks, max_bin=max_bin)


# ------------------------------------------------------------------------------ Spleeter checkpoint import

from models.checkpoints import Assign, ReleasedCheckpoint, assign_table  # noqa: E402


# Spleeter's released models (spleeter/resources/{2,4,5}stems.json): instruments in graph order, activations
SPLEETER_RELEASES = {
    2: {"targets": ("vocals", "accompaniment"), "conv_activation": "leaky_relu", "deconv_activation": "relu",
        "mask_activation": "sigmoid"},
    4: {"targets": ("vocals", "drums", "bass", "other"), "conv_activation": "elu", "deconv_activation": "elu",
        "mask_activation": "sigmoid"},
    5: {"targets": ("vocals", "piano", "drums", "bass", "other"), "conv_activation": "elu",
        "deconv_activation": "elu", "mask_activation": "softmax"},
}
# Per instrument, Spleeter's `apply_unet` creates 7 Conv2D, 12 BatchNormalization and 6 Conv2DTranspose layers,
# named by tf.keras in creation order across the whole graph (conv2d, conv2d_1, ...).
CONVS, NORMS, DECONVS = 7, 12, 6
UNUSED_NORM = 5  # batch_normalization of conv6: created, never used
BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")


def spleeter_mapping(index: int, network: str) -> List[Tuple[str, str, str]]:
    """THE mapping table of target `index` (graph order): (Spleeter variable, our layer, our weight name).

    Spleeter creates, per instrument: conv1, bn1, ..., conv6, bn6 (unused), deconv1, bn7, ..., deconv6, bn12,
    the final 4x4 conv.
    """
    def suffix(kind, count, local):
        number = count * index + local
        return kind if number == 0 else f"{kind}_{number}"

    rows = []
    for i in range(NB_LAYERS):
        conv = suffix("conv2d", CONVS, i)
        rows += [(f"{conv}/{w}", f"{network}_conv{i + 1}", w) for w in ("kernel", "bias")]
        if i != UNUSED_NORM:
            bn = suffix("batch_normalization", NORMS, i)
            rows += [(f"{bn}/{w}", f"{network}_conv{i + 1}_bn", w) for w in BN_WEIGHTS]
    for i in range(NB_LAYERS):
        deconv = suffix("conv2d_transpose", DECONVS, i)
        rows += [(f"{deconv}/kernel", f"{network}_deconv{i + 1}", "kernel"),
                 (f"{deconv}/bias", f"{network}_deconv{i + 1}", "bias")]
        bn = suffix("batch_normalization", NORMS, NB_LAYERS + i)
        rows += [(f"{bn}/{w}", f"{network}_deconv{i + 1}_bn", w) for w in BN_WEIGHTS]
    last = suffix("conv2d", CONVS, NB_LAYERS)
    rows += [(f"{last}/kernel", f"{network}_masks", "kernel"), (f"{last}/bias", f"{network}_masks", "bias")]
    return rows


def unused_tensors(index: int) -> List[str]:
    """Spleeter variables of target `index` that the graph creates but never uses (the bottleneck BN)."""
    number = NORMS * index + UNUSED_NORM
    bn = "batch_normalization" if number == 0 else f"batch_normalization_{number}"
    return [f"{bn}/{w}" for w in BN_WEIGHTS]


_TRAINING_STATE = re.compile(r"(/Adam(_\d+)?$|^beta[12]_power|^global_step$|^Variable)")


def read_released(path: pathlib.Path, **options) -> ReleasedCheckpoint:
    """A Spleeter 2/4/5-stem TF1 checkpoint (a directory holding `checkpoint`, `model.index`, `model.data-*`, or a
    checkpoint prefix) -> tensors by Spleeter name and the config that builds the matching model.

    Optimizer slots and counters are left out; the bottleneck BNs Spleeter's graph creates but never uses are
    listed as ignorable. The number of stems comes from the number of conv layers.
    """
    from models.checkpoints import set_option_keys

    set_option_keys(options, (), "import (unet)")
    path = pathlib.Path(path)
    prefix = tf.train.latest_checkpoint(str(path)) if path.is_dir() else str(path)
    if not prefix or not pathlib.Path(prefix + ".index").exists():
        raise CheckpointError(f"unet.read_released: no TF checkpoint at {path}; pass a Spleeter model directory "
                              "(e.g. pretrained_models/4stems) holding checkpoint, model.index and model.data-*")
    reader = tf.train.load_checkpoint(prefix)
    names = [name for name in reader.get_variable_to_shape_map() if not _TRAINING_STATE.search(name)]
    nb_convs = sum(1 for name in names if re.fullmatch(r"conv2d(_\d+)?/kernel", name))
    nb_stems = nb_convs // CONVS
    if nb_convs % CONVS or nb_stems not in SPLEETER_RELEASES:
        raise CheckpointError(f"unet.read_released: {prefix} holds {nb_convs} conv2d kernels, not 7 per stem of a "
                              f"2, 4 or 5-stem Spleeter model; pass one of Spleeter's released checkpoints")
    release = SPLEETER_RELEASES[nb_stems]
    first_kernel = reader.get_tensor("conv2d/kernel")
    overrides = {
        "data.targets": list(release["targets"]), "data.sample_rate": 44100,
        "data.nb_channels": int(first_kernel.shape[2]),
        **{f"model.unet.{key}": value for key, value in {
            "network": "spleeter", "n_fft": 4096, "hop_length": 1024, "max_bin": 1024, "patch_frames": 512,
            "first_filters": int(first_kernel.shape[3]), "conv_activation": release["conv_activation"],
            "deconv_activation": release["deconv_activation"], "mask_activation": release["mask_activation"],
            "framing": "spleeter", "separation": "ratio", "separation_exponent": 2.0,
            "mask_extension": "zeros"}.items()},
    }
    tensors = {name: reader.get_tensor(name) for name in names}
    files = sorted(pathlib.Path(p) for p in pathlib.Path(prefix).parent.glob(pathlib.Path(prefix).name + ".*"))
    ignorable = {name: "the bottleneck BN Spleeter's graph creates but never uses"
                 for index in range(nb_stems) for name in unused_tensors(index)}
    return ReleasedCheckpoint(family="unet", config_overrides=overrides, tensors=tensors, files=files,
                              description=f"Spleeter {nb_stems} stems", ignorable=ignorable)


def assign_released(model, released: ReleasedCheckpoint) -> dict:
    """Copies every Spleeter tensor into `model` (built from `released.config_overrides`) through
    `spleeter_mapping`, checked by `models.checkpoints.assign_table`: every source tensor used once (the unused
    bottleneck BNs are ignorable), every weight of every target network assigned once, shapes equal."""
    rows = []
    for index, target in enumerate(model.targets):
        net = model.inference.networks[target]
        for source, layer_name, weight_name in spleeter_mapping(index, net.name):
            layer = net.get_layer(layer_name)
            variable = next(w for w in layer.weights if w.name == weight_name)
            rows.append(Assign((source,), variable))
    return assign_table(rows, released, model.train_model.weights, "unet.assign_released")
