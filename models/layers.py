"""Building blocks shared by model families: initialisers, BatchNorm conventions, the STFT-config check,
frame patching/cropping and the per-target output dict.

BatchNorm momentum conventions differ: Keras updates `moving = momentum * moving + (1 - momentum) * batch`,
PyTorch `running = (1 - momentum) * running + momentum * batch`. So PyTorch's default 0.1 is Keras's 0.9,
and Keras's own default 0.99 is PyTorch's 0.01. Epsilon defaults differ too (Keras 1e-3, PyTorch 1e-5).
"""
from __future__ import annotations

import math
from typing import Sequence

import keras
import tensorflow as tf

from configs.errors import ConfigError
from models.transforms import Float32Layer, compiled_or_plain


# ---------------------------------------------------------------------------------------- initialisers


def torch_uniform():
    """PyTorch's default for Conv*d / ConvTranspose*d / Linear kernels: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Keras computes a transposed conv's fan_in from its output channels, as PyTorch does.
    """
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


# ---------------------------------------------------------------------------------------- frames


class PadFrames(keras.layers.Layer):
    """Zero-pads axis 1 (frames) at the end to a multiple of `multiple`."""

    def __init__(self, multiple: int, **kwargs):
        super().__init__(**kwargs)
        self.multiple = multiple

    def call(self, x):
        missing = (-tf.shape(x)[1]) % self.multiple
        return tf.pad(x, [[0, 0], [0, missing]] + [[0, 0]] * (x.shape.rank - 2))

    def compute_output_shape(self, input_shape):
        frames = input_shape[1]
        if frames is not None:
            frames = -(-frames // self.multiple) * self.multiple
        return (input_shape[0], frames) + tuple(input_shape[2:])

    def get_config(self):
        return {**super().get_config(), "multiple": self.multiple}


class CropFrames(keras.layers.Layer):
    """`x[:, :nb_frames of reference]`: undoes `PadFrames`."""

    def call(self, inputs, reference):
        return inputs[:, : tf.shape(reference)[1]]

    def compute_output_shape(self, inputs_shape, reference_shape):
        return (inputs_shape[0], reference_shape[1]) + tuple(inputs_shape[2:])


def batch_norm(name: str, *, torch_momentum: float = None, keras_momentum: float = None, epsilon: float = 1e-3,
               axis: int = -1, **kwargs) -> keras.layers.BatchNormalization:
    """A Keras BatchNormalization from the momentum of either convention (exactly one of the two)."""
    if (torch_momentum is None) == (keras_momentum is None):
        raise ValueError("batch_norm: give exactly one of torch_momentum, keras_momentum")
    momentum = keras_momentum if keras_momentum is not None else 1.0 - torch_momentum
    return keras.layers.BatchNormalization(axis=axis, momentum=momentum, epsilon=epsilon, name=name, **kwargs)


def torch_batch_norm(name: str, axis: int = -1, **kwargs) -> keras.layers.BatchNormalization:
    """PyTorch's BatchNorm defaults (momentum 0.1, eps 1e-5) in Keras terms."""
    return batch_norm(name, torch_momentum=0.1, epsilon=1e-5, axis=axis, **kwargs)


@keras.saving.register_keras_serializable(package="musicsep")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization whose training call on a 4-D float32 input is ONE `FusedBatchNormV3` op
    (and one `FusedBatchNormGradV3` in the backward pass) instead of the ~10 ops of Keras's moments and
    normalisation and the ~25 of their gradient: a graph of many batch norms traces and optimises faster.

    Same weights, same numbers to float32 round-off: the input is normalised with the biased batch variance,
    and the moving variance is updated with the biased one (Keras's convention; the op returns Bessel's, which
    is undone). Channels on axis 3 (NHWC), 1 (NCHW) or 2 (`(n, h, channels, w)` read as NCHW `(n·h, channels,
    w, 1)`). Inference, other ranks, masks and renorm take Keras's own path, so exported graphs are unchanged.
    """

    def call(self, inputs, training=None, mask=None):
        if (not (training and self.trainable) or mask is not None or self.renorm or not (self.center and self.scale)
                or len(inputs.shape) != 4 or inputs.dtype != tf.float32 or self.synchronized):
            return super().call(inputs, training=training, mask=mask)
        axis = self.axis % 4
        shape = tf.shape(inputs)
        x = inputs
        if axis == 2:  # rows of (channels, w): NCHW with h = 1 after folding h into the batch
            x = tf.reshape(inputs, tf.stack([shape[0] * shape[1], shape[2], shape[3], 1]))
        y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=tf.convert_to_tensor(self.gamma), offset=tf.convert_to_tensor(self.beta),
            mean=tf.zeros([0]), variance=tf.zeros([0]), epsilon=self.epsilon,
            data_format="NHWC" if axis == 3 else "NCHW", is_training=True)
        count = tf.cast(tf.size(inputs) // shape[axis], variance.dtype)
        variance = variance * (count - 1.0) / count  # Bessel's correction undone: the biased variance
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.reshape(y, shape) if axis == 2 else y


ACTIVATIONS = ("relu", "leaky_relu", "elu")


def activation(kind: str, name: str, leaky_slope: float = 0.2) -> keras.layers.Layer:
    """relu | leaky_relu (slope `leaky_slope`) | elu (alpha 1) as a named layer."""
    if kind == "relu":
        return keras.layers.ReLU(name=name)
    if kind == "leaky_relu":
        return keras.layers.LeakyReLU(leaky_slope, name=name)
    if kind == "elu":
        return keras.layers.ELU(name=name)
    raise ValueError(f"activation: unknown kind '{kind}'; choose one of {', '.join(ACTIVATIONS)}")


# ---------------------------------------------------------------------------------------------- checks


def check_stft(key: str, n_fft: int, hop_length: int) -> None:
    """`key` is the config prefix, e.g. "model.unet."; a perfect ISTFT needs hop_length <= n_fft / 2."""
    if n_fft <= 0 or n_fft % 2:
        raise ConfigError(f"{key}n_fft must be a positive even number, got {n_fft}")
    if not 0 < hop_length <= n_fft // 2:
        raise ConfigError(f"{key}hop_length must lie in (0, n_fft/2] for a perfect ISTFT, got {hop_length}")


# ------------------------------------------------------------------------------ frame patching/cropping


class SpectrogramPatches(keras.layers.Layer):
    """`(nb_samples, nb_frames, nb_bins, nb_channels)` -> `(nb_samples * nb_patches, patch_frames, padded_bins,
    nb_channels)`.

    Bins are cropped at `max_bin` and zero-padded to `padded_bins`; frames zero-padded to whole patches
    (Spleeter's `pad_and_partition`). Patches of one example are consecutive rows.
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
    """[patches `(nb_samples * nb_patches, patch_frames, padded_bins, *extra)`, reference `(nb_samples, nb_frames,
    ...)`] -> `(nb_samples, nb_frames, max_bin, *extra)`: patches joined, frame and bin padding cropped."""

    def __init__(self, max_bin: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.max_bin = max_bin

    def call(self, patches, reference):
        nb_samples = tf.shape(reference)[0]
        nb_frames = reference.shape[1] if reference.shape[1] is not None else tf.shape(reference)[1]
        shape = patches.shape
        merged = tf.reshape(patches, [nb_samples, -1] + list(shape[2:]))
        # a slice with a dynamic frame count loses the static bin axis in traced graphs: restore it
        return tf.ensure_shape(merged[:, :nb_frames, : self.max_bin], [None, None, self.max_bin] + list(shape[3:]))

    def compute_output_shape(self, patches_shape, reference_shape):
        return (reference_shape[0], reference_shape[1], self.max_bin) + tuple(patches_shape[3:])

    def get_config(self):
        return {**super().get_config(), "max_bin": self.max_bin}


# ------------------------------------------------------------------------------------------- targets


class StackTargets(keras.layers.Layer):
    """Per-target tensors `[(...)] * J` -> `(..., J)`."""

    def call(self, tensors):
        return tf.stack(list(tensors), axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0]) + (len(input_shape),)


class SplitTargets(Float32Layer):
    """`(..., nb_targets)` -> {target: `(...)`}, the output dict of every graph (float32 under any precision)."""

    def __init__(self, targets: Sequence[str] = (), **kwargs):
        super().__init__(**kwargs)
        self.targets = tuple(targets)

    def call(self, stacked):
        return {target: stacked[..., index] for index, target in enumerate(self.targets)}

    def compute_output_shape(self, input_shape):
        return {target: tuple(input_shape[:-1]) for target in self.targets}

    def get_config(self):
        return {**super().get_config(), "targets": list(self.targets)}


# ---------------------------------------------------------------------------------------------- LSTM


@keras.saving.register_keras_serializable(package="musicsep")
def recur(step, projected, zeros, unroll: bool, where: str):
    """The hidden states of an LSTM cell `step((h, c), z) -> (h, c)` run over time-major inputs `projected`
    `(nb_frames, ...)` from the state `(zeros, zeros)`: one `tf.scan`, or (`unroll`, for TFLite built-ins) a
    Python loop over the static frame count."""
    if not unroll:
        return tf.scan(step, projected, initializer=(zeros, zeros))[0]
    nb_frames = projected.shape[0]
    if nb_frames is None:
        raise ValueError(f"{where}(unroll=True) needs a static number of frames (fixed input length)")
    state, outputs = (zeros, zeros), []
    for z in tf.unstack(projected, num=nb_frames, axis=0):
        state = step(state, z)
        outputs.append(state[0])
    return tf.stack(outputs, axis=0)


def lstm_cell(recurrent_kernel):
    """The PyTorch-order LSTM step `((h, c), z) -> (h, c)` (gates i, f, g, o), `z` the projected input plus both
    biases; `recurrent_kernel` `(..., units, 4 * units)` broadcasts over leading group axes of `h`."""
    def step(state, z):
        h, c = state
        i, f, g, o = tf.split(z + tf.matmul(h, recurrent_kernel), 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        return tf.sigmoid(o) * tf.tanh(c), c

    return step


def _previous(sequence):
    """`(nb_frames, ..., units)` -> the same one frame later: zeros first (the initial state), the last frame dropped."""
    return tf.concat([tf.zeros_like(sequence[:1]), sequence[:-1]], axis=0)


@compiled_or_plain
def _lstm_forward(projected, recurrent_kernel):
    """Hidden and cell states `(nb_frames, ..., units)` of the PyTorch-order LSTM over time-major `projected`
    `(nb_frames, ..., 4 * units)` (input projection and both biases already added); `recurrent_kernel`
    `(..., units, 4 * units)` broadcasts over the leading (group) axes of a step's `(..., nb_samples, units)`.

    XLA compiles the loop into one native loop: no per-step op dispatch, the step's ops fused."""
    units = recurrent_kernel.shape[-1] // 4
    zeros = tf.zeros_like(projected[0, ..., :units])
    return tf.scan(lstm_cell(recurrent_kernel), projected, initializer=(zeros, zeros))


@compiled_or_plain
def _lstm_backward(projected, recurrent_kernel, hidden, cells, d_hidden):
    """Gradients of `_lstm_forward`'s hidden states w.r.t. `projected` and `recurrent_kernel`, given `d_hidden`.

    The gate activations are recomputed from the stored states with ONE matmul over all frames; the reverse
    loop only carries d(hidden), d(cell) through `recurrent_kernel^T`, and the kernel's gradient is one matmul
    over all frames after the loop (the cuDNN scheme) instead of an accumulation per step."""
    h_prev, c_prev = _previous(hidden), _previous(cells)
    i, f, g, o = tf.split(projected + tf.matmul(h_prev, recurrent_kernel), 4, axis=-1)
    i, f, g, o = tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)
    tanh_c = tf.tanh(cells)
    # d(cell) += d(hidden) * k_c; d(gates before activation) = [dc, dc, dc, dh] * k_gates
    k_c = o * (1.0 - tf.square(tanh_c))
    k_gates = tf.concat([g * i * (1.0 - i), c_prev * f * (1.0 - f), i * (1.0 - tf.square(g)),
                         tanh_c * o * (1.0 - o)], axis=-1)
    zeros = tf.zeros_like(hidden[0])

    def step(state, frame):
        d_h_next, d_c_next, _ = state
        d_h_frame, k_c_frame, k_gates_frame, f_frame = frame
        d_h = d_h_frame + d_h_next
        d_c = d_c_next + d_h * k_c_frame
        d_gates = tf.concat([d_c, d_c, d_c, d_h], axis=-1) * k_gates_frame
        return tf.matmul(d_gates, recurrent_kernel, transpose_b=True), d_c * f_frame, d_gates

    d_gates = tf.scan(step, (d_hidden, k_c, k_gates, f), initializer=(zeros, zeros, tf.zeros_like(projected[0])),
                      reverse=True)[2]
    # sum over frames and samples of h_prev^T d_gates, per group: batch axes (samples, groups...), then frames
    rank = len(hidden.shape)
    order = [rank - 2] + list(range(1, rank - 2)) + [0, rank - 1]
    d_kernel = tf.matmul(tf.transpose(h_prev, order), tf.transpose(d_gates, order), transpose_a=True)
    d_kernel = tf.reduce_sum(d_kernel, axis=0)  # (groups..., units, 4 * units)
    return d_gates, d_kernel


@tf.custom_gradient
def lstm_sequence(projected, recurrent_kernel):
    """Hidden states `(nb_frames, ..., nb_samples, units)` of the PyTorch-order LSTM (gates i, f, g, o) over
    time-major `projected` `(nb_frames, ..., nb_samples, 4 * units)` (inputs times kernel plus both biases) from
    a zero state, `recurrent_kernel` `(..., units, 4 * units)`: the fast path of `unroll=False`.

    Forward and backward loops are XLA-compiled; the gradient is written out (`_lstm_backward`). Same numbers as
    the `tf.scan` of `recur` to float32 round-off (tests/test_lstm.py)."""
    # inputs cut from any tape: the XLA loops must not be differentiated themselves (their TensorList
    # intermediates cannot leave the compiled cluster); `grad` is their derivative
    projected, recurrent_kernel = tf.stop_gradient(projected), tf.stop_gradient(recurrent_kernel)
    hidden, cells = _lstm_forward(projected, recurrent_kernel)

    def grad(d_hidden):
        return _lstm_backward(projected, recurrent_kernel, hidden, cells, tf.stop_gradient(d_hidden))

    return hidden, grad


class LSTM(keras.layers.Layer):
    """One PyTorch-style LSTM layer, `(nb_samples, nb_frames, features)` -> `(nb_samples, nb_frames, units * dirs)`.

    Gates in PyTorch order (input, forget, cell, output), biases `b_ih` (`bias`) and `b_hh`
    (`recurrent_bias`) per direction, initialised U(-1/sqrt(units), 1/sqrt(units)). The input
    projection runs once over all frames; only the recurrence loops: `lstm_sequence` (XLA-compiled,
    both directions in one loop, written-out gradient), or a Python loop over a static frame count
    when `unroll`, which TFLite converts to builtins.
    """

    def __init__(self, units: int, bidirectional: bool = False, unroll: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.bidirectional = bidirectional
        self.unroll = unroll

    def build(self, input_shape):
        features = input_shape[-1]
        bound = 1.0 / math.sqrt(self.units)

        def init():  # one instance per weight: a Keras 3 initializer gives the same values on every call
            return keras.initializers.RandomUniform(-bound, bound)

        self.directions = []
        for suffix in ("", "_reverse")[: 2 if self.bidirectional else 1]:
            self.directions.append({
                "kernel": self.add_weight(shape=(features, 4 * self.units), initializer=init(), name="kernel" + suffix),
                "recurrent_kernel": self.add_weight(shape=(self.units, 4 * self.units), initializer=init(),
                                                    name="recurrent_kernel" + suffix),
                "bias": self.add_weight(shape=(4 * self.units,), initializer=init(), name="bias" + suffix),
                "recurrent_bias": self.add_weight(shape=(4 * self.units,), initializer=init(),
                                                  name="recurrent_bias" + suffix),
            })

    def _recurrence(self, projected, recurrent_kernel):
        """`projected` `(nb_frames, nb_samples, 4 * units)` (time major) -> hidden states, same layout with `units`."""
        if not self.unroll:
            return lstm_sequence(projected, tf.convert_to_tensor(recurrent_kernel))
        zeros = tf.zeros(tf.stack([tf.shape(projected)[1], self.units]), projected.dtype)
        return recur(lstm_cell(recurrent_kernel), projected, zeros, self.unroll, "LSTM")

    def call(self, inputs):
        time_major = tf.transpose(inputs, [1, 0, 2])
        projections = []
        for index, weights in enumerate(self.directions):
            sequence = tf.reverse(time_major, axis=[0]) if index == 1 else time_major
            projections.append(tf.einsum("tbi,ig->tbg", sequence, weights["kernel"])
                               + weights["bias"] + weights["recurrent_bias"])
        if self.unroll or len(self.directions) == 1:
            outputs = [self._recurrence(projected, weights["recurrent_kernel"])
                       for projected, weights in zip(projections, self.directions)]
        else:  # both directions in ONE loop: (frames, direction, samples, 4 * units), one kernel per direction
            kernels = tf.stack([tf.convert_to_tensor(weights["recurrent_kernel"]) for weights in self.directions])
            outputs = tf.unstack(lstm_sequence(tf.stack(projections, axis=1), kernels), num=2, axis=1)
        if len(outputs) == 2:
            outputs[1] = tf.reverse(outputs[1], axis=[0])
        return tf.transpose(tf.concat(outputs, axis=-1), [1, 0, 2])

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units * (2 if self.bidirectional else 1),)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "bidirectional": self.bidirectional,
                "unroll": self.unroll}


# ------------------------------------------------------------------- TFLite's fused sequence LSTM
# The TFLite converter replaces the body of a function annotated `api_implements="lstm_<id>"` (the interface
# of Keras 2's `standard_lstm`, tensorflow/python/keras/layers/recurrent_v2.py) by ONE built-in
# UNIDIRECTIONAL_SEQUENCE_LSTM op (tensorflow/compiler/mlir/lite/transforms/prepare_composite_functions_tf.cc,
# utils/lstm_utils.cc `ConvertKerasLSTMLayer`): arguments (inputs, init_h, init_c, kernel, recurrent_kernel, bias)
# as float tensors of static shape (a variable passed as such is a resource: no fusion), five results of which
# only the first two may be used, gates in Keras order (i, f, c, o) = PyTorch's (i, f, g, o), no cell clipping.
# The op's kernel runs the whole sequence natively, and with dynamic-range quantization on int8 weights.
SEQUENCE_LSTM_INTERFACE = "lstm_9d1c2c1e8a6f4b0c9e0c5d3b2a1f7e61"


def _sequence_lstm_body(inputs, init_h, init_c, kernel, recurrent_kernel, bias):
    """What TensorFlow runs (the converter drops it): `inputs` `(nb_frames, nb_samples, features)` ->
    (last hidden state, hidden states `(nb_frames, nb_samples, units)`, last h, last c, a placeholder)."""
    projected = tf.einsum("tbi,ig->tbg", inputs, kernel) + bias
    hidden, cell = tf.scan(lstm_cell(recurrent_kernel), projected, initializer=(init_h, init_c))
    return hidden[-1], hidden, hidden[-1], cell[-1], tf.constant(0.0)


_sequence_lstm = tf.function(
    _sequence_lstm_body, autograph=False,
    experimental_attributes={"api_implements": SEQUENCE_LSTM_INTERFACE, "api_preferred_device": "CPU",
                             "time_major": True, "go_backwards": False})


def sequence_lstm(inputs, kernel, recurrent_kernel, bias):
    """One LSTM direction from the zero state as a TFLite-fusable composite: time-major `inputs`
    `(nb_frames, nb_samples, features)` -> hidden states `(nb_frames, nb_samples, units)`.

    `kernel` `(features, 4 * units)`, `recurrent_kernel` `(units, 4 * units)`, `bias` `(4 * units,)` (PyTorch's
    `b_ih + b_hh`), gates (i, f, g, o). TFLite fuses it when `nb_samples` is static."""
    kernel, recurrent_kernel, bias = (tf.convert_to_tensor(value) for value in (kernel, recurrent_kernel, bias))
    # the converter fuses only a static state shape; a dynamic batch (e.g. Keras's default signature of a
    # layer, traced when the model is saved) still runs in TensorFlow
    nb_samples = inputs.shape[1] if inputs.shape[1] is not None else tf.shape(inputs)[1]
    zeros = tf.zeros(tf.stack([nb_samples, recurrent_kernel.shape[0]]), inputs.dtype)
    return _sequence_lstm(inputs, zeros, zeros, kernel, recurrent_kernel, bias)[1]
