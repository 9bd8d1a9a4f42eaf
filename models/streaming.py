"""Real-time streaming form of unidirectional Open-Unmix: one hop of audio in, one hop per target out.

The offline separator (`models/open_unmix.py`, `wiener_iterations=0`) is STFT -> network -> ratio
masks -> ISTFT over a whole signal. With a unidirectional LSTM every step of that chain is causal
except the edges, so it can run frame by frame with three pieces of state carried between calls:

    frame_buffer  (nb_samples, n_fft - hop_length, nb_channels)          the last input samples
    overlap_tail  (nb_samples, n_fft - hop_length, nb_channels, nb_sources)  ISTFT overlap-add tail
    lstm_state    (nb_samples, nb_targets, nb_layers, 2, hidden_size)    (h, c) of every LSTM layer

Each call takes `audio` `(nb_samples, hop_length, nb_channels)`, completes one analysis frame (the
buffer plus the new hop), runs every target network on that single frame with the carried LSTM
states, applies ratio masks (`filtering.softmask`, per frame), inverts the frame and overlap-adds it.
The first `hop_length` samples of the sum receive no later frame, so they are final: dividing by the
(periodic) overlap-added squared window, as the offline ISTFT does, gives one output hop per target.

Latency: the output stream lags the input stream by `n_fft - hop_length` samples (3072 samples,
69.7 ms for UMX at 44.1 kHz). A sample first waits for its hop to fill, so from the first sample of a
hop to its separated output the algorithmic latency is `hop_length + (n_fft - hop_length) = n_fft`
samples, the window (92.9 ms for UMX), plus the compute time of one step.

Equivalence with the offline separator (tested in `tests/test_streaming.py`): starting from zero state
and fed `s = [0] * 2 hop ++ x`, output sample `j` equals the offline separator on
`u = [0] * (n_fft / 2 + hop) ++ x` at sample `j - n_fft / 2` (the zero prefixes make the offline
reflect padding and the streamed zero state see the same silent first frames).

The multichannel Wiener EM of the offline separator is not causal (covariances and its scaling are
sums over all frames), so the stream uses ratio masks by default; `wiener_iterations=n` instead runs
open-unmix's EM on the current frame alone (spatial covariances and scaling from that frame: causal,
a per-frame Wiener step with no offline counterpart). `residual` (mixture minus the targets) is causal.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional

import numpy as np

from configs.errors import ConfigError

STEP_SIGNATURE = "stream_step"
AUDIO = "audio"
STATE_NAMES = ("frame_buffer", "overlap_tail", "lstm_state")


def supports(model) -> bool:
    """True for a SeparationModel that has a streaming form (unidirectional Open-Unmix)."""
    return bool(model.inference.networks) and getattr(model.config, "unidirectional", False) \
        and hasattr(model.config, "hop_length")


def periodic_window_sum(n_fft: int, hop_length: int) -> np.ndarray:
    """`(hop_length,)`: sum over the frames covering a sample of the squared periodic Hann window at its offset.

    The offline ISTFT's normaliser away from the signal's edges (where every covering frame exists).
    """
    window = np.asarray(_hann(n_fft), np.float64)
    offsets = np.arange(hop_length)[:, None] + hop_length * np.arange(-(-n_fft // hop_length))[None, :]
    squared = np.where(offsets < n_fft, np.square(window[np.minimum(offsets, n_fft - 1)]), 0.0)
    return squared.sum(axis=1).astype(np.float32)


def _hann(n_fft: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)


class StreamingOpenUnmix:
    """The state-passing step of a built unidirectional Open-Unmix (weights shared with `model`).

    `step(audio, frame_buffer, overlap_tail, lstm_state)` -> {target: hop, `<state>_out`: new state}.
    """

    def __init__(self, model, residual: Optional[bool] = None, wiener_iterations: int = 0, eps: float = 1e-10):
        if not supports(model):
            raise ConfigError("streaming: needs a unidirectional Open-Unmix; set model.name=umx "
                              "model.umx.unidirectional=True")
        config = model.config
        self.model = model
        self.targets = tuple(model.targets)
        self.networks = [model.inference.networks[t] for t in self.targets]
        self.residual = config.residual if residual is None else residual
        self.sources = self.targets + (("residual",) if self.residual else ())
        self.n_fft, self.hop_length = config.n_fft, config.hop_length
        self.nb_channels = model.nb_channels
        self.nb_layers, self.hidden_size = config.nb_layers, config.hidden_size
        self.sample_rate = model.sample_rate
        self.eps = eps
        self.wiener_iterations = wiener_iterations
        self.window = _hann(self.n_fft).astype(np.float32)
        self.window_sum = periodic_window_sum(self.n_fft, self.hop_length)

    # ---------------------------------------------------------------------------- description
    @property
    def latency_samples(self) -> int:
        """Output stream lag behind the input stream, in samples."""
        return self.n_fft - self.hop_length

    def state_shapes(self, nb_samples: Optional[int] = 1) -> Dict[str, list]:
        keep = self.n_fft - self.hop_length
        return {"frame_buffer": [nb_samples, keep, self.nb_channels],
                "overlap_tail": [nb_samples, keep, self.nb_channels, len(self.sources)],
                "lstm_state": [nb_samples, len(self.targets), self.nb_layers, 2, self.hidden_size]}

    def initial_state(self, nb_samples: int = 1) -> Dict[str, np.ndarray]:
        """Zeros: silence before the stream starts."""
        return {name: np.zeros(shape, np.float32) for name, shape in self.state_shapes(nb_samples).items()}

    def input_signature(self, nb_samples: Optional[int] = None):
        import tensorflow as tf

        specs = [tf.TensorSpec([nb_samples, self.hop_length, self.nb_channels], tf.float32, name=AUDIO)]
        specs += [tf.TensorSpec(shape, tf.float32, name=name) for name, shape in self.state_shapes(nb_samples).items()]
        return specs

    def describe(self) -> dict:
        """What `model.json` says about the stream: hop, latency, tensors."""
        rate = float(self.sample_rate)
        return {
            "signature": STEP_SIGNATURE,
            "sample_rate": self.sample_rate,
            "nb_channels": self.nb_channels,
            "targets": list(self.sources),
            "hop_samples": self.hop_length,
            "hop_ms": round(1000 * self.hop_length / rate, 3),
            "window_samples": self.n_fft,
            "latency_samples": self.latency_samples,
            "latency_ms": round(1000 * self.latency_samples / rate, 3),
            "algorithmic_latency_ms": round(1000 * self.n_fft / rate, 3),
            "postprocess": ((f"Wiener EM ({self.wiener_iterations} iterations) on each frame alone"
                             if self.wiener_iterations else "ratio masks per frame")
                            + (" + residual" if self.residual else "")),
            "input": {AUDIO: ["batch", self.hop_length, self.nb_channels]},
            "outputs": {t: ["batch", self.hop_length, self.nb_channels] for t in self.sources},
            "state": {name: {"shape": ["batch"] + shape[1:], "dtype": "float32", "initial": "zeros",
                             "output": name + "_out"} for name, shape in self.state_shapes().items()},
            "protocol": (f"start with zero state; call once per {self.hop_length} input samples and feed every "
                         f"`<state>_out` back as `<state>`; output sample j belongs to input sample "
                         f"j - {self.latency_samples}"),
        }

    # ------------------------------------------------------------------------------- the step
    def step(self, audio, frame_buffer, overlap_tail, lstm_state) -> Dict[str, object]:
        """One hop. Shapes as in the module docstring; returns {source: (nb_samples, hop, nb_channels)} and
        `frame_buffer_out`, `overlap_tail_out`, `lstm_state_out`."""
        import tensorflow as tf

        from models.filtering import softmask, wiener
        from models.transforms import irfft

        hop = self.hop_length
        frame = tf.concat([frame_buffer, audio], axis=1)  # (B, n_fft, C)
        spectrum = tf.signal.rfft(tf.transpose(frame, [0, 2, 1]) * self.window)  # (B, C, bins)
        mix_re, mix_im = tf.math.real(spectrum), tf.math.imag(spectrum)
        mix_stft = tf.stack([tf.transpose(mix_re, [0, 2, 1]), tf.transpose(mix_im, [0, 2, 1])], axis=-1)
        magnitude = tf.sqrt(tf.square(mix_stft[..., 0]) + tf.square(mix_stft[..., 1]))  # (B, bins, C)

        estimates, new_states = [], []
        for index, network in enumerate(self.networks):
            estimate, states = self._network_frame(network, magnitude, lstm_state[:, index])
            estimates.append(estimate)
            new_states.append(states)
        if self.wiener_iterations:  # the offline EM over a one-frame axis
            sources = wiener(tf.stack(estimates, axis=-1)[:, None], mix_stft[:, None], self.wiener_iterations,
                             self.residual, self.eps)[:, 0]
        else:
            sources = softmask(tf.stack(estimates, axis=-1), mix_stft, self.eps)  # (B, bins, C, J, 2)
            if self.residual:
                sources = tf.concat([sources, (mix_stft - tf.reduce_sum(sources, axis=-2))[..., None, :]], axis=-2)

        real = tf.transpose(sources[..., 0], [0, 2, 3, 1])  # (B, C, J, bins)
        imag = tf.transpose(sources[..., 1], [0, 2, 3, 1])
        frames = tf.transpose(irfft(real, imag, self.n_fft) * self.window, [0, 3, 1, 2])  # (B, n_fft, C, J)
        summed = tf.concat([overlap_tail, tf.zeros_like(frames[:, :hop])], axis=1) + frames
        ready = summed[:, :hop] / self.window_sum[None, :, None, None]
        outputs = {name: ready[..., index] for index, name in enumerate(self.sources)}
        outputs["frame_buffer_out"] = frame[:, hop:]
        outputs["overlap_tail_out"] = summed[:, hop:]
        outputs["lstm_state_out"] = tf.stack(new_states, axis=1)
        return outputs

    def _network_frame(self, network, magnitude, states):
        """One target network on one frame: magnitude `(B, nb_bins, C)`, states `(B, nb_layers, 2, hidden)`.

        The same computation as `OpenUnmix.call` restricted to one frame (inference: BN statistics,
        no dropout), with the LSTM recurrence carried in `states`.
        """
        import tensorflow as tf

        nb_channels, max_bin, nb_bins = network.nb_channels, network.max_bin, network.nb_bins
        x = tf.transpose(magnitude, [0, 2, 1])[..., :max_bin]  # (B, C, max_bin)
        x = (x + network.input_mean) * network.input_scale
        x = tf.reshape(x, [-1, 1, nb_channels * max_bin])  # the layers were built for (B, frames, features)
        x = tf.tanh(network.bn1(network.fc1(x), training=False))
        hidden, new_states = x[:, 0], []
        for layer_index, lstm in enumerate(network.lstms):
            weights = lstm.directions[0]
            h, c = states[:, layer_index, 0], states[:, layer_index, 1]
            gates = (tf.matmul(hidden, weights["kernel"]) + weights["bias"] + weights["recurrent_bias"]
                     + tf.matmul(h, weights["recurrent_kernel"]))
            i, f, g, o = tf.split(gates, 4, axis=-1)
            c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
            h = tf.sigmoid(o) * tf.tanh(c)
            new_states.append(tf.stack([h, c], axis=1))
            hidden = h
        x = tf.concat([x, hidden[:, None]], axis=-1)
        x = tf.nn.relu(network.bn2(network.fc2(x), training=False))
        x = network.bn3(network.fc3(x), training=False)
        x = tf.reshape(x, [-1, nb_channels, nb_bins]) * network.output_scale + network.output_mean
        estimate = tf.transpose(tf.nn.relu(x), [0, 2, 1]) * magnitude
        return estimate, tf.stack(new_states, axis=1)

    def compiled(self) -> Callable[..., Dict[str, np.ndarray]]:
        """The step as a traced tf.function taking and returning numpy arrays (keyword arguments)."""
        import tensorflow as tf

        function = tf.function(self.step, input_signature=self.input_signature(None), jit_compile=False)

        def run(**inputs):
            outputs = function(*[tf.constant(inputs[name]) for name in (AUDIO,) + STATE_NAMES])
            return {k: v.numpy() for k, v in outputs.items()}

        return run


# ------------------------------------------------------------------------------------ drivers
def run_stream(step: Callable[..., Mapping[str, np.ndarray]], state: Mapping[str, np.ndarray],
               hops: Iterable[np.ndarray]) -> Iterator[Dict[str, np.ndarray]]:
    """Feed hops `(nb_samples, hop, nb_channels)` through `step` (keyword arguments `audio` and the state),
    carrying the state; yields {source: hop} as each is produced."""
    state = dict(state)
    for audio in hops:
        outputs = step(audio=np.asarray(audio, np.float32), **state)
        state = {name: np.asarray(outputs[name + "_out"]) for name in STATE_NAMES}
        yield {k: np.asarray(v) for k, v in outputs.items() if not k.endswith("_out")}


def split_hops(mixture: np.ndarray, hop_length: int) -> Iterator[np.ndarray]:
    """`(nb_timesteps, nb_channels)` -> hops `(1, hop, nb_channels)`, the last one zero-padded."""
    for start in range(0, len(mixture), hop_length):
        hop = mixture[start:start + hop_length]
        if len(hop) < hop_length:
            hop = np.pad(hop, ((0, hop_length - len(hop)), (0, 0)))
        yield hop[None].astype(np.float32)


def stream_array(step, state, mixture: np.ndarray, hop_length: int, flush: bool = True) -> Dict[str, np.ndarray]:
    """A whole `(nb_timesteps, nb_channels)` signal through the stream, hop by hop; returns {source: output stream}
    (`flush`: zero hops appended so that the output covers the input's last samples too)."""
    hops = list(split_hops(mixture, hop_length))
    if flush:
        latency = len(state["frame_buffer"][0])  # n_fft - hop
        hops += [np.zeros_like(hops[0])] * (-(-latency // hop_length))
    outputs: Dict[str, list] = {}
    for produced in run_stream(step, state, hops):
        for name, value in produced.items():
            outputs.setdefault(name, []).append(value[0])
    return {name: np.concatenate(parts, axis=0) for name, parts in outputs.items()}
