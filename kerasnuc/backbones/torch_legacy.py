"""Read a PyTorch state dict in the legacy (pre-1.6, non-zip) serialisation without PyTorch.

Such a ``.pth`` file is a sequence of pickles followed by raw tensor storages:

1. the magic number ``0x1950a86a20f9469cfc6c``, 2. the protocol version ``1001``, 3. a dict of
system information (byte order, type sizes), 4. the state dict itself, where every tensor is
pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and every
storage as a *persistent id* ``("storage", "FloatStorage", key, location, numel, view)``,
5. the list of storage keys in the order their data follows, 6. for each key: the number of
elements as a little-endian int64, then the elements as raw little-endian values.

:func:`read_legacy_state_dict` unpickles with an allow-list of the few globals such a file
names (no arbitrary code runs) and returns the tensors as numpy arrays, honouring each tensor's
offset and strides.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from pathlib import Path

import numpy as np

from kerasnuc.fileutil import KerasnucError

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001

#: Storage type name -> little-endian numpy dtype.
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class _TensorRef:
    """A tensor of the pickle before its storage data is read."""

    def __init__(self, storage, offset, size, stride, *_):
        self.key, self.dtype = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _TensorRef
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if storage_type not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        return key, _STORAGE_DTYPES[storage_type]


def read_legacy_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a legacy-format PyTorch ``.pth`` state dict, as numpy arrays.

    Args:
        path: the ``.pth`` file (``torch.save(state_dict, f, _use_new_zipfile_serialization=
            False)``, or any file written by PyTorch < 1.6).

    Returns:
        ``{name: array}`` in the file's order; arrays have the tensor's shape and dtype
        (``num_batches_tracked`` counters included).

    Raises:
        KerasnucError: the file is missing, is not a legacy state dict (e.g. the zip format of
            PyTorch >= 1.6) or is truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise KerasnucError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            if pickle.load(f) != _MAGIC:
                raise KerasnucError(f"{path}: not a legacy PyTorch file (bad magic number)")
            if pickle.load(f) != _PROTOCOL:
                raise KerasnucError(f"{path}: unsupported PyTorch protocol version")
            info = pickle.load(f)
            if not info.get("little_endian", True):
                raise KerasnucError(f"{path}: big-endian PyTorch files are not supported")
            state = _Unpickler(f).load()
            keys = pickle.load(f)
            storages: dict[str, np.ndarray] = {}
            dtypes = {t.key: t.dtype for t in state.values() if isinstance(t, _TensorRef)}
            for key in keys:
                (numel,) = struct.unpack("<q", f.read(8))
                dtype = np.dtype(dtypes.get(str(key), "u1"))
                buf = f.read(numel * dtype.itemsize)
                if len(buf) != numel * dtype.itemsize:
                    raise KerasnucError(f"{path}: truncated storage {key}")
                storages[str(key)] = np.frombuffer(buf, dtype=dtype)
    except (pickle.UnpicklingError, EOFError, struct.error, AttributeError) as err:
        raise KerasnucError(f"{path}: not a readable legacy PyTorch state dict ({err})") from err

    out: dict[str, np.ndarray] = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise KerasnucError(f"{path}: entry {name!r} is not a tensor")
        flat = storages[ref.key]
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset :],
            shape=ref.size,
            strides=tuple(s * itemsize for s in ref.stride),
            writeable=False,
        )
        out[name] = np.array(view, dtype=flat.dtype.newbyteorder("="))
    return out
