"""Write `torch.save` files without torch, for fixtures whose weights are regenerated at test time.

`save_torch(obj, path)` writes torch's zip format (torch >= 1.6): `archive/data.pkl` pickles `obj` with every
numpy array as a tensor (`torch._utils._rebuild_tensor_v2` over a storage in `archive/data/<key>`), plus
`archive/version` and `archive/byteorder`. `collections.OrderedDict` stays one (a state dict). The pure-Python
pickler writes torch's globals by name, so torch need not be installed; `torch.load` and
`models.checkpoints.load_torch` both read the result (tests/test_import.py checks the second; the first was
checked once with torch 2.14.1).
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np


class _Global:
    """A torch global, pickled as `GLOBAL module name` (never called here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise TypeError("a stand-in for pickling only")


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
             np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
             np.dtype(np.int32): "IntStorage", np.dtype(np.bool_): "BoolStorage"}


class _StorageRef:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its `save` can be extended per object
    def __init__(self, file, storages: dict):
        super().__init__(file, protocol=2)
        self.storages = storages

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            dtype = obj.array.dtype
            if dtype not in _STORAGES:
                raise TypeError(f"no torch storage for {dtype}")
            return ("storage", _Global("torch", _STORAGES[dtype]), obj.key, "cpu", obj.array.size)
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        if isinstance(obj, (np.ndarray, np.generic)):
            array = np.array(obj, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
            key = str(len(self.storages))
            self.storages[key] = array
            stride = tuple(step // array.itemsize for step in array.strides)
            self.save_reduce(_REBUILD, (_StorageRef(key, array), 0, tuple(array.shape), stride, False,
                                        collections.OrderedDict()))
            return
        super().save(obj, save_persistent_id)


def save_torch(obj, path: Path) -> None:
    storages: dict = {}
    data = io.BytesIO()
    _Pickler(data, storages).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data.getvalue())
        archive.writestr("archive/byteorder", "little")
        for key, array in storages.items():
            archive.writestr(f"archive/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
        archive.writestr("archive/version", "3\n")
