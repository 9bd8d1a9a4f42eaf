"""The contract between a model family and the stages: what `build()` returns.

Stages never special-case a family: anything a family needs (a training-domain transform of the
targets, a per-epoch loss weighting, an input-length rule, statistics from the data) goes through
these fields, with defaults that suit most families.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple


@dataclass(frozen=True)
class Stats:
    """Per-target statistics of the training split, what model builders read for loss weighting (EBW)."""

    split: str
    energy: Mapping[str, float]
    rms: Mapping[str, float]

    def to_dict(self) -> dict:
        return {"split": self.split, "energy": dict(self.energy), "rms": dict(self.rms)}

    @classmethod
    def of(cls, value) -> Optional["Stats"]:
        """`value` as Stats: Stats, a mapping as `to_dict` writes it (a train artifact's `stats`), or None / {}
        when there are none (no training split, an imported model)."""
        if value is None or isinstance(value, cls):
            return value
        if not value:
            return None
        return cls(split=str(value.get("split", "train")), energy=dict(value.get("energy") or {}),
                   rms=dict(value.get("rms") or {}))



@dataclass(frozen=True)
class TrainingHooks:
    """What the train stage asks of a family beyond its training graph (defaults suit most families).

    adapt:         called once before training with an iterable of mixture batches (e.g. Open-Unmix's per-bin
                   input mean/scale from the training set)
    callbacks:     extra keras callbacks the family needs in training (e.g. DWA loss weighting)
    loss_weighting: the layer holding the per-target loss weights (M-U-Net's DWA / EBW `LossWeighting`)
    loss_domain:   what the loss compares, where the family resolves it from its config (M-U-Net: masks or
                   magnitudes)
    graph_optimization: False: training runs with TensorFlow's graph optimiser (Grappler's meta optimiser) off,
                   for graphs where its pass at the first step costs more than it saves (DTTNet's ~25,000-op
                   training step); the numbers do not change
    """

    adapt: Optional[Callable[[Any], None]] = None
    callbacks: Tuple[Any, ...] = ()
    loss_weighting: Optional[Any] = None
    loss_domain: Optional[str] = None
    graph_optimization: bool = True


@dataclass(frozen=True)
class InferencePieces:
    """Named inference pieces, for export, separate, streaming, benchmarks, fine-tuning and checkpoint import
    (None or empty where a family has no such thing).

    make_separator: keyword options -> another separator keras.Model with these weights: `nb_timesteps`,
                   `batch_size` (static shapes) and the family's own (Open-Unmix: `wiener_iterations`, `residual`)
    mobile:        chunk length in samples -> a static-shape keras.Model with this model's weights, mixture
                   `(1, chunk, nb_channels)` -> {target: waveform}, the whole separator (STFT, network, masks or
                   Wiener filter, ISTFT) from TFLite built-in ops only (e.g. LSTMs unrolled); None when the family
                   cannot
    networks:      {target: keras.Model} of families with one network per target (Open-Unmix, Spleeter, DTTNet)
    network:       the one keras.Model every target shares (C-U-Net, M-U-Net, TFC-TDF-UNet v3)
    max_bin:       frequency bins the networks see (bins above it are not modelled)
    chunk_samples: the reference's inference chunk in samples, when the family prescribes one (TFC-TDF-UNet v3,
                   DTTNet). Validation snapshots separate with it
    overlap:       fraction of `chunk_samples` neighbouring chunks share, with `chunk_samples`
    separation_chunk_samples: the chunk `separate` uses by default (export records it in the sidecar;
                   `--chunk-seconds` overrides it), for families whose per-chunk activations at their published
                   size would not fit a 2 GB budget in 10 s chunks; None: the CLI's 10 s
    """

    make_separator: Optional[Callable[..., Any]] = None
    mobile: Optional[Callable[[int], Any]] = None
    networks: Mapping[str, Any] = field(default_factory=dict)
    network: Optional[Any] = None
    max_bin: Optional[int] = None
    chunk_samples: Optional[int] = None
    overlap: Optional[float] = None
    separation_chunk_samples: Optional[int] = None


@dataclass(frozen=True)
class SeparationModel:
    """A built model family: what every family has, then its training hooks and its inference pieces.

    targets:       target names, the keys of every output dict
    sample_rate:   rate the model works at
    nb_channels:   audio channels in and out
    train_model:   keras.Model, mixture `(nb_samples, nb_timesteps, nb_channels)` ->
                   {target: estimate in the training domain}; `fit` runs on it
    train_targets: stems {target: (nb_samples, nb_timesteps, nb_channels)} -> {target: training-domain
                   truth}, same shapes as `train_model`'s outputs; run inside tf.data
    loss:          keras loss (or dict per target) for `train_model`
    separator:     keras.Model, mixture `(nb_samples, nb_timesteps, nb_channels)` -> {target: waveform of the
                   same shape}; shares weights with `train_model`; used by evaluate, export and separate
    config:        the family's frozen Config, recorded with the artifacts
    input_samples: rule mapping a wanted excerpt length to the length the model accepts
                   (e.g. Wave-U-Net's valid convolutions), identity by default
    training:      `TrainingHooks` (what only the train stage reads)
    inference:     `InferencePieces` (what export, separate, streaming and import read)
    """

    targets: Tuple[str, ...]
    sample_rate: int
    nb_channels: int
    train_model: Any
    train_targets: Callable[[Dict[str, Any]], Dict[str, Any]]
    loss: Any
    separator: Any
    config: Any
    input_samples: Callable[[int], int] = lambda n: n
    training: TrainingHooks = field(default_factory=TrainingHooks)
    inference: InferencePieces = field(default_factory=InferencePieces)

    @property
    def chunk_seconds(self) -> Optional[float]:
        """`inference.chunk_samples` in seconds (None when the family prescribes no chunk)."""
        chunk = self.inference.chunk_samples
        return None if chunk is None else chunk / self.sample_rate


def count_parameters(obj) -> int:
    """Trainable parameters of a keras Model or Layer: PyTorch's `sum(p.numel() for p in parameters())`.

    BatchNorm moving statistics are non-trainable buffers in both frameworks and are not counted.
    """
    return int(sum(math.prod(int(d) for d in weight.shape) for weight in obj.trainable_weights))
