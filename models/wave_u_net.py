"""Wave-U-Net (Stoller, Ewert & Dixon 2018, arXiv:1806.03185): a U-Net on the raw waveform.

Architecture, with L = `num_layers`, F_c = `num_initial_filters`, f = `filter_size`, m = `merge_filter_size`:

    down block i = 1..L:  Conv1D(F_c·i, f) + LeakyReLU  -> kept as the skip features of level i
                          then decimation by 2 (every other time step)
    bottleneck:           Conv1D(F_c·(L+1), f) + LeakyReLU
    up block i = L..1:    upsample ×2, concat with the skip features of level i (centre-cropped),
                          Conv1D(F_c·i, m) + LeakyReLU
    output:               concat with the input mixture (centre-cropped), 1×1 Conv1D per source
                          (`direct`), or for all sources but the last with the last one the mixture
                          minus their sum (`difference`: the estimates add up to the mixture exactly)

With `context` (the paper's "proper input context") every convolution is `valid`, and the model
predicts the centre of its input. Valid lengths are indexed by the length x of the bottleneck output
(at least the smallest x keeping every up-path feature map non-empty: x = m for the paper's depth):

    input  I(x) = 2^L (x + 2f - 3) - (f - 2)
    output O(x) = 2^L (x - m) + m
    context on each side (I - O) / 2 = 2^(L-1) (2f + m - 3) - (f + m - 2) / 2, the same for every x

The paper's setting (L=12, f=15, m=5) has x=9: input 147,443 -> output 16,389 samples, 65,527 samples
(2.97 s at 22,050 Hz) of context on each side. Without context (`same` convolutions) the input must be a
multiple of 2^L and the output has the input's length.

The separator (any length -> the same length) predicts a song as the reference's `Evaluate.predict_track`:
zero-padded by the context, in chunks of `predict_frames` (rounded up to an output length) output samples on
the output grid, the last chunk moved to end at the song's end. The decimation grid follows the chunk starts,
so only this reproduces the reference's separations with the same weights (`predict=one_pass`: one pass
over the whole song, a different separation).

Defaults are the paper's multi-instrument model M6 (M4 = difference output + input context + stereo,
applied to bass/drums/other/vocals), as in the reference code's `full_multi_instrument`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import keras
from keras import ops

from configs.config import bounded, check_fields, choice
from configs.errors import CheckpointError, ConfigError
from models.base import InferencePieces, SeparationModel
from models.transforms import Float32Layer

LEAKY_RELU_SLOPE = 0.2  # the reference code's LeakyReLU (Keras' own default slope would be 0.3)
UPSAMPLING = ("linear", "learned")
OUTPUT_TYPES = ("direct", "difference")
OUTPUT_ACTIVATIONS = ("tanh", "linear")
PREDICTIONS = ("chunks", "one_pass")


@dataclass(frozen=True)
class Config:
    num_layers: int = bounded(12, 1)  # L: down- and upsampling blocks
    num_initial_filters: int = bounded(24, 1)  # F_c: block i has F_c * i filters
    filter_size: int = bounded(15, 1)  # downsampling blocks and bottleneck
    merge_filter_size: int = bounded(5, 1)  # upsampling blocks
    # linear | learned (per-feature sigmoid-weighted interpolation, the paper's M5)
    upsampling: str = choice("linear", UPSAMPLING)
    output_type: str = choice("difference", OUTPUT_TYPES)  # direct | difference (last target = mixture - the others)
    # tanh | linear (identity in training, clipped to [-1, 1] at inference)
    output_activation: str = choice("tanh", OUTPUT_ACTIVATIONS)
    context: bool = True  # valid convolutions, output = centre of the input; False: same padding
    # learned upsampling's weights: glorot_uniform on the F logits, U(±sqrt(3/F)), as the reference's
    # tf.get_variable default (f90/Wave-U-Net Models/InterpolationLayer.py); zeros: start as linear interpolation
    interpolation_init: str = choice("glorot_uniform", ("glorot_uniform", "zeros"))
    # difference output clipped to [-1, 1] outside training (validation, evaluation, export), as the reference's
    # Utils.AudioClip in Models/OutputLayer.py `difference_output`; False: estimates sum to the mixture exactly
    clip_difference: bool = True
    # how the separator runs a song: `chunks` as the reference's Evaluate.predict_track (zero-pad by the context,
    # predict chunks of `predict_frames` output samples on the output grid, the last one moved to end at the
    # song's end; the decimation grid follows the chunks, so this is the only way to reproduce its output);
    # `one_pass`: the whole song through the network at once (a different, equally valid separation)
    predict: str = choice("chunks", PREDICTIONS)
    # output samples per chunk asked for, rounded up to the next length the network outputs (`input_samples`):
    # the reference's `num_frames` (Config.py, 16384 -> 16389 output / 147443 input samples for the paper's M6)
    predict_frames: int = bounded(16384, 1)

    def __post_init__(self):
        prefix = "model.wave_u_net."
        check_fields(self, prefix)
        if self.context and (self.filter_size % 2 == 0 or self.merge_filter_size % 2 == 0):
            raise ConfigError(f"{prefix}filter_size and {prefix}merge_filter_size must be odd with context=true "
                              f"(the output must be the exact centre of the input); got {self.filter_size} and "
                              f"{self.merge_filter_size}")


# --------------------------------------------------------------------------------------------
# Lengths (plain integers; the separator repeats `padded_length` on tensors)
# --------------------------------------------------------------------------------------------
def _ceil_div(a, b):
    return -((-a) // b)


def _min_bottleneck(config: Config) -> int:
    """Smallest bottleneck output length x whose up path never shrinks to nothing."""
    for x in range(1, config.merge_filter_size + 1):
        length = x
        for _ in range(config.num_layers):
            length = 2 * length - 1 - (config.merge_filter_size - 1)
            if length < 1:
                break
        else:
            return x
    return config.merge_filter_size  # O(m) = m: never reached, x = m always works


def _input_length(config: Config, x: int) -> int:
    length = x + config.filter_size - 1  # bottleneck input
    for _ in range(config.num_layers):
        length = 2 * length - 1 + config.filter_size - 1  # undo decimation, then the block's conv
    return length


def _output_length(config: Config, x: int) -> int:
    length = x
    for _ in range(config.num_layers):
        length = 2 * length - 1 - (config.merge_filter_size - 1)  # upsampling, then the block's conv
    return length


def context_samples(config: Config) -> int:
    """Input samples on each side of the output that the output depends on (0 without context)."""
    if not config.context:
        return 0
    x = _min_bottleneck(config)
    return (_input_length(config, x) - _output_length(config, x)) // 2


def padded_length(n, config: Config, maximum=max):
    """The shortest valid input length whose output covers `n` samples (int or int tensor)."""
    scale = 2 ** config.num_layers
    if not config.context:
        return maximum(scale, scale * _ceil_div(n, scale))
    f, m = config.filter_size, config.merge_filter_size
    x = maximum(_min_bottleneck(config), m + _ceil_div(n - m, scale))  # O(x) >= n
    return scale * (x + 2 * f - 3) - (f - 2)  # I(x)


def input_samples(config: Config, n: int) -> int:
    """`SeparationModel.input_samples`: the input length for an excerpt whose *output* has >= n samples.

    With context this is the paper's rule (`get_padding`): asked for its 16,384 output frames, the
    paper's model takes 147,443 input samples and predicts their centre 16,389.
    """
    return int(padded_length(int(n), config))


def output_samples(config: Config, n: int) -> int:
    """Output length of a valid input length `n` (ValueError for an invalid one)."""
    if not is_valid_input(config, n):
        raise ValueError(f"{n} is not a valid Wave-U-Net input length; use input_samples() "
                         f"(e.g. {input_samples(config, n)})")
    return n - 2 * context_samples(config)


def is_valid_input(config: Config, n: int) -> bool:
    return n >= 1 and padded_length(n - 2 * context_samples(config), config) == n


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
def time_length(shape):
    return shape[1]


@keras.saving.register_keras_serializable(package="wave_u_net")
class Decimate(keras.layers.Layer):
    """Every other time step: `(nb_samples, n, F)` -> `(nb_samples, ceil(n / 2), F)`."""

    def call(self, x):
        return x[:, ::2, :]

    def compute_output_shape(self, shape):
        n = time_length(shape)
        return (shape[0], None if n is None else (n + 1) // 2, shape[2])


@keras.saving.register_keras_serializable(package="wave_u_net")
class Upsample(keras.layers.Layer):
    """Time ×2: between neighbours v_t, v_t+1 goes w·v_t + (1 − w)·v_t+1, originals at even steps.

    `linear`: w = 1/2. `learned`: w = sigmoid(a), one trainable a per feature (the paper's learned
    upsampling), initialised by `initializer` (glorot_uniform as the reference; zeros = linear at first).
    valid=True: `(nb_samples, n, F)` -> `(nb_samples, 2n − 1, F)` (the reference's
    `align_corners=True` resize); valid=False: -> `2n`, the last in-between step repeating the last
    step (as TF1's `resize_bilinear`; the reference's learned layer zero-pads there instead).
    """

    def __init__(self, learned: bool = False, valid: bool = True, initializer: str = "zeros", **kwargs):
        super().__init__(**kwargs)
        self.learned = learned
        self.valid = valid
        self.initializer = initializer

    def build(self, shape):
        if self.learned:
            self.logit = self.add_weight(shape=(shape[-1],), initializer=self.initializer,
                                         name="interpolation_logit")

    def call(self, x):
        if self.valid:
            left, right = x[:, :-1], x[:, 1:]
        else:
            left, right = x, ops.concatenate([x[:, 1:], x[:, -1:]], axis=1)
        if self.learned:
            weight = ops.sigmoid(self.logit)
            between = weight * left + (1.0 - weight) * right
        else:
            between = 0.5 * (left + right)
        pairs = ops.stack([left, between], axis=2)  # (nb_samples, n', 2, F)
        shape = ops.shape(pairs)
        out = ops.reshape(pairs, (shape[0], 2 * shape[1], shape[3]))
        if self.valid:
            out = ops.concatenate([out, x[:, -1:]], axis=1)
        return out

    def compute_output_shape(self, shape):
        n = time_length(shape)
        return (shape[0], None if n is None else 2 * n - (1 if self.valid else 0), shape[2])

    def get_config(self):
        return {**super().get_config(), "learned": self.learned, "valid": self.valid,
                "initializer": self.initializer}


@keras.saving.register_keras_serializable(package="wave_u_net")
class CentreCrop(keras.layers.Layer):
    """[x `(nb_samples, n_x, F)`, like `(nb_samples, n, ...)`] -> the centre n steps of x (n <= n_x)."""

    def call(self, inputs):
        x, like = inputs
        start = (ops.shape(x)[1] - ops.shape(like)[1]) // 2
        return x[:, start:start + ops.shape(like)[1]]

    def compute_output_shape(self, shapes):
        return (shapes[0][0], time_length(shapes[1]), shapes[0][2])


@keras.saving.register_keras_serializable(package="wave_u_net")
class TakeFirst(Float32Layer):  # the separator's outputs: float32 under any precision
    """[x `(nb_samples, n_x, F)`, like `(nb_samples, n, ...)`] -> the first n steps of x."""

    def call(self, inputs):
        x, like = inputs
        return x[:, :ops.shape(like)[1]]

    def compute_output_shape(self, shapes):
        return (shapes[0][0], time_length(shapes[1]), shapes[0][2])


@keras.saving.register_keras_serializable(package="wave_u_net")
class AudioClip(keras.layers.Layer):
    """Identity in training, clip to [-1, 1] at inference (the reference's `linear` output activation)."""

    def call(self, x, training=None):
        return x if training else ops.clip(x, -1.0, 1.0)


@keras.saving.register_keras_serializable(package="wave_u_net")
class PadToValid(keras.layers.Layer):
    """Zero-pad a mixture of any length n: `context` samples before it, and after it up to the
    shortest valid input whose output covers n (see `padded_length`)."""

    def __init__(self, num_layers: int, filter_size: int, merge_filter_size: int, context: bool, **kwargs):
        super().__init__(**kwargs)
        self.geometry = Config(num_layers=num_layers, filter_size=filter_size,
                               merge_filter_size=merge_filter_size, context=context)

    def call(self, x):
        n = ops.shape(x)[1]
        before = context_samples(self.geometry)
        after = padded_length(n, self.geometry, maximum=ops.maximum) - n - before
        return ops.pad(x, [[0, 0], [before, after], [0, 0]])

    def compute_output_shape(self, shape):
        n = time_length(shape)
        return (shape[0], None if n is None else padded_length(n, self.geometry), shape[2])

    def get_config(self):
        g = self.geometry
        return {**super().get_config(), "num_layers": g.num_layers, "filter_size": g.filter_size,
                "merge_filter_size": g.merge_filter_size, "context": g.context}


class PredictTrack(Float32Layer):  # the separator's outputs: float32 under any precision
    """The reference's `Evaluate.predict_track` around `network` (the train model): mixture `(nb_samples,
    n, nb_channels)` of any length -> {target: `(nb_samples, n, nb_channels)`}.

    The song is zero-padded at its end to at least one network input (`input_length`), then by the context
    on both sides; chunks of `input_length` samples are cut at output positions 0, O, 2O, ... (O =
    `output_length`), the last one moved to end at the song's end, and each chunk's prediction written to
    its O output samples (a later chunk overwrites the overlap). A static length is unrolled in Python
    (plain slices and a gather: TFLite built-ins); a dynamic one maps over the chunks one at a time, so
    memory grows with the chunk, not the song. Holds no weights of its own (not serialisable: the
    separator is rebuilt from the config and the train model's weights).
    """

    def __init__(self, network, input_length: int, output_length: int, targets, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.input_length = int(input_length)
        self.output_length = int(output_length)
        self.targets = tuple(targets)

    def call(self, x, training=None):
        inputs, outputs = self.input_length, self.output_length
        context = (inputs - outputs) // 2
        n = x.shape[1]
        static = n is not None
        if not static:
            n = ops.shape(x)[1]
        total = max(n, inputs) if static else ops.maximum(n, inputs)  # song padded to >= one input
        padded = ops.pad(x, [[0, 0], [context, total - n + context], [0, 0]])
        if static:
            positions = [min(p, total - outputs) for p in range(0, total, outputs)]
            parts = [self.network(padded[:, p:p + inputs], training=training) for p in positions]
            stacked = {t: ops.stack([part[t] for part in parts]) for t in self.targets}  # (chunks, b, O, c)
            positions = ops.convert_to_tensor(positions, "int32")
        else:
            nb_chunks = (total + outputs - 1) // outputs
            positions = ops.minimum(ops.arange(nb_chunks, dtype="int32") * outputs, total - outputs)

            def chunk(position):
                estimates = self.network(padded[:, position:position + inputs], training=training)
                return {t: estimates[t] for t in self.targets}

            import tensorflow as tf  # tf.map_fn: keras.ops.map would trace the network once more for the signature

            spec = tf.TensorSpec([None, None, x.shape[2]], x.dtype)
            stacked = tf.map_fn(chunk, positions, fn_output_signature={t: spec for t in self.targets})
        # output sample s comes from chunk s // O, or from the last chunk once s reaches its start
        samples = ops.arange(n, dtype="int32")
        last = ops.shape(positions)[0] - 1
        chunk_of = ops.where(samples < total - outputs, samples // outputs, last)
        index = chunk_of * outputs + samples - ops.take(positions, chunk_of)
        out = {}
        for target, value in stacked.items():
            shape = ops.shape(value)
            flat = ops.reshape(ops.transpose(value, (1, 0, 2, 3)), (shape[1], shape[0] * outputs, shape[3]))
            out[target] = ops.take(flat, index, axis=1)
        return out

    def compute_output_shape(self, shape):
        return {t: tuple(shape) for t in self.targets}


@keras.saving.register_keras_serializable(package="wave_u_net")
class SourceMeanSquaredError(keras.losses.Loss):
    """MSE of one source divided by the number of sources: Keras sums the per-output losses, so the
    total is the reference's loss, the mean over sources of each source's MSE."""

    def __init__(self, nb_sources: int = 1, name: str = "source_mse", **kwargs):
        super().__init__(name=name, **kwargs)
        self.nb_sources = nb_sources

    def call(self, y_true, y_pred):
        return ops.mean(ops.square(y_pred - y_true), axis=-1) / self.nb_sources

    def get_config(self):
        return {**super().get_config(), "nb_sources": self.nb_sources}


# --------------------------------------------------------------------------------------------
# The functional graph
# --------------------------------------------------------------------------------------------
def wave_u_net(config: Config, targets, nb_channels: int, name: str = "wave_u_net"):
    """keras.Model, mixture `(nb_samples, nb_timesteps, nb_channels)` -> {target: `(nb_samples,
    nb_output_timesteps, nb_channels)`}, nb_output_timesteps = nb_timesteps - 2 * context_samples(config)
    for a valid nb_timesteps (see `input_samples`)."""
    padding = "valid" if config.context else "same"
    filters = config.num_initial_filters

    def conv(width, size, layer_name):
        return keras.layers.Conv1D(width, size, padding=padding, name=layer_name)

    def leaky(layer_name):
        return keras.layers.LeakyReLU(negative_slope=LEAKY_RELU_SLOPE, name=layer_name)

    # layers
    down = [(conv(filters * i, config.filter_size, f"down_{i}_conv"), leaky(f"down_{i}_act"),
             Decimate(name=f"down_{i}_decimate"))
            for i in range(1, config.num_layers + 1)]
    bottleneck = (conv(filters * (config.num_layers + 1), config.filter_size, "bottleneck_conv"),
                  leaky("bottleneck_act"))
    up = {i: (Upsample(learned=config.upsampling == "learned", valid=config.context,
                            initializer=config.interpolation_init, name=f"up_{i}_upsample"),
              CentreCrop(name=f"up_{i}_crop"), keras.layers.Concatenate(name=f"up_{i}_concat"),
              conv(filters * i, config.merge_filter_size, f"up_{i}_conv"), leaky(f"up_{i}_act"))
          for i in range(config.num_layers, 0, -1)}
    learned_targets = targets[:-1] if config.output_type == "difference" else targets
    activation = "tanh" if config.output_activation == "tanh" else None
    heads = {t: keras.layers.Conv1D(nb_channels, 1, activation=activation, name=f"output_{t}") for t in learned_targets}
    clips = ({t: AudioClip(name=f"output_{t}_clip") for t in learned_targets}
             if config.output_activation == "linear" else {})

    # functional graph
    mixture = keras.Input((None, nb_channels), name="mixture")
    x = mixture
    skips = {}
    for i, (convolution, act, decimate) in enumerate(down, start=1):
        skips[i] = act(convolution(x))
        x = decimate(skips[i])
    x = bottleneck[1](bottleneck[0](x))
    for i, (upsample, crop, concat, convolution, act) in up.items():
        x = upsample(x)
        x = act(convolution(concat([crop([skips[i], x]), x])))
    mixture_centre = CentreCrop(name="mixture_crop")([mixture, x])
    features = keras.layers.Concatenate(name="output_concat")([mixture_centre, x])
    outputs = {}
    for target in learned_targets:
        estimate = heads[target](features)
        outputs[target] = clips[target](estimate) if target in clips else estimate
    if config.output_type == "difference":
        others = [outputs[t] for t in learned_targets]
        if not others:
            rest = mixture_centre
        else:
            total = others[0] if len(others) == 1 else keras.layers.Add(name="sum_of_others")(others)
            rest = keras.layers.Subtract(name=f"output_{targets[-1]}")([mixture_centre, total])
        if config.clip_difference:
            rest = AudioClip(name=f"output_{targets[-1]}_clip")(rest)
        outputs[targets[-1]] = rest
    outputs = {t: keras.layers.Identity(name=t)(outputs[t]) for t in targets}  # output names = targets
    return keras.Model(mixture, outputs, name=name)


def separator_model(train_model, config: Config, targets, nb_channels: int):
    """Mixture of any length `(nb_samples, nb_timesteps, nb_channels)` -> {target: same shape}, sharing
    `train_model`'s weights. `predict=chunks`: the reference's chunked prediction (`PredictTrack`) with chunks
    of `chunk_lengths(config)`; `one_pass`: zero-pad by the context (and to a valid length), run `train_model`
    once, keep the first nb_timesteps."""
    mixture = keras.Input((None, nb_channels), name="mixture")
    if config.predict == "chunks":
        input_length, output_length = chunk_lengths(config)
        estimates = PredictTrack(train_model, input_length, output_length, targets,
                                      name="predict_track")(mixture)
        outputs = {t: keras.layers.Identity(name=f"{t}_trim", dtype="float32")(estimates[t]) for t in targets}
        return keras.Model(mixture, outputs, name="wave_u_net_separator")
    padded = PadToValid(config.num_layers, config.filter_size, config.merge_filter_size, config.context,
                             name="pad_to_valid")(mixture)
    estimates = train_model(padded)
    outputs = {t: TakeFirst(name=f"{t}_trim")([estimates[t], mixture]) for t in targets}
    return keras.Model(mixture, outputs, name="wave_u_net_separator")


def chunk_lengths(config: Config):
    """(input, output) samples of one chunk of the chunked prediction: the reference's `get_padding` for
    `num_frames` = predict_frames (same padding: input = output, a multiple of 2^L)."""
    input_length = input_samples(config, config.predict_frames)
    return input_length, input_length - 2 * context_samples(config)


# --------------------------------------------------------------------------------------------
# The family builder
# --------------------------------------------------------------------------------------------
def build(config: Config, *, data, stats=None) -> SeparationModel:
    targets = tuple(data.targets)
    nb_channels = int(data.nb_channels)
    train_model = wave_u_net(config, targets, nb_channels)
    separator = separator_model(train_model, config, targets, nb_channels)
    context = context_samples(config)

    def train_targets(stems: Dict) -> Dict:
        """Stems `(nb_samples, nb_timesteps, nb_channels)` of a valid length -> their centre, the output."""
        out = {}
        for target in targets:
            stem = keras.ops.convert_to_tensor(stems[target], "float32")
            out[target] = stem[:, context:keras.ops.shape(stem)[1] - context] if context else stem
        return out

    def mobile(chunk: int):
        """Static `(1, chunk, nb_channels)` -> {target: `(1, chunk, nb_channels)`}: the separator over a fixed
        chunk (zero context at its ends, as for the SavedModel; with predict=chunks its network chunks unrolled
        into plain slices), so an app overlap-adds whole chunks. The train model alone would return only the
        centre, 2 * context_samples shorter than the chunk."""
        mixture = keras.Input((chunk, nb_channels), batch_size=1, name="mixture")
        return keras.Model(mixture, separator(mixture), name="wave_u_net_mobile")

    return SeparationModel(
        targets=targets,
        sample_rate=int(data.sample_rate),
        nb_channels=nb_channels,
        train_model=train_model,
        train_targets=train_targets,
        loss={t: SourceMeanSquaredError(nb_sources=len(targets)) for t in targets},
        separator=separator,
        config=config,
        input_samples=functools.partial(input_samples, config),
        inference=InferencePieces(mobile=mobile),
    )


# --------------------------------------------------------------------------------------------
# Released checkpoints (TF1, github.com/f90/Wave-U-Net)
# --------------------------------------------------------------------------------------------
# The reference's named configurations with released weights (Config.py; README "pretrained models"):
# all use difference output, input context, stereo and tanh; they differ in upsampling, task and rate.
PUBLISHED = {
    "baseline_stereo": {"upsampling": "linear", "task": "voice", "expected_sr": 22050},  # M4
    "full": {"upsampling": "learned", "task": "voice", "expected_sr": 22050},  # M5
    "full_44KHz": {"upsampling": "learned", "task": "voice", "expected_sr": 44100},  # M5-HighSR
    "full_multi_instrument": {"upsampling": "linear", "task": "multi_instrument", "expected_sr": 22050},  # M6
}
SOURCE_NAMES = {"voice": ["accompaniment", "vocals"], "multi_instrument": ["bass", "drums", "other", "vocals"]}


def _checkpoint_prefix(path: Path) -> Path:
    if path.is_dir():
        indexes = sorted(path.glob("*.index"))
        state = path / "checkpoint"
        if state.is_file():  # TF's bookkeeping file names the latest checkpoint
            for line in state.read_text().splitlines():
                if line.startswith("model_checkpoint_path:"):
                    name = line.split(":", 1)[1].strip().strip('"')
                    # an absolute path is the writer's machine's: the checkpoint of that name in this folder wins
                    named, local = Path(name), path / Path(name).name
                    return named if named.is_absolute() and not Path(f"{local}.index").is_file() else local
        if len(indexes) != 1:
            raise CheckpointError(f"import {path}: expected one TF checkpoint (<name>.index) in the folder, found "
                                  f"{len(indexes)}; pass the checkpoint prefix, e.g. import.path=<folder>/<name>-<step>")
        return indexes[0].with_suffix("")
    if path.suffix == ".index" or ".data-" in path.name:
        return path.parent / path.name.split(".index")[0].split(".data-")[0]
    return path


def read_released(path, model: Optional[str] = None, config: Optional[str] = None, targets=(), **options):
    """A TF1 checkpoint of the reference implementation (`<name>-<step>.index/.data-*`, a folder holding one,
    or the prefix), read with `tf.train.load_checkpoint`. The network's sizes come from the tensors; the
    settings the tensors cannot show (rate, context, output type and activation, predict_track's chunk
    `num_frames`) from the reference's
    Sacred `config.json` (`model_config`; import.config or beside the checkpoint), else from the named
    published configuration (import.model, or the checkpoint's name: baseline_stereo, full, full_44KHz,
    full_multi_instrument), else the reference's defaults with input context and difference output."""
    import json

    import numpy as np
    import tensorflow as tf

    from models.checkpoints import ReleasedCheckpoint, set_option_keys

    where = f"import {path}"
    set_option_keys(options, ("model", "config", "targets"), where)
    prefix = _checkpoint_prefix(Path(path))
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except (tf.errors.OpError, ValueError) as error:
        raise CheckpointError(f"{where}: not a readable TF checkpoint ({type(error).__name__}); pass the released "
                              "<name>-<step> checkpoint") from None
    tensors = {name: np.asarray(reader.get_tensor(name)) for name in reader.get_variable_to_shape_map()}
    settings = {"context": True, "output_type": "difference", "output_activation": "tanh", "expected_sr": 22050}
    name = model or next((n for n in sorted(PUBLISHED, key=len, reverse=True)
                          if prefix.name.startswith(n) or prefix.parent.name == n), None)
    if model is not None and model not in PUBLISHED:
        raise CheckpointError(f"{where}: import.model={model} is not a released Wave-U-Net configuration; choose "
                              f"one of {', '.join(PUBLISHED)}")
    if name:
        settings.update(PUBLISHED[name])
    config_file = Path(config) if config else prefix.parent / "config.json"
    files = [Path(f"{prefix}.index"), *sorted(prefix.parent.glob(prefix.name + ".data-*"))]
    if config_file.is_file():
        model_config = json.loads(config_file.read_text()).get("model_config", {})
        settings.update({k: v for k, v in model_config.items() if k in ("context", "output_type", "output_activation",
                                                                        "expected_sr", "upsampling", "task",
                                                                        "source_names", "mono_downmix", "num_frames")})
        files.append(config_file)
    elif config:
        raise CheckpointError(f"{where}: import.config={config} does not exist; pass the run's config.json")
    kernels = []
    while f"separator/conv1d{'_' + str(len(kernels)) if kernels else ''}/kernel" in tensors:
        kernels.append(tensors[f"separator/conv1d{'_' + str(len(kernels)) if kernels else ''}/kernel"])
    if not kernels:
        raise CheckpointError(f"{where}: no 'separator/conv1d/kernel'; not a Wave-U-Net checkpoint of the reference "
                              "implementation (model.name names the family of the file)")
    width, nb_channels, filters = kernels[0].shape
    depth = 0
    while depth < len(kernels) and kernels[depth].shape[2] == filters * (depth + 1):
        depth += 1
    num_layers = depth - 1
    nb_outputs = len(kernels) - (2 * num_layers + 1)
    if num_layers < 1 or nb_outputs < 1 or any(k.shape[0] != 1 for k in kernels[2 * num_layers + 1:]):
        raise CheckpointError(f"{where}: the separator's convolutions do not form a Wave-U-Net with 1x1 output "
                              "layers; it cannot be imported")
    task = settings.get("task") or ("voice" if nb_outputs in (1, 2) else "multi_instrument")
    sources = list(settings.get("source_names") or SOURCE_NAMES[task])
    expected = len(sources) - (1 if settings["output_type"] == "difference" else 0)
    if nb_outputs != expected:
        raise CheckpointError(f"{where}: {nb_outputs} output layers but {settings['output_type']} output for "
                              f"{sources} needs {expected}; name the configuration with import.model or import.config")
    if targets and list(targets) != sources:
        raise CheckpointError(f"{where}: the model separates {sources} in this order; drop import.targets")
    upsampling = "learned" if "separator/interp_0" in tensors else "linear"
    overrides = {"model.name": "wave_u_net", "data.sample_rate": int(settings["expected_sr"]),
                 "data.nb_channels": int(nb_channels), "data.targets": sources,
                 "model.wave_u_net.num_layers": num_layers, "model.wave_u_net.num_initial_filters": int(filters),
                 "model.wave_u_net.filter_size": int(width),
                 "model.wave_u_net.merge_filter_size": int(kernels[num_layers + 1].shape[0]),
                 "model.wave_u_net.upsampling": upsampling, "model.wave_u_net.output_type": settings["output_type"],
                 "model.wave_u_net.output_activation": settings["output_activation"],
                 "model.wave_u_net.context": bool(settings["context"]),
                 # predict_track's chunk: num_frames of the run's config (Config.py's 16384 for every release)
                 "model.wave_u_net.predict_frames": int(settings.get("num_frames", Config.predict_frames))}
    ignorable = {n: "optimizer state of the reference's training (Adam slots, beta powers, step)"
                 for n in tensors if n.startswith("separator_solver/") or n == "global_step"}
    return ReleasedCheckpoint(family="wave_u_net", config_overrides=overrides, tensors=tensors, files=files,
                              description=f"Wave-U-Net TF1 checkpoint {prefix.name} ({name or 'custom'}: "
                                          f"{', '.join(sources)})", ignorable=ignorable)


def assign_released(model: SeparationModel, released) -> dict:
    """The reference's TF1 variables -> our layers: the one mapping table of this family. `tf.layers.conv1d`
    names its layers conv1d, conv1d_1, ... in creation order (down blocks, bottleneck, up blocks, outputs);
    the learned upsampling of up step i is `interp_i`. Conv1D kernels share Keras' layout `(width, in, out)`."""
    from models.checkpoints import Assign, assign_table

    config = model.config
    network = model.train_model
    order = ([f"down_{i}_conv" for i in range(1, config.num_layers + 1)] + ["bottleneck_conv"]
             + [f"up_{i}_conv" for i in range(config.num_layers, 0, -1)]
             + [f"output_{t}" for t in (model.targets[:-1] if config.output_type == "difference" else model.targets)])
    rows = []
    for index, layer_name in enumerate(order):
        source = f"separator/conv1d{'_' + str(index) if index else ''}"
        layer = network.get_layer(layer_name)
        rows += [Assign((f"{source}/kernel",), layer.kernel), Assign((f"{source}/bias",), layer.bias)]
    if config.upsampling == "learned":
        for step in range(config.num_layers):  # up step i works at level num_layers - i
            rows.append(Assign((f"separator/interp_{step}",),
                               network.get_layer(f"up_{config.num_layers - step}_upsample").logit))
    return assign_table(rows, released, network.weights, where="import wave_u_net")
