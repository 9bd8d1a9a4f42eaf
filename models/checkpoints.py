"""Released checkpoints of the model families: one interface, a torch-free reader, one assignment rule.

The interface every family module implements to be importable (`pipeline/run.py --stage import`):

    read_released(path: pathlib.Path, **options) -> ReleasedCheckpoint
        Reads the files *as the authors distribute them* (a file or a folder) without building a
        model: the tensors (numpy arrays keyed by the source's own names), the configuration they
        imply as dotted config keys (`config_overrides`, e.g. {"data.sample_rate": 44100,
        "data.targets": ["vocals"], "model.umx.hidden_size": 512}) and the files read (their sha256
        goes into the artifact). `options` are the `import.*` keys (`model`, `config`, `targets`);
        a family ignores the ones it has no use for. Raises `CheckpointError` for anything wrong
        with the files (missing target, wrong family, unreadable), before anything is written.

    assign_released(model: SeparationModel, released: ReleasedCheckpoint) -> dict
        Sets the weights of a model built with those overrides through ONE mapping table per
        family: a list of `Assign(sources, variable, convert)` rows passed to `assign_table`, which
        checks that every source tensor is used exactly once (or is listed as ignorable by the
        family, with the reason), that every Keras weight is assigned exactly once, and that shapes
        agree (an error names both tensors). Returns the figures of the mapping (tensors mapped,
        ignored).

A new family (e.g. Spleeter) adds these two functions to its module; the import stage
(`components/importer.py`) needs no change.

PyTorch files are read by `load_torch` without torch and without running code from the file:
a restricted unpickler that rebuilds tensors as numpy arrays from the storages (zip format of
torch >= 1.6 and the legacy format of older releases such as the 2019 open-unmix weights), accepts
plain containers, and turns every other class (Lightning's AttributeDict, omegaconf nodes,
pathlib paths, ...) into an inert `Placeholder` that records what it was given.
"""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from configs.errors import CheckpointError


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """What a family's `read_released` found in the released files.

    family:           registry name (`umx`, `tfc_tdf_v3`, ...)
    config_overrides: dotted config keys -> values implied by the release (rate, targets, STFT, sizes)
    tensors:          source tensor name -> numpy array, names as in the release (a prefix per target
                      where one file holds one target, e.g. `vocals/fc1.weight`)
    files:            the files read (hashed into the artifact)
    description:      one line for logs and the artifact, e.g. "open-unmix umxhq, 4 targets"
    ignorable:        source tensor names the family deliberately does not map, each with its reason
    """

    family: str
    config_overrides: Dict[str, Any]
    tensors: Dict[str, np.ndarray]
    files: List[Path]
    description: str = ""
    ignorable: Dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Assign:
    """One row of a family's mapping table: source tensor(s) -> one Keras variable.

    `convert(*arrays)` turns the source arrays into the variable's layout (e.g. a transpose);
    None means the single source array is taken as is.
    """

    sources: Tuple[str, ...]
    variable: Any  # keras.Variable
    convert: Optional[Callable[..., np.ndarray]] = None


def transpose(array: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight `(out, in)` -> Keras Dense kernel `(in, out)`."""
    return np.ascontiguousarray(np.asarray(array).T)


def assign_table(rows: Sequence[Assign], released: ReleasedCheckpoint, weights: Iterable[Any],
                 where: str) -> dict:
    """Check a family's mapping table against the release and the model, then assign every row.

    `weights`: every Keras variable that must be set (normally `model.train_model.weights`).
    Nothing is assigned unless the whole table checks out.
    """
    tensors = released.tensors
    used: Dict[str, str] = {}
    assigned: Dict[int, str] = {}
    values = []
    for row in rows:
        for name in row.sources:
            if name not in tensors:
                raise CheckpointError(f"{where}: the released files have no tensor '{name}' (needed for "
                                      f"{row.variable.path}); import a complete checkpoint of this family")
            if name in used:
                raise CheckpointError(f"{where}: tensor '{name}' is mapped twice ({used[name]} and "
                                      f"{row.variable.path}); the mapping table is wrong")
            used[name] = row.variable.path
        if id(row.variable) in assigned:
            raise CheckpointError(f"{where}: Keras weight {row.variable.path} is assigned twice "
                                  f"({assigned[id(row.variable)]} and {', '.join(row.sources)})")
        assigned[id(row.variable)] = ", ".join(row.sources)
        arrays = [np.asarray(tensors[name]) for name in row.sources]
        value = row.convert(*arrays) if row.convert is not None else arrays[0]
        value = np.asarray(value)
        if tuple(value.shape) != tuple(row.variable.shape):
            shapes = ", ".join(f"'{n}' {tuple(np.shape(tensors[n]))}" for n in row.sources)
            raise CheckpointError(f"{where}: tensor {shapes} does not fit Keras weight {row.variable.path} "
                                  f"{tuple(row.variable.shape)}; the checkpoint was made with other settings "
                                  "(check the import.* options and the checkpoint's config)")
        values.append((row.variable, value))
    missing = [w.path for w in weights if id(w) not in assigned]
    if missing:
        raise CheckpointError(f"{where}: Keras weight {missing[0]} has no source tensor "
                              f"({len(missing)} unassigned); the mapping table is incomplete")
    unused = sorted(set(tensors) - set(used) - set(released.ignorable))
    if unused:
        raise CheckpointError(f"{where}: tensor '{unused[0]}' {tuple(np.shape(tensors[unused[0]]))} of the released "
                              f"files is not used ({len(unused)} unused); the files are not a "
                              f"{released.family} checkpoint of this configuration")
    for variable, value in values:
        variable.assign(value.astype(variable.dtype if isinstance(variable.dtype, str) else "float32"))
    return {"tensors_mapped": len(used), "weights_assigned": len(values),
            "tensors_ignored": sorted(set(tensors) & set(released.ignorable))}


def assign_layers(network, rows: Iterable[Tuple[str, str, str, str]], tensors: Mapping[str, Any], *, family: str,
                  where: str, converts: Mapping[str, Callable[[np.ndarray], np.ndarray]],
                  ignorable: Optional[Mapping[str, str]] = None) -> int:
    """`assign_table` for a table written by layer name: rows (source tensor, Keras layer name, weight name,
    kind) -> `network`'s weights, `converts[kind]` turning a source array into the Keras layout (a kind not
    in `converts` copies as is). Every weight of `network` must be set. Returns the number of tensors used."""
    weights = {(layer.name, weight.name): weight for layer in network.layers for weight in layer.weights}
    table = []
    for source, layer, weight_name, kind in rows:
        if (layer, weight_name) not in weights:
            raise CheckpointError(f"{where}: the model has no weight {layer}/{weight_name} for tensor '{source}'; "
                                  "the mapping table is wrong")
        table.append(Assign((source,), weights[(layer, weight_name)], converts.get(kind)))
    released = ReleasedCheckpoint(family=family, config_overrides={}, tensors=dict(tensors), files=[],
                                  ignorable=dict(ignorable or {}))
    return assign_table(table, released, network.weights, where)["tensors_mapped"]


# --------------------------------------------------------------------------------------------
# Reading torch.save files without torch
# --------------------------------------------------------------------------------------------
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": "bfloat16",
                 "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
                 "bool": np.bool_}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class Placeholder(dict):
    """An inert stand-in for a class the reader does not trust (never imported, never called).

    Keeps what the pickle gave it: constructor `args`, `state` (from BUILD), items (a dict
    subclass's SETITEMS) and `items_list` (APPENDS), so configs can still be read from it.
    """

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):  # pickle's NEWOBJ calls __new__ only
        self = super().__new__(cls)
        self.args, self.kwargs, self.state, self.items_list = args, kwargs, None, []
        return self

    def __init__(self, *args, **kwargs):  # REDUCE calls the class: keep the arguments, run nothing
        super().__init__()

    def __setstate__(self, state):
        self.state = state

    def append(self, value):
        self.items_list.append(value)

    def extend(self, values):
        self.items_list.extend(values)

    def __repr__(self):
        return f"<Placeholder {self.qualified_name}>"

    def __reduce__(self):  # never pickled again
        raise TypeError("placeholders cannot be pickled")


_PLACEHOLDERS: Dict[str, type] = {}


def _placeholder(module: str, name: str) -> type:
    qualified = f"{module}.{name}"
    if qualified not in _PLACEHOLDERS:
        _PLACEHOLDERS[qualified] = type(name, (Placeholder,), {"qualified_name": qualified, "__module__": __name__})
    return _PLACEHOLDERS[qualified]


class _Storage:
    """Raw bytes of one torch storage and its element type (filled lazily in the legacy format)."""

    def __init__(self, dtype, data: Optional[bytes] = None, byteorder: str = "little"):
        self.dtype = dtype
        self.data = data
        self.byteorder = byteorder

    def array(self) -> np.ndarray:
        if self.data is None:
            raise CheckpointError("torch file: a tensor's storage has no data; the file is truncated")
        if self.dtype == "bfloat16":
            raw = np.frombuffer(self.data, dtype=np.dtype("<u2" if self.byteorder == "little" else ">u2"))
            return (raw.astype(np.uint32) << 16).view(np.float32)
        dtype = np.dtype(self.dtype).newbyteorder("<" if self.byteorder == "little" else ">")
        return np.frombuffer(self.data, dtype=dtype).astype(np.dtype(self.dtype).newbyteorder("="))


class _LazyTensor:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        flat = self.storage.array()
        if not self.size:
            return np.array(flat[self.offset])
        itemsize = flat.itemsize
        needed = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, flat.dtype)
        if needed > flat.size:
            raise CheckpointError("torch file: a tensor reaches past the end of its storage; the file is corrupt")
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size,
                                               strides=tuple(s * itemsize for s in self.stride))
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _storage_class(name: str):
    def make(*unused):
        raise CheckpointError(f"torch file: a {name} is constructed directly; only saved tensors can be read")
    make.storage_name = name
    return make


class _OrderedDict(dict):
    """collections.OrderedDict as pickled by torch: a state dict also carries `_metadata` (via BUILD)."""


_SAFE = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("builtins", "dict"): dict, ("builtins", "list"): list, ("builtins", "tuple"): tuple,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "int"): int,
    ("builtins", "float"): float, ("builtins", "str"): str, ("builtins", "bool"): bool,
    ("builtins", "complex"): complex, ("builtins", "slice"): slice,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


def _codecs_encode(text, encoding="latin1"):
    return text.encode(encoding)


_SAFE[("_codecs", "encode")] = _codecs_encode


class _Unpickler(pickle.Unpickler):
    """Plain containers and tensors; every other global becomes a `Placeholder` (nothing is imported)."""

    def __init__(self, file, storages: Callable[[tuple], Any]):
        super().__init__(file, encoding="utf-8")
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _storage_class(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return f"torch.{name}"
        return _placeholder(module, name)

    def persistent_load(self, pid):
        return self._storages(pid)


def _storage_dtype(storage_type) -> Any:
    name = getattr(storage_type, "storage_name", None)
    if name is None and isinstance(storage_type, str):  # torch.float32 style (UntypedStorage saves)
        return _TORCH_DTYPES.get(storage_type.split(".")[-1])
    return _STORAGE_DTYPES.get(name)


def _materialize(value):
    if isinstance(value, _LazyTensor):
        return value.array()
    if isinstance(value, Placeholder):
        value.args = _materialize(value.args)
        value.state = _materialize(value.state)
        for key in list(value):
            dict.__setitem__(value, key, _materialize(dict.__getitem__(value, key)))
        value.items_list = _materialize(value.items_list)
        return value
    if isinstance(value, _OrderedDict):  # kept apart from a plain dict: `state_dict_of` tells the two apart
        return _OrderedDict((key, _materialize(item)) for key, item in value.items())
    if isinstance(value, dict):
        return {key: _materialize(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_materialize(item) for item in value]
    if isinstance(value, set):
        return value
    if isinstance(value, tuple):
        return tuple(_materialize(item) for item in value)
    return value


def load_torch(path: Path) -> Any:
    """The object a `torch.save` file holds, with tensors as numpy arrays; no torch, no code from the file."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _materialize(_load_zip(path))
        with open(path, "rb") as handle:
            return _materialize(_load_legacy(handle, path))
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, struct.error, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable torch.save file ({type(error).__name__}: {error}); "
                              "pass the released .pth/.ckpt file as downloaded") from None


def _load_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise CheckpointError("zip archive without data.pkl (a TorchScript or other archive, not torch.save)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        storages: Dict[str, _Storage] = {}

        def storage(pid):
            kind, storage_type, key, _location, _numel = pid[:5]
            if (kind.decode() if isinstance(kind, bytes) else kind) != "storage":
                raise CheckpointError(f"unknown persistent id {kind!r}")
            dtype = _storage_dtype(storage_type)
            if dtype is None:
                raise CheckpointError(f"unsupported storage type {storage_type!r}")
            if key not in storages:
                storages[key] = _Storage(dtype, archive.read(f"{prefix}data/{key}"), byteorder)
            return storages[key]

        with archive.open(pickles[0]) as handle:
            return _Unpickler(io.BytesIO(handle.read()), storage).load()


def _load_legacy(handle, path: Path):
    """torch < 1.6 files: magic, protocol, sys info, the pickled object, storage keys, raw storages."""
    def no_storage(pid):
        raise CheckpointError("a storage outside the tensor pickle; the file is corrupt")

    def restricted_load():  # every pickle in the file goes through the restricted unpickler
        return _Unpickler(handle, no_storage).load()

    if restricted_load() != _LEGACY_MAGIC:
        raise CheckpointError("neither a zip nor a legacy torch.save file (bad magic number)")
    restricted_load()  # protocol version
    sys_info = restricted_load()
    byteorder = "little" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else "big"
    storages: Dict[str, _Storage] = {}
    views: Dict[str, Tuple[str, int, int]] = {}

    def storage(pid):
        kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise CheckpointError(f"unsupported persistent id {kind!r} (a pickled module, not a state dict)")
        storage_type, root_key, _location, _numel, view_metadata = pid[1:6]
        dtype = _storage_dtype(storage_type)
        if dtype is None:
            raise CheckpointError(f"unsupported storage type {storage_type!r}")
        storages.setdefault(root_key, _Storage(dtype, None, byteorder))
        if view_metadata is not None:
            view_key, offset, size = view_metadata
            views[view_key] = (root_key, int(offset), int(size))
            return _View(storages[root_key], int(offset), int(size))
        return storages[root_key]

    result = _Unpickler(handle, storage).load()
    keys = restricted_load()
    for key in keys:
        item = storages[key]
        size = np.dtype(np.uint16 if item.dtype == "bfloat16" else item.dtype).itemsize
        (count,) = struct.unpack("<q" if byteorder == "little" else ">q", handle.read(8))
        item.data = handle.read(count * size)
        if len(item.data) != count * size:
            raise CheckpointError("the file ends inside a storage; it is truncated")
    return result


class _View(_Storage):
    def __init__(self, root: _Storage, offset: int, size: int):
        super().__init__(root.dtype, None, root.byteorder)
        self.root, self.view_offset, self.view_size = root, offset, size

    def array(self) -> np.ndarray:
        return self.root.array()[self.view_offset:self.view_offset + self.view_size]


class StateDict(dict):
    """A released network's tensors (name -> numpy array) and `layout`: how the file held them, for the log line
    (e.g. "EMA weights preferred over the training weights (model_state_dict / ema_state_dict)")."""

    layout = "state dict"


# Where released checkpoints keep the network, outermost first, as ZFTurbo's Music-Source-Separation-Training loader
# unwraps them (`utils/model_utils.py`, `load_start_checkpoint`): `state` (HTDemucs), `state_dict` (Lightning, Apollo),
# `model_state_dict` (its own `save_weights` checkpoints, beside optimizer/scheduler state, epoch and metrics).
_CONTAINER_KEYS = ("state", "state_dict", "model_state_dict")
# An EMA copy saved beside the training weights in one checkpoint dict (torch.optim.swa_utils.AveragedModel's
# state dict under `ema_state_dict`, next to `model_state_dict`): preferred.
_EMA_KEYS = ("ema_state_dict",)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, np.ndarray) for v in value.values())


def _describe_keys(value: Any) -> str:
    if isinstance(value, dict):
        keys = [repr(k) for k in list(value)[:8]]
        more = f" and {len(value) - 8} more" if len(value) > 8 else ""
        return f"a dict with the top-level keys {', '.join(keys) or 'none'}{more}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items ({', '.join(type(v).__name__ for v in value[:6])})"
    return f"a {getattr(value, 'qualified_name', type(value).__name__)}"


def state_dict_of(loaded: Any, path: Path) -> StateDict:
    """The network's tensors in a loaded `torch.save` file, whichever layout released checkpoints use.

    - a bare state dict (`model.state_dict()`);
    - a checkpoint dict holding it under `state`, `state_dict` or `model_state_dict` (ZFTurbo's full checkpoints,
      Lightning, HTDemucs), unwrapped in that order as ZFTurbo's loader does;
    - `torch.nn.DataParallel` / `DistributedDataParallel` weights (`module.` before every name): the prefix goes;
    - EMA weights, preferred over the training weights when a file has both:
      * kuielab sdx23 (`my_submission/src/train.py`, `torch.save(ema_helper.state_dict(), .../step{N}_seed{S}.ckpt)`):
        the whole file is `EMAHelper.shadow`, a plain dict `{parameter name: tensor}` of `named_parameters()` of the
        unwrapped network (no `module.`, no buffers) - told from `model.state_dict()` (an OrderedDict) by its type;
      * ermongroup/ddim, where sdx23's EMAHelper comes from: a list `[model state, optimizer state, epoch, step,
        ema shadow]`; the last entry, a parameter dict with the model's names, is taken;
      * `torch.optim.swa_utils.AveragedModel` (ZFTurbo's `training.ema_momentum`): `module.<name>` plus an
        `n_averaged` counter, alone or as `ema_state_dict` beside `model_state_dict`.
    Anything else: a one-line CheckpointError naming the top-level keys found.
    """
    notes = []
    value = loaded
    if isinstance(value, (list, tuple)) and len(value) >= 2 and _is_tensor_dict(value[0]) \
            and _is_tensor_dict(value[-1]) and type(value[-1]) is dict:
        model_names = {name[len("module."):] if name.startswith("module.") else name for name in value[0]}
        if set(value[-1]) <= model_names:
            notes.append("EMA weights preferred over the training weights (the last entry of a "
                         "[model, optimizer, epoch, step, ema] list, as ddim/sdx23's EMAHelper saves)")
            value = value[-1]
    if isinstance(value, dict) and not _is_tensor_dict(value):
        ema = [key for key in _EMA_KEYS if _is_tensor_dict(value.get(key))]
        if ema:
            notes.append(f"EMA weights preferred over the training weights ('{ema[0]}')")
            value = value[ema[0]]
        else:
            for key in _CONTAINER_KEYS:
                if isinstance(value, dict) and isinstance(value.get(key), dict):
                    notes.append(f"weights under '{key}'")
                    value = value[key]
    if not _is_tensor_dict(value):
        where = f" (in {' / '.join(notes)})" if notes else ""
        raise CheckpointError(f"{path}: holds no state dict (name -> tensor) but {_describe_keys(value)}{where}; "
                              "pass the released weights file (a state dict, or a checkpoint with model_state_dict, "
                              "state or state_dict)")
    tensors = dict(value)
    if "n_averaged" in tensors and all(name.startswith("module.") for name in tensors if name != "n_averaged"):
        tensors.pop("n_averaged")
        if not any("EMA" in note for note in notes):
            notes.append("EMA weights (torch AveragedModel)")
    elif type(value) is dict and not notes and loaded is value:
        notes.append("EMA weights (a plain parameter dict: sdx23's EMAHelper shadow)")
    if len(tensors) > 0 and all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module."):]: array for name, array in tensors.items()}
        notes.append("'module.' prefix removed (DataParallel, DDP or AveragedModel)")
    result = StateDict(tensors)
    if notes:
        result.layout = "; ".join(notes)
    return result


def plain(value: Any) -> Any:
    """A Placeholder tree (e.g. omegaconf DictConfig in Lightning hyper_parameters) -> plain dicts/lists."""
    if isinstance(value, Placeholder):
        if value.qualified_name.startswith("omegaconf."):
            content = value.state.get("_content") if isinstance(value.state, dict) else None
            if content is None and isinstance(value.state, dict):
                content = value.state.get("_val")
            return plain(content)
        if len(value):
            return {k: plain(v) for k, v in value.items()}
        return plain(value.state) if value.state is not None else list(map(plain, value.args))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def set_option_keys(options: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    """Refuse the `import.*` options a family's `read_released` has no parameter for (`options` holds only
    those); `known` names the ones it takes, for the message."""
    for key, value in options.items():
        if value not in (None, "", (), []):
            raise CheckpointError(f"{where}: import.{key} does not apply to this family; "
                                  f"it takes {', '.join('import.' + k for k in known) or 'no options'}")


def load_release_yaml(path: Path) -> dict:
    """A release's yaml config as a mapping: safe YAML plus the `!!python/tuple` tags some releases carry (read as
    lists). Unreadable, malformed, unsafe (other python tags) or not a mapping: a one-line CheckpointError naming
    the file."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))
    fix = "pass the yaml config that came with the release (import.config=...)"
    try:
        with open(path) as handle:
            settings = yaml.load(handle, Loader=Loader)
    except OSError as error:
        raise CheckpointError(f"import.config={path}: cannot be read ({error.strerror or error}); {fix}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise CheckpointError(f"import.config={path}: not valid YAML{where} ({' '.join(str(problem).split())}); "
                              f"{fix}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise CheckpointError(f"import.config={path}: holds a {type(settings).__name__}, not a mapping of settings "
                              f"(audio, model, training, ...); {fix}")
    return settings


def torch_conv_kernel(weight):
    """PyTorch Conv2d `(out, in, kh, kw)` over the reference's `(t, f)` plane -> Keras `(kh, kw, in, out)`."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def torch_transposed_kernel(weight):
    """PyTorch ConvTranspose2d `(in, out, kh, kw)` -> Keras Conv2DTranspose `(kh, kw, out, in)`."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))
