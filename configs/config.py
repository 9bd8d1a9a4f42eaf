"""The one configuration story: Sacred's config dict <-> frozen dataclasses, one per section.

Defaults live here (as dataclass defaults), presets in `configs/presets.py` are dicts of overrides,
and Sacred merges both with the user's `with key=value` overrides. `Config.from_dict` validates the
merged dict (unknown keys and wrong types are errors that name the key) and freezes it.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

MUSDB_TARGETS = ("vocals", "drums", "bass", "other")
DATA_FORMATS = ("default", "musdb", "musdb-hq", "folder")
PREPARE_RUNNERS = ("local", "beam")
TRAIN_STRATEGIES = ("mirrored", "multi_worker")


class ConfigError(ValueError):
    """A user-caused configuration problem; its message names the key and the fix."""


@dataclass(frozen=True)
class DataConfig:
    """Where the audio comes from and how it is cut into TFRecord segments."""

    format: str = "default"  # one of DATA_FORMATS
    root: Optional[str] = None  # data set root; `default` generates into artifacts_dir when None
    targets: Tuple[str, ...] = MUSDB_TARGETS
    sample_rate: int = 44100
    nb_channels: int = 2
    segment_seconds: float = 6.0  # length of one TFRecord example
    pcm: str = "int16"  # int16 | float16 | float32
    shard_megabytes: float = 64.0  # approximate uncompressed size of one shard
    compression: str = ""  # "" | GZIP | ZLIB
    skip_bad_tracks: bool = False  # skip (and list in the manifest) tracks that fail validation
    splits: Tuple[str, ...] = ("train", "valid", "test")
    # The embedded default data set (data.format=default): a deterministic synthesizer.
    synth_tracks: Tuple[int, int, int] = (12, 2, 3)  # train, valid, test
    synth_seconds: float = 20.0
    synth_seed: int = 42
    # tf.data augmentation (training split only)
    gain_range: Tuple[float, float] = (0.25, 1.25)
    channel_swap: bool = True
    remix_probability: float = 0.0  # chance that a source comes from a different track
    shuffle_buffer: int = 1024
    # How a training example is put together (components/records.py, `load_dataset`):
    #   segment: the sources of one segment of one track (the augmentations below apply on top)
    #   independent: every source from its own random track and offset, as the TFC-TDF v3 and DTTNet
    #                references draw them (kuielab/sdx23 `dataset.py`, DTTNet `datasets/musdb.py`)
    mixing: str = "segment"
    quiet_threshold: float = 0.0  # independent mixing: redraw a source whose mean |x| is below (sdx23 min_mean_abs)
    # drop an example when a source's energy (sum of squares of its channel mean) is below this: M-U-Net's
    # filtering of training chunks with a silent source (0: off)
    silent_energy: float = 0.0
    # prepare: extra pitch/tempo-shifted copies of every training track (DTTNet's offline augmentation)
    pitch_shifts: Tuple[int, ...] = ()  # semitones, e.g. [-2, -1, 0, 1, 2]
    tempo_changes: Tuple[int, ...] = ()  # percent, e.g. [-20, -10, 0, 10, 20]; 10 = 10 % faster


@dataclass(frozen=True)
class PrepareConfig:
    """How the prepare stage (and, with `beam`, evaluation) is executed; never what it produces, so
    these keys are not part of any stage fingerprint: every runner writes the same artifact."""

    runner: str = "local"  # local: in-process, tracks in parallel processes | beam: an Apache Beam pipeline
    workers: int = 0  # local: track processes (0: every core, one per 64 MB of source files); beam: DirectRunner
    # workers (0: every core)
    # any Beam pipeline option, e.g. ["--runner=FlinkRunner", "--flink_master=host:8081"]; the default is
    # the DirectRunner in multi-processing mode
    beam_options: Tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """`name` picks the family from the registry; each family keeps its knobs in its own mapping."""

    name: str = "umx"
    umx: Mapping[str, Any] = field(default_factory=dict)
    wave_u_net: Mapping[str, Any] = field(default_factory=dict)
    unet: Mapping[str, Any] = field(default_factory=dict)
    m_unet: Mapping[str, Any] = field(default_factory=dict)
    c_unet: Mapping[str, Any] = field(default_factory=dict)
    tfc_tdf_v3: Mapping[str, Any] = field(default_factory=dict)
    dttnet: Mapping[str, Any] = field(default_factory=dict)

    def family_params(self) -> Mapping[str, Any]:
        return dict(getattr(self, self.name, {}) or {})


@dataclass(frozen=True)
class TrainConfig:
    """Defaults follow open-unmix's training script."""

    epochs: int = 1000
    batch_size: int = 16  # global batch; split over the replicas
    steps_per_epoch: Optional[int] = None  # None: samples_per_track * nb_train_tracks / batch_size
    samples_per_track: int = 64
    seq_seconds: float = 6.0  # length of a training excerpt (<= data.segment_seconds)
    lr: float = 1e-3
    lr_scaling: str = "none"  # none | linear: lr x replicas (the linear scaling rule for larger global batches)
    weight_decay: float = 1e-5
    lr_decay_patience: int = 80
    lr_decay_gamma: float = 0.3
    patience: int = 140  # early stopping, in epochs
    clip_norm: Optional[float] = None
    workers: int = 4  # tf.data parallel calls
    seed: int = 42
    deterministic: bool = False
    replicas: int = 0  # 0: every visible GPU (or 1 CPU); n > 1 on CPU: n logical CPU devices
    max_seconds: Optional[float] = None  # wall-clock training budget: stop after the step that exceeds it
    snapshot_every_steps: int = 0  # quick validation SDR every N steps (0: off)
    snapshot_tracks: int = 1
    snapshot_seconds: float = 10.0
    # optional second phase (Wave-U-Net): fine-tune with lr * factor and batch * factor
    finetune_epochs: int = 0
    finetune_lr: Optional[float] = None
    finetune_batch_size: Optional[int] = None
    # mirrored: one host's GPUs (or logical CPUs); multi_worker: MultiWorkerMirroredStrategy over the
    # hosts listed in TF_CONFIG (train.batch_size stays the global batch over every worker's replicas)
    strategy: str = "mirrored"
    # last: continue from the last epoch with the optimizer state (f90/Wave-U-Net Training.py);
    # best: from the best weights with a fresh optimizer (Stoller et al. 2018, Sec. 4.1)
    finetune_from: str = "last"
    # the optimizer (components/optimizers.py): adam = torch.optim.Adam (weight_decay as an L2 term in the
    # gradient), adam_tf = TF1/Keras Adam (epsilon-hat), adamw = decoupled weight decay, sgd = torch.optim.SGD
    optimizer: str = "adam"
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-8  # PyTorch's default (open-unmix); Keras/TF2 use 1e-7, TF1's AdamOptimizer 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    ema_momentum: Optional[float] = None  # e.g. 0.999: evaluate and export an exponential moving average of the weights
    lr_schedule: str = "plateau"  # plateau (ReduceLROnPlateau) | constant
    lr_min: float = 0.0  # plateau: the rate never decays below this
    early_stopping: bool = True  # stop after `patience` epochs without improvement
    # val_loss | val_sdr: the best weights by loss or by whole-track validation SDR; last: the final weights are
    # the model (recipes without model selection: the sdx23 and Spleeter scripts save the last step)
    checkpoint_metric: str = "val_loss"


@dataclass(frozen=True)
class EvaluateConfig:
    split: str = "test"
    max_tracks: Optional[int] = None
    chunk_seconds: float = 30.0  # separation chunk; bounded memory on full tracks
    overlap: float = 0.25  # fraction of a chunk shared by neighbours (overlap-add)
    window_seconds: float = 1.0  # BSSEval v4 window and hop
    workers: int = 2  # museval processes


@dataclass(frozen=True)
class ExportConfig:
    version: int = 1
    tflite_chunk_seconds: float = 3.0
    quantize: str = "float16"  # float16 | dynamic


@dataclass(frozen=True)
class ImportConfig:
    """`--stage import`: the authors' released files -> the train artifact (components/importer.py).

    The user-facing section is `import` (`import.path=...`); `import` is a Python keyword, so the
    field is `Config.import_`.
    """

    path: Optional[str] = None  # the released file or folder, as downloaded
    model: Optional[str] = None  # published model name where the files do not say (open-unmix: umxhq, umx, umxl)
    config: Optional[str] = None  # the release's config file when it is not beside the weights (yaml/json)
    targets: Tuple[str, ...] = ()  # targets to import, in this order (default: every target released)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    artifacts_dir: str = "artifacts"
    seed: int = 0  # Sacred's seed; the training seed is train.seed
    import_: ImportConfig = field(default_factory=ImportConfig)  # the `import` section

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Config":
        raw = dict(raw)
        imported = raw.pop("import", None) or {}
        config = _build(cls, raw, prefix="")
        return dataclasses.replace(config, import_=_build(ImportConfig, imported, prefix="import."))

    def to_dict(self) -> dict:
        plain = to_plain(self)
        plain["import"] = plain.pop("import_")
        return plain

    def section(self, name: str) -> dict:
        return to_plain(getattr(self, "import_" if name == "import" else name))


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings -> JSON/Sacred-friendly dicts and lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def defaults() -> dict:
    return Config().to_dict()


def _build(cls, raw: Mapping[str, Any], prefix: str):
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in raw if k not in names and not str(k).startswith("_"))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}"
        )
    values = {}
    for name in names:
        if name not in raw:
            continue
        values[name] = _coerce(hints[name], raw[name], prefix + name)
    obj = cls(**values)
    _check(obj, prefix)
    return obj


def _coerce(hint, value, key):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, key)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}' must have {len(args)} entries, got {list(value)!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if origin in (Mapping, dict) or hint is Any:
        if origin in (Mapping, dict) and not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _freeze(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    return value


def _freeze(value):
    if isinstance(value, Mapping):
        return FrozenDict({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


class FrozenDict(dict):
    """A read-only dict: model family parameters cannot be mutated by code downstream."""

    def _readonly(self, *args, **kwargs):
        raise TypeError("configuration is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


def _check(obj, prefix):
    if isinstance(obj, DataConfig):
        if obj.format not in DATA_FORMATS:
            raise ConfigError(f"data.format must be one of {', '.join(DATA_FORMATS)}; got '{obj.format}'")
        if obj.format in ("musdb", "musdb-hq", "folder") and not obj.root:
            raise ConfigError(f"data.format={obj.format} needs data.root=/path/to/the/data/set")
        if obj.pcm not in ("int16", "float16", "float32"):
            raise ConfigError(f"data.pcm must be int16, float16 or float32; got '{obj.pcm}'")
        if obj.compression not in ("", "GZIP", "ZLIB"):
            raise ConfigError(f"data.compression must be '', GZIP or ZLIB; got '{obj.compression}'")
        if not obj.targets or len(set(obj.targets)) != len(obj.targets):
            raise ConfigError(f"data.targets must be a non-empty list of distinct names; got {list(obj.targets)}")
        if obj.sample_rate <= 0 or obj.nb_channels not in (1, 2):
            raise ConfigError("data.sample_rate must be positive and data.nb_channels 1 or 2")
        if not 0 <= obj.remix_probability <= 1:
            raise ConfigError("data.remix_probability must lie in [0, 1]")
        lo, hi = obj.gain_range
        if not 0 < lo <= hi:
            raise ConfigError(f"data.gain_range must be [low, high] with 0 < low <= high; got {list(obj.gain_range)}")
    if isinstance(obj, TrainConfig) and obj.lr_scaling not in ("none", "linear"):
        raise ConfigError(f"train.lr_scaling must be none or linear; got '{obj.lr_scaling}'")
    if isinstance(obj, PrepareConfig):
        if obj.runner not in PREPARE_RUNNERS:
            raise ConfigError(f"prepare.runner must be one of {', '.join(PREPARE_RUNNERS)}; got '{obj.runner}'")
        if obj.workers < 0:
            raise ConfigError(f"prepare.workers must be >= 0 (0: every core); got {obj.workers}")
        bad = [o for o in obj.beam_options if not o.startswith("--")]
        if bad:
            raise ConfigError(f"prepare.beam_options takes Beam pipeline flags like '--runner=FlinkRunner'; "
                              f"got '{bad[0]}'")
    if isinstance(obj, TrainConfig) and obj.strategy not in TRAIN_STRATEGIES:
        raise ConfigError(f"train.strategy must be one of {', '.join(TRAIN_STRATEGIES)}; got '{obj.strategy}'")
    if isinstance(obj, TrainConfig):
        _check_recipe(obj)
    if isinstance(obj, DataConfig):
        _check_mixing(obj)
    if isinstance(obj, ModelConfig):
        from models import registry  # late: keeps `--help` free of TensorFlow

        if obj.name not in registry.names():
            raise ConfigError(
                f"model.name '{obj.name}' is not a registered model; choose one of {', '.join(registry.names())}"
            )


TRAIN_CHOICES = {"optimizer": ("adam", "adam_tf", "adamw", "sgd"), "lr_schedule": ("plateau", "constant"),
                 "checkpoint_metric": ("val_loss", "val_sdr", "last"), "finetune_from": ("last", "best")}


def _check_recipe(train: TrainConfig) -> None:
    for key, choices in TRAIN_CHOICES.items():
        if getattr(train, key) not in choices:
            raise ConfigError(f"train.{key} must be one of {', '.join(choices)}; got '{getattr(train, key)}'")
    if not (0 <= train.beta_1 < 1 and 0 <= train.beta_2 < 1):
        raise ConfigError(f"train.beta_1 and train.beta_2 must lie in [0, 1); got {train.beta_1}, {train.beta_2}")
    if train.epsilon <= 0:
        raise ConfigError(f"train.epsilon must be positive; got {train.epsilon}")
    if not 0 <= train.momentum < 1:
        raise ConfigError(f"train.momentum must lie in [0, 1); got {train.momentum}")
    if train.ema_momentum is not None and not 0 < train.ema_momentum < 1:
        raise ConfigError(f"train.ema_momentum must lie in (0, 1) or be null; got {train.ema_momentum}")


def _check_mixing(data: DataConfig) -> None:
    if data.mixing not in ("segment", "independent"):
        raise ConfigError(f"data.mixing must be segment or independent; got '{data.mixing}'")
    if data.quiet_threshold < 0 or data.silent_energy < 0:
        raise ConfigError("data.quiet_threshold and data.silent_energy must be >= 0")
    if data.quiet_threshold > 0 and data.mixing != "independent":
        raise ConfigError("data.quiet_threshold redraws sources and needs data.mixing=independent")
    if any(abs(p) > 12 for p in data.pitch_shifts) or any(not -50 <= t <= 100 for t in data.tempo_changes):
        raise ConfigError("data.pitch_shifts must lie in [-12, 12] semitones and data.tempo_changes in [-50, 100] %")
