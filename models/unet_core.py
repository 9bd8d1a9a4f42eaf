"""The shared core of the spectrogram U-Net families (`unet`, `m_unet`, `c_unet`): framing, masks -> waveforms,
length rules and the assembly of a `SeparationModel` from a family's network.

A family provides four pieces and `assemble` wires them into the train, separator and mobile graphs:

    analysis   waveform `(nb_samples, nb_timesteps, nb_channels)` -> mixture STFT `(B, nb_frames, nb_bins, C, 2)`
               (`Analysis`, centred like torch.stft or Spleeter's framing)
    estimate   mixture STFT -> the training-domain outputs stacked on a last target axis `(..., nb_targets)`
    to_masks   [stacked outputs, mixture STFT] -> real masks `(B, nb_frames, max_bin, C, nb_targets)`
    synthesis  [masks, mixture STFT, waveform] -> waveforms `(B, nb_timesteps, C, nb_targets)` (`ApplyMasks`:
               bins above max_bin, mask x mixture STFT or multichannel Wiener EM, ISTFT)

The TFLite form (`InferencePieces.mobile`) is the separator itself at a static chunk: traced inside
`transforms.tflite_graph()` its STFT, masks and ISTFT are TFLite built-ins, so an app runs one file, waveform in,
stems out.
"""
from __future__ import annotations

from typing import Callable, Optional

import keras
import tensorflow as tf

from configs.errors import ConfigError
from models.base import InferencePieces, SeparationModel, TrainingHooks
from models.filtering import wiener
from models.layers import SplitTargets
from models.transforms import Float32Layer, complex_norm, istft, stft

FRAMINGS = ("centered", "spleeter")
MASK_EXTENSIONS = ("zeros", "average")


def check_patches(key: str, patch_frames: int, multiple: int, reason: str) -> None:
    if patch_frames % multiple:
        raise ConfigError(f"{key}patch_frames must be a positive multiple of {multiple} ({reason}), got {patch_frames}")


def check_max_bin(key: str, config) -> None:
    """`max_bin` (the bins fed to the network) against the STFT's bins."""
    if config.max_bin > config.n_fft // 2 + 1:
        raise ConfigError(f"{key}max_bin must lie in [0, n_fft/2 + 1] (0: all bins), got {config.max_bin}")


# -------------------------------------------------------------------------------------------- framing


def analyse(waveform, n_fft: int, hop_length: int, framing: str = "centered") -> tf.Tensor:
    """Waveform `(B, T, C)` -> STFT `(B, nb_frames, nb_bins, C, 2)`.

    centered: torch.stft(center=True) framing, `1 + T // hop` frames.
    spleeter: Spleeter's `_build_stft_feature` (spleeter/model/__init__.py): `n_fft` zeros before the signal,
              no centring, zeros after it up to whole frames (`tf.signal.stft(pad_end=True)`):
              `ceil((T + n_fft) / hop)` frames.
    """
    if framing == "centered":
        return stft(waveform, n_fft, hop_length)
    waveform = tf.convert_to_tensor(waveform, tf.float32)
    length = waveform.shape[1] if waveform.shape[1] is not None else tf.shape(waveform)[1]
    padded = length + n_fft
    nb_frames = -(-padded // hop_length)
    end = (nb_frames - 1) * hop_length + n_fft - padded
    waveform = tf.pad(waveform, [[0, 0], [n_fft, end], [0, 0]])
    return stft(waveform, n_fft, hop_length, center=False)


def synthesise(spectrogram, n_fft: int, hop_length: int, length, framing: str = "centered") -> tf.Tensor:
    """The inverse of `analyse`: `(B, nb_frames, nb_bins, *extra, 2)` -> `(B, length, *extra)`.

    Spleeter divides the overlap-added Hann-windowed frames by 3/2 (`WINDOW_COMPENSATION_FACTOR`, exact for
    hop = n_fft / 4); `istft` divides by the overlap-added squared window, the same 3/2 wherever the output
    is kept (the first `n_fft` samples, the leading zeros, are dropped).
    """
    if framing == "centered":
        return istft(spectrogram, n_fft, hop_length, length)
    return istft(spectrogram, n_fft, hop_length, length + n_fft, center=False)[:, n_fft:]


def whole_patches(n: int, *, n_fft: int, hop_length: int, patch_frames: int, framing: str = "centered") -> int:
    """Samples giving a whole number (>= 1) of `patch_frames`-frame patches, at most `n` when one patch fits."""
    if framing == "centered":  # 1 + T // hop frames
        patches = max(1, (1 + n // hop_length) // patch_frames)
        return (patches * patch_frames - 1) * hop_length
    patches = max(1, (n + n_fft) // (patch_frames * hop_length))  # ceil((T + n_fft) / hop) frames
    return patches * patch_frames * hop_length - n_fft


class Analysis(Float32Layer):
    """Waveform `(B, T, C)` -> mixture STFT `(B, nb_frames, nb_bins, C, 2)` with `framing`."""

    def __init__(self, n_fft: int = 4096, hop_length: int = 1024, framing: str = "centered", **kwargs):
        super().__init__(**kwargs)
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.framing = framing

    def call(self, waveform):
        return analyse(waveform, self.n_fft, self.hop_length, self.framing)

    def compute_output_shape(self, input_shape):
        nb_samples, nb_timesteps, nb_channels = input_shape
        nb_frames = None
        if nb_timesteps is not None:
            if self.framing == "centered":
                nb_frames = 1 + nb_timesteps // self.hop_length
            else:
                nb_frames = -(-(nb_timesteps + self.n_fft) // self.hop_length)
        return (nb_samples, nb_frames, self.n_fft // 2 + 1, nb_channels, 2)

    def get_config(self):
        return {**super().get_config(), "n_fft": self.n_fft, "hop_length": self.hop_length, "framing": self.framing}


# --------------------------------------------------------------------------------------- masks -> audio


def apply_masks(masks, mix_stft, length, *, n_fft: int, hop_length: int, framing: str = "centered",
                mask_extension: str = "zeros", wiener_iterations: int = 0) -> tf.Tensor:
    """Real masks below max_bin -> waveforms `(B, length, C, J)`.

    masks:    `(B, nb_frames, max_bin, C or 1, J)`
    mix_stft: `(B, nb_frames, nb_bins, C, 2)`
    Bins above max_bin get a zero mask or the frame's mean mask (`mask_extension`, Spleeter's `_extend_mask`);
    then mask x mixture STFT (`wiener_iterations` = 0) or the multichannel Wiener EM on the masked magnitudes
    (a residual source is added when there is one target).
    """
    masks = tf.convert_to_tensor(masks, tf.float32)
    mix_stft = tf.convert_to_tensor(mix_stft, tf.float32)
    max_bin = masks.shape[2]
    nb_bins = mix_stft.shape[2]
    nb_targets = masks.shape[-1]
    if max_bin < nb_bins:
        ones = tf.ones_like(mix_stft[:, :, max_bin:, :1, :1])  # (B, F, K - max_bin, 1, 1)
        if mask_extension == "average":
            high = ones * tf.reduce_mean(masks, axis=2, keepdims=True)
        else:
            high = ones * tf.zeros_like(masks[:, :, :1])
        masks = tf.concat([masks, high], axis=2)
    if wiener_iterations == 0:
        sources = masks[..., None] * mix_stft[..., None, :]  # (B, F, K, C, J, 2)
    else:
        magnitudes = masks * complex_norm(mix_stft)[..., None]
        sources = wiener(magnitudes, mix_stft, niter=wiener_iterations, residual=nb_targets == 1)
        sources = sources[..., :nb_targets, :]
    return synthesise(sources, n_fft, hop_length, length, framing)


def ratio_masks(estimates, exponent: float = 2.0, epsilon: float = 1e-10) -> tf.Tensor:
    """Spleeter's `_build_masks`: `(estimate_j ** p + eps / J) / (sum_i estimate_i ** p + eps)` over the last axis J."""
    estimates = tf.convert_to_tensor(estimates, tf.float32)
    nb_targets = estimates.shape[-1]
    powered = tf.pow(estimates, exponent) if exponent != 2.0 else tf.square(estimates)
    total = tf.reduce_sum(powered, axis=-1, keepdims=True) + epsilon
    return (powered + epsilon / nb_targets) / total


class ApplyMasks(Float32Layer):
    """[masks `(B, F, max_bin, C, J)`, mixture STFT, mixture waveform `(B, T, C)`] -> `(B, T, C, J)` (`apply_masks`)."""

    def __init__(self, n_fft: int = 4096, hop_length: int = 1024, framing: str = "centered",
                 mask_extension: str = "zeros", wiener_iterations: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.framing = framing
        self.mask_extension = mask_extension
        self.wiener_iterations = wiener_iterations

    def call(self, masks, mix_stft, waveform):
        length = waveform.shape[1] if waveform.shape[1] is not None else tf.shape(waveform)[1]
        return apply_masks(masks, mix_stft, length, n_fft=self.n_fft, hop_length=self.hop_length,
                           framing=self.framing, mask_extension=self.mask_extension,
                           wiener_iterations=self.wiener_iterations)

    def compute_output_shape(self, masks_shape, mix_stft_shape, waveform_shape):
        return tuple(waveform_shape) + (masks_shape[-1],)

    def get_config(self):
        return {**super().get_config(), "n_fft": self.n_fft, "hop_length": self.hop_length, "framing": self.framing,
                "mask_extension": self.mask_extension, "wiener_iterations": self.wiener_iterations}


# -------------------------------------------------------------------------------------------- assembly


def assemble(*, name: str, config, data, analysis: keras.layers.Layer, estimate: Callable, to_masks: Callable,
             synthesis: ApplyMasks, train_targets: Callable, loss, input_samples: Callable[[int], int],
             train_wrapper: Optional[Callable] = None, callbacks=(), training: Optional[dict] = None,
             **named) -> SeparationModel:
    """A `SeparationModel` from a family's pieces (see the module docstring); every graph shares their weights.

    `train_wrapper` (optional) maps the train model's output dict before it leaves the graph (M-U-Net's
    `LossWeighting` layer). `training`: the family's other `TrainingHooks` (`loss_weighting`, `loss_domain`);
    `named`: its `InferencePieces` (`networks` or `network`, `max_bin`, ...).
    """
    targets = tuple(data.targets)
    nb_channels = data.nb_channels
    split = SplitTargets(targets, name="targets")

    mixture = keras.Input((None, nb_channels), name="mixture")
    train_outputs = split(estimate(analysis(mixture)))
    if train_wrapper is not None:
        train_outputs = train_wrapper(train_outputs)
    train_model = keras.Model(mixture, train_outputs, name=name)

    def make_separator(nb_timesteps: Optional[int] = None, batch_size: Optional[int] = None) -> keras.Model:
        """Mixture `(nb_samples, nb_timesteps, nb_channels)` -> {target: waveform, same shape}; shares the weights."""
        waveform = keras.Input((nb_timesteps, nb_channels), batch_size=batch_size, name="mixture")
        mix_stft = analysis(waveform)
        waveforms = synthesis(to_masks(estimate(mix_stft), mix_stft), mix_stft, waveform)
        return keras.Model(waveform, split(waveforms), name=f"{name}_separator")

    def mobile(chunk: int) -> keras.Model:
        """The separator at static `(1, chunk, nb_channels)`: waveform in, one waveform per target out (STFT,
        network, masks, ISTFT inside); traced in `transforms.tflite_graph()` it holds TFLite built-ins only."""
        return make_separator(nb_timesteps=chunk, batch_size=1)

    return SeparationModel(
        targets=targets,
        sample_rate=data.sample_rate,
        nb_channels=nb_channels,
        train_model=train_model,
        train_targets=train_targets,
        loss=loss,
        separator=make_separator(),
        config=config,
        input_samples=input_samples,
        training=TrainingHooks(callbacks=tuple(callbacks), **(training or {})),
        inference=InferencePieces(mobile=mobile, make_separator=make_separator, **named),
    )
