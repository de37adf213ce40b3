"""Tests of the PyTorch legacy-format reader on files written here with a stand-in ``torch``."""

from __future__ import annotations

import collections
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from kerasnuc.backbones.torch_legacy import read_legacy_state_dict
from kerasnuc.fileutil import KerasnucError


class _Storage:
    """A storage of the stand-in torch module: its key, type name and data."""

    def __init__(self, key: str, type_name: str, data: np.ndarray):
        self.key, self.type_name, self.data = key, type_name, data


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (sys.modules["torch._utils"]._rebuild_tensor_v2, self.args)


def _write_legacy(path, tensors, storages, monkeypatch, little_endian=True):
    """Write ``{name: (storage, offset, size, stride)}`` in PyTorch's legacy layout."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called when writing
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage", "HalfStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return (
                    "storage",
                    getattr(torch, obj.type_name),
                    obj.key,
                    "cpu",
                    obj.data.size,
                    None,
                )
            return None

    state = collections.OrderedDict((name, _Tensor(*spec)) for name, spec in tensors.items())
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": little_endian}, f, protocol=2)
        Pickler(f, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(struct.pack("<q", s.data.size))
            f.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())


def test_reads_tensors_with_offsets_and_strides(tmp_path, monkeypatch):
    weights = _Storage("7", "FloatStorage", np.arange(12, dtype=np.float32))
    counter = _Storage("9", "LongStorage", np.array([42], dtype=np.int64))
    path = tmp_path / "state.pth"
    tensors = {
        "conv.weight": (weights, 0, (2, 3), (3, 1)),  # row-major 2x3
        "conv.weight_t": (weights, 0, (3, 2), (1, 3)),  # its transpose (column-major view)
        "bias": (weights, 6, (4,), (1,)),  # offset 6
        "every_other": (weights, 1, (3,), (4,)),  # elements 1, 5, 9
        "bn.num_batches_tracked": (counter, 0, (), ()),
    }
    _write_legacy(path, tensors, [weights, counter], monkeypatch)
    monkeypatch.delitem(sys.modules, "torch")  # the reader must not need it
    monkeypatch.delitem(sys.modules, "torch._utils")
    out = read_legacy_state_dict(path)
    assert list(out) == list(tensors)
    np.testing.assert_array_equal(out["conv.weight"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(out["conv.weight_t"], [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(out["bias"], [6, 7, 8, 9])
    np.testing.assert_array_equal(out["every_other"], [1, 5, 9])
    assert out["conv.weight"].dtype == np.float32
    assert out["bn.num_batches_tracked"].shape == () and int(out["bn.num_batches_tracked"]) == 42


def test_rejects_other_files(tmp_path, monkeypatch):
    with pytest.raises(KerasnucError, match="not found"):
        read_legacy_state_dict(tmp_path / "missing.pth")
    zipped = tmp_path / "new_format.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 60)  # PyTorch >= 1.6 writes zip archives
    with pytest.raises(KerasnucError, match="new_format.pth"):
        read_legacy_state_dict(zipped)
    weights = _Storage("1", "FloatStorage", np.ones(4, dtype=np.float32))
    truncated = tmp_path / "truncated.pth"
    _write_legacy(truncated, {"w": (weights, 0, (4,), (1,))}, [weights], monkeypatch)
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(KerasnucError, match="truncated"):
        read_legacy_state_dict(truncated)


def test_refuses_code_in_the_pickle(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"little_endian": True}, f, protocol=2)
        pickle.dump(collections.OrderedDict(x=types.SimpleNamespace()), f, protocol=2)
    with pytest.raises(KerasnucError, match="not allowed"):
        read_legacy_state_dict(path)
