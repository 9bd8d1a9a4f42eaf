"""Open-Unmix (Stöter et al., 2019): one BLSTM spectrogram-masking network per target, in Keras.

Faithful to sigsep open-unmix's `OpenUnmix` module, including its parameter layout and count
(8,893,348 trainable parameters per target for the published stereo 44.1 kHz model):

    |X| (per-bin mean/scale, bins cropped at `bandwidth`) -> fc1 (no bias) -> BN -> tanh
        -> nb_layers x LSTM (bidirectional: hidden/2 per direction; dropout 0.4 between layers)
        -> concat(skip, lstm) -> fc2 (no bias) -> BN -> ReLU -> fc3 (no bias) -> BN
        -> per-bin output scale/mean -> ReLU -> mask * |X|

PyTorch-compatible details kept on purpose: the LSTM has both `b_ih` and `b_hh` biases (part of
the published count), `input_mean` stores the *negated* mean and `input_scale` the inverse std,
features are flattened channel-major (`nb_channels * nb_bins`), BN uses momentum 0.1 / eps 1e-5 and
layers use PyTorch's default initialisation. Pretrained open-unmix weights map one to one.

Separation (`SeparationModel.separator`): STFT -> every target network -> multichannel Wiener
filter (`wiener_iterations` EM steps, 0 = ratio masks) -> ISTFT to the input length.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import keras
import numpy as np
import tensorflow as tf

from configs.config import MUSDB_TARGETS, bounded, check_fields
from configs.errors import ConfigError
from models.base import InferencePieces, SeparationModel, TrainingHooks
from models.filtering import WienerFilter, WienerISTFT
from models.layers import LSTM, check_stft, lstm_cell, lstm_sequence, sequence_lstm, torch_uniform
from models.transforms import (STFT, ISTFT, ComplexNorm, Float32Layer, bandwidth_to_max_bin, complex_norm,
                               in_tflite_lstm_loop, stft)


@dataclass(frozen=True)
class Config:
    """Published open-unmix (UMX) defaults; `nb_channels` and targets come from `data`."""

    n_fft: int = 4096
    hop_length: int = 1024
    hidden_size: int = bounded(512, 2)  # even unless unidirectional (split over two LSTM directions)
    nb_layers: int = bounded(3, 1)
    unidirectional: bool = False
    bandwidth: float = bounded(16000.0, 0, low_open=True)  # Hz; bins above are not fed to the network (but are estimated)
    wiener_iterations: int = bounded(1, 0)  # EM iterations in the separator; 0: ratio masks
    # frames per independently Wiener-filtered block; 0: the whole chunk the separator gets. open-unmix's
    # Separator uses 300; 0 is kept here because evaluate / separate already cut songs into bounded chunks
    wiener_win_len: int = bounded(0, 0)
    residual: bool = False  # add a `residual` output: mixture minus the sum of the targets
    unroll: bool = False  # the TFLite form (`mobile`): fused sequence-LSTM composites, static batch at call time

    def __post_init__(self):
        key = "model.umx."
        check_fields(self, key)
        check_stft(key, self.n_fft, self.hop_length)
        if not self.unidirectional and self.hidden_size % 2:
            raise ConfigError(f"{key}hidden_size must be even (split over two LSTM directions), got {self.hidden_size}")


# --------------------------------------------------------------------------------------------- layers


@keras.saving.register_keras_serializable(package="musicsep")
class OpenUnmix(keras.layers.Layer):
    """One target's network: magnitude `(nb_samples, nb_frames, nb_bins, nb_channels)` -> estimate, same shape.

    `compute_output_shape` is explicit so that the functional graph is built without tracing the
    LSTMs: with `unroll=True` the frame count only has to be static when the layer really runs.
    """

    def __init__(self, nb_bins: int = 2049, nb_channels: int = 2, hidden_size: int = 512, nb_layers: int = 3,
                 unidirectional: bool = False, max_bin: Optional[int] = None, unroll: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.nb_bins = nb_bins
        self.nb_channels = nb_channels
        self.hidden_size = hidden_size
        self.nb_layers = nb_layers
        self.unidirectional = unidirectional
        self.max_bin = max_bin or nb_bins
        self.unroll = unroll

        # PyTorch BatchNorm1d defaults (momentum 0.1); batch statistics over the global batch under
        # MirroredStrategy, so n replicas train exactly like one device on the same global batch
        bn = dict(momentum=0.9, epsilon=1e-5, synchronized=True)
        self.fc1 = keras.layers.Dense(hidden_size, use_bias=False, kernel_initializer=torch_uniform(), name="fc1")
        self.bn1 = keras.layers.BatchNormalization(name="bn1", **bn)
        lstm_units = hidden_size if unidirectional else hidden_size // 2
        self.lstms = [LSTM(lstm_units, bidirectional=not unidirectional, unroll=unroll, name=f"lstm_{index}")
                      for index in range(nb_layers)]
        self.dropouts = [keras.layers.Dropout(0.4, name=f"lstm_dropout_{index}") for index in range(nb_layers - 1)]
        self.fc2 = keras.layers.Dense(hidden_size, use_bias=False, kernel_initializer=torch_uniform(), name="fc2")
        self.bn2 = keras.layers.BatchNormalization(name="bn2", **bn)
        self.fc3 = keras.layers.Dense(nb_bins * nb_channels, use_bias=False, kernel_initializer=torch_uniform(),
                                      name="fc3")
        self.bn3 = keras.layers.BatchNormalization(name="bn3", **bn)

    def build(self, input_shape=None):
        # stored as in open-unmix: input_mean = -mean, input_scale = 1 / std
        self.input_mean = self.add_weight(shape=(self.max_bin,), initializer="zeros", name="input_mean")
        self.input_scale = self.add_weight(shape=(self.max_bin,), initializer="ones", name="input_scale")
        self.output_scale = self.add_weight(shape=(self.nb_bins,), initializer="ones", name="output_scale")
        self.output_mean = self.add_weight(shape=(self.nb_bins,), initializer="ones", name="output_mean")
        hidden = self.hidden_size
        self.fc1.build((None, None, self.max_bin * self.nb_channels))
        self.bn1.build((None, None, hidden))
        for lstm in self.lstms:
            lstm.build((None, None, hidden))
        self.fc2.build((None, None, 2 * hidden))
        self.bn2.build((None, None, hidden))
        self.fc3.build((None, None, hidden))
        self.bn3.build((None, None, self.nb_bins * self.nb_channels))

    def call(self, magnitude, training=None):
        mix = magnitude
        batch_frames = tf.shape(magnitude)[:2]
        x = tf.transpose(magnitude, [0, 1, 3, 2])[..., : self.max_bin]  # (samples, frames, channels, max_bin)
        x = (x + self.input_mean) * self.input_scale
        x = tf.reshape(x, tf.concat([batch_frames, [self.nb_channels * self.max_bin]], 0))
        x = tf.tanh(self.bn1(self.fc1(x), training=training))
        lstm_out = x
        for index, lstm in enumerate(self.lstms):
            lstm_out = lstm(lstm_out)
            if index < len(self.dropouts):
                lstm_out = self.dropouts[index](lstm_out, training=training)
        x = tf.concat([x, lstm_out], axis=-1)
        x = tf.nn.relu(self.bn2(self.fc2(x), training=training))
        x = self.bn3(self.fc3(x), training=training)
        x = tf.reshape(x, tf.concat([batch_frames, [self.nb_channels, self.nb_bins]], 0))
        x = x * self.output_scale + self.output_mean
        return tf.transpose(tf.nn.relu(x), [0, 1, 3, 2]) * mix

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def set_input_statistics(self, mean: np.ndarray, std: np.ndarray):
        """Initialise the input normalisation from per-bin magnitude statistics `(nb_bins,)`."""
        self.input_mean.assign(-np.asarray(mean, np.float32)[: self.max_bin])
        self.input_scale.assign(1.0 / np.asarray(std, np.float32)[: self.max_bin])

    def get_config(self):
        return {**super().get_config(), "nb_bins": self.nb_bins, "nb_channels": self.nb_channels,
                "hidden_size": self.hidden_size, "nb_layers": self.nb_layers,
                "unidirectional": self.unidirectional, "max_bin": self.max_bin, "unroll": self.unroll}


def _stack(tensors):
    """Keras variables (or tensors) of one shape -> one tensor, new leading axis."""
    return tf.stack([tf.convert_to_tensor(tensor) for tensor in tensors])


def _batch_norm_inference(layers, x):
    """Inference BatchNorm of `layers` (one per target) on `x` `(nb_targets, ..., features)`."""
    def stacked(name):
        value = _stack([getattr(layer, name) for layer in layers])
        return tf.reshape(value, [len(layers)] + [1] * (len(x.shape) - 2) + [-1])

    epsilon = layers[0].epsilon
    return (x - stacked("moving_mean")) / tf.sqrt(stacked("moving_variance") + epsilon) * stacked("gamma") \
        + stacked("beta")


def _batched_dense(x, kernels):
    """`x` `(groups, ..., in)` times one kernel `(in, out)` per group -> `(groups, ..., out)`.

    One 2-D matmul per group (outside the recurrence, so no per-step cost): TFLite maps each to a
    FULLY_CONNECTED that XNNPACK runs on weights unpacked once (a BATCH_MATMUL over stacked float16
    weights would dequantize them on every call)."""
    shape = tf.shape(x)
    flat = tf.reshape(x, [x.shape[0], -1, x.shape[-1]])
    # SPLIT, not one STRIDED_SLICE per group: TFLite's strided slice is a per-element reference kernel
    groups = tf.split(flat, len(kernels), axis=0)
    out = tf.stack([tf.matmul(tf.squeeze(group, 0), kernel) for group, kernel in zip(groups, kernels)])
    return tf.reshape(out, tf.concat([shape[:-1], [kernels[0].shape[-1]]], 0))


def _tflite_lstm_loop(sequences, weights):
    """The LSTMs of one layer for a float32 TFLite file: `sequences` `(groups, frames, samples, features)`, one
    group per target and direction, -> hidden states `(groups, frames, samples, units)`.

    The input projections are hoisted out of the recurrence (one FULLY_CONNECTED per group over all frames)
    and WHILE loops step every group at once, a step one BATCH_MATMUL of the stacked recurrent kernels.
    The fused UNIDIRECTIONAL_SEQUENCE_LSTM cannot skip its own input product, and runs per group; this form
    measured 1.8x faster per layer in float32, and the whole dynamic-int8 file 1.09x faster than with the fused
    ops' int8 kernels (README "TFLite for phones"). Nothing is kept from one invoke to the next.

    TFLite copies a loop's carried tensors on every iteration and its DYNAMIC_UPDATE_SLICE copies the whole
    tensor it writes into, so the frames run in blocks of ~sqrt(frames): an inner loop collects one block's
    hidden states, an outer loop writes the block into the collection (the copies shrink from frames x
    collection to ~2 sqrt(frames) x collection). Per UMX-HQ layer and 3 s chunk (one thread, quiet machine):
    30.0 ms with one loop and a TensorArray (lowered to a slice-and-concatenate of the whole collection per
    frame), 26.7 with one loop and DYNAMIC_UPDATE_SLICE, 21.8 reading the step's input with GATHER instead of
    the reference STRIDED_SLICE kernel, 17.4 in blocks; the hidden states identical."""
    projected = _batched_dense(sequences, [w["kernel"] for w in weights]) + tf.reshape(
        _stack([w["bias"] + w["recurrent_bias"] for w in weights]), [len(weights), 1, 1, -1])
    projected = tf.transpose(projected, [1, 0, 2, 3])  # (frames, groups, samples, 4 * units)
    kernels = _stack([w["recurrent_kernel"] for w in weights])  # (groups, units, 4 * units)
    step = lstm_cell(kernels)
    units = kernels.shape[1]
    nb_frames = projected.shape[0]
    block = max(1, round(math.sqrt(nb_frames)))
    nb_blocks = -(-nb_frames // block)
    if nb_blocks * block > nb_frames:  # the padded frames' states are computed after the real ones, then dropped
        projected = tf.pad(projected, [[0, nb_blocks * block - nb_frames]] + [[0, 0]] * 3)
    blocks = tf.reshape(projected, [nb_blocks, block] + projected.shape[1:])
    zeros = tf.zeros_like(projected[0, ..., :units])

    def write(tensor, index, value):  # tensor[index] = value, as one DYNAMIC_UPDATE_SLICE
        return keras.ops.slice_update(tensor, tf.stack([index] + [0] * (len(tensor.shape) - 1)), value[None])

    # only the hidden states are collected (tf.scan would also collect the cells)
    def block_body(index, hidden, cell, collected):
        inputs = tf.gather(blocks, index)  # GATHER: TFLite's STRIDED_SLICE is a per-element reference kernel

        def frame_body(frame, hidden, cell, states):
            hidden, cell = step((hidden, cell), tf.gather(inputs, frame))
            return frame + 1, hidden, cell, write(states, frame, hidden)

        _, hidden, cell, states = tf.while_loop(lambda frame, *_: frame < block, frame_body,
                                                (tf.constant(0), hidden, cell, tf.zeros_like(inputs[..., :units])))
        return index + 1, hidden, cell, write(collected, index, states)

    collected = tf.while_loop(lambda index, *_: index < nb_blocks, block_body,
                              (tf.constant(0), zeros, zeros, tf.zeros_like(blocks[..., :units])))[-1]
    states = tf.reshape(collected, [nb_blocks * block] + zeros.shape)[:nb_frames]  # (frames, groups, samples, units)
    return tf.transpose(states, [1, 0, 2, 3])


@keras.saving.register_keras_serializable(package="musicsep")
class StackedOpenUnmix(Float32Layer):  # inference only: float32 whatever train.precision
    """Every target's network at inference as one graph: magnitude `(nb_samples, nb_frames, nb_bins, nb_channels)`
    -> estimates `(nb_samples, nb_frames, nb_bins, nb_channels, nb_targets)`.

    The weights are those of `networks` (nothing new is created) and the numbers are theirs; only the
    schedule changes: the dense layers of all targets run side by side, and per LSTM layer the recurrences
    run with their input projections hoisted out of the loop: for the SavedModel one XLA-compiled loop
    (`models.layers.lstm_sequence`) per target whose step is one batched matmul over both directions, the
    targets' loops independent so that they run on separate cores (pipeline/benchmark.py
    `part:networks, ...` times this against the per-target networks). With `unroll` (the TFLite form) a
    layer is hoisted FULLY_CONNECTED projections and one WHILE loop over all groups (`_tflite_lstm_loop`,
    inside `transforms.tflite_graph(lstm_loop=True)`: the float32 and dynamic-int8 files), or else every
    recurrence is one `models.layers.sequence_lstm` composite, which the converter turns into one fused
    UNIDIRECTIONAL_SEQUENCE_LSTM op (24 for UMX-HQ; the float16 file).
    """

    def __init__(self, networks=(), targets_first: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.networks = list(networks)
        # output (nb_targets, nb_frames, nb_samples, nb_channels, nb_bins), the networks' own layout: what
        # `filtering.WienerISTFT` reads (no transposed copy of every estimate)
        self.targets_first = targets_first

    def build(self, input_shape=None):
        for network in self.networks:
            if not network.built:
                network.build(input_shape)

    def call(self, magnitude, training=None):
        if training:  # dropout and batch statistics: the per-target networks themselves
            estimates = tf.stack([network(magnitude, training=True) for network in self.networks], axis=-1)
            return tf.transpose(estimates, [4, 1, 0, 3, 2]) if self.targets_first else estimates
        nets = self.networks
        first = nets[0]
        nb_targets, nb_channels, max_bin, nb_bins = len(nets), first.nb_channels, first.max_bin, first.nb_bins
        frames_samples = tf.stack([tf.shape(magnitude)[1], tf.shape(magnitude)[0]])  # (nb_frames, nb_samples)
        # time major from here on: (targets, frames, samples, features)
        time_major = tf.transpose(magnitude, [1, 0, 3, 2])  # (frames, samples, channels, bins)
        x = time_major[None, ..., :max_bin]  # (1, frames, samples, channels, max_bin)
        x = (x + tf.reshape(_stack([n.input_mean for n in nets]), [nb_targets, 1, 1, 1, max_bin])) \
            * tf.reshape(_stack([n.input_scale for n in nets]), [nb_targets, 1, 1, 1, max_bin])
        x = tf.reshape(x, tf.concat([[nb_targets], frames_samples, [nb_channels * max_bin]], 0))
        x = tf.tanh(_batch_norm_inference([n.bn1 for n in nets], _batched_dense(x, [n.fc1.kernel for n in nets])))
        hidden = x
        for layer in range(first.nb_layers):
            lstms = [n.lstms[layer] for n in nets]
            nb_directions = len(lstms[0].directions)
            # group = target * nb_directions + direction; the reverse direction reads time backwards
            sequences = tf.stack([hidden, tf.reverse(hidden, axis=[1])] if nb_directions == 2 else [hidden], axis=1)
            sequences = tf.reshape(sequences, tf.concat([[nb_targets * nb_directions], tf.shape(hidden)[1:]], 0))
            weights = [direction for lstm in lstms for direction in lstm.directions]
            if first.unroll and in_tflite_lstm_loop():  # TFLite: FULLY_CONNECTED + one WHILE loop per layer
                states = _tflite_lstm_loop(sequences, weights)
            elif first.unroll:  # TFLite: one fused UNIDIRECTIONAL_SEQUENCE_LSTM per target and direction
                states = tf.stack([sequence_lstm(sequences[group], w["kernel"], w["recurrent_kernel"],
                                                 w["bias"] + w["recurrent_bias"])
                                   for group, w in enumerate(weights)])  # (groups, frames, samples, units)
            else:
                projected = _batched_dense(sequences, [w["kernel"] for w in weights]) + tf.reshape(
                    _stack([w["bias"] + w["recurrent_bias"] for w in weights]), [len(weights), 1, 1, -1])
                projected = tf.transpose(projected, [1, 0, 2, 3])  # (frames, groups, samples, 4 * units)
                kernels = _stack([w["recurrent_kernel"] for w in weights])
                # one XLA-compiled loop per target, its directions together: (frames, groups, samples, units).
                # The loops are independent ops, so TensorFlow's inter-op threads run them side by side; a
                # step is a matrix-vector product bound by reading the recurrent weights, and one loop of
                # all groups runs on one core (measured 1.07-1.14x slower for UMX-HQ on 2 cores)
                states = tf.concat([lstm_sequence(projected[:, group:group + nb_directions],
                                                  kernels[group:group + nb_directions])
                                    for group in range(0, len(weights), nb_directions)], axis=1)
                states = tf.transpose(states, [1, 0, 2, 3])
            states = tf.reshape(states, tf.concat([[nb_targets, nb_directions], tf.shape(states)[1:]], 0))
            hidden = states[:, 0] if nb_directions == 1 else tf.concat(
                [states[:, 0], tf.reverse(states[:, 1], axis=[1])], axis=-1)
        x = tf.concat([x, hidden], axis=-1)
        x = tf.nn.relu(_batch_norm_inference([n.bn2 for n in nets], _batched_dense(x, [n.fc2.kernel for n in nets])))
        x = _batch_norm_inference([n.bn3 for n in nets], _batched_dense(x, [n.fc3.kernel for n in nets]))
        x = tf.reshape(x, tf.concat([[nb_targets], frames_samples, [nb_channels, nb_bins]], 0))
        x = x * tf.reshape(_stack([n.output_scale for n in nets]), [nb_targets, 1, 1, 1, nb_bins]) \
            + tf.reshape(_stack([n.output_mean for n in nets]), [nb_targets, 1, 1, 1, nb_bins])
        if self.targets_first:
            return tf.nn.relu(x) * time_major
        mask = tf.transpose(tf.nn.relu(x), [2, 1, 4, 3, 0])  # (samples, frames, bins, channels, targets)
        return mask * magnitude[..., None]

    def compute_output_shape(self, input_shape):
        if self.targets_first:
            return (len(self.networks), input_shape[1], input_shape[0], input_shape[3], input_shape[2])
        return tuple(input_shape) + (len(self.networks),)


# ---------------------------------------------------------------------------------------------- build


def magnitude_statistics(batches: Iterable, n_fft: int, hop_length: int):
    """Per-bin mean and std `(nb_bins,)` of channel-averaged mixture magnitudes over all frames of `batches`.

    As open-unmix's `get_statistics`: std is floored at 1e-4 of its maximum.
    """
    total = total_sq = None
    count = 0
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        magnitude = complex_norm(stft(batch, n_fft, hop_length), mono=True)[..., 0]  # (samples, frames, bins)
        magnitude = tf.reshape(tf.cast(magnitude, tf.float64), [-1, n_fft // 2 + 1])
        total = tf.reduce_sum(magnitude, 0) + (0 if total is None else total)
        total_sq = tf.reduce_sum(tf.square(magnitude), 0) + (0 if total_sq is None else total_sq)
        count += int(magnitude.shape[0])
    if not count:
        raise ValueError("Open-Unmix adapt() got no batches to compute input statistics from")
    mean = (total / count).numpy()
    std = np.sqrt(np.maximum(total_sq.numpy() / count - mean ** 2, 0.0))
    std = np.maximum(std, 1e-4 * np.max(std))
    return mean, std


def build(config: Config, *, data, stats=None) -> SeparationModel:
    """Open-Unmix for `data.targets`; `stats` (the prepare manifest) is not needed: `adapt` computes the scaler."""
    targets = tuple(data.targets)
    nb_channels = data.nb_channels
    nb_bins = config.n_fft // 2 + 1
    max_bin = bandwidth_to_max_bin(data.sample_rate, config.n_fft, config.bandwidth)
    if config.wiener_iterations > 0 and len(targets) == 1 and not config.residual:
        raise ConfigError("model.umx.wiener_iterations > 0 needs two or more sources: set model.umx.residual=true "
                          "or model.umx.wiener_iterations=0")

    # layers (shared by every graph below)
    stft_layer = STFT(config.n_fft, config.hop_length, name="stft")
    norm_layer = ComplexNorm(name="magnitude")
    networks = {
        target: OpenUnmix(nb_bins=nb_bins, nb_channels=nb_channels, hidden_size=config.hidden_size,
                          nb_layers=config.nb_layers, unidirectional=config.unidirectional, max_bin=max_bin,
                          unroll=config.unroll, name=f"open_unmix_{target}")
        for target in targets
    }

    # functional graphs
    mixture = keras.Input((None, nb_channels), name="mixture")
    magnitude = norm_layer(stft_layer(mixture))
    train_model = keras.Model(mixture, {target: networks[target](magnitude) for target in targets},
                              name="open_unmix")

    def make_separator(nb_timesteps: Optional[int] = None, wiener_iterations: int = config.wiener_iterations,
                       residual: bool = config.residual) -> keras.Model:
        """Mixture `(nb_samples, nb_timesteps, nb_channels)` -> {target [, "residual"]: waveform, same shape}.

        Shares the weights of `train_model`. With `unroll=True` (TFLite) give a static `nb_timesteps`.
        """
        waveform = keras.Input((nb_timesteps, nb_channels), name="mixture")
        # the server's STFT as one XLA function (no weights: a layer of its own, training keeps `stft_layer`)
        mix_stft = (stft_layer if config.unroll else STFT(config.n_fft, config.hop_length, jit_compile=True,
                                                          name="stft"))(waveform)
        mix_magnitude = norm_layer(mix_stft)
        # all targets side by side: one fused sequence-LSTM op per target and direction for TFLite, one XLA
        # loop of nb_targets x 2 groups per layer for the server (measured 1.4-1.5x faster than per-target)
        estimates = StackedOpenUnmix([networks[target] for target in targets], targets_first=not config.unroll,
                                     name="networks")(mix_magnitude)
        names = targets + (("residual",) if residual else ())
        if config.unroll:  # TFLite: built-in ops only
            sources = WienerFilter(wiener_iterations, residual, win_len=config.wiener_win_len,
                                   jit_compile=False, name="wiener")(estimates, mix_stft)
            waveforms = ISTFT(config.n_fft, config.hop_length, name="istft")(sources, waveform)  # (B, T, C, J)
            outputs = [waveforms[..., index] for index in range(len(names))]
        else:  # server: the Wiener filter and the ISTFT in XLA functions, one per source after shared statistics
            outputs = WienerISTFT(wiener_iterations, residual, win_len=config.wiener_win_len, n_fft=config.n_fft,
                                  hop_length=config.hop_length, name="wiener_istft")(estimates, mix_stft, waveform)
        return keras.Model(waveform, dict(zip(names, outputs)), name="open_unmix_separator")

    def train_targets(stems):
        return {target: complex_norm(stft(stems[target], config.n_fft, config.hop_length)) for target in targets}

    def adapt(batches):
        mean, std = magnitude_statistics(batches, config.n_fft, config.hop_length)
        for network in networks.values():
            network.set_input_statistics(mean, std)

    def mobile(nb_timesteps: int) -> keras.Model:
        """The whole separator (STFT, networks, Wiener, ISTFT) over a static chunk with fused sequence
        LSTMs: TFLite built-in ops only. Weights are copied from this model at call time."""
        static = build(dataclasses.replace(config, unroll=True), data=data, stats=stats)
        static.train_model.set_weights(train_model.get_weights())
        return static.inference.make_separator(nb_timesteps=nb_timesteps)

    return SeparationModel(
        targets=targets,
        sample_rate=data.sample_rate,
        nb_channels=nb_channels,
        train_model=train_model,
        train_targets=train_targets,
        loss={target: keras.losses.MeanSquaredError() for target in targets},
        separator=make_separator(),
        config=config,
        training=TrainingHooks(adapt=adapt),
        inference=InferencePieces(mobile=mobile, make_separator=make_separator, networks=networks, max_bin=max_bin),
    )


# ------------------------------------------------------------------------------ released checkpoints
# The published open-unmix models (openunmix/__init__.py, `<name>_spec`): STFT 4096/1024 at 44.1 kHz,
# stereo, 16 kHz bandwidth, 3 BLSTM layers; UMX-L has hidden size 1024. UMX-SE is the 16 kHz mono speech model.
PUBLISHED = {
    "umxhq": {"sample_rate": 44100, "nb_channels": 2, "n_fft": 4096, "hop_length": 1024, "hidden_size": 512,
              "bandwidth": 16000.0, "targets": ("vocals", "drums", "bass", "other")},
    "umx": {"sample_rate": 44100, "nb_channels": 2, "n_fft": 4096, "hop_length": 1024, "hidden_size": 512,
            "bandwidth": 16000.0, "targets": ("vocals", "drums", "bass", "other")},
    "umxl": {"sample_rate": 44100, "nb_channels": 2, "n_fft": 4096, "hop_length": 1024, "hidden_size": 1024,
             "bandwidth": 16000.0, "targets": ("vocals", "drums", "bass", "other")},
    "umxse": {"sample_rate": 16000, "nb_channels": 1, "n_fft": 1024, "hop_length": 512, "hidden_size": 256,
              "bandwidth": 16000.0, "targets": ("speech", "noise")},
}
# `<target>-<hash>.pth` as published on Zenodo (records 3370489, 3370486, 5069601, 3786908)
PUBLISHED_FILES = {
    "bass-8d85a5bd": "umxhq", "drums-9619578f": "umxhq", "other-b52fbbf7": "umxhq", "vocals-b62c91ce": "umxhq",
    "bass-646024d3": "umx", "drums-5a48008b": "umx", "other-f8e132cc": "umx", "vocals-c8df74a5": "umx",
    "bass-2ca1ce51": "umxl", "drums-69e0ebd4": "umxl", "other-c8c5b3e6": "umxl", "vocals-bccbd9aa": "umxl",
    "speech-f5ae7c4c": "umxse", "noise-2ccb2e32": "umxse",
    # as openunmix/__init__.py's umxse_spec names them (an underscore before the hash)
    "speech_f5e0d9f9": "umxse", "noise_04a6fc2d": "umxse",
}
# in state dicts of open-unmix < 1.1 (the 2019 UMX / UMX-HQ files), not parameters of the network
_IGNORABLE = {
    "stft.window": "the STFT window of open-unmix 1.0's model (a fixed Hann window; ours is computed)",
    "transform.0.window": "the same STFT window under open-unmix 1.0's transform alias",
    "sample_rate": "a buffer of open-unmix 1.0's model; checked against the model's rate",
    "bn1.num_batches_tracked": "PyTorch's BatchNorm step counter (unused with momentum 0.1)",
    "bn2.num_batches_tracked": "PyTorch's BatchNorm step counter (unused with momentum 0.1)",
    "bn3.num_batches_tracked": "PyTorch's BatchNorm step counter (unused with momentum 0.1)",
}


def _target_of(stem: str) -> str:
    """The target of `<target>.pth`, `<target>-<hash>.pth` or `<target>_<8 hex>.pth` (UMX-SE's names)."""
    hashed = re.fullmatch(r"(.+?)_[0-9a-f]{8}", stem)
    return hashed.group(1) if hashed else stem.split("-")[0]


def _target_file(folder: Path, target: str) -> Optional[Path]:
    exact = folder / f"{target}.pth"
    if exact.is_file():
        return exact
    found = sorted(p for p in folder.glob(f"{target}[-_]*.pth") if _target_of(p.name[:-4]) == target)
    return found[0] if found else None


def read_released(path, model: Optional[str] = None, targets=(), **options):
    """Open-Unmix weights as published: a model folder (`<target>.pth` + `<target>.json` +
    `separator.json`, as open-unmix's `scripts/train.py` writes it) or bare `<target>[-<hash>].pth`
    files (a folder of them or one file) with the configuration of a published model (`import.model`
    = umxhq, umx, umxl or umxse; recognised from the published file names when not given)."""
    from models.checkpoints import ReleasedCheckpoint, load_torch, set_option_keys, state_dict_of
    from configs.errors import CheckpointError

    where = f"import {path}"
    set_option_keys(options, ("model", "targets"), where)
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if model is not None and model not in PUBLISHED:
        raise CheckpointError(f"{where}: import.model={model} is not a published open-unmix model; "
                              f"choose one of {', '.join(PUBLISHED)}")
    if path.is_file():
        stem = path.name[: -len(".pth")] if path.name.endswith(".pth") else path.stem
        files = {_target_of(stem): path}
    else:
        if targets:
            files = {t: _target_file(folder, t) for t in targets}
        else:
            names = sorted({p.name[:-5] for p in folder.glob("*.json") if p.name != "separator.json"}
                           | {_target_of(p.name[:-4]) for p in folder.glob("*.pth")},
                           key=lambda t: (MUSDB_TARGETS.index(t) if t in MUSDB_TARGETS else len(MUSDB_TARGETS), t))
            files = {t: _target_file(folder, t) for t in names}
        missing = [t for t, f in files.items() if f is None]
        if missing or not files:
            raise CheckpointError(f"{where}: no weights for target '{missing[0] if missing else '?'}' "
                                  f"(expected {missing[0] if missing else '<target>'}.pth or <target>-<hash>.pth); "
                                  "pass the model folder open-unmix wrote or a published <target>-<hash>.pth")
    if targets and path.is_file() and tuple(targets) != tuple(files):
        raise CheckpointError(f"{where}: the file holds target '{next(iter(files))}' but import.targets="
                              f"{list(targets)}; pass the folder to import several targets")
    read_files = list(files.values())
    settings = {}
    separator_json = folder / "separator.json"
    if separator_json.is_file():
        separator = json.loads(separator_json.read_text())
        settings.update(sample_rate=int(separator["sample_rate"]), n_fft=int(separator["nfft"]),
                        hop_length=int(separator["nhop"]), nb_channels=int(separator["nb_channels"]))
        read_files.append(separator_json)
    for target in files:
        target_json = folder / f"{target}.json"
        if target_json.is_file() and model is None:
            arguments = json.loads(target_json.read_text()).get("args", {})
            found = dict(n_fft=int(arguments["nfft"]), hop_length=int(arguments["nhop"]),
                         hidden_size=int(arguments["hidden_size"]), nb_channels=int(arguments["nb_channels"]),
                         bandwidth=float(arguments.get("bandwidth", 16000)),
                         unidirectional=bool(arguments.get("unidirectional", False)))
            clash = [k for k in found if k in settings and settings[k] != found[k]]
            if clash:
                raise CheckpointError(f"{where}: {target_json.name} has {clash[0]}={found[clash[0]]} but the other "
                                      f"files have {settings[clash[0]]}; every target must share one configuration")
            settings.update(found)
            read_files.append(target_json)
    if "hidden_size" not in settings:  # bare published files
        if model is None:
            names = {PUBLISHED_FILES.get(f.name[:-4]) for f in files.values()}
            if len(names) != 1 or None in names:
                raise CheckpointError(f"{where}: no {next(iter(files))}.json beside the weights; name the published "
                                      f"model with import.model=umxhq|umx|umxl|umxse")
            model = names.pop()
        published = PUBLISHED[model]
        settings = {k: v for k, v in published.items() if k != "targets"} | settings
    tensors, sample_rates, layouts = {}, [], set()
    for target, file in files.items():
        state = state_dict_of(load_torch(file), file)
        layouts.add(state.layout)
        if "sample_rate" in state:
            sample_rates.append(float(np.asarray(state["sample_rate"])))
        tensors.update({f"{target}/{name}": value for name, value in state.items()})
    if "sample_rate" not in settings:
        settings["sample_rate"] = int(sample_rates[0]) if sample_rates else 44100
    if any(rate != settings["sample_rate"] for rate in sample_rates):
        raise CheckpointError(f"{where}: the weights say {sample_rates[0]:g} Hz but the configuration "
                              f"{settings['sample_rate']} Hz; import.model names another model")
    first = next(iter(files))
    for target, file in files.items():
        if f"{target}/fc1.weight" not in tensors or f"{target}/lstm.weight_ih_l0" not in tensors:
            raise CheckpointError(f"{where}: {file.name} has no 'fc1.weight' / 'lstm.weight_ih_l0'; it is not an "
                                  "Open-Unmix state dict (model.name names the family of the file)")
    if "unidirectional" not in settings:
        settings["unidirectional"] = f"{first}/lstm.weight_ih_l0_reverse" not in tensors
    nb_layers = len([k for k in tensors if k.startswith(f"{first}/lstm.weight_ih_l") and "reverse" not in k])
    overrides = {"data.sample_rate": settings["sample_rate"], "data.nb_channels": settings["nb_channels"],
                 "data.targets": list(files), "model.name": "umx",
                 **{f"model.umx.{key}": settings[key] for key in
                    ("n_fft", "hop_length", "hidden_size", "bandwidth", "unidirectional")},
                 "model.umx.nb_layers": nb_layers}
    ignorable = {f"{t}/{name}": reason for t in files for name, reason in _IGNORABLE.items()}
    kind = model or "model folder"
    return ReleasedCheckpoint(family="umx", config_overrides=overrides, tensors=tensors, files=read_files,
                              description=f"open-unmix {kind} ({', '.join(files)}), hidden {settings['hidden_size']}"
                                          f"{', unidirectional' if settings['unidirectional'] else ''}"
                                          f"; {', '.join(sorted(layouts))}",
                              ignorable=ignorable)


def assign_released(model: SeparationModel, released) -> dict:
    """Open-Unmix state dicts -> the Keras networks: the one mapping table of this family."""
    from models.checkpoints import Assign, assign_table, transpose

    rows = []
    for target, network in model.inference.networks.items():
        def source(name):
            return (f"{target}/{name}",)

        rows += [Assign(source("input_mean"), network.input_mean), Assign(source("input_scale"), network.input_scale),
                 Assign(source("output_mean"), network.output_mean),
                 Assign(source("output_scale"), network.output_scale)]
        for dense in ("fc1", "fc2", "fc3"):
            rows.append(Assign(source(f"{dense}.weight"), getattr(network, dense).kernel, transpose))
        for norm in ("bn1", "bn2", "bn3"):
            layer = getattr(network, norm)
            rows += [Assign(source(f"{norm}.weight"), layer.gamma), Assign(source(f"{norm}.bias"), layer.beta),
                     Assign(source(f"{norm}.running_mean"), layer.moving_mean),
                     Assign(source(f"{norm}.running_var"), layer.moving_variance)]
        for index, lstm in enumerate(network.lstms):
            for direction, suffix in zip(lstm.directions, ("", "_reverse")):
                rows += [Assign(source(f"lstm.weight_ih_l{index}{suffix}"), direction["kernel"], transpose),
                         Assign(source(f"lstm.weight_hh_l{index}{suffix}"), direction["recurrent_kernel"], transpose),
                         Assign(source(f"lstm.bias_ih_l{index}{suffix}"), direction["bias"]),
                         Assign(source(f"lstm.bias_hh_l{index}{suffix}"), direction["recurrent_bias"])]
    return assign_table(rows, released, model.train_model.weights, where="import umx")
