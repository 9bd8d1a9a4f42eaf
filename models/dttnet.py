"""DTTNet, the Dual-Path TFC-TDF UNet (Chen, Vekkot & Shukla, ICASSP 2024), in Keras: one network per target.

    STFT (n_fft 6144, hop 1024), keep the lowest `dim_f` bins (2048; 864 for bass) as real/imag features
    -> first conv 1x1 (4 -> g) -> BN -> ReLU
    -> encoder, `num_scales` (2) times: TFC-TDF-Res2(c) -> skip; conv 2x2 stride 2 (c -> c+g) -> BN -> ReLU
    -> latent: TFC-TDF-Res2(c), then the Improved Dual-Path Module
    -> decoder: transposed conv 2x2 stride 2 (c -> c-g) -> BN -> ReLU; x * skip; TFC-TDF-Res2(c)
    -> conv 1x1 (g -> 4): the target's complex spectrogram (no mask) -> ISTFT

TFC-TDF-Res2 (the reference's `TFC_TDF_Res2`): res = TFC_1(x); x = TFC_l(x); x = x + TDF(x);
x = TFC_l(x); x = x + res, with TFC_l = l x (conv k x k with bias -> BN -> ReLU) and TDF = linear over
the frequency axis f -> f/bn (no bias) -> BN -> ReLU -> linear f/bn -> f -> BN -> ReLU.

Improved Dual-Path Module: the C channels are split into H heads folded into the batch (the heads
share weights); `num_dual_path_layers` times: GroupNorm -> BLSTM (hidden 2C/H per direction) -> linear
-> residual along time, then the same along frequency; the heads are merged back into C channels.
GroupNorm has (C/H) // 16 groups, normalising over channel groups and the sequence axis.

The LSTM is Open-Unmix's PyTorch-style layer (models/open_unmix.py): both biases `b_ih` and `b_hh`
(so the weight count is PyTorch's) and `unroll` over a static length, which is how the `mobile`
model converts to TFLite built-in ops.

Trainable parameters per target (the "4.97M" of the paper, derivation in tests/test_dttnet.py):
4,958,468 for vocals / drums / other and 4,184,388 for bass.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import tensorflow as tf

from configs.config import MUSDB_TARGETS, bounded, check_fields
from configs.errors import ConfigError
from models.base import InferencePieces, SeparationModel, TrainingHooks
from models.layers import LSTM, FusedBatchNormalization, check_stft
from models.layers import CropFrames, PadFrames, torch_uniform
from models.transforms import ISTFT, STFT


@dataclass(frozen=True)
class Config:
    """The paper's vocals model (DTTNet-Pytorch `configs/model/vocals.yaml`); bass gets its own bins and bn."""

    n_fft: int = 6144
    hop_length: int = 1024
    dim_f: int = 2048
    dim_t: int = 256  # frames of a training chunk: hop_length * (dim_t - 1) = 261,120 samples
    num_scales: int = bounded(2, 1)  # the reference's num_blocks = 5: 2 encoder blocks, the latent block, 2 decoder blocks
    tfc_layers: int = bounded(3, 1)  # l: convolutions per TFC
    growth: int = bounded(32, 1)  # g: first channel count and growth per scale
    kernel_size: int = bounded(3, 1)  # odd
    bottleneck_factor: int = 8  # bn of the TDF
    bass_dim_f: int = 864
    bass_bottleneck_factor: int = 2
    num_heads: int = bounded(2, 1)
    num_dual_path_layers: int = bounded(4, 1)
    group_size: int = bounded(16, 1)  # channels per GroupNorm group in the dual-path module
    inference_dim_t: int = 512  # the reference's inference chunk: hop_length * (2 dim_t - 1) samples
    num_overlap: int = bounded(4, 1)  # the reference's demix(inf_overf=4): chunk hop = chunk / 4
    # frames of the chunk `separate` uses by default (ours: the networks run one after another there, and 128
    # frames = 2.95 s keep a 10-minute song under 2 GB at the paper size)
    separate_dim_t: int = bounded(128, 1)
    unroll: bool = False  # unrolled LSTMs (static lengths); `mobile` always unrolls

    def __post_init__(self):
        key = "model.dttnet."
        check_fields(self, key)
        check_stft(key, self.n_fft, self.hop_length)
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"{key}kernel_size must be odd, got {self.kernel_size}")
        scale = 2 ** self.num_scales
        for bins, factor, name in ((self.dim_f, self.bottleneck_factor, "dim_f"),
                                   (self.bass_dim_f, self.bass_bottleneck_factor, "bass_dim_f")):
            if not 0 < bins <= self.n_fft // 2 + 1 or bins % scale:
                raise ConfigError(f"{key}{name}={bins} must be a multiple of 2**num_scales = {scale} in (0, n_fft/2 + 1]")
            if factor < 1 or bins // scale < factor:
                raise ConfigError(f"{key}the bottleneck factor of {name} must be in [1, {bins // scale}], got {factor}")
        if (self.growth * (self.num_scales + 1)) % self.num_heads:
            raise ConfigError(f"{key}the latent channels growth * (num_scales + 1) = "
                              f"{self.growth * (self.num_scales + 1)} must split into num_heads={self.num_heads}")
        for name in ("dim_t", "inference_dim_t", "separate_dim_t"):
            if getattr(self, name) < scale or getattr(self, name) % scale:
                raise ConfigError(f"{key}{name} must be a positive multiple of 2**num_scales = {scale}")

    def target_bins(self, target: str) -> tuple:
        """(dim_f, bottleneck_factor) of `target`'s network."""
        if target == "bass":
            return self.bass_dim_f, self.bass_bottleneck_factor
        return self.dim_f, self.bottleneck_factor


# --------------------------------------------------------------------------------------------- layers


def _shape(x) -> list:
    """Sizes of x: python ints where static, scalar tensors where not."""
    dynamic = tf.shape(x)
    return [size if size is not None else dynamic[axis] for axis, size in enumerate(x.shape)]


class DualPathModule(keras.layers.Layer):
    """Improved Dual-Path Module, `(nb_samples, nb_frames, nb_bins, channels)` -> same shape.

    Channels are split into `num_heads` heads of `channels / num_heads` features that share the
    weights; every layer runs GroupNorm -> BLSTM -> linear with a residual, first along the frames
    (one sequence per bin), then along the bins (one sequence per frame).
    """

    def __init__(self, channels: int, num_heads: int = 2, num_layers: int = 4, group_size: int = 16,
                 unroll: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.group_size = group_size
        self.unroll = unroll
        features = channels // num_heads
        hidden = 2 * channels // num_heads  # the reference's hidden_dim_size = 2 C, split over the heads
        groups = max(1, features // group_size)
        self.paths = []
        for index in range(num_layers):
            path = {}
            for axis in ("time", "freq"):
                path[axis] = (
                    keras.layers.GroupNormalization(groups, axis=-1, epsilon=1e-5, name=f"{axis}{index}_norm"),
                    LSTM(hidden, bidirectional=True, unroll=unroll, name=f"{axis}{index}_blstm"),
                    keras.layers.Dense(features, kernel_initializer=torch_uniform(), name=f"{axis}{index}_fc",
                                       bias_initializer=keras.initializers.RandomUniform(
                                           -(2 * hidden) ** -0.5, (2 * hidden) ** -0.5)),
                )
            self.paths.append(path)

    def build(self, input_shape):
        features = self.channels // self.num_heads
        hidden = 2 * self.channels // self.num_heads
        for path in self.paths:
            for norm, lstm, dense in path.values():
                norm.build((None, None, features))
                lstm.build((None, None, features))
                dense.build((None, None, 2 * hidden))

    def _along(self, x, layers):
        """x `(batch, nb_sequences, length, features)` -> x + fc(blstm(norm(x))) per sequence."""
        norm, lstm, dense = layers
        batch, nb_sequences, length, features = _shape(x)
        y = dense(lstm(norm(tf.reshape(x, [batch * nb_sequences, length, features]))))
        return x + tf.reshape(y, [batch, nb_sequences, length, features])

    def call(self, x):
        # static sizes where known: the unrolled LSTMs of the mobile model need static lengths
        batch, frames, bins, _ = shape = _shape(x)
        heads, features = self.num_heads, self.channels // self.num_heads
        x = tf.reshape(x, [batch, frames, bins, heads, features])
        x = tf.transpose(x, [0, 3, 2, 1, 4])  # (samples, heads, bins, frames, features)
        x = tf.reshape(x, [batch * heads, bins, frames, features])
        for path in self.paths:
            x = self._along(x, path["time"])  # sequences over frames, one per bin
            x = tf.transpose(x, [0, 2, 1, 3])
            x = self._along(x, path["freq"])  # sequences over bins, one per frame
            x = tf.transpose(x, [0, 2, 1, 3])
        x = tf.reshape(x, [batch, heads, bins, frames, features])
        x = tf.transpose(x, [0, 3, 2, 1, 4])
        return tf.reshape(x, shape)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "num_heads": self.num_heads,
                "num_layers": self.num_layers, "group_size": self.group_size, "unroll": self.unroll}


class ComplexFeatures(keras.layers.Layer):
    """`(nb_samples, nb_frames, nb_bins, nb_channels, 2)` -> `(nb_samples, nb_frames, dim_f, nb_channels·2)`."""

    def __init__(self, dim_f: int, **kwargs):
        super().__init__(**kwargs)
        self.dim_f = dim_f

    def call(self, spectrogram):
        shape = tf.shape(spectrogram)
        features = spectrogram.shape[3] * 2
        return tf.reshape(spectrogram[:, :, : self.dim_f], tf.stack([shape[0], shape[1], self.dim_f, features]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.dim_f, input_shape[3] * 2)

    def get_config(self):
        return {**super().get_config(), "dim_f": self.dim_f}


class ComplexSpectrogram(keras.layers.Layer):
    """`(nb_samples, nb_frames, dim_f, nb_channels·2)` -> `(nb_samples, nb_frames, nb_bins, nb_channels, 2)`, upper bins zero."""

    def __init__(self, nb_bins: int, **kwargs):
        super().__init__(**kwargs)
        self.nb_bins = nb_bins

    def call(self, x):
        shape = tf.shape(x)
        x = tf.reshape(x, tf.stack([shape[0], shape[1], shape[2], x.shape[3] // 2, 2]))
        return tf.pad(x, [[0, 0], [0, 0], [0, self.nb_bins - shape[2]], [0, 0], [0, 0]])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.nb_bins, input_shape[3] // 2, 2)

    def get_config(self):
        return {**super().get_config(), "nb_bins": self.nb_bins}


class After(keras.layers.Layer):
    """[x, previous] -> x, computed only once `previous` is: the separator runs the target networks one after
    another, so that one network's activations are alive at a time (a graph executor with several inter-op
    threads otherwise interleaves the four networks and holds their feature maps together)."""

    def call(self, x, previous):
        with tf.control_dependencies([previous]):
            return tf.identity(x)

    def compute_output_shape(self, x_shape, previous_shape):
        return x_shape


def _conv(x, channels: int, kernel: int, name: str, stride: int = 1, transpose: bool = False):
    """Conv with bias, PyTorch's default init: U(±1/sqrt(fan_in)) for kernel and bias (fan_in of a transposed
    conv from its output channels, as PyTorch computes it)."""
    layer = keras.layers.Conv2DTranspose if transpose else keras.layers.Conv2D
    bound = (kernel * kernel * (channels if transpose else x.shape[-1])) ** -0.5
    return layer(channels, kernel, strides=stride, padding="same" if stride == 1 else "valid",
                 kernel_initializer=torch_uniform(), bias_initializer=keras.initializers.RandomUniform(-bound, bound),
                 name=name)(x)


def _bn(name: str, axis: int = -1):
    # PyTorch defaults; fused: one op per training batch norm (40 per network at the default size)
    return FusedBatchNormalization(axis=axis, momentum=0.9, epsilon=1e-5, name=name)


def tfc(x, channels: int, layers: int, kernel: int, name: str):
    for index in range(layers):
        x = _conv(x, channels, kernel, f"{name}_{index}_conv")
        x = keras.layers.ReLU(name=f"{name}_{index}_relu")(_bn(f"{name}_{index}_bn")(x))
    return x


def tfc_tdf_res2(x, channels: int, layers: int, kernel: int, bottleneck_factor: int, name: str):
    """`TFC_TDF_Res2` on `(nb_samples, nb_frames, nb_bins, features)` -> `(..., channels)`; nb_bins static."""
    nb_bins = x.shape[2]
    res = tfc(x, channels, 1, kernel, f"{name}_res")
    x = tfc(x, channels, layers, kernel, f"{name}_tfc1")
    y = keras.layers.Permute((1, 3, 2), name=f"{name}_tdf_to_bins")(x)  # (samples, frames, channels, bins)
    for index, units in enumerate((nb_bins // bottleneck_factor, nb_bins)):
        y = keras.layers.Dense(units, use_bias=False, kernel_initializer=torch_uniform(), name=f"{name}_tdf_fc{index}")(y)
        y = keras.layers.ReLU(name=f"{name}_tdf_relu{index}")(_bn(f"{name}_tdf_bn{index}", axis=2)(y))
    y = keras.layers.Permute((1, 3, 2), name=f"{name}_tdf_to_channels")(y)
    x = keras.layers.Add(name=f"{name}_tdf_residual")([x, y])
    x = tfc(x, channels, layers, kernel, f"{name}_tfc2")
    return keras.layers.Add(name=f"{name}_residual")([x, res])


def dttnet_net(config: Config, dim_f: int, bottleneck_factor: int, nb_channels: int, unroll: bool,
               name: str, nb_frames: Optional[int] = None, batch_size: Optional[int] = None) -> keras.Model:
    """One target's network: features `(nb_samples, nb_frames, dim_f, nb_channels·2)` -> the same, the
    target's spectrogram; nb_frames a multiple of 2 ** num_scales (static with `unroll`)."""
    g, l, k = config.growth, config.tfc_layers, config.kernel_size
    features = keras.Input((nb_frames, dim_f, nb_channels * 2), batch_size=batch_size, name="features")
    x = _conv(features, g, 1, "first_conv")
    x = keras.layers.ReLU(name="first_relu")(_bn("first_bn")(x))
    c, skips = g, []
    for scale in range(config.num_scales):
        x = tfc_tdf_res2(x, c, l, k, bottleneck_factor, f"encoder{scale}")
        skips.append(x)
        x = _conv(x, c + g, 2, f"encoder{scale}_down", stride=2)
        x = keras.layers.ReLU(name=f"encoder{scale}_down_relu")(_bn(f"encoder{scale}_down_bn")(x))
        c += g
    x = tfc_tdf_res2(x, c, l, k, bottleneck_factor, "latent")
    x = DualPathModule(c, config.num_heads, config.num_dual_path_layers, config.group_size, unroll=unroll,
                       name="dual_path")(x)
    for scale in reversed(range(config.num_scales)):
        c -= g
        x = _conv(x, c, 2, f"decoder{scale}_up", stride=2, transpose=True)
        x = keras.layers.ReLU(name=f"decoder{scale}_up_relu")(_bn(f"decoder{scale}_up_bn")(x))
        x = keras.layers.Multiply(name=f"decoder{scale}_skip")([x, skips[scale]])
        x = tfc_tdf_res2(x, c, l, k, bottleneck_factor, f"decoder{scale}")
    x = _conv(x, nb_channels * 2, 1, "final_conv")
    return keras.Model(features, x, name=name)


# ---------------------------------------------------------------------------------------------- build


def valid_samples(config: Config, n: int) -> int:
    """`SeparationModel.input_samples`: the longest length <= n (at least one valid chunk) with a frame count
    `1 + length // hop_length` that is a multiple of 2 ** num_scales."""
    multiple = 2 ** config.num_scales
    frames = max(multiple, (int(n) // config.hop_length + 1) // multiple * multiple)
    return config.hop_length * (frames - 1)


def build(config: Config, *, data, stats=None) -> SeparationModel:
    """One DTTNet per target of `data.targets`, side by side in one keras.Model (disjoint weights, separable
    loss: fitting them together is fitting each alone, as the reference does); `stats` is not needed."""
    targets = tuple(data.targets)
    nb_channels = data.nb_channels
    nb_bins = config.n_fft // 2 + 1

    def networks(unroll: bool, **static):
        return {target: dttnet_net(config, *config.target_bins(target), nb_channels, unroll, f"dttnet_{target}",
                                   **static)
                for target in targets}

    nets = networks(config.unroll)
    stft_layer = STFT(config.n_fft, config.hop_length, name="stft")
    pad = PadFrames(2 ** config.num_scales, name="pad_frames")
    crop = CropFrames(name="crop_frames")
    istft_layer = ISTFT(config.n_fft, config.hop_length, name="istft")
    features = {target: ComplexFeatures(config.target_bins(target)[0], name=f"features_{target}")
                for target in targets}
    to_spectrogram = ComplexSpectrogram(nb_bins, name="spectrogram")

    def separate(waveform, by_target, in_turn: bool = False):
        """in_turn: each target's network starts after the previous target's waveform is out (same numbers)."""
        spectrogram = stft_layer(waveform)
        outputs, previous = {}, None
        for target in targets:
            x = features[target](spectrogram)
            if in_turn and previous is not None:
                x = After(name=f"after_{target}")(x, previous)
            estimate = to_spectrogram(crop(by_target[target](pad(x)), x))
            outputs[target] = previous = istft_layer(estimate, waveform)
        return outputs

    # the loss is on waveforms (the reference's L1 after ISTFT): training and separating compute the same, the
    # separator with the networks in turn (peak memory of `separate`: one network's activations, not four)
    mixture = keras.Input((None, nb_channels), name="mixture")
    model = keras.Model(mixture, separate(mixture, nets), name="dttnet")
    waveform = keras.Input((None, nb_channels), name="mixture")
    separator = keras.Model(waveform, separate(waveform, nets, in_turn=True), name="dttnet_separator")

    def make_mobile(chunk: int) -> keras.Model:
        """Static `(1, chunk, nb_channels)` -> {target: waveform}, LSTMs unrolled, weights copied from `nets`."""
        if valid_samples(config, chunk) != chunk:
            raise ValueError(f"chunk of {chunk} samples is not a valid DTTNet input; use input_samples() "
                             f"(e.g. {valid_samples(config, chunk)})")
        # a static input shape: SavedModel tracing of the nested models then never meets a dynamic length
        unrolled = networks(unroll=True, nb_frames=1 + chunk // config.hop_length, batch_size=1)
        for target in targets:
            unrolled[target].set_weights(nets[target].get_weights())
        static = keras.Input((chunk, nb_channels), batch_size=1, name="mixture")
        return keras.Model(static, separate(static, unrolled), name="dttnet_mobile")

    return SeparationModel(
        targets=targets,
        sample_rate=data.sample_rate,
        nb_channels=nb_channels,
        train_model=model,
        train_targets=lambda stems: {target: stems[target] for target in targets},
        loss={target: keras.losses.MeanAbsoluteError() for target in targets},
        separator=separator,
        config=config,
        input_samples=lambda n: valid_samples(config, n),
        # Grappler spent ~6 s of the first step optimising the training graph (default preset, 4 targets, batch 2:
        # first step 18.5 -> 13.2 s without it on a quiet 2-core machine; steady step within 4 %)
        training=TrainingHooks(graph_optimization=False),
        inference=InferencePieces(
            mobile=make_mobile,
            chunk_samples=config.hop_length * (config.inference_dim_t - 1),
            overlap=1.0 - 1.0 / config.num_overlap,
            separation_chunk_samples=config.hop_length * (config.separate_dim_t - 1),
            networks=nets,
        ),
    )


# ------------------------------------------------------------------------------ released checkpoints
def _count(state, prefix: str) -> int:
    """How many numbered children `prefix.<i>.` the state dict has."""
    found = {name[len(prefix):].split(".", 1)[0] for name in state if name.startswith(prefix)}
    return len([index for index in found if index.isdigit()])


def _network_settings(state: dict, where: str) -> dict:
    """The DPTDFNet hyper-parameters a released state dict implies (the reference never saves them)."""
    from configs.errors import CheckpointError

    try:
        n_fft = int(state["window"].shape[0])
        dim_f = n_fft // 2 + 1 - int(state["freq_pad"].shape[2])
        growth = int(state["first_conv.0.weight"].shape[0])
        num_scales = _count(state, "encoding_blocks.")
        tdf = state["encoding_blocks.0.tdf.0.weight"]
        settings = {
            "n_fft": n_fft, "dim_f": dim_f, "nb_channels": int(state["freq_pad"].shape[1]) // 2, "growth": growth,
            "num_scales": num_scales, "tfc_layers": _count(state, "encoding_blocks.0.tfc1.H."),
            "kernel_size": int(state["encoding_blocks.0.tfc1.H.0.0.weight"].shape[-1]),
            "bottleneck_factor": dim_f // int(tdf.shape[0]),
            "num_dual_path_layers": _count(state, "bottleneck_block2.bsrnn."),
            "num_heads": growth * (num_scales + 1) // int(state["bottleneck_block2.bsrnn.0.0.groupnorm.weight"].shape[0]),
        }
    except KeyError as error:
        raise CheckpointError(f"{where}: no tensor {error}; not a DTTNet (DPTDFNet) checkpoint "
                              "(model.name names the family of the file)") from None
    if "encoding_blocks.0.tdf.3.weight" not in state or "encoding_blocks.0.tdf.0.bias" in state:
        raise CheckpointError(f"{where}: the TDF is not the published one (two linear layers without bias, bn > 0); "
                              "it cannot be imported")
    if "encoding_blocks.0.tfc2.H.0.0.weight" not in state or "first_conv.1.running_mean" not in state:
        raise CheckpointError(f"{where}: not a TFC_TDF_Res2 network with BatchNorm (block_type / bn_norm differ "
                              "from the published DTTNet); it cannot be imported")
    return settings


def read_released(path, config: Optional[str] = None, targets=(), **options):
    """DTTNet's released Lightning checkpoints: `<target>.ckpt` files (one network each; a folder of them or
    one file), the network read from `state_dict`. The sizes come from the tensors themselves (the reference
    does not save its hyper-parameters); the hop length and chunk (`dim_t`) from the model yaml of the
    reference (`configs/model/<target>.yaml`, import.config) when given, else the published 1024 / 256."""
    from models.checkpoints import ReleasedCheckpoint, load_release_yaml, load_torch, set_option_keys, state_dict_of
    from configs.errors import CheckpointError

    where = f"import {path}"
    set_option_keys(options, ("config", "targets"), where)
    path = Path(path)
    if config and not Path(config).is_file():
        raise CheckpointError(f"{where}: import.config={config} does not exist; pass the reference's model yaml")
    yaml_settings = load_release_yaml(Path(config)) if config else {}
    if path.is_dir():
        files = {p.stem.split("-")[0].split("_")[0]: p for p in sorted(path.glob("*.ckpt"))}
        if targets:
            missing = [t for t in targets if t not in files]
            if missing:
                raise CheckpointError(f"{where}: no {missing[0]}.ckpt in the folder; import.targets names the "
                                      "checkpoints to import")
            files = {t: files[t] for t in targets}
        files = dict(sorted(files.items(), key=lambda item: (MUSDB_TARGETS.index(item[0]) if item[0] in MUSDB_TARGETS
                                                             else len(MUSDB_TARGETS), item[0])))
    else:
        target = (targets[0] if len(targets) == 1 else yaml_settings.get("target_name")
                  or path.stem.split("-")[0].split("_")[0])
        files = {target: path}
    if not files:
        raise CheckpointError(f"{where}: no .ckpt files; pass DTTNet's released <target>.ckpt files")
    tensors, per_target, layouts = {}, {}, set()
    for target, file in files.items():
        loaded = load_torch(file)
        state = state_dict_of(loaded, file)
        layouts.add(state.layout)
        per_target[target] = _network_settings(state, f"{where}: {file.name}")
        tensors.update({f"{target}/{name}": value for name, value in state.items()})
    shared = {k: v for k, v in next(iter(per_target.values())).items() if k not in ("dim_f", "bottleneck_factor")}
    for target, settings in per_target.items():
        clash = [k for k in shared if settings[k] != shared[k]]
        if clash:
            raise CheckpointError(f"{where}: {files[target].name} has {clash[0]}={settings[clash[0]]} but "
                                  f"{next(iter(files.values())).name} has {shared[clash[0]]}; import them separately")
    bands = {("bass" if t == "bass" else "other"): (s["dim_f"], s["bottleneck_factor"]) for t, s in per_target.items()}
    for target, settings in per_target.items():
        if (settings["dim_f"], settings["bottleneck_factor"]) != bands["bass" if target == "bass" else "other"]:
            raise CheckpointError(f"{where}: {files[target].name} has dim_f={settings['dim_f']} but the other "
                                  "non-bass targets differ; our DTTNet shares one band setting across them")
    main = bands.get("other", bands.get("bass"))
    bass = bands.get("bass", main)
    hop = int(yaml_settings.get("hop_length", 1024))
    dim_t = int(yaml_settings.get("dim_t", 256))
    overrides = {"model.name": "dttnet", "data.nb_channels": shared.pop("nb_channels"), "data.targets": list(files),
                 **{f"model.dttnet.{k}": v for k, v in shared.items()},
                 "model.dttnet.hop_length": hop, "model.dttnet.dim_t": dim_t,
                 "model.dttnet.inference_dim_t": 2 * dim_t,  # the reference's inference chunk: hop * (2 dim_t - 1)
                 "model.dttnet.dim_f": main[0], "model.dttnet.bottleneck_factor": main[1],
                 "model.dttnet.bass_dim_f": bass[0], "model.dttnet.bass_bottleneck_factor": bass[1]}
    # the checkpoints do not record the rate: the published models are 44.1 kHz (MUSDB18-HQ); a yaml may say otherwise
    overrides["data.sample_rate"] = int(yaml_settings.get("sample_rate", 44100))
    ignorable = {}
    for target in files:
        ignorable[f"{target}/window"] = "the STFT's Hann window (a frozen parameter; ours is computed)"
        ignorable[f"{target}/freq_pad"] = "zeros padding the bins above dim_f before the ISTFT (frozen)"
        for name in tensors:
            if name.startswith(f"{target}/") and name.endswith("num_batches_tracked"):
                ignorable[name] = "PyTorch's BatchNorm step counter (unused with momentum 0.1)"
    read = list(files.values()) + ([Path(config)] if config else [])
    return ReleasedCheckpoint(family="dttnet", config_overrides=overrides, tensors=tensors, files=read,
                              description=f"DTTNet Lightning checkpoints ({', '.join(files)}; {', '.join(sorted(layouts))})", ignorable=ignorable)




def assign_released(model: SeparationModel, released) -> dict:
    """DTTNet-Pytorch's DPTDFNet state dicts -> one Keras network per target: the one mapping table of this family."""
    from models.checkpoints import Assign, assign_table, transpose
    from models.checkpoints import torch_conv_kernel, torch_transposed_kernel

    config = model.config
    rows = []
    for target, net in model.inference.networks.items():
        def conv(source, layer, convert=torch_conv_kernel):
            layer = net.get_layer(layer)
            return [Assign((f"{target}/{source}.weight",), layer.kernel, convert),
                    Assign((f"{target}/{source}.bias",), layer.bias)]

        def bn(source, layer):
            layer = net.get_layer(layer)
            return [Assign((f"{target}/{source}.{name}",), variable) for name, variable in
                    (("weight", layer.gamma), ("bias", layer.beta), ("running_mean", layer.moving_mean),
                     ("running_var", layer.moving_variance))]

        def tfc(source, name, layers):
            found = []
            for index in range(layers):
                found += conv(f"{source}.H.{index}.0", f"{name}_{index}_conv") + bn(f"{source}.H.{index}.1",
                                                                                  f"{name}_{index}_bn")
            return found

        def block(source, name):
            found = tfc(f"{source}.res", f"{name}_res", 1) + tfc(f"{source}.tfc1", f"{name}_tfc1", config.tfc_layers)
            for index, (linear, norm) in enumerate(((0, 1), (3, 4))):
                found.append(Assign((f"{target}/{source}.tdf.{linear}.weight",),
                                    net.get_layer(f"{name}_tdf_fc{index}").kernel, transpose))
                found += bn(f"{source}.tdf.{norm}", f"{name}_tdf_bn{index}")
            return found + tfc(f"{source}.tfc2", f"{name}_tfc2", config.tfc_layers)

        rows += conv("first_conv.0", "first_conv") + bn("first_conv.1", "first_bn")
        for scale in range(config.num_scales):
            rows += block(f"encoding_blocks.{scale}", f"encoder{scale}")
            rows += conv(f"ds.{scale}.0", f"encoder{scale}_down") + bn(f"ds.{scale}.1", f"encoder{scale}_down_bn")
        rows += block("bottleneck_block1", "latent")
        dual_path = net.get_layer("dual_path")
        for index, path in enumerate(dual_path.paths):
            for along, axis in ((0, "time"), (1, "freq")):  # the reference's rnn_across_t, then rnn_across_k
                norm, lstm, dense = path[axis]
                source = f"{target}/bottleneck_block2.bsrnn.{index}.{along}"
                rows += [Assign((f"{source}.groupnorm.weight",), norm.gamma),
                         Assign((f"{source}.groupnorm.bias",), norm.beta),
                         Assign((f"{source}.fc.weight",), dense.kernel, transpose),
                         Assign((f"{source}.fc.bias",), dense.bias)]
                for direction, suffix in zip(lstm.directions, ("", "_reverse")):
                    rows += [Assign((f"{source}.rnn.weight_ih_l0{suffix}",), direction["kernel"], transpose),
                             Assign((f"{source}.rnn.weight_hh_l0{suffix}",), direction["recurrent_kernel"], transpose),
                             Assign((f"{source}.rnn.bias_ih_l0{suffix}",), direction["bias"]),
                             Assign((f"{source}.rnn.bias_hh_l0{suffix}",), direction["recurrent_bias"])]
        for index in range(config.num_scales):  # the reference's us[i] / decoding_blocks[i] work at scale n - 1 - i
            scale = config.num_scales - 1 - index
            rows += conv(f"us.{index}.0", f"decoder{scale}_up", torch_transposed_kernel) + bn(f"us.{index}.1",
                                                                                         f"decoder{scale}_up_bn")
            rows += block(f"decoding_blocks.{index}", f"decoder{scale}")
        rows += conv("final_conv.0", "final_conv")
    return assign_table(rows, released, model.train_model.weights, where="import dttnet")
