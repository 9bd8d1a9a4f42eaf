"""The one configuration story: Sacred's config dict <-> frozen dataclasses, one per section.

Defaults live here (as dataclass defaults), presets in `configs/presets.py` are dicts of overrides,
and Sacred merges both with the user's `with key=value` overrides. `Config.from_dict` validates the
merged dict (unknown keys and wrong types are errors that name the key) and freezes it.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from configs.errors import ConfigError

MUSDB_TARGETS = ("vocals", "drums", "bass", "other")
DATA_FORMATS = ("default", "musdb", "musdb-hq", "folder")
PREPARE_RUNNERS = ("local", "beam")
TRAIN_STRATEGIES = ("mirrored", "multi_worker")


# -- validation: every section (and model family) checks itself in `__post_init__`; single-key limits are
# declared on the field (`choice`, `bounded`) and checked by `check_fields`, rules across keys are code.
def choice(default, allowed):
    """A field whose value must be one of `allowed`."""
    return field(default=default, metadata={"choices": tuple(allowed)})


def bounded(default, low=None, high=None, *, low_open=False, high_open=False, each=False):
    """A number field (or, with `each`, every entry of a tuple field) within [low, high]; `*_open` excludes
    that end. None (for Optional fields) is always allowed."""
    return field(default=default, metadata={"bounds": (low, high, low_open, high_open), "each": each})


def _bounds_text(low, high, low_open, high_open) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _within(value, low, high, low_open, high_open) -> bool:
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return high is None or not (value > high or (high_open and value == high))


def check_fields(obj, prefix: str) -> None:
    """ConfigError `<prefix><key> must be ...; got ...` for the first field outside its declared choices/bounds."""
    for spec in dataclasses.fields(obj):
        value, key = getattr(obj, spec.name), prefix + spec.name
        if value is None:
            continue
        if "choices" in spec.metadata and value not in spec.metadata["choices"]:
            allowed = ", ".join(repr(c) if c == "" else str(c) for c in spec.metadata["choices"])
            raise ConfigError(f"config key '{key}' must be one of {allowed}; got {value!r}")
        if "bounds" in spec.metadata:
            values = value if spec.metadata["each"] else (value,)
            for item in values:
                if isinstance(item, bool) or not isinstance(item, (int, float)) or not _within(
                        item, *spec.metadata["bounds"]):
                    raise ConfigError(f"config key '{key}' must be {'all entries ' if spec.metadata['each'] else ''}"
                                      f"{_bounds_text(*spec.metadata['bounds'])}; got {_show(value)}")


def _show(value):
    return list(value) if isinstance(value, tuple) else repr(value)


@dataclass(frozen=True)
class DataConfig:
    """Where the audio comes from and how it is cut into TFRecord segments."""

    format: str = choice("default", DATA_FORMATS)
    root: Optional[str] = None  # data set root; `default` generates into artifacts_dir when None
    targets: Tuple[str, ...] = MUSDB_TARGETS
    sample_rate: int = bounded(44100, 1)
    nb_channels: int = choice(2, (1, 2))
    segment_seconds: float = bounded(6.0, 0, low_open=True)  # length of one TFRecord example
    pcm: str = choice("int16", ("int16", "float16", "float32"))
    shard_megabytes: float = bounded(64.0, 0, low_open=True)  # approximate uncompressed size of one shard
    compression: str = choice("", ("", "GZIP", "ZLIB"))
    skip_bad_tracks: bool = False  # skip (and list in the manifest) tracks that fail validation
    splits: Tuple[str, ...] = ("train", "valid", "test")
    # The embedded default data set (data.format=default): a deterministic synthesizer.
    synth_tracks: Tuple[int, int, int] = bounded((12, 2, 3), 0, each=True)  # train, valid, test
    synth_seconds: float = bounded(20.0, 0, low_open=True)
    synth_seed: int = 42
    # tf.data augmentation (training split only)
    gain_range: Tuple[float, float] = (0.25, 1.25)
    channel_swap: bool = True
    remix_probability: float = bounded(0.0, 0, 1)  # chance that a source comes from a different track
    shuffle_buffer: int = bounded(1024, 1)
    # How a training example is put together (components/records.py, `load_dataset`):
    #   segment: the sources of one segment of one track (the augmentations below apply on top)
    #   independent: every source from its own random track and offset, as the TFC-TDF v3 and DTTNet
    #                references draw them (kuielab/sdx23 `dataset.py`, DTTNet `datasets/musdb.py`)
    mixing: str = choice("segment", ("segment", "independent"))
    # independent mixing: redraw a source whose mean |x| is below (sdx23 min_mean_abs)
    quiet_threshold: float = bounded(0.0, 0)
    # drop an example when a source's energy (sum of squares of its channel mean) is below this: M-U-Net's
    # filtering of training chunks with a silent source (0: off)
    silent_energy: float = bounded(0.0, 0)
    # prepare: extra pitch/tempo-shifted copies of every training track (DTTNet's offline augmentation)
    pitch_shifts: Tuple[int, ...] = bounded((), -12, 12, each=True)  # semitones, e.g. [-2, -1, 0, 1, 2]
    # percent, e.g. [-20, -10, 0, 10, 20]; 10 = 10 % faster
    tempo_changes: Tuple[int, ...] = bounded((), -50, 100, each=True)

    def __post_init__(self):
        check_fields(self, "data.")
        if self.format in ("musdb", "musdb-hq", "folder") and not self.root:
            raise ConfigError(f"data.format={self.format} needs data.root=/path/to/the/data/set")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"data.targets must be a non-empty list of distinct names; got {list(self.targets)}")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ConfigError(f"data.splits must be a non-empty list of distinct names; got {list(self.splits)}")
        lo, hi = self.gain_range
        if not 0 < lo <= hi:
            raise ConfigError(f"data.gain_range must be [low, high] with 0 < low <= high; got {list(self.gain_range)}")
        if self.quiet_threshold > 0 and self.mixing != "independent":
            raise ConfigError("data.quiet_threshold redraws sources and needs data.mixing=independent")


@dataclass(frozen=True)
class PrepareConfig:
    """How the prepare stage (and, with `beam`, evaluation) is executed; never what it produces, so
    these keys are not part of any stage fingerprint: every runner writes the same artifact."""

    # local: in-process, tracks in parallel processes | beam: an Apache Beam pipeline
    runner: str = choice("local", PREPARE_RUNNERS)
    # local: track processes (0: every core, one per 64 MB of source files); beam: DirectRunner workers (0: every core)
    workers: int = bounded(0, 0)
    # any Beam pipeline option, e.g. ["--runner=FlinkRunner", "--flink_master=host:8081"]; the default is
    # the DirectRunner in multi-processing mode
    beam_options: Tuple[str, ...] = ()

    def __post_init__(self):
        check_fields(self, "prepare.")
        bad = [o for o in self.beam_options if not o.startswith("--")]
        if bad:
            raise ConfigError(f"prepare.beam_options takes Beam pipeline flags like '--runner=FlinkRunner'; "
                              f"got '{bad[0]}'")


@dataclass(frozen=True)
class ModelConfig:
    """`name` picks the family; `families` holds each family's knobs (`model.<family>.<knob>` in Sacred).

    This section knows no model: which families exist and which knobs each takes is the registry's business
    (`models/registry.py`, `registry.check`), so a new family touches the registry and its own file only.
    """

    name: str = "umx"
    families: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: FrozenDict())

    def __post_init__(self):
        if not self.name:
            raise ConfigError("config key 'model.name' must name a registered model family; got ''")

    def params(self, family: Optional[str] = None) -> dict:
        """The knobs given for `family` (default: the selected one), as a plain dict."""
        return dict(self.families.get(family or self.name) or {})


@dataclass(frozen=True)
class TrainConfig:
    """Defaults follow open-unmix's training script."""

    epochs: int = bounded(1000, 1)
    batch_size: int = bounded(16, 1)  # global batch; split over the replicas
    steps_per_epoch: Optional[int] = bounded(None, 1)  # None: samples_per_track * nb_train_tracks / batch_size
    samples_per_track: int = bounded(64, 1)
    seq_seconds: float = bounded(6.0, 0, low_open=True)  # length of a training excerpt (<= data.segment_seconds)
    lr: float = bounded(1e-3, 0, low_open=True)
    # none | linear: lr x replicas (the linear scaling rule for larger global batches)
    lr_scaling: str = choice("none", ("none", "linear"))
    weight_decay: float = bounded(1e-5, 0)
    lr_decay_patience: int = bounded(80, 0)
    lr_decay_gamma: float = bounded(0.3, 0, 1, low_open=True, high_open=True)
    patience: int = bounded(140, 0)  # early stopping, in epochs
    clip_norm: Optional[float] = bounded(None, 0, low_open=True)
    workers: int = bounded(4, 1)  # tf.data parallel calls
    seed: int = 42
    deterministic: bool = False
    replicas: int = bounded(0, 0)  # 0: every visible GPU (or 1 CPU); n > 1 on CPU: n logical CPU devices
    # Keras dtype policy of the networks in training: mixed_float16 (dynamic loss scaling, as torch's autocast +
    # GradScaler) or mixed_bfloat16; float32 variables either way. STFT, masks, Wiener filter and losses stay
    # float32 (models.transforms.Float32Layer); evaluation and export always build the model in float32
    precision: str = choice("float32", ("float32", "mixed_float16", "mixed_bfloat16"))
    # wall-clock training budget: stop after the step that exceeds it
    max_seconds: Optional[float] = bounded(None, 0, low_open=True)
    snapshot_every_steps: int = bounded(0, 0)  # quick validation SDR every N steps (0: off)
    snapshot_tracks: int = bounded(1, 1)
    snapshot_seconds: float = bounded(10.0, 0, low_open=True)
    # optional second phase (Wave-U-Net): fine-tune with lr * factor and batch * factor
    finetune_epochs: int = bounded(0, 0)
    finetune_lr: Optional[float] = bounded(None, 0, low_open=True)
    finetune_batch_size: Optional[int] = bounded(None, 1)
    # mirrored: one host's GPUs (or logical CPUs); multi_worker: MultiWorkerMirroredStrategy over the
    # hosts listed in TF_CONFIG (train.batch_size stays the global batch over every worker's replicas)
    strategy: str = choice("mirrored", TRAIN_STRATEGIES)
    # last: continue from the last epoch with the optimizer state (f90/Wave-U-Net Training.py);
    # best: from the best weights with a fresh optimizer (Stoller et al. 2018, Sec. 4.1)
    finetune_from: str = choice("last", ("last", "best"))
    # the optimizer (components/optimizers.py): adam = torch.optim.Adam (weight_decay as an L2 term in the
    # gradient), adam_tf = TF1/Keras Adam (epsilon-hat), adamw = decoupled weight decay, sgd = torch.optim.SGD
    optimizer: str = choice("adam", ("adam", "adam_tf", "adamw", "sgd"))
    beta_1: float = bounded(0.9, 0, 1, high_open=True)
    beta_2: float = bounded(0.999, 0, 1, high_open=True)
    # PyTorch's default (open-unmix); Keras/TF2 use 1e-7, TF1's AdamOptimizer 1e-8
    epsilon: float = bounded(1e-8, 0, low_open=True)
    momentum: float = bounded(0.9, 0, 1, high_open=True)  # sgd
    nesterov: bool = False  # sgd
    # e.g. 0.999: evaluate and export an exponential moving average of the weights
    ema_momentum: Optional[float] = bounded(None, 0, 1, low_open=True, high_open=True)
    lr_schedule: str = choice("plateau", ("plateau", "constant"))  # plateau (ReduceLROnPlateau) | constant
    lr_min: float = bounded(0.0, 0)  # plateau: the rate never decays below this
    # plateau as torch.optim.lr_scheduler.ReduceLROnPlateau does it (the presets citing torch code) or as Keras'
    # ReduceLROnPlateau (min_delta = lr_threshold, absolute; lr_threshold_mode and lr_monitor are torch's only)
    plateau_impl: str = choice("keras", ("keras", "torch"))
    lr_threshold: float = bounded(1e-4, 0)  # plateau: the improvement that counts (Keras' min_delta)
    lr_threshold_mode: str = choice("rel", ("rel", "abs"))  # torch plateau: relative (torch's default) or absolute
    lr_cooldown: int = bounded(10, 0)  # plateau: epochs without reduction after one (open-unmix: 10)
    lr_monitor: str = choice("auto", ("auto", "loss", "val_loss"))  # torch plateau: auto = the checkpoint metric
    early_stopping: bool = True  # stop after `patience` epochs without improvement
    early_stopping_min_delta: float = bounded(0.0, 0)  # the improvement that counts (Keras' min_delta)
    # val_loss | val_sdr: the best weights by loss or by whole-track validation SDR; last: the final weights are
    # the model (recipes without model selection: the sdx23 and Spleeter scripts save the last step)
    checkpoint_metric: str = choice("val_loss", ("val_loss", "val_sdr", "last"))
    # fine-tuning (docs/fine-tuning.md): start from this artifacts directory's (or train artifact folder's) model
    init_from: Optional[str] = None
    freeze: Tuple[str, ...] = ()  # named parts of the family kept fixed (components/training/finetune.py)
    init_targets: Mapping[str, str] = field(default_factory=lambda: FrozenDict())  # {new target: init target}

    def __post_init__(self):
        check_fields(self, "train.")
        if self.replicas > 1 and self.batch_size % self.replicas:
            raise ConfigError(f"train.batch_size={self.batch_size} must be a multiple of train.replicas="
                              f"{self.replicas} (the global batch is split over the replicas)")


@dataclass(frozen=True)
class EvaluateConfig:
    split: str = "test"  # one of data.splits
    max_tracks: Optional[int] = bounded(None, 1)
    chunk_seconds: float = bounded(30.0, 0, low_open=True)  # separation chunk; bounded memory on full tracks
    overlap: float = bounded(0.25, 0, 1, high_open=True)  # fraction of a chunk shared by neighbours (overlap-add)
    window_seconds: float = bounded(1.0, 0, low_open=True)  # BSSEval v4 window and hop
    workers: int = bounded(2, 1)  # museval processes

    def __post_init__(self):
        check_fields(self, "evaluate.")


@dataclass(frozen=True)
class ExportConfig:
    version: int = bounded(1, 1)  # TF Serving version folder
    tflite_chunk_seconds: float = bounded(3.0, 0, low_open=True)
    # dynamic: int8 weights, float activations (the fused LSTM and FULLY_CONNECTED run int8 kernels: faster);
    # float16: half-size weights dequantized to float32 at load (smaller file, not faster on CPU)
    quantize: str = choice("dynamic", ("float16", "dynamic"))
    # true: the serving SavedModel keeps its XLA-compiled functions (STFT, LSTM loops, Wiener filter): faster, but
    # only for servers started with XLA's CPU JIT on (TF Serving: --xla_cpu_compilation_enabled=true)
    xla: bool = False
    # TF Serving's model folder: each export is published there as the next version `<model>/<n+1>/` (written
    # beside, renamed into place), keeping the newest `keep_versions`; None: <artifacts_dir>/serving
    serving_dir: Optional[str] = None
    keep_versions: int = bounded(2, 1)

    def __post_init__(self):
        check_fields(self, "export.")


@dataclass(frozen=True)
class ImportConfig:
    """`--stage import`: the authors' released files -> the train artifact (components/importer.py).

    The user-facing section is `import` (`import.path=...`); `import` is a Python keyword, so the
    field is `Config.import_`.
    """

    path: Optional[str] = None  # the released file or folder, as downloaded
    name: Optional[str] = None  # a released model by catalogue name (downloaded, checked, cached): sets path
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

    def __post_init__(self):
        if not self.artifacts_dir:
            raise ConfigError("config key 'artifacts_dir' must name a directory; got ''")
        if self.evaluate.split not in self.data.splits:
            raise ConfigError(f"config key 'evaluate.split' must be one of data.splits "
                              f"({', '.join(self.data.splits)}); got '{self.evaluate.split}'")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Config":
        raw = dict(raw)
        imported = raw.pop("import", None) or {}
        config = build_section(cls, raw, prefix="")
        return dataclasses.replace(config, import_=build_section(ImportConfig, imported, prefix="import."))

    def to_dict(self) -> dict:
        plain = to_plain(self)
        plain["import"] = plain.pop("import_")
        return plain

    def section(self, name: str) -> dict:
        return to_plain(getattr(self, "import_" if name == "import" else name))


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings -> JSON/Sacred-friendly dicts and lists."""
    if isinstance(value, ModelConfig):  # `model.<family>` keys sit beside `model.name`
        return {"name": value.name, **{family: to_plain(params) for family, params in value.families.items()}}
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def defaults() -> dict:
    return Config().to_dict()


def dotted_get(tree: Mapping[str, Any], key: str):
    """The value at dotted `key` ("model.umx.hidden_size") of a nested mapping, or `KeyError` (the class) when
    absent."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return KeyError
        node = node[part]
    return node


def same_value(a, b) -> bool:
    """Config values equal as a user means them: 512 == 512.0, lists and tuples element by element."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """Recursive merge of config dicts (Sacred's order: defaults <- presets <- updates): `update` wins; nested
    mappings are merged, not replaced. Neither argument is changed."""
    merged = copy.deepcopy(dict(base))
    for key, value in (update or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def nested(dotted: Mapping[str, Any]) -> dict:
    """{"a.b.c": v, ...} -> {"a": {"b": {"c": v}}, ...}: dotted keys as config updates."""
    result: dict = {}
    for key, value in dotted.items():
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return result


def build_section(cls, raw: Mapping[str, Any], prefix: str):
    """The frozen dataclass `cls` from a mapping: unknown keys and wrong types are ConfigErrors naming the key
    (`prefix` + key); each dataclass then validates its values in `__post_init__`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section (mapping), got {raw!r}")
    if cls is ModelConfig:
        return _build_model(raw, prefix)
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
    return cls(**values)  # each dataclass validates itself in __post_init__


def _build_model(raw: Mapping[str, Any], prefix: str) -> ModelConfig:
    """`name` and one mapping per family; the registry checks the family names and their knobs."""
    families = {}
    for key, value in raw.items():
        if key == "name" or str(key).startswith("_"):
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{prefix}{key}' must be a mapping of the family's settings, got {value!r}")
        families[str(key)] = _freeze(value)
    name = _coerce(str, raw.get("name", ModelConfig.name), prefix + "name")
    return ModelConfig(name=name, families=FrozenDict(families))


def _coerce(hint, value, key):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, key + ".")
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
        if isinstance(value, str) and value.lower() in ("true", "false"):  # `with key=true` (Sacred keeps a string)
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false (any case), got {value!r}")
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
