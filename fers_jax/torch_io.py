"""Reads PyTorch checkpoints (.pt/.pth) into numpy arrays without PyTorch.

Two on-disk formats exist:

* The zip format, written by ``torch.save`` since PyTorch 1.6. The archive
  holds one folder (its name varies: ``archive/``, ``convh/``, ...) with
  ``data.pkl``, a pickle of the saved object; ``data/<key>``, the raw bytes of
  each storage; and, in files from recent versions, ``byteorder``
  (``little`` or ``big``; files without it are little-endian).
* The legacy format (``_use_new_zipfile_serialization=False``, and many older
  torchvision ``.pth`` files): five pickles back to back (a magic number, the
  protocol version 1001, a system-info dict, the object, the list of storage
  keys), then for each key an int64 element count and the storage's raw
  little-endian bytes.

In both, the object pickle never holds tensor bytes. It calls
``torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, ...)``
whose ``storage`` argument is a persistent id, a tuple
``('storage', torch.FloatStorage, key, location, numel[, view])`` that the
loader resolves to the bytes stored under ``key``.

Safety rule: a pickle can name any importable callable and call it, so
unpickling an untrusted file with plain ``pickle`` can run arbitrary code.
This reader's unpickler resolves a short allow-list of names (the tensor
rebuild functions, storage and dtype names, ``collections.OrderedDict``,
``torch.Size``) to inert stand-ins defined here and refuses every other name
with `CheckpointError` before anything is called. Nothing in this module
imports torch, calls eval/exec, or imports a module the pickle names.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from fers_jax.errors import CheckpointError

try:  # bfloat16 and float8 dtypes; a dependency of jax, so normally present.
    import ml_dtypes
except ImportError:  # pragma: no cover - exercised only without jax
    ml_dtypes = None

__all__ = ["load", "load_state_dict"]

# First pickle of a legacy file, and the protocol number after it.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Storage class name -> element dtype. Tensors whose dtype has no storage
# class of its own (uint16, float8, ...) use UntypedStorage (bytes) and pass
# the dtype to _rebuild_tensor_v3 instead.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}
# Modules a storage class is pickled under: torch.FloatStorage (zip format),
# torch.cuda.FloatStorage (old legacy GPU saves), torch.storage.UntypedStorage.
_STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")

# torch dtype names as pickled (torch.float32 pickles as GLOBAL 'torch
# float32') -> numpy / ml_dtypes name.
_TORCH_DTYPES = {
    **{name: name for name in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32",
        "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
        "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
        "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")},
    "double": "float64", "float": "float32", "half": "float16",
    "long": "int64", "int": "int32", "short": "int16",
    "cfloat": "complex64", "cdouble": "complex128",
}

_MODULE_PREFIX = "module."


class _Bad(Exception):
    """A problem with the file; `load` prefixes the path and re-raises it."""


def _numpy_dtype(name: str) -> np.dtype:
    """Returns the numpy dtype for a numpy or ml_dtypes type name."""
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16, float8_*: not numpy's own
        pass
    if ml_dtypes is not None and hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name))
    raise _Bad(f"holds {name} tensors, which need a newer ml_dtypes package")


# ---------------------------------------------------------------------------
# Inert stand-ins that the restricted unpickler hands out.


@dataclass(frozen=True)
class _StorageType:
    """Stands in for a torch.*Storage class; only its dtype matters."""

    name: str
    dtype_name: str


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; its bytes are read later.

    Attributes:
        key: the storage's record key (``data/<key>`` in a zip).
        dtype: element type the storage was saved with.
        numel: elements the pickle declares.
        offset: first element within the stored bytes (legacy views only).
    """

    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0


@dataclass(frozen=True)
class _Marker:
    """Stands in for torch.Tensor / torch.nn.Parameter as a type argument."""

    name: str


_TENSOR_TYPES = (_Marker("torch.Tensor"),
                 _Marker("torch.nn.parameter.Parameter"))


@dataclass
class _PendingTensor:
    """A tensor whose bytes are not read yet.

    Legacy files store tensor bytes after the object pickle, so rebuild
    functions cannot build arrays while unpickling; `_materialize` does it.
    """

    storage: _StorageRef
    offset: int
    shape: tuple
    stride: tuple
    dtype: np.dtype
    conj: bool = False
    neg: bool = False


class _OrderedDict(dict):
    """Stands in for collections.OrderedDict.

    torch attaches a ``_metadata`` attribute to state dicts through the
    BUILD opcode; it describes module versions, not weights, so it is dropped.
    """

    def __setstate__(self, state):
        del state


def _make_pending(storage, storage_offset, size, stride, dtype=None,
                  metadata=None) -> _PendingTensor:
    """Checks rebuild arguments (they come from the file) and records them."""
    if not isinstance(storage, _StorageRef):
        raise _Bad("is corrupt: a tensor's storage is not a storage record")
    if not _is_index_tuple(size) or not _is_index_tuple(stride) \
            or len(size) != len(stride) or not _is_index(storage_offset):
        raise _Bad(f"is corrupt: a tensor has shape {size!r}, strides "
                   f"{stride!r} and offset {storage_offset!r}")
    if dtype is None:
        dtype = storage.dtype
    elif not isinstance(dtype, np.dtype):
        raise _Bad(f"is corrupt: a tensor has dtype {dtype!r}")
    metadata = metadata if isinstance(metadata, dict) else {}
    return _PendingTensor(storage, storage_offset, tuple(size), tuple(stride),
                          dtype, bool(metadata.get("conj")),
                          bool(metadata.get("neg")))


def _is_index(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and value >= 0)


def _is_index_tuple(value) -> bool:
    return isinstance(value, tuple) and all(_is_index(v) for v in value)


# The rebuild functions mirror torch._utils' signatures; requires_grad,
# backward hooks and Python attributes do not matter for arrays.

def _rebuild_tensor(storage, storage_offset, size, stride):
    return _make_pending(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None,
                       metadata=None):
    del requires_grad, backward_hooks
    return _make_pending(storage, storage_offset, size, stride,
                         metadata=metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
    del requires_grad, backward_hooks
    return _make_pending(storage, storage_offset, size, stride, dtype,
                         metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    del requires_grad, backward_hooks
    return _expect_tensor(data)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    del requires_grad, backward_hooks, state
    return _expect_tensor(data)


def _rebuild_from_type_v2(func, new_type, args, state):
    """Rebuilds a tensor that carried Python attributes (they are dropped).

    torch uses this for tensor subclasses too, whose classes would need
    their code; only plain Tensor and Parameter are accepted.
    """
    del state
    if func not in _TENSOR_REBUILDERS or new_type not in _TENSOR_TYPES:
        raise _Bad(f"refused: it asks to rebuild a tensor as {new_type!r}, "
                   "which is not a plain tensor or parameter")
    if not isinstance(args, tuple):
        raise _Bad("is corrupt: bad arguments to _rebuild_from_type_v2")
    return func(*args)


def _expect_tensor(data):
    if not isinstance(data, _PendingTensor):
        raise _Bad("is corrupt: a parameter wraps something that is not "
                   "a tensor")
    return data


_TENSOR_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3,
                      _rebuild_parameter, _rebuild_parameter_with_state)


def _torch_size(items=()):
    """torch.Size pickles as torch.Size(tuple); a plain tuple is kept."""
    return tuple(items)


def _codecs_encode(text, encoding="utf-8"):
    """Protocol-2 pickles write bytes as _codecs.encode(str, 'latin1').

    Only str inputs and str.encode's text codecs are accepted, so this cannot
    reach codecs such as zlib that act on arbitrary objects.
    """
    if not isinstance(text, str) or not isinstance(encoding, str):
        raise _Bad("is corrupt: bad arguments to _codecs.encode")
    return text.encode(encoding)


_ALLOWED = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"):
        _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    # The module's name before PyTorch 1.9; torch.load maps it the same way.
    ("torch.tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch", "Tensor"): _TENSOR_TYPES[0],
    ("torch.nn.parameter", "Parameter"): _TENSOR_TYPES[1],
    ("_codecs", "encode"): _codecs_encode,
}


def _resolve_global(module: str, name: str):
    """Maps a pickled global to its stand-in, or refuses it."""
    if (module, name) in _ALLOWED:
        return _ALLOWED[module, name]
    if module in _STORAGE_MODULES and name in _STORAGE_DTYPES:
        return _StorageType(name, _STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
        return _numpy_dtype(_TORCH_DTYPES[name])
    raise _Bad(f"refused: it asks to load '{module}.{name}', which is not a "
               "tensor or plain container (a checkpoint must never run code)")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only build containers and tensor stand-ins."""

    def __init__(self, file, persistent: Callable[[tuple], Any] | None):
        super().__init__(file, encoding="utf-8")
        self._persistent = persistent

    def find_class(self, module, name):
        return _resolve_global(module, name)

    def persistent_load(self, pid):
        if self._persistent is None:
            raise _Bad("is corrupt: a storage reference appears outside "
                       "the object pickle")
        return self._persistent(pid)


def _unpickle(file, persistent=None):
    """Runs the restricted unpickler over one pickle in `file`."""
    try:
        return _RestrictedUnpickler(file, persistent).load()
    except _Bad:
        raise
    except RecursionError:
        raise _Bad("is corrupt: its pickle nests too deeply") from None
    except Exception as err:  # noqa: BLE001
        # Only pickle's own machinery and the stand-ins above run here, so
        # any other exception (UnpicklingError, EOFError, a TypeError from a
        # bad REDUCE, ...) means the bytes are damaged or not a checkpoint.
        raise _Bad(f"is corrupt: its pickle cannot be read "
                   f"({type(err).__name__}: {err})") from None


def _parse_storage_id(pid) -> tuple[_StorageType, str, int, Any]:
    """Splits ('storage', type, key, location, numel[, view]) into parts."""
    if isinstance(pid, tuple) and pid and pid[0] == "module":
        raise _Bad("refused: it pickles a whole nn.Module, which cannot be "
                   "rebuilt without running its code; save model.state_dict()")
    if not (isinstance(pid, tuple) and len(pid) in (5, 6)
            and pid[0] == "storage"):
        raise _Bad(f"is corrupt: unknown storage reference {pid!r:.80}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, _StorageType) or not _is_index(numel):
        raise _Bad(f"is corrupt: bad storage reference {pid!r:.80}")
    view = pid[5] if len(pid) == 6 else None
    return storage_type, str(key), numel, view


# ---------------------------------------------------------------------------
# Turning pending tensors into arrays.


def _to_native(raw, dtype: np.dtype, byteorder: str, count: int) -> np.ndarray:
    """Reads `count` values of `dtype` stored in `byteorder` as native ones."""
    arr = np.frombuffer(raw, dtype=dtype, count=count)
    if byteorder == sys.byteorder or dtype.itemsize == 1:
        return arr
    # Swap through an unsigned view, which works for ml_dtypes types too;
    # complex values swap each of their two float halves.
    half = dtype.kind == "c"
    unit = np.dtype(f"u{dtype.itemsize // 2 if half else dtype.itemsize}")
    return arr.view(unit).byteswap().view(dtype)


def _build_array(tensor: _PendingTensor, raw, byteorder: str) -> np.ndarray:
    """Copies a tensor's elements out of its storage's bytes."""
    ref = tensor.storage
    start = ref.offset * ref.dtype.itemsize
    nbytes = ref.numel * ref.dtype.itemsize
    if start + nbytes > len(raw):
        raise _Bad(f"is corrupt: storage '{ref.key}' holds {len(raw)} bytes "
                   f"but the pickle declares {ref.numel} {ref.dtype} values "
                   f"({start + nbytes} bytes)")
    shape, dtype = tensor.shape, tensor.dtype
    if 0 in shape:
        return np.zeros(shape, dtype)
    count = nbytes // dtype.itemsize
    needed = tensor.offset + 1 + sum((n - 1) * s
                                     for n, s in zip(shape, tensor.stride))
    if needed > count:
        raise _Bad(f"is corrupt: a tensor of shape {shape} needs {needed} "
                   f"values from storage '{ref.key}', which holds {count}")
    flat = _to_native(memoryview(raw)[start:start + nbytes], dtype,
                      byteorder, count)
    try:
        view = np.lib.stride_tricks.as_strided(
            flat[tensor.offset:], shape,
            tuple(s * dtype.itemsize for s in tensor.stride))
        arr = view.copy()  # owns its memory, C-contiguous, writable
    except (MemoryError, ValueError):
        # Zero strides let a small storage back a huge (broadcast) tensor.
        raise _Bad(f"holds a tensor of shape {shape}, too large to load "
                   "into memory") from None
    if tensor.neg:
        arr = -arr
    if tensor.conj:
        arr = np.conj(arr)
    return arr


def _materialize(obj, fetch: Callable[[str], bytes], byteorder: str):
    """Returns `obj` with tensors as arrays and stand-ins as plain values.

    Args:
        obj: what the restricted unpickler returned.
        fetch: maps a storage key to its raw bytes.
        byteorder: 'little' or 'big', the order the bytes were written in.
    """
    raw_by_key: dict[str, bytes] = {}

    def raw_of(key):
        if key not in raw_by_key:
            raw_by_key[key] = fetch(key)
        return raw_by_key[key]

    def convert(node):
        if isinstance(node, _PendingTensor):
            return _build_array(node, raw_of(node.storage.key), byteorder)
        if isinstance(node, _StorageRef):  # a storage saved on its own
            whole = _PendingTensor(node, 0, (node.numel,), (1,), node.dtype)
            return _build_array(whole, raw_of(node.key), byteorder)
        if isinstance(node, (_StorageType, _Marker)):
            return node.name
        return node

    try:
        return _walk(obj, convert, {})
    except RecursionError:
        raise _Bad("is corrupt: its object nests too deeply") from None


def _walk(node, convert, memo: dict):
    """Copies containers (dict subclasses become dicts), converting leaves.

    `memo` keeps objects the pickle shares shared, and ends cycles.
    """
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, dict):
        out = memo[id(node)] = {}
        for key, value in node.items():
            out[_walk(key, convert, memo)] = _walk(value, convert, memo)
    elif isinstance(node, list):
        out = memo[id(node)] = []
        out.extend(_walk(item, convert, memo) for item in node)
    elif isinstance(node, tuple):
        out = memo[id(node)] = tuple(_walk(item, convert, memo)
                                     for item in node)
    else:
        out = memo[id(node)] = convert(node)
    return out


# ---------------------------------------------------------------------------
# The two file formats.


def _load_zip(path: str):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise _Bad(f"is a truncated or corrupt zip archive ({err})") from None
    with archive:
        return _load_from_archive(archive)


def _read_record(archive: zipfile.ZipFile, name: str, what: str) -> bytes:
    try:
        return archive.read(name)
    except KeyError:
        raise _Bad(f"has no record '{name}' ({what})") from None
    except Exception as err:  # noqa: BLE001 - BadZipFile, zlib.error, EOF...
        raise _Bad(f"is corrupt: record '{name}' cannot be read "
                   f"({type(err).__name__}: {err})") from None


def _archive_prefix(names: list[str]) -> str:
    """torch names every record '<archive name>/...', after the first one."""
    if names and "/" in names[0]:
        return names[0].split("/", 1)[0] + "/"
    return ""


def _read_byteorder(archive: zipfile.ZipFile, prefix: str) -> str:
    """The order storages were written in; files without a record: little."""
    name = prefix + "byteorder"
    if name not in archive.namelist():
        return "little"
    byteorder = _read_record(archive, name, "").decode("ascii", "replace")
    if byteorder not in ("little", "big"):
        raise _Bad(f"is corrupt: unknown byte order {byteorder!r}")
    return byteorder


def _load_from_archive(archive: zipfile.ZipFile):
    prefix = _archive_prefix(archive.namelist())
    pickled = _read_record(archive, prefix + "data.pkl",
                           "not a torch.save archive; a TorchScript file?")
    byteorder = _read_byteorder(archive, prefix)

    def persistent(pid):
        storage_type, key, numel, _ = _parse_storage_id(pid)
        return _StorageRef(key, _numpy_dtype(storage_type.dtype_name), numel)

    def fetch(key):
        return _read_record(archive, f"{prefix}data/{key}",
                            "the bytes of a storage the pickle uses")

    return _materialize(_unpickle(io.BytesIO(pickled), persistent), fetch,
                        byteorder)


def _load_legacy(raw: bytes):
    stream = io.BytesIO(raw)
    if _unpickle(stream) != _LEGACY_MAGIC:
        raise _Bad("is not a PyTorch checkpoint (neither a zip archive nor "
                   "a legacy torch.save file)")
    protocol = _unpickle(stream)
    if protocol != _LEGACY_PROTOCOL:
        raise _Bad(f"uses unknown legacy protocol {protocol!r}")
    _unpickle(stream)  # system info; data are little-endian regardless
    dtypes: dict[str, np.dtype] = {}

    def persistent(pid):
        storage_type, key, numel, view = _parse_storage_id(pid)
        dtype = dtypes.setdefault(key, _numpy_dtype(storage_type.dtype_name))
        if view is None:
            return _StorageRef(key, dtype, numel)
        # A view of part of a storage (PyTorch < 1.0): (key, offset, numel).
        if not (isinstance(view, tuple) and len(view) == 3
                and _is_index(view[1]) and _is_index(view[2])):
            raise _Bad(f"is corrupt: bad storage view {view!r:.80}")
        return _StorageRef(key, dtype, view[2], view[1])

    obj = _unpickle(stream, persistent)
    keys = _unpickle(stream)
    if not isinstance(keys, list):
        raise _Bad("is corrupt: the storage key list is missing")
    data = _read_legacy_storages(stream, [str(k) for k in keys], dtypes)

    def fetch(key):
        if key not in data:
            raise _Bad(f"has no data for storage '{key}' that the pickle uses")
        return data[key]

    return _materialize(obj, fetch, "little")


def _read_legacy_storages(stream: io.BytesIO, keys: list[str],
                          dtypes: dict[str, np.dtype]) -> dict[str, bytes]:
    """Reads each storage's int64 element count and raw bytes, in order."""
    data = {}
    for key in keys:
        if key not in dtypes:
            raise _Bad(f"is corrupt: storage '{key}' has data but no type")
        header = stream.read(8)
        if len(header) < 8:
            raise _Bad(f"is truncated: storage '{key}' is missing")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * dtypes[key].itemsize
        chunk = stream.read(nbytes) if numel >= 0 else b""
        if numel < 0 or len(chunk) < nbytes:
            raise _Bad(f"is truncated: storage '{key}' is cut short")
        data[key] = chunk
    return data


def _read_head(path: str, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        raise _Bad("does not exist") from None
    except IsADirectoryError:
        raise _Bad("is a directory, not a file") from None
    except OSError as err:
        raise _Bad(f"cannot be read ({err.strerror or err})") from None


def _load_any(path: str):
    head = _read_head(path, 4)
    if not head:
        raise _Bad("is empty")
    if head.startswith(b"PK"):
        return _load_zip(path)
    if head[:1] == pickle.PROTO:
        return _load_legacy(_read_head(path, -1))
    raise _Bad("is not a PyTorch checkpoint (neither a zip archive nor a "
               "legacy torch.save file)")


# ---------------------------------------------------------------------------
# Public API.


def load(path: str | os.PathLike) -> Any:
    """Loads a torch.save file without torch and without running its code.

    Args:
        path: a .pt/.pth file in the zip format (PyTorch >= 1.6) or the
            legacy pickle format.

    Returns:
        The saved object, with each tensor (or parameter) as a C-contiguous
        numpy array of its dtype and shape, each OrderedDict as a dict,
        torch.Size as a tuple and torch dtypes as numpy dtypes; other plain
        values (dict, list, tuple, str, bytes, int, float, bool, None) as
        they are. State-dict ``_metadata`` is dropped.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, damaged, or
            names anything other than tensors and plain containers.
    """
    name = os.fspath(path)
    try:
        return _load_any(name)
    except _Bad as err:
        raise CheckpointError(f"checkpoint {name} {err}") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a state_dict as one flat dict of arrays.

    The object is unwrapped from ``{'state_dict': sd}`` or ``{'model': sd}``.
    DataParallel's ``module.`` prefix is removed from keys. A dict of state
    dicts, such as ``{'encoder': sd1, 'decoder': sd2}``, is flattened with
    dotted prefixes: ``'encoder.layer1.0.conv1.weight'``; use `load` to keep
    the nesting.

    Args:
        path: a checkpoint file, as for `load`.

    Returns:
        Parameter and buffer names mapped to numpy arrays, in file order.

    Raises:
        CheckpointError: as for `load`, or when the file does not hold a
            (dict of) state_dict(s) or two entries flatten to one name.
    """
    name = os.fspath(path)
    obj = load(name)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {name} holds a "
                              f"{type(obj).__name__}, not a state_dict")
    flat: dict[str, np.ndarray] = {}
    try:
        _flatten(obj, "", flat)
    except _Bad as err:
        raise CheckpointError(f"checkpoint {name} {err}") from None
    return flat


def _flatten(tree: dict, prefix: str, out: dict[str, np.ndarray]) -> None:
    for key, value in tree.items():
        if not isinstance(key, str):
            raise _Bad(f"is not a state_dict: it has key {key!r}")
        if key.startswith(_MODULE_PREFIX):
            key = key[len(_MODULE_PREFIX):]
        full = prefix + key
        if isinstance(value, dict):
            _flatten(value, full + ".", out)
        elif not isinstance(value, np.ndarray):
            raise _Bad(f"is not a state_dict: entry '{full}' is a "
                       f"{type(value).__name__}, not a tensor")
        elif full in out:
            raise _Bad(f"has two entries named '{full}' once 'module.' "
                       "prefixes are removed")
        else:
            out[full] = value
