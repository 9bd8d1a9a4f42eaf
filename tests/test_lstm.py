"""The LSTM fast path (models/layers.py `lstm_sequence`: XLA-compiled loops, written-out gradient) against
the reference formulations: the `tf.scan` cell, the unrolled graph (TFLite path) and Keras's cuDNN-layout LSTM."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from models.layers import LSTM, lstm_sequence, recur
from tests import model_harness as harness


def sdr(reference, estimate) -> float:
    reference, estimate = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum((reference - estimate) ** 2)))


def scan_sequence(projected, recurrent_kernel):
    """The PyTorch LSTM cell (gates i, f, g, o) in `tf.scan`, differentiated by TensorFlow."""
    units = recurrent_kernel.shape[-1] // 4

    def step(state, z):
        h, c = state
        i, f, g, o = tf.split(z + tf.matmul(h, recurrent_kernel), 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        return tf.sigmoid(o) * tf.tanh(c), c

    return recur(step, projected, tf.zeros_like(projected[0, ..., :units]), False, "test")


@pytest.mark.parametrize("groups", [(), (3,)])  # one recurrence; 3 batched ones (StackedOpenUnmix's layout)
def test_fused_sequence_and_gradients_match_scan(groups):
    rng = np.random.default_rng(0)
    units, nb_frames, nb_samples = 8, 40, 2
    projected = tf.constant(rng.normal(0, 1, (nb_frames, *groups, nb_samples, 4 * units)).astype(np.float32))
    kernel = tf.constant(rng.normal(0, 0.4, (*groups, units, 4 * units)).astype(np.float32))
    weights = tf.constant(rng.normal(0, 1, (nb_frames, *groups, nb_samples, units)).astype(np.float32))
    results = {}
    for name, sequence in (("scan", scan_sequence), ("fused", lstm_sequence)):
        with tf.GradientTape() as tape:
            tape.watch([projected, kernel])
            hidden = sequence(projected, kernel)
            loss = tf.reduce_sum(hidden * weights)
        results[name] = [hidden] + tape.gradient(loss, [projected, kernel])
    (hidden, d_projected, d_kernel), expected = results["fused"], results["scan"]
    assert hidden.shape == (nb_frames, *groups, nb_samples, units)
    assert d_kernel.shape == kernel.shape
    assert sdr(expected[0], hidden) >= 100
    for got, want in zip((d_projected, d_kernel), expected[1:]):
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5


def test_training_gradients_match_unrolled_graph():
    # tiny Open-Unmix: every weight's gradient of the training loss, fused path (unroll=False) against the
    # unrolled per-frame graph that TensorFlow differentiates op by op (unroll=True), same weights and batch
    # two layers: the gradient also flows from one recurrence into the one below
    fused = harness.build_tiny("umx", overrides={"data": {"targets": ["vocals", "drums"]},
                                                 "model": {"umx": {"nb_layers": 2}}})
    unrolled = harness.build_tiny("umx", overrides={"data": {"targets": ["vocals", "drums"]},
                                                    "model": {"umx": {"nb_layers": 2, "unroll": True}}})
    rng = np.random.default_rng(3)
    for weight in fused.train_model.weights:  # non-trivial scalers so every path carries signal
        weight.assign(rng.uniform(0.5, 1.5, weight.shape) if "variance" in weight.path or "scale" in weight.path
                      else rng.normal(0, 0.3, weight.shape))
    unrolled.train_model.set_weights(fused.train_model.get_weights())
    mixture, stems = harness.random_batch(fused, 2, 961, seed=4)
    targets = fused.train_targets({name: tf.constant(value) for name, value in stems.items()})
    gradients = []
    for model in (fused, unrolled):
        with tf.GradientTape() as tape:
            outputs = model.train_model(mixture, training=False)  # no dropout: both see the same graph
            loss = sum(tf.reduce_mean(tf.square(outputs[t] - targets[t])) for t in model.targets)
        gradients.append(tape.gradient(loss, model.train_model.trainable_weights))
    lstm_weights = 0
    for weight, got, want in zip(fused.train_model.trainable_weights, *gradients):
        assert got is not None and want is not None, weight.path
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), weight.path
        lstm_weights += "lstm" in weight.path
    assert lstm_weights == 2 * 2 * 2 * 4  # targets x layers x directions x (kernel, recurrent, two biases)


def test_cudnn_layout_keras_lstm_gives_the_same_numbers():
    # Keras's LSTM (cuDNN kernel on GPU) keeps gates in our (PyTorch) order i, f, c, o with ONE bias: loading
    # kernel, recurrent kernel and bias_ih + bias_hh of a direction gives the same outputs on CPU
    rng = np.random.default_rng(5)
    ours = LSTM(16, bidirectional=True)
    inputs = rng.normal(0, 1, (2, 30, 12)).astype(np.float32)
    ours.build(inputs.shape)
    for weight in ours.weights:
        weight.assign(rng.normal(0, 0.3, weight.shape))
    forward, backward = ours.directions
    keras_lstm = keras.layers.Bidirectional(keras.layers.LSTM(16, return_sequences=True), merge_mode="concat")
    keras_lstm.build(inputs.shape)
    keras_lstm.set_weights([forward["kernel"], forward["recurrent_kernel"], forward["bias"] + forward["recurrent_bias"],
                            backward["kernel"], backward["recurrent_kernel"],
                            backward["bias"] + backward["recurrent_bias"]])
    assert sdr(keras_lstm(inputs), ours(inputs)) >= 100


def test_every_weight_draws_its_own_initial_values():
    """PyTorch draws each LSTM parameter on its own; a Keras 3 initializer instance gives the same values on
    every call, so one instance shared by the weights made both directions start equal and each bias equal to
    its recurrent bias (their sum twice one uniform draw instead of the sum of two)."""
    keras.utils.set_random_seed(0)
    layer = LSTM(8, bidirectional=True)
    layer.build((None, None, 8))
    values = [weight.numpy() for direction in layer.directions for weight in direction.values()]
    assert len(values) == 8
    for first in range(len(values)):
        for second in range(first + 1, len(values)):
            assert values[first].shape != values[second].shape or not np.array_equal(values[first], values[second])
    bound = 1 / np.sqrt(8)
    assert all(np.abs(value).max() <= bound and np.abs(value).max() > 0.5 * bound for value in values)


@pytest.mark.parametrize("nb_frames", [7, 9, 1])  # 7: blocks of 3, two padded frames; 9: 3 x 3; 1: one block
def test_tflite_lstm_loop_file_equals_the_scan(nb_frames):
    # the float32 / dynamic TFLite files' recurrences (open_unmix._tflite_lstm_loop: hoisted input projections,
    # WHILE loops over blocks of frames writing with DYNAMIC_UPDATE_SLICE), converted and run by LiteRT,
    # against the PyTorch-order cell in tf.scan; built-in ops only
    from ai_edge_litert.interpreter import Interpreter

    from models.open_unmix import _tflite_lstm_loop
    from models.transforms import tflite_graph

    rng = np.random.default_rng(1)
    groups, nb_samples, features, units = 3, 2, 5, 4
    weights = [{"kernel": rng.normal(0, 0.5, (features, 4 * units)).astype(np.float32),
                "recurrent_kernel": rng.normal(0, 0.5, (units, 4 * units)).astype(np.float32),
                "bias": rng.normal(0, 0.5, 4 * units).astype(np.float32),
                "recurrent_bias": rng.normal(0, 0.5, 4 * units).astype(np.float32)} for _ in range(groups)]
    sequences = rng.normal(0, 1, (groups, nb_frames, nb_samples, features)).astype(np.float32)
    projected = np.stack([s @ w["kernel"] + w["bias"] + w["recurrent_bias"] for s, w in zip(sequences, weights)])
    expected = scan_sequence(tf.constant(np.transpose(projected, [1, 0, 2, 3])),
                             tf.constant(np.stack([w["recurrent_kernel"] for w in weights])))
    expected = np.transpose(np.asarray(expected), [1, 0, 2, 3])  # (groups, frames, samples, units)

    function = tf.function(lambda x: _tflite_lstm_loop(x, [{k: tf.constant(v) for k, v in w.items()} for w in weights]),
                           input_signature=[tf.TensorSpec(sequences.shape, tf.float32)])
    with tflite_graph(lstm_loop=True):
        concrete = function.get_concrete_function()
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], function)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        blob = converter.convert()
    interpreter = Interpreter(model_content=blob)
    interpreter.allocate_tensors()
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert {"WHILE", "FULLY_CONNECTED"} <= ops
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], sequences)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) < 1e-5
