"""Reading PyTorch checkpoints without torch: formats, values and safety.

The core tests need no torch. Values are checked against files this module
writes itself, opcode by opcode, in the layout torch.save uses; the tests at
the end compare with real torch.save output when torch is installed.
"""

import os
import pickle
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from conftest import CHECKPOINTS, GOLDEN, REPO
from fers_jax import torch_io
from fers_jax.errors import CheckpointError

# ---------------------------------------------------------------------------
# A tiny writer of torch-style pickles. The standard pickler refuses to name
# torch functions unless torch is importable, so this one writes opcodes.

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class Global:
    """A GLOBAL opcode naming module.name."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Call:
    """A REDUCE opcode: func(*args)."""

    def __init__(self, func, args):
        self.func, self.args = func, args


class PersistentId:
    """A BINPERSID opcode: the unpickler's persistent_load(pid)."""

    def __init__(self, pid):
        self.pid = pid


def emit(obj, out, memo):
    """Appends the protocol-2 opcodes that rebuild `obj` to `out`.

    A Call seen before is fetched from the memo, as pickle does for shared
    objects.
    """
    if id(obj) in memo:
        out += b"j" + struct.pack("<I", memo[id(obj)])  # LONG_BINGET
    elif obj is None:
        out += b"N"
    elif obj is True or obj is False:
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
        out += b"\x8a" + bytes([len(raw)]) + raw  # LONG1
    elif isinstance(obj, float):
        out += b"G" + struct.pack(">d", obj)
    elif isinstance(obj, str):
        raw = obj.encode()
        out += b"X" + struct.pack("<I", len(raw)) + raw
    elif isinstance(obj, tuple):
        out += b"("
        for item in obj:
            emit(item, out, memo)
        out += b"t"
    elif isinstance(obj, list):
        out += b"]("
        for item in obj:
            emit(item, out, memo)
        out += b"e"
    elif isinstance(obj, dict):
        out += b"}("
        for key, value in obj.items():
            emit(key, out, memo)
            emit(value, out, memo)
        out += b"u"
    elif isinstance(obj, Global):
        out += f"c{obj.module}\n{obj.name}\n".encode()
    elif isinstance(obj, Call):
        emit(obj.func, out, memo)
        emit(obj.args, out, memo)
        memo[id(obj)] = len(memo)
        out += b"R" + b"r" + struct.pack("<I", memo[id(obj)])  # LONG_BINPUT
    elif isinstance(obj, PersistentId):
        emit(obj.pid, out, memo)
        out += b"Q"
    else:
        raise TypeError(type(obj))


def dumps(obj):
    out = bytearray(b"\x80\x02")
    emit(obj, out, {})
    return bytes(out + b".")


STORAGE_NAMES = {
    "float32": "FloatStorage", "float64": "DoubleStorage",
    "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage",
    "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
    "complex64": "ComplexFloatStorage", "complex128": "ComplexDoubleStorage",
}


class Store:
    """Collects storages and makes the pickle calls for tensors over them.

    Args:
        byteorder: 'little' or 'big', how storage bytes are written.
        legacy: use the legacy 6-field persistent ids.
    """

    def __init__(self, byteorder="little", legacy=False):
        self.byteorder, self.legacy = byteorder, legacy
        self.storages = {}  # key -> (storage class name, numel, bytes)

    def storage(self, flat, name=None, numel=None):
        key = str(len(self.storages))
        flat = np.ascontiguousarray(flat).reshape(-1)
        name = name or STORAGE_NAMES[flat.dtype.name]
        self.storages[key] = (name, flat.size if numel is None else numel,
                              to_bytes(flat, self.byteorder))
        return key

    def pid(self, key):
        name, numel, _ = self.storages[key]
        pid = ("storage", Global("torch", name), key, "cpu", numel)
        return PersistentId(pid + (None,) if self.legacy else pid)

    def view(self, key, offset, shape, stride):
        """_rebuild_tensor_v2 over storage `key`; strides in elements."""
        return Call(Global("torch._utils", "_rebuild_tensor_v2"),
                    (self.pid(key), offset, tuple(shape), tuple(stride),
                     False, Call(Global("collections", "OrderedDict"), ())))

    def tensor(self, array):
        """A contiguous tensor with its own storage."""
        array = np.asarray(array)
        strides = tuple(s // array.itemsize for s in array.strides)
        return self.view(self.storage(array), 0, array.shape, strides)


def to_bytes(flat, byteorder):
    if byteorder == sys.byteorder or flat.dtype.itemsize == 1:
        return flat.tobytes()
    if flat.dtype.kind == "c":
        half = np.dtype(f"f{flat.dtype.itemsize // 2}")
        return flat.view(half).byteswap().tobytes()
    return flat.view(f"u{flat.dtype.itemsize}").byteswap().tobytes()


def write_zip(path, obj, store, prefix="archive", byteorder="little",
              skip=()):
    """Writes `obj` as torch.save's zip format would, minus records `skip`."""
    records = {"data.pkl": dumps(obj), "version": b"3\n"}
    if byteorder:
        records["byteorder"] = byteorder.encode()
    for key, (_, _, raw) in store.storages.items():
        records[f"data/{key}"] = raw
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, raw in records.items():
            if name not in skip:
                z.writestr(f"{prefix}/{name}", raw)
    return path


def write_legacy(path, obj, store, main_pickle=None):
    """Writes `obj` in the legacy (non-zip) torch.save format."""
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(LEGACY_MAGIC, 2), pickle.dumps(1001, 2),
             pickle.dumps(sys_info, 2), main_pickle or dumps(obj),
             pickle.dumps(list(store.storages), 2)]
    for name, numel, raw in store.storages.values():
        parts += [struct.pack("<q", numel), raw]
    path.write_bytes(b"".join(parts))
    return path


def sample_arrays():
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "f64": rng.standard_normal((4,)),
        "f16": rng.standard_normal((3, 1)).astype(np.float16),
        "bf16": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
        "i64": rng.integers(-2**40, 2**40, (2, 2)),
        "i32": rng.integers(-2**30, 2**30, (3,)).astype(np.int32),
        "i16": rng.integers(-2**14, 2**14, (3,)).astype(np.int16),
        "i8": rng.integers(-100, 100, (3,)).astype(np.int8),
        "u8": rng.integers(0, 255, (2, 2, 2)).astype(np.uint8),
        "bool": rng.random((3, 2)) > 0.5,
        "c64": (rng.standard_normal(3) + 1j * rng.standard_normal(3)
                ).astype(np.complex64),
        "c128": rng.standard_normal(2) + 1j * rng.standard_normal(2),
    }
    # Shape (), like BatchNorm's num_batches_tracked.
    arrays["scalar"] = np.asarray(7, dtype=np.int64)
    return arrays


def assert_same(got, want):
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------
# Hand-made files: exact round trips.


@pytest.mark.parametrize("byteorder", ["little", "big", None])
def test_zip_round_trip_of_every_dtype(tmp_path, byteorder):
    arrays = sample_arrays()
    store = Store(byteorder or "little")
    obj = {"sd": Call(Global("collections", "OrderedDict"),
                      ([(k, store.tensor(v)) for k, v in arrays.items()],))}
    loaded = torch_io.load(write_zip(tmp_path / "x.pt", obj, store,
                                     byteorder=byteorder))
    assert type(loaded) is dict and type(loaded["sd"]) is dict
    assert list(loaded["sd"]) == list(arrays)
    for key, want in arrays.items():
        assert_same(loaded["sd"][key], want)
        assert loaded["sd"][key].dtype.isnative


def test_strides_and_storage_offset_are_honoured(tmp_path):
    base = np.arange(24, dtype=np.float32) * 1.5
    store = Store()
    key = store.storage(base)
    obj = {
        "transposed": store.view(key, 0, (6, 4), (1, 6)),
        "sliced": store.view(key, 5, (3,), (2,)),
        "block": store.view(key, 7, (2, 2), (6, 1)),
        "broadcast": store.view(key, 3, (2, 3), (0, 1)),
        "scalar": store.view(key, 9, (), ()),
        "empty": store.view(key, 0, (0, 3), (3, 1)),
    }
    got = torch_io.load(write_zip(tmp_path / "v.pt", obj, store))
    assert_same(got["transposed"], base.reshape(4, 6).T.copy())
    assert_same(got["sliced"], base[5:11:2].copy())
    assert_same(got["block"], base.reshape(4, 6)[1:3, 1:3].copy())
    assert_same(got["broadcast"], np.stack([base[3:6]] * 2))
    assert_same(got["scalar"], np.asarray(base[9]))
    assert_same(got["empty"], np.zeros((0, 3), np.float32))
    assert got["transposed"].flags.c_contiguous
    assert got["transposed"].flags.writeable


def test_plain_values_and_containers_are_kept(tmp_path):
    store = Store()
    weight = np.ones((2, 2), np.float32)
    obj = {"epoch": 3, "big": 2**70, "lr": 0.5, "name": "é", "ok": True,
           "none": None, "pair": (1, "a"), "items": [1, [2.0]],
           "shape": Call(Global("torch", "Size"), ([4, 5],)),
           "blob": Call(Global("_codecs", "encode"), ("\x00\xff", "latin1")),
           "dtype": Global("torch", "float16"),
           "param": Call(Global("torch._utils", "_rebuild_parameter"),
                         (store.tensor(weight), True,
                          Call(Global("collections", "OrderedDict"), ()))),
           "shared": [store.tensor(weight)] * 2}
    got = torch_io.load(write_zip(tmp_path / "p.pt", obj, store))
    assert {k: got[k] for k in ("epoch", "big", "lr", "name", "ok", "none",
                                "pair", "items", "shape", "blob")} == {
        "epoch": 3, "big": 2**70, "lr": 0.5, "name": "é", "ok": True,
        "none": None, "pair": (1, "a"), "items": [1, [2.0]],
        "shape": (4, 5), "blob": b"\x00\xff"}
    assert got["dtype"] == np.float16
    assert_same(got["param"], weight)
    assert got["shared"][0] is got["shared"][1]


def test_rebuild_tensor_v3_reads_dtype_from_untyped_storage(tmp_path):
    values = np.array([[1, 65535], [300, 7]], np.uint16)
    store = Store()
    key = store.storage(values.view(np.uint8), name="UntypedStorage")
    pid = ("storage", Global("torch.storage", "UntypedStorage"), key, "cpu",
           values.nbytes)
    obj = Call(Global("torch._utils", "_rebuild_tensor_v3"),
               (PersistentId(pid), 0, (2, 2), (2, 1), False,
                Call(Global("collections", "OrderedDict"), ()),
                Global("torch", "uint16")))
    assert_same(torch_io.load(write_zip(tmp_path / "u.pt", obj, store)),
                values)


def test_legacy_format_round_trip(tmp_path):
    arrays = sample_arrays()
    store = Store(legacy=True)
    obj = {k: store.tensor(v) for k, v in arrays.items()}
    base = np.arange(10, dtype=np.float64)
    obj["view"] = store.view(store.storage(base), 2, (2, 2), (1, 3))
    got = torch_io.load(write_legacy(tmp_path / "old.pth", obj, store))
    for key, want in arrays.items():
        assert_same(got[key], want)
    assert_same(got["view"], np.array([[2.0, 5.0], [3.0, 6.0]]))


def test_legacy_storage_view_metadata(tmp_path):
    # PyTorch < 1.0 could save a view of part of a storage:
    # ('storage', type, root_key, location, numel, (view_key, offset, numel)).
    base = np.arange(8, dtype=np.float32)
    store = Store(legacy=True)
    key = store.storage(base)
    pid = ("storage", Global("torch", "FloatStorage"), key, "cpu", 8,
           ("view", 3, 4))
    obj = Call(Global("torch._utils", "_rebuild_tensor_v2"),
               (PersistentId(pid), 1, (2,), (1,), False,
                Call(Global("collections", "OrderedDict"), ())))
    got = torch_io.load(write_legacy(tmp_path / "view.pth", obj, store))
    assert_same(got, base[4:6].copy())


# ---------------------------------------------------------------------------
# load_state_dict.


def test_load_state_dict_unwraps_and_strips_module_prefix(tmp_path):
    store = Store()
    a, b = np.zeros(2, np.float32), np.ones((1, 2), np.float32)
    sd = {"module.conv.weight": store.tensor(b),
          "module.conv.bias": store.tensor(a)}
    for wrapper in ("state_dict", "model"):
        path = write_zip(tmp_path / f"{wrapper}.pt",
                         {wrapper: sd, "epoch": 4}, store)
        got = torch_io.load_state_dict(path)
        assert list(got) == ["conv.weight", "conv.bias"]
        assert_same(got["conv.weight"], b)


def test_load_state_dict_flattens_nested_state_dicts(tmp_path):
    store = Store()
    w = np.ones(3, np.float32)
    obj = {"encoder": {"layer.weight": store.tensor(w)},
           "head": {"module.fc.bias": store.tensor(w)}}
    path = write_zip(tmp_path / "n.pt", obj, store)
    assert list(torch_io.load_state_dict(path)) == [
        "encoder.layer.weight", "head.fc.bias"]


@pytest.mark.parametrize("obj, problem", [
    ({"w": 3}, "entry 'w' is a int, not a tensor"),
    ([1, 2], "holds a list, not a state_dict"),
])
def test_load_state_dict_rejects_non_state_dicts(tmp_path, obj, problem):
    path = write_zip(tmp_path / "s.pt", obj, Store())
    with pytest.raises(CheckpointError, match=problem) as err:
        torch_io.load_state_dict(path)
    assert str(path) in str(err.value)


def test_load_state_dict_rejects_names_that_collide(tmp_path):
    store = Store()
    w = np.ones(1, np.float32)
    obj = {"fc.w": store.tensor(w), "module.fc.w": store.tensor(w)}
    with pytest.raises(CheckpointError, match="two entries named 'fc.w'"):
        torch_io.load_state_dict(write_zip(tmp_path / "c.pt", obj, store))


# ---------------------------------------------------------------------------
# The published checkpoints and golden files.


@pytest.mark.parametrize("folder, bands", [
    ("50bands", 50), ("100bands", 100), ("200bands", 200),
    ("aviris/200bands", 200)])
def test_published_checkpoints(folder, bands):
    root = CHECKPOINTS / folder
    convh = torch_io.load_state_dict(root / "convh.pt")
    assert list(convh) == ["convh.weight"]
    assert convh["convh.weight"].shape == (64, bands, 1, 1)
    assert convh["convh.weight"].dtype == np.float32

    enc = torch_io.load_state_dict(root / "enc.pt")
    assert len(enc) == 60 and all(k.startswith("layer1.") for k in enc)
    assert enc["layer1.0.conv1.weight"].shape == (128, 64, 1, 1)
    assert enc["layer1.0.bn1.running_mean"].shape == (128,)
    tracked = enc["layer1.0.bn1.num_batches_tracked"]
    assert tracked.shape == () and tracked.dtype == np.int64
    assert np.all(enc["layer1.0.bn1.running_var"] > 0)

    pc = torch_io.load_state_dict(root / "pc.pt")
    hidden = pc["conv1.weight"].shape[0]  # 128 or 256, by band count
    assert {k: v.shape for k, v in pc.items()} == {
        "conv1.weight": (hidden, 256, 1, 1), "conv1.bias": (hidden,),
        "conv2.weight": (bands, hidden, 1, 1), "conv2.bias": (bands,),
        "conv3.weight": (1, bands, 1, 1), "conv3.bias": (1,)}
    assert all(np.isfinite(v).all() for v in pc.values())


def test_published_checkpoint_load_keeps_the_wrapper():
    obj = torch_io.load(CHECKPOINTS / "50bands" / "convh.pt")
    assert list(obj) == ["state_dict"] and type(obj["state_dict"]) is dict


def test_golden_spa_fen():
    sd = torch_io.load_state_dict(GOLDEN / "spa_fen_random_50bands.pt")
    assert {k.split(".")[0] for k in sd} == {
        "initial_conv", "get_features", "spp"}
    assert sd["initial_conv.conv.weight"].shape == (256, 50, 1, 1)
    assert sd["get_features.0.weight"].shape == (64, 3, 7, 7)


def test_golden_stage1_is_a_dict_of_state_dicts():
    path = GOLDEN / "stage1_tiny_random_20bands.pt"
    nested = torch_io.load(path)
    parts = ["encoder", "ocbe", "decoder", "convh", "deconvh", "classifier"]
    assert list(nested) == parts
    assert all(type(nested[p]) is dict for p in parts)
    assert nested["convh"]["convh.weight"].shape == (64, 20, 1, 1)
    flat = torch_io.load_state_dict(path)
    assert len(flat) == sum(len(nested[p]) for p in parts)
    np.testing.assert_array_equal(flat["encoder.layer1.0.conv1.weight"],
                                  nested["encoder"]["layer1.0.conv1.weight"])


def test_reading_needs_no_torch():
    code = ("import sys; from fers_jax import torch_io; "
            f"torch_io.load({str(CHECKPOINTS / '50bands' / 'pc.pt')!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------
# Safety: pickles that would run code are refused before anything runs.


class RunsCommand:
    """Unpickled by plain pickle, this runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def zip_with_pickle(path, pickled):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/version", b"3\n")
    return path


@pytest.mark.parametrize("protocol", [2, 4])
def test_os_system_is_refused_and_not_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    pickled = pickle.dumps({"state_dict": RunsCommand(f"touch {marker}")},
                           protocol=protocol)
    # The payload is live: plain pickle runs it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(RunsCommand(f"touch {control}"), protocol))
    assert control.exists()

    path = zip_with_pickle(tmp_path / "evil.pt", pickled)
    with pytest.raises(CheckpointError) as err:
        torch_io.load(path)
    system = f"{os.system.__module__}.system"  # posix.system on Linux
    assert str(err.value) == (
        f"checkpoint {path} refused: it asks to load '{system}', which is "
        "not a tensor or plain container (a checkpoint must never run code)")
    assert not marker.exists()


@pytest.mark.parametrize("func", [("builtins", "eval"), ("builtins", "exec"),
                                  ("subprocess", "Popen"),
                                  ("torch", "load"), ("numpy", "load")])
def test_other_callables_are_refused_even_after_valid_tensors(tmp_path, func):
    marker = tmp_path / "pwned"
    store = Store()
    obj = {"ok": store.tensor(np.ones(2, np.float32)),
           "evil": Call(Global(*func), (f"open({str(marker)!r}, 'w')",))}
    path = write_zip(tmp_path / "evil.pt", obj, store)
    with pytest.raises(CheckpointError, match=f"'{'.'.join(func)}'"):
        torch_io.load(path)
    assert not marker.exists()


def test_legacy_file_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    pickled = pickle.dumps(RunsCommand(f"touch {marker}"), protocol=2)
    path = write_legacy(tmp_path / "evil.pth", None, Store(), pickled)
    with pytest.raises(CheckpointError, match="refused: .*system"):
        torch_io.load(path)
    assert not marker.exists()


def test_tensor_subclass_and_whole_module_are_refused(tmp_path):
    store = Store()
    subclass = Call(Global("torch._tensor", "_rebuild_from_type_v2"),
                    (Global("torch._utils", "_rebuild_tensor_v2"),
                     Global("torch", "Size"), (), {}))
    with pytest.raises(CheckpointError, match="not a plain tensor"):
        torch_io.load(write_zip(tmp_path / "sub.pt", subclass, store))
    module = PersistentId(("module", "Net", "net.py", "class Net: ..."))
    with pytest.raises(CheckpointError, match="whole nn.Module"):
        torch_io.load(write_zip(tmp_path / "mod.pt", module, store))


def test_codecs_encode_only_takes_text_codecs(tmp_path):
    obj = Call(Global("_codecs", "encode"), ("x", "zlib_codec"))
    with pytest.raises(CheckpointError, match="is corrupt"):
        torch_io.load(write_zip(tmp_path / "z.pt", obj, Store()))


# ---------------------------------------------------------------------------
# Damaged or wrong inputs: one clear error that names the file.


def expect_error(path, problem):
    with pytest.raises(CheckpointError, match=problem) as err:
        torch_io.load(path)
    assert str(path) in str(err.value)


def test_missing_empty_text_and_directory(tmp_path):
    expect_error(tmp_path / "nope.pt", "does not exist")
    (tmp_path / "empty.pt").write_bytes(b"")
    expect_error(tmp_path / "empty.pt", "is empty")
    (tmp_path / "notes.pt").write_text("weights: see the paper\n")
    expect_error(tmp_path / "notes.pt", "is not a PyTorch checkpoint")
    expect_error(tmp_path, "is a directory")


def test_truncated_zip(tmp_path):
    raw = (CHECKPOINTS / "50bands" / "convh.pt").read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(raw[:len(raw) // 2])
    expect_error(path, "truncated or corrupt zip")


def test_truncated_legacy_file(tmp_path):
    store = Store(legacy=True)
    obj = {"w": store.tensor(np.arange(100, dtype=np.float64))}
    raw = write_legacy(tmp_path / "full.pth", obj, store).read_bytes()
    for cut in (len(raw) - 8, len(raw) // 3, 30):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(raw[:cut])
        expect_error(path, "truncated|corrupt")


def test_pickle_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    expect_error(path, "is not a PyTorch checkpoint")


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/code/forward.py", "def forward(x): return x\n")
    expect_error(path, "has no record 'model/data.pkl'")


def test_missing_data_record(tmp_path):
    store = Store()
    obj = {"w": store.tensor(np.ones(4, np.float32))}
    path = write_zip(tmp_path / "m.pt", obj, store, skip=("data/0",))
    expect_error(path, "has no record 'archive/data/0'")


def test_storage_shorter_than_declared(tmp_path):
    store = Store()
    obj = {"w": store.tensor(np.ones(4, np.float32))}
    name, numel, raw = store.storages["0"]
    store.storages["0"] = (name, numel, raw[:10])
    expect_error(write_zip(tmp_path / "s.pt", obj, store),
                 "storage '0' holds 10 bytes but the pickle declares 4")


def test_tensor_larger_than_its_storage(tmp_path):
    store = Store()
    key = store.storage(np.ones(4, np.float32))
    obj = {"w": store.view(key, 3, (2, 2), (2, 1))}
    expect_error(write_zip(tmp_path / "t.pt", obj, store),
                 r"shape \(2, 2\) needs 7 values from storage '0'")


def test_huge_broadcast_tensor(tmp_path):
    store = Store()
    key = store.storage(np.ones(1, np.float32))
    obj = {"w": store.view(key, 0, (2**40, 2**40), (0, 0))}
    expect_error(write_zip(tmp_path / "h.pt", obj, store), "too large")


def test_garbage_pickle(tmp_path):
    expect_error(zip_with_pickle(tmp_path / "g.pt", b"\x80\x02}q\x00(garbage"),
                 "is corrupt: its pickle cannot be read")


def test_bad_byteorder_record(tmp_path):
    store = Store()
    obj = store.tensor(np.ones(1, np.float32))
    expect_error(write_zip(tmp_path / "b.pt", obj, store, byteorder="middle"),
                 "unknown byte order 'middle'")


# ---------------------------------------------------------------------------
# Against real torch.save output (only where torch is installed).


def torch_samples(torch):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    tagged = torch.randn(3, generator=gen)
    tagged.note = "an attribute, saved through _rebuild_from_type_v2"
    return {
        "f32": torch.randn(3, 4, generator=gen),
        "f64": torch.randn(5, dtype=torch.float64, generator=gen),
        "i64": torch.randint(-2**40, 2**40, (2, 3), generator=gen),
        "u8": torch.randint(0, 255, (4,), generator=gen).to(torch.uint8),
        "bool": torch.randn(3, generator=gen) > 0,
        "f16": torch.randn(3, generator=gen).half(),
        "transposed": base.t(),
        "sliced": base[2:5, 1::3],
        "narrow": base.view(-1)[7:19],
        "scalar": torch.tensor(3, dtype=torch.int64),
        "conj": torch.randn(3, dtype=torch.complex64, generator=gen).conj(),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
        "tagged": tagged,
    }


@pytest.mark.parametrize("zip_format", [True, False])
def test_matches_torch_save(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    tensors = torch_samples(torch)
    extra = {"bf16": torch.randn(4).bfloat16(),
             "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
             "size": torch.Size([2, 3]), "blob": b"\x00\x01", "epoch": 9}
    path = tmp_path / "t.pt"
    torch.save({**tensors, **extra}, path,
               _use_new_zipfile_serialization=zip_format)
    got = torch_io.load(path)
    for key, tensor in tensors.items():
        assert_same(got[key], tensor.detach().resolve_conj().numpy())
    bits = extra["bf16"].view(torch.int16).numpy()
    assert got["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["bf16"].view(np.int16), bits)
    assert_same(got["u16"], np.array([0, 1, 65535], np.uint16))
    assert (got["size"], got["blob"], got["epoch"]) == ((2, 3), b"\x00\x01", 9)


def test_matches_torch_state_dict_with_module_prefix(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1),
                              torch.nn.BatchNorm2d(4))
    want = net.state_dict()
    path = tmp_path / "dp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in want.items()},
                "epoch": 1}, path)
    got = torch_io.load_state_dict(path)
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert_same(got[key], tensor.numpy())
