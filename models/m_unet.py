"""M-U-Net (Kadandale et al. 2020): one U-Net with one ReLU mask per target and channel, on the log of the mixture
magnitude warped onto a log-frequency axis; multi-task loss weighting in `models/loss_weighting.py`.

The authors' code (github.com/vskadandale/multichannel-unet-bss, commit 5d979a76): `train/*.py` build
`flerken.models.UNet([32, 64, 128, 256, 512, 1024, 2048], K, None, useBN=True, dropout=0.1)` (flerken
`flerken/models/UNet.py` of flerken-nightly 0.4.post10, the version requirements.txt pins) inside
`models/wrapper.py`'s `Wrapper`:

    input     warp |X| `(512 bins, 256 frames)` onto 256 log-frequency rows (`utils.warpgrid(warp=True)`,
              bilinear `F.grid_sample`), log -> U-Net -> ReLU -> masks `(K, 256, 256)`
    encoder   6 x [Conv 3x3 -> BN -> LeakyReLU(0.1) -> Dropout2d -> Conv 3x3 -> BN -> LeakyReLU(0.1) -> Dropout2d]
              (32 ... 1024 channels) -> skip, MaxPool 2x2
    bottom    Conv 3x3 (1024 -> 2048) -> BN -> LReLU -> Conv 3x3 -> BN -> LReLU -> ConvTranspose 2x2 stride 2 (-> 1024)
    decoder   6 x [concat(x, skip) -> Conv 3x3 (2d -> d) -> BN -> Dropout2d -> LReLU -> Conv 3x3 -> BN -> LReLU ->
              Dropout2d -> ConvTranspose 2x2 stride 2 (d -> d/2)] (the last, at 32 channels, without the transposed
              conv), Conv 1x1 (32 -> K)
    truth     masks |S_k| / |X| on the warped grid, clamped to [0, 10]
    loss      L1 on the warped magnitudes mask x |X| (equal weights, DWA), or on the masks (EBW,
              `EnergyBasedLossPowerPMask`); `loss_domain` picks one explicitly
    output    masks unwarped to the linear frequency axis (`warpgrid(warp=False)`) x the mixture STFT

BatchNorm: PyTorch's defaults (momentum 0.1, eps 1e-5). 124,448,772 trainable parameters for K = 4 on a mono
input (the paper's ~124.4M). Kernels use Glorot-uniform (the code's `INITIALIZER = 'xavier'`), biases zero.

`F.grid_sample` samples both axes: time too, with the identity grid `linspace(-1, 1, 256)`; from PyTorch 1.3
(`align_corners=False`, the default since) that grid shifts frames by a fraction and blends in zeros at the
edges. `align_corners` selects PyTorch < 1.3's behaviour (time untouched). The warp is applied per patch of
`patch_frames` frames (the paper's 6 s excerpt = 256 frames), and the mixture magnitude gets a floor of 1e-30
before the log so that digital silence stays finite (the reference would give -inf).
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from configs.config import bounded, check_fields, choice
from configs.errors import ConfigError
from models import unet_core
from models.layers import MergePatches, SpectrogramPatches, check_stft, torch_batch_norm
from models.loss_weighting import DWA_VARIANTS, WEIGHTINGS, weighted_losses
from models.transforms import ComplexNorm, Float32Layer, complex_norm

LOSS_DOMAINS = ("auto", "magnitudes", "masks")
LOG_FLOOR = 1e-30


@dataclass(frozen=True)
class Config:
    """Defaults: the paper code's settings.py (10,880 Hz audio, NFFT 1022, hop 256, 256 frames, dropout 0.1)."""

    n_fft: int = 1022
    hop_length: int = 256
    # frames per U-Net patch (STFT_WIDTH); a multiple of 2 ** (nb_levels - 1)
    patch_frames: int = bounded(256, 1)
    log_bins: int = bounded(256, 1)  # rows of the log-frequency grid; a multiple of 2 ** (nb_levels - 1)
    first_filters: int = bounded(32, 1)
    nb_levels: int = bounded(7, 2)  # U-Net levels: channels first_filters * 2 ** level (32 ... 2048)
    dropout: float = bounded(0.1, 0, 1, high_open=True)
    mask_clamp: float = bounded(10.0, 0, low_open=True)  # ground-truth masks clamped to [0, mask_clamp]
    align_corners: bool = False  # grid_sample of PyTorch >= 1.3 (False) or < 1.3 (True)
    weighting: str = choice("dwa", WEIGHTINGS)  # equal | dwa | ebw
    dwa_temperature: float = bounded(2.0, 0, low_open=True)
    # softmax: the paper's K-way formula (and the authors' train/dwa.py today); first_two: their code at the
    # "EUSIPCO final configuration" commit 9eb7032, which weighted only the first two targets (models/loss_weighting)
    dwa_variant: str = choice("softmax", DWA_VARIANTS)
    # EBW: lambda_k = (E_max / E_k) ** ebw_power (the paper uses 1 and 2)
    ebw_power: float = bounded(1.0, 0, low_open=True)
    # auto (masks for EBW, magnitudes otherwise, as the code) | magnitudes | masks
    loss_domain: str = choice("auto", LOSS_DOMAINS)
    # 0: mask x mixture STFT (published); > 0: EM iterations of the Wiener filter
    wiener_iterations: int = bounded(0, 0)
    # patches per chunk of `separate` by default (ours: 2 x 256 frames = 2.97 s at 44.1 kHz, so that the
    # 124M-parameter network's activations keep a 10-minute song under 2 GB)
    separate_patches: int = bounded(2, 1)

    def __post_init__(self):
        key = "model.m_unet."
        check_fields(self, key)
        check_stft(key, self.n_fft, self.hop_length)
        multiple = 2 ** (self.nb_levels - 1)
        unet_core.check_patches(key, self.patch_frames, multiple, f"{self.nb_levels - 1} max-pools")
        if self.log_bins % multiple:
            raise ConfigError(f"{key}log_bins must be a positive multiple of {multiple} ({self.nb_levels - 1} "
                              f"max-pools), got {self.log_bins}")


# ---------------------------------------------------------------------------------------------- warping


def grid_sample_matrix(grid: np.ndarray, size_in: int, align_corners: bool) -> np.ndarray:
    """Bilinear `F.grid_sample` (zero padding) along one axis as a matrix `(len(grid), size_in)`.

    `grid` holds normalised coordinates in [-1, 1]; row r interpolates the input at that coordinate.
    """
    grid = np.asarray(grid, np.float64)
    if align_corners:
        position = (grid + 1) / 2 * (size_in - 1)
    else:
        position = ((grid + 1) * size_in - 1) / 2
    low = np.floor(position).astype(int)
    frac = position - low
    matrix = np.zeros((len(grid), size_in))
    for row, (index, weight) in enumerate(zip(low, frac)):
        for column, value in ((index, 1 - weight), (index + 1, weight)):
            if 0 <= column < size_in:
                matrix[row, column] += value
    return matrix


def warp_grid(size_out: int, warp: bool) -> np.ndarray:
    """The frequency coordinates of `utils.warpgrid`: log-warped (warp) or its inverse (unwarp)."""
    y = np.linspace(-1, 1, size_out)
    if warp:
        return (np.power(21.0, (y + 1) / 2) - 11) / 10
    return np.log(y * 10 + 11) / np.log(21) * 2 - 1


class Resample(Float32Layer):
    """`(N, T_in, F_in, D)` -> `(N, T_out, F_out, D)`: fixed interpolation matrices on the time and frequency axes."""

    def __init__(self, time_matrix=None, freq_matrix=None, **kwargs):
        super().__init__(**kwargs)
        self.time_matrix = np.asarray(time_matrix, np.float32)
        self.freq_matrix = np.asarray(freq_matrix, np.float32)

    def call(self, x):
        x = tf.einsum("gf,ntfd->ntgd", tf.constant(self.freq_matrix), x)
        return tf.einsum("ut,ntgd->nugd", tf.constant(self.time_matrix), x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.time_matrix.shape[0], self.freq_matrix.shape[0], input_shape[3])

    def get_config(self):
        return {**super().get_config(), "time_matrix": self.time_matrix.tolist(),
                "freq_matrix": self.freq_matrix.tolist()}


def warp_layers(config: Config, nb_bins: int, name: str):
    """(warp, unwarp) Resample layers for one patch: `(T, nb_bins)` <-> `(T, log_bins)`."""
    time = grid_sample_matrix(np.linspace(-1, 1, config.patch_frames), config.patch_frames, config.align_corners)
    warp = grid_sample_matrix(warp_grid(config.log_bins, warp=True), nb_bins, config.align_corners)
    unwarp = grid_sample_matrix(warp_grid(nb_bins, warp=False), config.log_bins, config.align_corners)
    return Resample(time, warp, name=f"{name}_warp"), Resample(time, unwarp, name=f"{name}_unwarp")


# ---------------------------------------------------------------------------------------------- network


def flerken_unet(patch_frames: int, log_bins: int, nb_in: int, nb_out: int, config: Config,
                 name: str = "m_unet") -> keras.Model:
    """flerken's `UNet(dims, K, None, useBN=True, dropout)`: `(N, T, log_bins, nb_in)` -> `(N, T, log_bins, nb_out)`,
    linear (the ReLU comes after, in `MaskPairs`).

    Axes: PyTorch's `(N, C, H = freq, W = time)` is ours `(N, T, F, C)`; `assign_flerken` transposes kernels.
    """
    dims = [config.first_filters * 2 ** level for level in range(config.nb_levels)]
    init = dict(kernel_initializer="glorot_uniform", bias_initializer="zeros")

    def conv(x, channels, label):
        return keras.layers.Conv2D(channels, 3, padding="same", name=f"{name}_{label}", **init)(x)

    def lrelu(x, label):
        return keras.layers.LeakyReLU(0.1, name=f"{name}_{label}")(x)

    def drop(x, label):
        if not config.dropout:
            return x
        return keras.layers.SpatialDropout2D(config.dropout, name=f"{name}_{label}")(x)  # torch Dropout2d

    spectrogram = keras.Input((patch_frames, log_bins, nb_in), name="log_magnitude")
    x, skips = spectrogram, []
    for level, channels in enumerate(dims[:-1]):  # ConvolutionalBlock
        block = f"down{level + 1}"
        x = drop(lrelu(torch_batch_norm(f"{name}_{block}_bn1")(conv(x, channels, f"{block}_conv1")), f"{block}_act1"),
                 f"{block}_drop1")
        x = drop(lrelu(torch_batch_norm(f"{name}_{block}_bn2")(conv(x, channels, f"{block}_conv2")), f"{block}_act2"),
                 f"{block}_drop2")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"{name}_{block}_pool")(x)
    # TransitionBlock (no dropout)
    x = lrelu(torch_batch_norm(f"{name}_bottom_bn1")(conv(x, dims[-1], "bottom_conv1")), "bottom_act1")
    x = lrelu(torch_batch_norm(f"{name}_bottom_bn2")(conv(x, dims[-1], "bottom_conv2")), "bottom_act2")
    x = keras.layers.Conv2DTranspose(dims[-2], 2, strides=2, name=f"{name}_bottom_up", **init)(x)
    for level in reversed(range(len(dims) - 1)):  # AtrousBlock; level 0 is the final block
        block, channels, final = f"up{level + 1}", dims[level], level == 0
        x = keras.layers.Concatenate(name=f"{name}_{block}_skip")([x, skips[level]])
        x = torch_batch_norm(f"{name}_{block}_bn1")(conv(x, channels, f"{block}_conv1"))
        x = lrelu(drop(x, f"{block}_drop1"), f"{block}_act1")
        x = lrelu(torch_batch_norm(f"{name}_{block}_bn2")(conv(x, channels, f"{block}_conv2")), f"{block}_act2")
        x = drop(x, f"{block}_drop2")
        if not final:
            x = keras.layers.Conv2DTranspose(dims[level - 1], 2, strides=2, name=f"{name}_{block}_up", **init)(x)
    outputs = keras.layers.Conv2D(nb_out, 1, name=f"{name}_final", **init)(x)
    return keras.Model(spectrogram, outputs, name=name)


# ------------------------------------------------------------------------------------------------ layers


class LogInput(Float32Layer):
    """Warped magnitude -> log(max(magnitude, 1e-30)) (the reference's `torch.log`, finite on silence)."""

    def call(self, magnitude):
        return tf.math.log(tf.maximum(magnitude, LOG_FLOOR))


class MaskPairs(Float32Layer):
    """[network output `(N, T, G, C * J)` channel-major, warped mixture `(N, T, G, C)`] ->
    `(N, T, G, C, 2, J)`: ReLU masks and the warped mixture magnitude side by side (the loss needs both)."""

    def __init__(self, nb_channels: int = 1, nb_targets: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.nb_channels = nb_channels
        self.nb_targets = nb_targets

    def call(self, outputs, warped):
        shape = tf.shape(outputs)
        masks = tf.nn.relu(tf.reshape(outputs, tf.concat([shape[:3], [self.nb_channels, self.nb_targets]], 0)))
        mixture = tf.broadcast_to(tf.stop_gradient(warped)[..., None], tf.shape(masks))
        return tf.stack([masks, mixture], axis=-2)

    def compute_output_shape(self, outputs_shape, warped_shape):
        return tuple(outputs_shape[:3]) + (self.nb_channels, 2, self.nb_targets)

    def get_config(self):
        return {**super().get_config(), "nb_channels": self.nb_channels, "nb_targets": self.nb_targets}


class UnwarpMasks(Float32Layer):
    """[training outputs `(B, F, G, C, 2, J)`, mixture STFT] -> linear-frequency masks `(B, F, nb_bins, C, J)`."""

    def __init__(self, patch_frames: int = 256, log_bins: int = 256, nb_bins: int = 512, unwarp=None, **kwargs):
        super().__init__(**kwargs)
        self.patch_frames = patch_frames
        self.log_bins = log_bins
        self.nb_bins = nb_bins
        self.unwarp = unwarp

    def call(self, outputs, mix_stft):
        masks = outputs[..., 0, :]  # (B, F, G, C, J)
        shape = tf.shape(masks)
        nb_channels, nb_targets = masks.shape[3], masks.shape[4]
        flat = tf.reshape(masks, tf.concat([shape[:3], [nb_channels * nb_targets]], 0))
        nb_frames = flat.shape[1] if flat.shape[1] is not None else tf.shape(flat)[1]
        nb_patches = -(-nb_frames // self.patch_frames)
        flat = tf.pad(flat, [[0, 0], [0, nb_patches * self.patch_frames - nb_frames], [0, 0], [0, 0]])
        patches = tf.reshape(flat, [-1, self.patch_frames, self.log_bins, nb_channels * nb_targets])
        linear = self.unwarp(patches)  # (N, T, nb_bins, C * J)
        linear = tf.reshape(linear, [shape[0], -1, self.nb_bins, nb_channels, nb_targets])[:, :nb_frames]
        return linear

    def compute_output_shape(self, outputs_shape, mix_stft_shape):
        return tuple(outputs_shape[:2]) + (self.nb_bins, outputs_shape[3], outputs_shape[5])


def pair_distance(domain: str, clamp: float):
    """(y_true `(..., 2)` [target warped magnitude, -], y_pred `(..., 2)` [mask, warped mixture]) -> L1 per example."""
    def distance(y_true, y_pred):
        y_true = tf.cast(y_true, y_pred.dtype)
        masks, mixture = y_pred[..., 0], y_pred[..., 1]
        truth = tf.clip_by_value(tf.math.divide_no_nan(y_true[..., 0], mixture), 0.0, clamp)
        error = masks - truth
        if domain == "magnitudes":
            error = error * mixture
        rank = len(error.shape)
        return tf.reduce_mean(tf.abs(error), axis=list(range(1, rank)))
    return distance


# ------------------------------------------------------------------------------------------------- build


def build(config: Config, *, data, stats=None):
    """One U-Net with nb_channels x nb_targets ReLU masks -> `models.base.SeparationModel`."""
    targets = tuple(data.targets)
    nb_targets, nb_channels = len(targets), data.nb_channels
    nb_bins = config.n_fft // 2 + 1

    analysis = unet_core.Analysis(config.n_fft, config.hop_length, name="stft")
    norm = ComplexNorm(name="magnitude")
    patches_layer = SpectrogramPatches(config.patch_frames, nb_bins, nb_bins, name="patches")
    warp, unwarp = warp_layers(config, nb_bins, "m_unet")
    log_input = LogInput(name="log")
    network = flerken_unet(config.patch_frames, config.log_bins, nb_channels, nb_channels * nb_targets, config)
    pairs = MaskPairs(nb_channels, nb_targets, name="mask_pairs")
    merge = MergePatches(config.log_bins, name="merge_patches")
    to_masks = UnwarpMasks(config.patch_frames, config.log_bins, nb_bins, unwarp, name="unwarp_masks")
    synthesis = unet_core.ApplyMasks(config.n_fft, config.hop_length, "centered", "zeros", config.wiener_iterations,
                                     name="reconstruct")  # every bin is estimated: nothing to extend

    def estimate(mix_stft):
        """Mixture STFT -> `(B, F, log_bins, C, 2, J)`: [ReLU mask, warped mixture magnitude] per target."""
        magnitude = norm(mix_stft)
        warped = warp(patches_layer(magnitude))
        return merge(pairs(network(log_input(warped)), warped), magnitude)

    def train_targets(stems):
        truth = {}
        for target in targets:
            magnitude = complex_norm(unet_core.analyse(stems[target], config.n_fft, config.hop_length))
            warped = merge(warp(patches_layer(magnitude)), magnitude)  # (B, F, G, C)
            truth[target] = tf.stack([warped, tf.zeros_like(warped)], axis=-1)
        return truth

    domain = config.loss_domain
    if domain == "auto":
        domain = "masks" if config.weighting == "ebw" else "magnitudes"
    weighting, loss, callbacks = weighted_losses(
        config.weighting, targets, stats, temperature=config.dwa_temperature, power=config.ebw_power,
        dwa_variant=config.dwa_variant,
        distance=pair_distance(domain, config.mask_clamp))

    def input_samples(n: int) -> int:
        return unet_core.whole_patches(n, n_fft=config.n_fft, hop_length=config.hop_length,
                                       patch_frames=config.patch_frames)

    return unet_core.assemble(
        name="m_unet", config=config, data=data, analysis=analysis, estimate=estimate, to_masks=to_masks,
        synthesis=synthesis, train_targets=train_targets, input_samples=input_samples, loss=loss,
        train_wrapper=weighting, callbacks=callbacks,
        training={"loss_weighting": weighting, "loss_domain": domain}, network=network,
        separation_chunk_samples=input_samples(config.separate_patches * config.patch_frames * config.hop_length))


# --------------------------------------------------------------------------------- weights from PyTorch

_BN = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"), ("running_var", "moving_variance"))


def flerken_mapping(nb_levels: int, name: str = "m_unet"):
    """THE mapping table flerken `UNet` state_dict -> our network: (source, our layer, our weight, kind).

    kind "conv": torch (out, in, kH = freq, kW = time) -> Keras (time, freq, in, out); "deconv": torch
    (in, out, kH, kW) -> Keras (time, freq, out, in); "copy" otherwise. `num_batches_tracked` has no
    counterpart (see `ignored_flerken`). flerken's decoder[j] is the block of level nb_levels - 1 - j.
    """
    rows = []

    def conv(source, layer):
        rows.extend([(f"{source}.weight", layer, "kernel", "conv"), (f"{source}.bias", layer, "bias", "copy")])

    def bn(source, layer):
        rows.extend((f"{source}.{theirs}", layer, ours, "copy") for theirs, ours in _BN)

    for level in range(nb_levels - 1):
        for k in (1, 2):
            conv(f"encoder.{level}.Conv{k}", f"{name}_down{level + 1}_conv{k}")
            bn(f"encoder.{level}.BN{k}", f"{name}_down{level + 1}_bn{k}")
    for k in (1, 2):
        conv(f"decoder.0.Conv{k}", f"{name}_bottom_conv{k}")
        bn(f"decoder.0.BN{k}", f"{name}_bottom_bn{k}")
    rows.extend([("decoder.0.AtrousConv.weight", f"{name}_bottom_up", "kernel", "deconv"),
                 ("decoder.0.AtrousConv.bias", f"{name}_bottom_up", "bias", "copy")])
    for j in range(1, nb_levels):
        level = nb_levels - 1 - j
        for k in (1, 2):
            conv(f"decoder.{j}.Conv{k}", f"{name}_up{level + 1}_conv{k}")
            bn(f"decoder.{j}.BN{k}", f"{name}_up{level + 1}_bn{k}")
        if level:
            rows.extend([(f"decoder.{j}.AtrousConv.weight", f"{name}_up{level + 1}_up", "kernel", "deconv"),
                         (f"decoder.{j}.AtrousConv.bias", f"{name}_up{level + 1}_up", "bias", "copy")])
    conv("final_conv", f"{name}_final")
    return rows


def assign_flerken(network: keras.Model, state_dict: dict, prefix: str = "") -> int:
    """Copies a flerken `UNet` state_dict (numpy values; `prefix` e.g. "model." for the authors' Wrapper) into
    `network` (`flerken_unet`); every tensor used once, every weight set once, shapes checked
    (`checkpoints.assign_layers`). Returns the count."""
    from models.checkpoints import assign_layers

    nb_levels = sum(1 for layer in network.layers if layer.name.endswith("_pool")) + 1
    tensors = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    steps = {key: "BatchNorm step counter (no Keras counterpart)" for key in tensors
             if key.endswith("num_batches_tracked")}
    kernel = lambda k: np.transpose(k, (3, 2, 1, 0))  # noqa: E731 - PyTorch (C0, C1, H, W) -> ours (W = time, H, C1, C0)
    return assign_layers(network, flerken_mapping(nb_levels, network.name), tensors, family="m_unet",
                         where="m_unet.assign_flerken", converts={"conv": kernel, "deconv": kernel}, ignorable=steps)
