"""TFC-TDF-UNet v3 (Kim, Kim & Kim, "Sound Demixing Challenge 2023 Music Demixing Track Technical Report:
TFC-TDF-UNet v3", KUIELab), in Keras: the complex spectrogram of the mixture in, the complex
spectrogram of every target out (no mask), then ISTFT.

    STFT (n_fft 8192, hop 1024), keep the lowest `dim_f` = 4096 bins (the Nyquist bin is dropped)
    -> real/imag x channels x `num_subbands` subbands folded into `dim_c` = 2·2·4 = 16 channels
    -> first conv 1x1 (dim_c -> c)
    -> encoder, `num_scales` times: TFC-TDF(c -> c) -> skip; downscale (norm, GELU, conv 2x2 stride 2, c -> c+g)
    -> bottleneck TFC-TDF(c -> c)
    -> decoder, `num_scales` times: upscale (norm, GELU, transposed conv 2x2 stride 2, c -> c-g);
       concat(skip) -> TFC-TDF(2c -> c)
    -> x * first conv output -> concat(folded mixture) -> conv 1x1 (c+dim_c -> c) -> GELU
    -> conv 1x1 (c -> nb_targets·dim_c) -> unfold -> {target: spectrogram}

TFC-TDF block (`num_blocks_per_scale` of them): shortcut = conv 1x1; x = TFC1(x); x = x + TDF(x);
x = TFC2(x); x = x + shortcut, with TFC = InstanceNorm (affine) -> GELU -> conv 3x3 and
TDF = norm -> GELU -> linear over the frequency axis f -> f/bn -> norm -> GELU -> linear f/bn -> f.
No convolution or linear layer has a bias. Initialisation follows PyTorch's defaults.

Tensors are channels last, time before frequency: `(nb_samples, nb_frames, nb_bins, features)` (the
reference's `(b, c, t, f)` after its transpose), so the TDF's linear layers act on the last axis
after a permute. The network needs `nb_frames` to be a multiple of `2 ** num_scales`: the separator
zero-pads the frames and crops them again, `input_samples` rounds excerpt lengths down to such a frame
count (`hop_length * (dim_t - 1)` samples gives exactly `dim_t` frames, the reference's chunk).

Trainable parameters: 30,119,168 for the SDX23 configuration (c = g = 64, 4 targets; the "~30M" of
the report), 111,994,368 for the MUSDB18 configuration (c = g = 128); derivation in
tests/test_tfc_tdf_unet.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import tensorflow as tf

from configs.config import bounded, check_fields, choice
from configs.errors import CheckpointError, ConfigError
from models.base import InferencePieces, SeparationModel
from models.layers import CropFrames, PadFrames, check_stft, torch_uniform
from models.transforms import ISTFT, STFT, stft

LOSSES = ("mse", "quantile_coarse", "quantile_element")
DEFAULT_QUANTILE = {"quantile_coarse": 0.4, "quantile_element": 0.93}  # label noise (A), bleeding (B)


@dataclass(frozen=True)
class Config:
    """SDX23 leaderboard A/B configuration (kuielab/sdx23 `ckpts/modelA/config.yaml`); targets from `data`."""

    n_fft: int = 8192
    hop_length: int = 1024
    dim_f: int = bounded(4096, 1)  # bins fed to the network; the bins above (Nyquist) are estimated as zero
    dim_t: int = bounded(256, 1)  # frames of a training chunk: hop_length * (dim_t - 1) = 261,120 samples
    num_subbands: int = bounded(4, 1)
    num_scales: int = bounded(5, 1)
    num_blocks_per_scale: int = bounded(2, 1)
    num_channels: int = bounded(64, 1)
    growth: int = bounded(64, 0)
    bottleneck_factor: int = bounded(4, 1)
    inference_dim_t: int = bounded(1024, 1)  # frames of the SDX23 inference chunk (`inference.dim_t`)
    num_overlap: int = bounded(8, 1)  # inference chunks overlap so that hop = chunk / num_overlap
    # frames of the chunk `separate` uses by default (ours, not the reference's: at the SDX23 size a frame costs
    # about 2 MB of activations, so 10 s chunks peak at 2.5 GB; 128 frames = 2.95 s keep a 10-minute song under 2 GB)
    separate_dim_t: int = bounded(128, 1)
    loss: str = choice("mse", LOSSES)  # mse | quantile_coarse | quantile_element
    # q of the quantile losses; None: 0.4 coarse, 0.93 element
    quantile: Optional[float] = bounded(None, 0, 1, low_open=True, high_open=True)
    # waveform: the loss compares waveforms after the ISTFT (seed 000 §3.2.2; kuielab/sdx23 src/train.py applies
    # `masked_loss` to the model's waveform output), the quantile mask then acting on samples along time;
    # spectrogram: on the complex STFT bins (our earlier variant)
    loss_domain: str = choice("waveform", ("waveform", "spectrogram"))

    def __post_init__(self):
        key = "model.tfc_tdf_v3."
        check_fields(self, key)
        check_stft(key, self.n_fft, self.hop_length)
        if self.dim_f > self.n_fft // 2 + 1:
            raise ConfigError(f"{key}dim_f must lie in (0, n_fft/2 + 1], got {self.dim_f}")
        scale = 2 ** self.num_scales
        if self.dim_f % (self.num_subbands * scale):
            raise ConfigError(f"{key}dim_f={self.dim_f} must be a multiple of num_subbands * 2**num_scales = "
                              f"{self.num_subbands * scale}")
        if self.dim_f // (self.num_subbands * scale) < self.bottleneck_factor:
            raise ConfigError(f"{key}bottleneck_factor={self.bottleneck_factor} leaves no bins at the deepest scale "
                              f"({self.dim_f // (self.num_subbands * scale)} bins)")
        for name in ("dim_t", "inference_dim_t", "separate_dim_t"):
            if getattr(self, name) < scale or getattr(self, name) % scale:
                raise ConfigError(f"{key}{name} must be a positive multiple of 2**num_scales = {scale}")


# ----------------------------------------------------------------------------------------------- loss


def quantile(values, q: float):
    """The q-quantile of a 1-D tensor with linear interpolation (`torch.quantile`'s default)."""
    ordered = tf.sort(tf.reshape(values, [-1]))
    count = tf.shape(ordered)[0]
    position = q * tf.cast(count - 1, ordered.dtype)
    lower = tf.cast(tf.floor(position), tf.int32)
    upper = tf.minimum(lower + 1, count - 1)
    fraction = position - tf.cast(lower, ordered.dtype)
    low = tf.gather(ordered, lower)
    return low + fraction * (tf.gather(ordered, upper) - low)


def quantile_masked_loss(y_true, y_pred, q: float, coarse: bool):
    """Squared error with the entries at or above the q-quantile of the (detached) error zeroed.

    y_true, y_pred: `(nb_samples, ...)`, one target's truth and estimate.
    coarse: ℓ is averaged over every axis but the batch first and the quantile is taken over the batch
            items (noisy labels: whole excerpts are dropped); otherwise per element, over all of them
            (bleeding: loud leaked entries are dropped).
    returns mean(ℓ · 1[ℓ < τ]); masked entries count as zeros in the mean.
    """
    error = tf.square(tf.convert_to_tensor(y_pred, tf.float32) - tf.convert_to_tensor(y_true, tf.float32))
    if coarse:
        error = tf.reduce_mean(error, axis=tf.range(1, tf.rank(error)))
    detached = tf.stop_gradient(error)
    threshold = quantile(detached, q)
    return tf.reduce_mean(error * tf.cast(detached < threshold, error.dtype))


class QuantileMaskedLoss(keras.losses.Loss):
    """Keras wrapper of `quantile_masked_loss` (one target's output)."""

    def __init__(self, q: float = 0.4, coarse: bool = True, name: str = "quantile_masked", **kwargs):
        super().__init__(name=name, **kwargs)
        self.q = q
        self.coarse = coarse

    def call(self, y_true, y_pred):
        return quantile_masked_loss(y_true, y_pred, self.q, self.coarse)

    def get_config(self):
        return {**super().get_config(), "q": self.q, "coarse": self.coarse}


def make_loss(config: Config):
    if config.loss == "mse":
        return keras.losses.MeanSquaredError()
    q = config.quantile if config.quantile is not None else DEFAULT_QUANTILE[config.loss]
    return QuantileMaskedLoss(q, coarse=config.loss == "quantile_coarse", name=config.loss)


# --------------------------------------------------------------------------------------------- layers


class FoldSubbands(keras.layers.Layer):
    """`(nb_samples, nb_frames, nb_bins, nb_channels, 2)` -> `(nb_samples, nb_frames, dim_f / k, nb_channels·2·k)`.

    Keeps the lowest `dim_f` bins and cuts them into `k` subbands stacked on the feature axis; feature
    `(channel·2 + real/imag)·k + subband`, as the reference's `cac2cws`.
    """

    def __init__(self, dim_f: int, num_subbands: int, **kwargs):
        super().__init__(**kwargs)
        self.dim_f = dim_f
        self.num_subbands = num_subbands

    def call(self, spectrogram):
        k = self.num_subbands
        shape = tf.shape(spectrogram)
        features = spectrogram.shape[3] * 2
        x = tf.reshape(spectrogram[:, :, : self.dim_f], tf.stack([shape[0], shape[1], k, self.dim_f // k, features]))
        x = tf.transpose(x, [0, 1, 3, 4, 2])
        return tf.reshape(x, tf.stack([shape[0], shape[1], self.dim_f // k, features * k]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.dim_f // self.num_subbands,
                input_shape[3] * 2 * self.num_subbands)

    def get_config(self):
        return {**super().get_config(), "dim_f": self.dim_f, "num_subbands": self.num_subbands}


class UnfoldSubbands(keras.layers.Layer):
    """`(nb_samples, nb_frames, dim_f / k, nb_sources·nb_channels·2·k)` ->
    `(nb_samples, nb_frames, dim_f, nb_sources, nb_channels·2)`: `FoldSubbands` undone per source (`cws2cac`)."""

    def __init__(self, nb_sources: int, num_subbands: int, **kwargs):
        super().__init__(**kwargs)
        self.nb_sources = nb_sources
        self.num_subbands = num_subbands

    def call(self, x):
        k = self.num_subbands
        shape = tf.shape(x)
        sub_bins, features = x.shape[2], x.shape[3] // k
        x = tf.reshape(x, tf.stack([shape[0], shape[1], sub_bins, features, k]))
        x = tf.transpose(x, [0, 1, 4, 2, 3])  # (samples, frames, k, bins / k, features)
        return tf.reshape(x, tf.stack([shape[0], shape[1], sub_bins * k, self.nb_sources, features // self.nb_sources]))

    def compute_output_shape(self, input_shape):
        features = input_shape[3] // self.num_subbands
        return (input_shape[0], input_shape[1], input_shape[2] * self.num_subbands, self.nb_sources,
                features // self.nb_sources)

    def get_config(self):
        return {**super().get_config(), "nb_sources": self.nb_sources, "num_subbands": self.num_subbands}


class SourceSpectrograms(keras.layers.Layer):
    """`(nb_samples, nb_frames, dim_f, nb_sources, nb_channels·2)` ->
    `(nb_samples, nb_frames, nb_bins, nb_channels, nb_sources, 2)` (ISTFT's layout), bins above `dim_f` zero."""

    def __init__(self, nb_bins: int, **kwargs):
        super().__init__(**kwargs)
        self.nb_bins = nb_bins

    def call(self, x):
        shape = tf.shape(x)
        nb_sources, features = x.shape[3], x.shape[4]
        x = tf.reshape(x, tf.stack([shape[0], shape[1], shape[2], nb_sources, features // 2, 2]))
        x = tf.transpose(x, [0, 1, 2, 4, 3, 5])
        return tf.pad(x, [[0, 0], [0, 0], [0, self.nb_bins - shape[2]], [0, 0], [0, 0], [0, 0]])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.nb_bins, input_shape[4] // 2, input_shape[3], 2)

    def get_config(self):
        return {**super().get_config(), "nb_bins": self.nb_bins}


class PadBins(keras.layers.Layer):
    """`(nb_samples, nb_frames, dim_f, nb_channels, 2)` -> `(..., nb_bins, nb_channels, 2)`, bins above dim_f zero."""

    def __init__(self, nb_bins: int, **kwargs):
        super().__init__(**kwargs)
        self.nb_bins = nb_bins

    def call(self, x):
        return tf.pad(x, [[0, 0], [0, 0], [0, self.nb_bins - tf.shape(x)[2]], [0, 0], [0, 0]])

    def compute_output_shape(self, input_shape):
        return (*input_shape[:2], self.nb_bins, *input_shape[3:])

    def get_config(self):
        return {**super().get_config(), "nb_bins": self.nb_bins}


def _norm_act(x, name: str, axis: int = -1):
    # InstanceNorm2d(affine=True): per sample and channel over both spatial axes = one group per channel
    x = keras.layers.GroupNormalization(groups=-1, axis=axis, epsilon=1e-5, name=f"{name}_norm")(x)
    return keras.layers.Activation("gelu", name=f"{name}_gelu")(x)  # exact (erf) GELU, as nn.GELU()


def _conv(channels: int, kernel: int, name: str, stride: int = 1, transpose: bool = False):
    layer = keras.layers.Conv2DTranspose if transpose else keras.layers.Conv2D
    return layer(channels, kernel, strides=stride, padding="same" if kernel == 3 else "valid", use_bias=False,
                 kernel_initializer=torch_uniform(), name=name)


def tfc_tdf(x, channels: int, nb_blocks: int, bottleneck_factor: int, name: str):
    """TFC-TDF blocks on `(nb_samples, nb_frames, nb_bins, features)` -> `(..., channels)`; nb_bins must be static."""
    nb_bins = x.shape[2]
    dense = dict(use_bias=False, kernel_initializer=torch_uniform())
    for index in range(nb_blocks):
        prefix = f"{name}_{index}"
        shortcut = _conv(channels, 1, f"{prefix}_shortcut")(x)
        x = _conv(channels, 3, f"{prefix}_tfc1_conv")(_norm_act(x, f"{prefix}_tfc1"))
        # TDF: linear layers over the frequency axis, (samples, frames, channels, bins)
        y = keras.layers.Permute((1, 3, 2), name=f"{prefix}_tdf_to_bins")(x)
        y = keras.layers.Dense(nb_bins // bottleneck_factor, name=f"{prefix}_tdf_fc1", **dense)(
            _norm_act(y, f"{prefix}_tdf1", axis=2))
        y = keras.layers.Dense(nb_bins, name=f"{prefix}_tdf_fc2", **dense)(_norm_act(y, f"{prefix}_tdf2", axis=2))
        y = keras.layers.Permute((1, 3, 2), name=f"{prefix}_tdf_to_channels")(y)
        x = keras.layers.Add(name=f"{prefix}_tdf_residual")([x, y])
        x = _conv(channels, 3, f"{prefix}_tfc2_conv")(_norm_act(x, f"{prefix}_tfc2"))
        x = keras.layers.Add(name=f"{prefix}_residual")([x, shortcut])
    return x


def tfc_tdf_net(config: Config, nb_sources: int, nb_channels: int) -> keras.Model:
    """The U-Net on folded spectrograms: `(nb_samples, nb_frames, dim_f / k, dim_c)` ->
    `(nb_samples, nb_frames, dim_f / k, nb_sources·dim_c)`, nb_frames a multiple of 2 ** num_scales."""
    dim_c = config.num_subbands * nb_channels * 2
    c, g, l, bn = config.num_channels, config.growth, config.num_blocks_per_scale, config.bottleneck_factor
    mix = keras.Input((None, config.dim_f // config.num_subbands, dim_c), name="folded_mixture")

    first = x = _conv(c, 1, "first_conv")(mix)
    skips = []
    for scale in range(config.num_scales):
        x = tfc_tdf(x, c, l, bn, f"encoder{scale}")
        skips.append(x)
        x = _conv(c + g, 2, f"encoder{scale}_downscale", stride=2)(_norm_act(x, f"encoder{scale}_downscale"))
        c += g
    x = tfc_tdf(x, c, l, bn, "bottleneck")
    for scale in reversed(range(config.num_scales)):
        c -= g
        x = _conv(c, 2, f"decoder{scale}_upscale", stride=2, transpose=True)(_norm_act(x, f"decoder{scale}_upscale"))
        x = keras.layers.Concatenate(name=f"decoder{scale}_concat")([x, skips[scale]])
        x = tfc_tdf(x, c, l, bn, f"decoder{scale}")
    x = keras.layers.Multiply(name="first_conv_gate")([x, first])  # "reduce artifacts" in the reference
    x = keras.layers.Concatenate(name="final_concat")([mix, x])
    x = keras.layers.Activation("gelu", name="final_gelu")(_conv(c, 1, "final_conv1")(x))
    x = _conv(nb_sources * dim_c, 1, "final_conv2")(x)
    return keras.Model(mix, x, name="tfc_tdf_net")


# ---------------------------------------------------------------------------------------------- build


def valid_samples(config: Config, n: int) -> int:
    """`SeparationModel.input_samples`: the longest length <= n (at least one valid chunk) whose frame
    count `1 + length // hop_length` is a multiple of 2 ** num_scales: `hop_length * (frames - 1)`."""
    multiple = 2 ** config.num_scales
    frames = max(multiple, (int(n) // config.hop_length + 1) // multiple * multiple)
    return config.hop_length * (frames - 1)


def spectral_graphs(config: Config, targets, nb_channels: int, net: keras.Model):
    """(train_model, separator, make_mobile) around a folded-spectrogram network `net`; all share its weights."""
    targets = tuple(targets)
    nb_bins = config.n_fft // 2 + 1
    stft_layer = STFT(config.n_fft, config.hop_length, name="stft")
    fold = FoldSubbands(config.dim_f, config.num_subbands, name="fold_subbands")
    pad = PadFrames(2 ** config.num_scales, name="pad_frames")
    crop = CropFrames(name="crop_frames")
    unfold = UnfoldSubbands(len(targets), config.num_subbands, name="unfold_subbands")
    per_target = keras.layers.Reshape((-1, config.dim_f, nb_channels, 2), name="target_spectrogram")

    def sources(waveform):
        """-> `(nb_samples, nb_frames, dim_f, nb_sources, nb_channels·2)`."""
        folded = fold(stft_layer(waveform))
        return unfold(crop(net(pad(folded)), folded))

    def train_outputs(waveform):
        estimates = sources(waveform)
        return {target: per_target(estimates[:, :, :, index]) for index, target in enumerate(targets)}

    mixture = keras.Input((None, nb_channels), name="mixture")
    train_model = keras.Model(mixture, train_outputs(mixture), name="tfc_tdf_v3")

    istft_layer = ISTFT(config.n_fft, config.hop_length, name="istft")
    source_spectrograms = SourceSpectrograms(nb_bins, name="source_spectrograms")

    pad_bins = PadBins(nb_bins, name="pad_bins")

    def waveform_outputs(waveform):
        if config.loss_domain == "spectrogram":  # one ISTFT over every source
            waveforms = istft_layer(source_spectrograms(sources(waveform)), waveform)
            return {target: waveforms[..., index] for index, target in enumerate(targets)}
        # one ISTFT per target on 5-D tensors (TFLite's Pad takes at most 5 dimensions): the mobile graph too
        return {target: istft_layer(pad_bins(spectrogram), waveform)
                for target, spectrogram in train_outputs(waveform).items()}

    waveform = keras.Input((None, nb_channels), name="mixture")
    separator = keras.Model(waveform, waveform_outputs(waveform), name="tfc_tdf_v3_separator")
    if config.loss_domain == "waveform":
        train_model = separator  # the loss is on waveforms: training and separating are one graph

    def make_mobile(chunk: int) -> keras.Model:
        if valid_samples(config, chunk) != chunk:
            raise ValueError(f"chunk of {chunk} samples is not a valid TFC-TDF-UNet input; use input_samples() "
                             f"(e.g. {valid_samples(config, chunk)})")
        static = keras.Input((chunk, nb_channels), batch_size=1, name="mixture")
        # waveform in, one waveform per target out, in either loss domain: one ISTFT per target on 5-D tensors
        # (TFLite's Pad takes at most 5 dimensions)
        outputs = {target: istft_layer(pad_bins(spectrogram), static)
                   for target, spectrogram in train_outputs(static).items()}
        return keras.Model(static, outputs, name="tfc_tdf_v3_mobile")

    return train_model, separator, make_mobile


def build(config: Config, *, data, stats=None) -> SeparationModel:
    """TFC-TDF-UNet v3 for `data.targets` (one network, every target from it); `stats` is not needed."""
    targets = tuple(data.targets)
    nb_channels = data.nb_channels
    net = tfc_tdf_net(config, len(targets), nb_channels)
    train_model, separator, make_mobile = spectral_graphs(config, targets, nb_channels, net)

    def train_targets(stems):
        """Stems (loss_domain=waveform) or their STFTs `(nb_samples, nb_frames, dim_f, nb_channels, 2)`."""
        if config.loss_domain == "waveform":
            return {target: stems[target] for target in targets}
        return {target: stft(stems[target], config.n_fft, config.hop_length)[:, :, : config.dim_f]
                for target in targets}

    return SeparationModel(
        targets=targets,
        sample_rate=data.sample_rate,
        nb_channels=nb_channels,
        train_model=train_model,
        train_targets=train_targets,
        loss={target: make_loss(config) for target in targets},
        separator=separator,
        config=config,
        input_samples=lambda n: valid_samples(config, n),
        inference=InferencePieces(
            mobile=make_mobile,
            # the reference's inference chunks of inference_dim_t frames overlap so that their hop is
            # chunk / num_overlap (evaluate.overlap = 1 - 1/num_overlap)
            chunk_samples=config.hop_length * (config.inference_dim_t - 1),
            overlap=1.0 - 1.0 / config.num_overlap,
            separation_chunk_samples=config.hop_length * (config.separate_dim_t - 1),
            network=net,
        ),
    )


# ------------------------------------------------------------------------------ released checkpoints
def _release_config(path: Path, config: Optional[str]):
    """(checkpoint file, yaml file) of an MDX23C release: the .ckpt/.pth and its yaml (import.config, the
    yaml of the same name, or the only yaml in the folder)."""
    where = f"import {path}"
    if path.is_dir():
        weights = sorted(p for p in path.iterdir() if p.suffix in (".ckpt", ".pth", ".pt"))
        if len(weights) != 1:
            raise CheckpointError(f"{where}: expected one .ckpt/.pth file in the folder, found {len(weights)}; "
                                  "pass the checkpoint file itself")
        weights = weights[0]
    else:
        weights = path
    if config:
        yaml_file = Path(config)
    else:
        candidates = [weights.with_suffix(".yaml"), weights.with_suffix(".yml")]
        yamls = sorted(weights.parent.glob("*.yaml")) + sorted(weights.parent.glob("*.yml"))
        found = [c for c in candidates if c.is_file()] or (yamls if len(yamls) == 1 else [])
        if not found:
            raise CheckpointError(f"{where}: no yaml config beside the checkpoint; pass the release's config with "
                                  "import.config=<file.yaml>")
        yaml_file = found[0]
    if not yaml_file.is_file():
        raise CheckpointError(f"{where}: import.config={yaml_file} does not exist; pass the release's yaml config")
    return weights, yaml_file


def read_released(path, config: Optional[str] = None, targets=(), **options):
    """An MDX23C / TFC-TDF-UNet v3 release: the checkpoint (`.ckpt`/`.pth`: the network's state dict, or a
    checkpoint dict holding it under `state_dict`) and its yaml config (audio / model / training / inference
    sections, as KUIELab's and ZFTurbo's code read them). Targets are `training.instruments`, or
    `[training.target_instrument]` when the model has one output."""
    from models.checkpoints import ReleasedCheckpoint, load_release_yaml, load_torch, set_option_keys, state_dict_of

    where = f"import {path}"
    set_option_keys(options, ("config", "targets"), where)
    weights, yaml_file = _release_config(Path(path), config)
    settings = load_release_yaml(yaml_file)
    try:
        audio, model, training = settings["audio"], settings["model"], settings["training"]
        unsupported = {"norm": (model.get("norm"), "InstanceNorm"), "act": (model.get("act", "gelu"), "gelu"),
                       "scale": (list(model.get("scale", [2, 2])), [2, 2])}
        for key, (value, ours) in unsupported.items():
            if value != ours:
                raise CheckpointError(f"{where}: {yaml_file.name} has model.{key}={value}; our TFC-TDF-UNet v3 is the "
                                      f"published {ours} network (no other setting can be imported)")
        released_targets = ([training["target_instrument"]] if training.get("target_instrument")
                            else list(training["instruments"]))
        overrides = {
            "model.name": "tfc_tdf_v3",
            "data.sample_rate": int(audio["sample_rate"]), "data.nb_channels": int(audio["num_channels"]),
            "data.targets": released_targets,
            "model.tfc_tdf_v3.n_fft": int(audio["n_fft"]), "model.tfc_tdf_v3.hop_length": int(audio["hop_length"]),
            "model.tfc_tdf_v3.dim_f": int(audio["dim_f"]), "model.tfc_tdf_v3.dim_t": int(audio["dim_t"]),
            **{f"model.tfc_tdf_v3.{key}": int(model[key]) for key in
               ("num_subbands", "num_scales", "num_blocks_per_scale", "num_channels", "growth", "bottleneck_factor")},
        }
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{where}: {yaml_file.name} is not a TFC-TDF-UNet v3 config (no {error}); "
                              "pass the yaml released with the checkpoint") from None
    inference = settings.get("inference") or {}
    if "dim_t" in inference:
        overrides["model.tfc_tdf_v3.inference_dim_t"] = int(inference["dim_t"])
    if "num_overlap" in inference:
        overrides["model.tfc_tdf_v3.num_overlap"] = int(inference["num_overlap"])
    if targets and list(targets) != released_targets:
        raise CheckpointError(f"{where}: the model has the outputs {released_targets} in this order; "
                              f"import.targets={list(targets)} cannot select among them, drop it")
    state = state_dict_of(load_torch(weights), weights)
    layout = state.layout
    prefixes = {name.split(".", 1)[0] for name in state}
    if prefixes == {"model"}:  # a Lightning module holding the network as `model`
        state = {name.split(".", 1)[1]: value for name, value in state.items()}
    if "first_conv.weight" not in state:
        raise CheckpointError(f"{where}: {weights.name} has no 'first_conv.weight'; it is not a TFC-TDF-UNet v3 "
                              "checkpoint (model.name names the family of the file)")
    return ReleasedCheckpoint(family="tfc_tdf_v3", config_overrides=overrides, tensors=state,
                              files=[weights, yaml_file],
                              description=f"TFC-TDF-UNet v3 {weights.name} ({', '.join(released_targets)}; {layout})")


def tfc_tdf_rows(net, config: Config, prefix: str = "") -> list:
    """The mapping table of KUIELab's `TFC_TDF_net` state dict onto `tfc_tdf_net` (shared with DTTNet's TFC-TDF
    parts where names agree). `prefix` is prepended to every source name."""
    from models.checkpoints import Assign, torch_conv_kernel, torch_transposed_kernel, transpose

    def norm(source, layer):
        layer = net.get_layer(layer)
        return [Assign((f"{prefix}{source}.weight",), layer.gamma), Assign((f"{prefix}{source}.bias",), layer.beta)]

    def conv(source, layer, convert=torch_conv_kernel):
        return [Assign((f"{prefix}{source}.weight",), net.get_layer(layer).kernel, convert)]

    def blocks(source, name):
        rows = []
        for index in range(config.num_blocks_per_scale):
            s, n = f"{source}.blocks.{index}", f"{name}_{index}"
            rows += norm(f"{s}.tfc1.0", f"{n}_tfc1_norm") + conv(f"{s}.tfc1.2", f"{n}_tfc1_conv")
            rows += norm(f"{s}.tdf.0", f"{n}_tdf1_norm") + conv(f"{s}.tdf.2", f"{n}_tdf_fc1", transpose)
            rows += norm(f"{s}.tdf.3", f"{n}_tdf2_norm") + conv(f"{s}.tdf.5", f"{n}_tdf_fc2", transpose)
            rows += norm(f"{s}.tfc2.0", f"{n}_tfc2_norm") + conv(f"{s}.tfc2.2", f"{n}_tfc2_conv")
            rows += conv(f"{s}.shortcut", f"{n}_shortcut")
        return rows

    rows = conv("first_conv", "first_conv")
    for scale in range(config.num_scales):
        rows += blocks(f"encoder_blocks.{scale}.tfc_tdf", f"encoder{scale}")
        rows += norm(f"encoder_blocks.{scale}.downscale.conv.0", f"encoder{scale}_downscale_norm")
        rows += conv(f"encoder_blocks.{scale}.downscale.conv.2", f"encoder{scale}_downscale")
    rows += blocks("bottleneck_block", "bottleneck")
    for index in range(config.num_scales):  # the reference's decoder_blocks[i] works at scale n - 1 - i
        scale = config.num_scales - 1 - index
        rows += norm(f"decoder_blocks.{index}.upscale.conv.0", f"decoder{scale}_upscale_norm")
        rows += conv(f"decoder_blocks.{index}.upscale.conv.2", f"decoder{scale}_upscale", torch_transposed_kernel)
        rows += blocks(f"decoder_blocks.{index}.tfc_tdf", f"decoder{scale}")
    rows += conv("final_conv.0", "final_conv1") + conv("final_conv.2", "final_conv2")
    return rows


def assign_released(model: SeparationModel, released) -> dict:
    """KUIELab's TFC_TDF_net state dict -> our network: the one mapping table of this family."""
    from models.checkpoints import assign_table

    return assign_table(tfc_tdf_rows(model.inference.network, model.config), released, model.train_model.weights,
                        where="import tfc_tdf_v3")
