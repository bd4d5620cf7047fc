"""Scenes in: loading, finding, band selection and the reference normalisation.

A scene is a hyperspectral cube (H, W, B) with an optional ground-truth mask
(H, W), anomaly = 1. Files come as MATLAB .mat (v5 through scipy, v7.3
through h5py), NumPy .npz/.npy, an ENVI header (.hdr) with its data file
(through the `spectral` package), or a HAD100 folder (`test/<sensor>/*.npy`
with `ground_truth/<sensor>/<stem>.png`, mask = green channel == 255).

ENVI masks: an ENVI scene `<stem>.hdr` takes its mask from the first of
`<stem>_mask.npy`, `<stem>_mask.png` (any non-zero grey value is an anomaly)
or `<stem>_mask.hdr` (a one-band ENVI image) found beside it; none means no
mask. The mask gets the same checks as any other (`check_mask`).

Large scenes stay on disk: `open_scene` returns a Scene whose cube is a
`DiskCube` (read in blocks of rows, each block mapped or read and released)
wherever the format allows it: .npy, an uncompressed .npz member, ENVI and
MATLAB v7.3. `load_scene` reads the whole cube into memory.
"""

import dataclasses
import pathlib
import zipfile
from typing import Callable, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

from fers_jax.errors import InputError

# Names that publishers use for the cube and the mask, in order of preference.
CUBE_KEYS = ("data", "hsi", "cube", "img", "image", "x", "hyperspectral")
GT_KEYS = ("map", "gt", "groundtruth", "ground_truth", "hsi_gt", "mask",
           "label", "labels", "anomaly_map")
SCENE_SUFFIXES = (".mat", ".npz", ".npy", ".hdr")
MASK_SUFFIX = "_mask"  # <stem>_mask.{npy,png,hdr} beside an ENVI scene
KEY_OPTIONS = {"cube": "--cube-key", "mask": "--gt-key"}  # evaluate.py's


@dataclasses.dataclass(frozen=True)
class Scene:
    """One hyperspectral image.

    Attributes:
      name: the file stem, used in reports and output file names.
      cube: (H, W, B) float32 array, as stored (not normalised).
      gt: (H, W) uint8 mask with 1 for anomaly pixels, or None.
      path: where it was read from.
      wavelengths: the wavelength of each band (ENVI headers), or None.
      wavelength_units: their unit as the header gives it, or None.

    A scene from `open_scene` may hold a `DiskCube` instead of an array.
    """
    name: str
    cube: "np.ndarray | DiskCube"
    gt: Optional[np.ndarray]
    path: str
    wavelengths: Optional[Tuple[float, ...]] = None
    wavelength_units: Optional[str] = None

    @property
    def shape(self):
        return tuple(int(s) for s in self.cube.shape)


def _match_key(arrays: Mapping[str, np.ndarray], preferred: Sequence[str],
               ndim: int, given: Optional[str], what: str, path,
               refuse_named: bool = False) -> Optional[str]:
    """Picks the key holding the cube (ndim 3) or the mask (ndim 2).

    With `refuse_named` (the mask), an array under a preferred name that
    fits nowhere is refused with its shape rather than passed over: the
    file says it is the mask, so scoring "without a mask" would mislead.
    An (H, W, 1) array counts as 2-D there (`check_mask` accepts it).
    """
    if given is not None:
        if given not in arrays:
            raise InputError(f"{path}: no key {given!r} for the {what}; keys "
                             f"found: {sorted(arrays)}")
        return given

    def fits(v):
        shape = np.shape(v)
        return len(shape) == ndim or (refuse_named and len(shape) == ndim + 1
                                      and shape[-1] == 1)
    lower = {k.lower(): k for k in arrays}
    named = [lower[name] for name in preferred if name in lower]
    for key in named:
        if fits(arrays[key]):
            return key
    if refuse_named and named:
        raise InputError(f"{path}: the {what} [{named[0]}] has shape "
                         f"{np.shape(arrays[named[0]])}, not (H, W): it cannot "
                         f"be used; fix it, or name the {what} with "
                         f"{KEY_OPTIONS[what]}")
    candidates = [k for k, v in arrays.items() if np.ndim(v) == ndim
                  and np.issubdtype(np.asarray(v).dtype, np.number)]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise InputError(
            f"{path}: cannot tell which key holds the {what}: {candidates} "
            f"are all {ndim}-D; name one ({KEY_OPTIONS[what]})")
    return None


NPY_MAGIC = b"\x93NUMPY"


def _magic(path: pathlib.Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None


def _open_arrays(path: pathlib.Path) -> dict:
    """Every array of a .mat/.npz/.npy file by name; 3-D arrays that can
    stay on disk come as DiskCube (or compressed .npz members not yet read)."""
    suffix = path.suffix.lower()
    if suffix == ".mat":
        return _open_mat(path)
    if suffix == ".npz":
        return _open_npz(path)
    if suffix == ".npy":
        return _open_npy(path)
    raise InputError(f"{path}: unknown scene format {suffix!r}; expected one "
                     f"of {', '.join(SCENE_SUFFIXES)}")


def read_png_mask(path) -> np.ndarray:
    """HAD100 ground truth: RGB PNG, anomaly where the green channel is 255."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{path}: ground-truth PNG not found") from None
    except Exception as e:
        raise InputError(f"{path}: not a readable PNG ({e})") from None
    return (rgb[..., 1] == 255).astype(np.uint8)


def _had100_mask_path(path: pathlib.Path) -> Optional[pathlib.Path]:
    """`<root>/<split>/<sensor>/<stem>.npy` -> `<root>/ground_truth/<sensor>/<stem>.png`.

    Every test image of a HAD100 root has a mask: for those the path is
    returned even when the PNG is missing, so that loading says so instead
    of scoring nothing. Train images (anomaly-free) get theirs if present.
    """
    if len(path.parents) < 3:
        return None
    root = path.parents[2]
    candidate = root / "ground_truth" / path.parent.name / (path.stem + ".png")
    if candidate.exists():
        return candidate
    if path.parents[1].name == "test" and is_had100_root(root):
        return candidate
    return None


def check_cube(cube: np.ndarray, where) -> np.ndarray:
    """Returns the cube as float32 after checking it is a finite (H, W, B) array."""
    cube = np.asarray(cube)
    if cube.ndim != 3:
        raise InputError(f"{where}: the cube must be 3-D (H, W, bands); got shape "
                         f"{cube.shape}")
    if not np.issubdtype(cube.dtype, np.number) or np.iscomplexobj(cube):
        raise InputError(f"{where}: the cube holds {cube.dtype}, not real numbers")
    if min(cube.shape) == 0:
        raise InputError(f"{where}: the cube is empty (shape {cube.shape})")
    cube = cube.astype(np.float32)
    if not np.all(np.isfinite(cube)):
        bad = int(np.sum(~np.isfinite(cube)))
        raise InputError(f"{where}: the cube has {bad} NaN or Inf values")
    return cube


def check_mask(gt: np.ndarray, shape_hw, where) -> np.ndarray:
    """Returns the mask as uint8 {0, 1} after checking it.

    Any value > 0 marks an anomaly pixel, 0 background: 0/1 masks, 0/255
    images and label maps (1, 2, ... for several targets) all work, and so
    does a boolean mask. Negative values have no agreed meaning (some tools
    use -1 for "unlabelled") and are refused, as are NaN/Inf, non-numbers
    and a shape other than the cube's (H, W); an (H, W, 1) mask is accepted.
    """
    gt = np.asarray(gt)
    if gt.ndim == 3 and gt.shape[-1] == 1:
        gt = gt[..., 0]
    if gt.shape != tuple(shape_hw):
        raise InputError(f"{where}: the mask is {gt.shape} but the cube is "
                         f"{tuple(shape_hw)} pixels")
    if gt.dtype != bool and (not np.issubdtype(gt.dtype, np.number)
                             or np.iscomplexobj(gt)):
        raise InputError(f"{where}: the mask holds {gt.dtype}, not numbers "
                         "(0 = background, > 0 = anomaly)")
    if not np.all(np.isfinite(gt.astype(np.float64))):
        raise InputError(f"{where}: the mask has NaN or Inf values")
    if gt.dtype != bool and gt.min(initial=0) < 0:
        raise InputError(f"{where}: the mask has negative values (min "
                         f"{gt.min()}); expected 0 = background, > 0 = anomaly")
    return (gt > 0).astype(np.uint8)


# --- Cubes left on disk -------------------------------------------------------

class DiskCube:
    """An (H, W, B) cube on disk, read as float32 in blocks of rows.

    `cube[r0:r1]` (or `cube.read(r0, r1)`) reads rows [r0, r1) of the kept
    bands; nothing of the file stays mapped or cached in the process between
    reads, so resident memory is one block whatever the file's size (a
    memory map's touched pages would count towards it). `np.asarray(cube)`
    reads it all.
    """

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, shape, read: Callable[[int, int], np.ndarray], where,
                 bands: Optional[np.ndarray] = None, stored=None):
        self.full_shape = tuple(int(s) for s in shape)
        self._read = read
        self.where = str(where)
        self.bands = (np.arange(self.full_shape[2]) if bands is None
                      else np.asarray(bands, np.int64))
        self.stored = None if stored is None else np.dtype(stored)  # the file's

    @property
    def shape(self):
        return self.full_shape[:2] + (len(self.bands),)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def read(self, r0: int, r1: int) -> np.ndarray:
        r0, r1 = max(0, int(r0)), min(self.full_shape[0], int(r1))
        block = self._read(r0, r1)
        if len(self.bands) != self.full_shape[2]:
            block = block[..., self.bands]
        return np.ascontiguousarray(block, np.float32)

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            out = self.read(key, key + 1)[0]
        elif isinstance(key, slice) and key.step in (None, 1):
            r0, r1, _ = key.indices(self.full_shape[0])
            out = self.read(r0, max(r0, r1))
        else:
            raise TypeError("a DiskCube is read in blocks of rows: cube[r0:r1]")
        return out[rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, np.float32)
        step = max(1, (64 << 20) // max(1, self.shape[1] * self.shape[2] * 4))
        for r in range(0, self.shape[0], step):
            out[r:r + step] = self.read(r, r + step)
        return out if dtype is None else out.astype(dtype)

    def select_bands(self, index) -> "DiskCube":
        return DiskCube(self.full_shape, self._read, self.where,
                        self.bands[np.asarray(index)], self.stored)


def _read_at(path, dtype, offset: int, count: int) -> np.ndarray:
    """`count` items of `dtype` at byte `offset` of `path`, one plain read.

    Plain reads, not memory maps: nothing stays mapped (resident memory is
    the block), and a cold file is read ~1.4x faster than by page faults
    (1.3-1.4 against 0.9-1.0 GB/s measured here, 64-row blocks of a 3.4 GB
    .npy)."""
    return np.fromfile(path, dtype, count=count, offset=offset)


def file_rows(path, dtype, shape, offset):
    """A reader of rows [r0, r1) of a C-ordered (H, W, B) array at `offset`
    of `path` (a .npy, an .npz member stored uncompressed, ENVI BIP)."""
    h, w, b = shape
    row = w * b * np.dtype(dtype).itemsize

    def read(r0, r1):
        r1 = max(r0, r1)
        return _read_at(path, dtype, offset + r0 * row,
                        (r1 - r0) * w * b).reshape(r1 - r0, w, b)
    return read


def _interleaved_rows(path, dtype, shape, offset, interleave: str):
    """`file_rows` for an ENVI data file of any interleave: rows [r0, r1)
    as (rows, W, B); BIL in one read, BSQ in one read a band."""
    h, w, b = shape
    if interleave == "bip":
        return file_rows(path, dtype, shape, offset)
    item = np.dtype(dtype).itemsize

    def read(r0, r1):
        r1 = max(r0, r1)
        if interleave == "bil":
            block = _read_at(path, dtype, offset + r0 * b * w * item,
                             (r1 - r0) * b * w).reshape(r1 - r0, b, w)
            return np.ascontiguousarray(block.transpose(0, 2, 1))
        out = np.empty((r1 - r0, w, b), dtype)  # bsq
        for k in range(b):
            out[..., k] = _read_at(path, dtype, offset + (k * h + r0) * w * item,
                                   (r1 - r0) * w).reshape(r1 - r0, w)
        return out
    return read


def _stand_in(shape, dtype) -> np.ndarray:
    """A zero-stride array with a file array's shape and dtype (no memory):
    what `_match_key` needs to choose keys before anything is read."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape,
                                           (0,) * len(shape), writeable=False)


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(f)
    return shape, fortran, dtype, f.tell()


def _open_npy(path: pathlib.Path) -> dict:
    if _magic(path, len(NPY_MAGIC)) != NPY_MAGIC:
        raise InputError(f"{path}: not a readable .npy file (no NumPy .npy "
                         "header: damaged or another format)")
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype, offset = _npy_header(f)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file ({e})") from None
    need = offset + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size < need:
        raise InputError(f"{path}: not a readable .npy file (truncated: "
                         f"{path.stat().st_size} bytes, its header needs {need})")
    if len(shape) == 3 and not fortran and not dtype.hasobject:
        cube = DiskCube(shape, file_rows(path, dtype, shape, offset), path,
                        stored=dtype)
        return {"data": cube}
    try:
        return {"data": np.load(path, allow_pickle=False)}
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file ({e})") from None


def _open_npz(path: pathlib.Path) -> dict:
    """Arrays of an .npz; a 3-D member stored uncompressed stays on disk."""
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a readable .npz file (not a zip "
                         "archive: truncated, damaged or not saved by NumPy)")
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i
                     for i in z.infolist()}
            heads = {}
            for key, info in infos.items():
                with z.open(info) as f:
                    heads[key] = _npy_header(f)
        out = {}
        with open(path, "rb") as raw:
            for key, (shape, fortran, dtype, hdr_len) in heads.items():
                info = infos[key]
                if (len(shape) == 3 and info.compress_type == zipfile.ZIP_STORED
                        and not fortran and not dtype.hasobject):
                    raw.seek(info.header_offset + 26)
                    name_len, extra_len = np.frombuffer(raw.read(4), "<u2")
                    start = info.header_offset + 30 + int(name_len) + int(extra_len)
                    out[key] = DiskCube(shape, file_rows(path, dtype, shape,
                                                            start + hdr_len),
                                        f"{path} [{key}]", stored=dtype)
                elif len(shape) == 3:
                    out[key] = _LazyMember(path, key, shape, dtype)
                else:
                    with np.load(path, allow_pickle=False) as f:
                        out[key] = f[key]
        return out
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise InputError(f"{path}: not a readable .npz file ({e})") from None


class _LazyMember:
    """A compressed .npz member: read (whole) only if chosen as the cube."""

    def __init__(self, path, key, shape, dtype):
        self.path, self.key, self.shape, self.dtype = path, key, shape, dtype
        self.ndim = len(shape)

    def load(self):
        with np.load(self.path, allow_pickle=False) as f:
            return f[self.key]


def _open_mat(path: pathlib.Path) -> dict:
    """MATLAB v5 read whole (scipy); v7.3 (HDF5) cubes left on disk."""
    import scipy.io
    try:
        return {k: v for k, v in scipy.io.loadmat(str(path)).items()
                if not k.startswith("__")}
    except NotImplementedError:
        pass  # MATLAB v7.3 is HDF5: scipy refuses it, h5py reads it.
    except Exception as e:  # scipy raises many types for corrupt files
        raise InputError(f"{path}: not a readable MATLAB file ({e})") from None
    import h5py
    try:
        with h5py.File(path, "r") as f:
            out = {}
            for k, v in f.items():
                if not isinstance(v, h5py.Dataset):
                    continue
                if v.ndim == 3 and np.issubdtype(v.dtype, np.number):
                    out[k] = DiskCube(v.shape[::-1], _h5_rows(path, k), f"{path} [{k}]",
                                      stored=v.dtype)
                else:
                    # HDF5 stores MATLAB's column-major arrays with the axes reversed.
                    out[k] = np.asarray(v).T
            return out
    except Exception as e:
        raise InputError(f"{path}: not a readable MATLAB v7.3 file ({e})") from None


def _h5_rows(path, key):
    """Rows [r0, r1) of a MATLAB v7.3 (H, W, B) cube, stored as (B, W, H)."""
    def read(r0, r1):
        import h5py
        with h5py.File(path, "r") as f:
            return np.asarray(f[key][:, :, r0:r1]).transpose(2, 1, 0)
    return read


# --- ENVI ---------------------------------------------------------------------

ENVI_DTYPES = {1: "uint8", 2: "int16", 3: "int32", 4: "float32", 5: "float64",
               12: "uint16", 13: "uint32", 14: "int64", 15: "uint64"}
ENVI_COMPLEX = (6, 9)
ENVI_INTERLEAVES = ("bsq", "bil", "bip")


def _envi_number_list(meta, key, bands, path):
    if key not in meta:
        return None
    values = meta[key]
    values = [values] if isinstance(values, str) else list(values)
    if len(values) != bands:
        raise InputError(f"{path}: the header's {key} list has {len(values)} "
                         f"values for {bands} bands")
    try:
        return [float(v) for v in values]
    except ValueError:
        raise InputError(f"{path}: the header's {key} list holds non-numbers") from None


def open_envi(path: pathlib.Path, drop_bad_bands: bool = False):
    """An ENVI header and its data file -> (DiskCube, wavelengths, units).

    The `spectral` package parses the header and reads blocks of rows
    (`read_subregion`: plain file reads, nothing mapped). Checked here, as
    spectral does not: the interleave (spectral reads an unknown one as
    BSQ), the data type (a KeyError there), complex data, the data file's
    size against the header and the wavelength / bbl lists' lengths.
    """
    import spectral.io.envi as envi
    try:
        meta = envi.read_envi_header(str(path))
    except envi.FileNotAnEnviHeader:
        raise InputError(f"{path}: not an ENVI header (its first line is not "
                         "'ENVI')") from None
    except Exception as e:  # noqa: BLE001 - spectral's parser raises many types
        raise InputError(f"{path}: not a readable ENVI header ({e})") from None
    for field in ("lines", "samples", "bands", "data type"):
        if field not in meta:
            raise InputError(f"{path}: the ENVI header lacks the required "
                             f"field '{field}'")
    try:
        lines, samples, bands = (int(meta[k]) for k in ("lines", "samples", "bands"))
        dtype_code = int(meta["data type"])
        offset = int(meta.get("header offset", 0))
        byte_order = int(meta.get("byte order", 0))
    except ValueError as e:
        raise InputError(f"{path}: a non-integer size, data type, offset or "
                         f"byte order in the ENVI header ({e})") from None
    if dtype_code in ENVI_COMPLEX:
        raise InputError(f"{path}: complex data (ENVI data type {dtype_code}); "
                         "a scene must hold real numbers")
    if dtype_code not in ENVI_DTYPES:
        raise InputError(f"{path}: unknown ENVI data type {dtype_code}; "
                         f"supported: {sorted(ENVI_DTYPES)}")
    interleave = str(meta.get("interleave", "bsq")).strip().lower()
    if interleave not in ENVI_INTERLEAVES:
        raise InputError(f"{path}: unknown ENVI interleave {interleave!r}; "
                         f"expected one of {', '.join(ENVI_INTERLEAVES)}")
    if byte_order not in (0, 1):
        raise InputError(f"{path}: ENVI byte order must be 0 or 1, got {byte_order}")
    if min(lines, samples, bands) < 1:
        raise InputError(f"{path}: the ENVI header gives an empty cube "
                         f"({lines} lines, {samples} samples, {bands} bands)")
    wavelengths = _envi_number_list(meta, "wavelength", bands, path)
    bbl = _envi_number_list(meta, "bbl", bands, path)
    try:
        img = envi.open(str(path))
    except envi.EnviDataFileNotFoundError:
        raise InputError(f"{path}: ENVI header without its data file (looked "
                         f"for {path.with_suffix('')}{{,.img,.dat,.raw,...}})") from None
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a readable ENVI scene ({e})") from None
    data_file = pathlib.Path(img.filename)
    del img  # its memory map of the whole file is not used (see below)
    need = offset + lines * samples * bands * np.dtype(ENVI_DTYPES[dtype_code]).itemsize
    have = data_file.stat().st_size
    if have != need:
        raise InputError(f"{path}: its data file {data_file.name} is {have} bytes "
                         f"but the header ({lines} x {samples} x {bands} "
                         f"{ENVI_DTYPES[dtype_code]}, offset {offset}) says {need}: "
                         + ("truncated" if have < need else "longer than the header says"))

    # Blocks are read by `_interleaved_rows`, not spectral's read_subregion:
    # spectral keeps a memory map of the whole data file open, and every page
    # a pass touches stays in resident memory (measured: FERD out of core on
    # a 3.4 GB BIL scene peaked at 4.8 GB, against 1.5 GB from the same
    # cube as .npy).
    stored = np.dtype(ENVI_DTYPES[dtype_code]).newbyteorder("<>"[byte_order])
    read = _interleaved_rows(data_file, stored, (lines, samples, bands), offset,
                             interleave)
    cube = DiskCube((lines, samples, bands), read, path,
                    stored=np.dtype(ENVI_DTYPES[dtype_code]))
    if drop_bad_bands and bbl is not None:
        keep = np.flatnonzero(np.asarray(bbl) != 0)
        if keep.size == 0:
            raise InputError(f"{path}: the header's bbl marks every band bad")
        cube = cube.select_bands(keep)
        if wavelengths is not None:
            wavelengths = [wavelengths[i] for i in keep]
    units = meta.get("wavelength units")
    return cube, wavelengths, (str(units) if units is not None else None)


def _envi_mask_path(path: pathlib.Path) -> Optional[pathlib.Path]:
    for suffix in (".npy", ".png", ".hdr"):
        candidate = path.with_name(path.stem + MASK_SUFFIX + suffix)
        if candidate.is_file():
            return candidate
    return None


def _read_envi_mask(path: pathlib.Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.asarray(_open_arrays(path)["data"])
    if path.suffix == ".png":
        from PIL import Image
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L"))
        except Exception as e:
            raise InputError(f"{path}: not a readable PNG ({e})") from None
    cube, _, _ = open_envi(path)
    if cube.shape[2] != 1:
        raise InputError(f"{path}: an ENVI mask must have one band, not "
                         f"{cube.shape[2]}")
    return np.asarray(cube)[..., 0]


def check_disk_cube(cube: DiskCube) -> DiskCube:
    if min(cube.shape) == 0:
        raise InputError(f"{cube.where}: the cube is empty (shape {cube.shape})")
    dt = cube.stored
    if dt is not None and (not np.issubdtype(dt, np.number) or
                           np.issubdtype(dt, np.complexfloating)):
        raise InputError(f"{cube.where}: the cube holds {dt}, not real numbers")
    return cube


def open_scene(path, cube_key: Optional[str] = None,
               gt_key: Optional[str] = None, drop_bad_bands: bool = False) -> Scene:
    """Opens one scene file, leaving a large cube on disk where it can.

    Args:
      path: a .mat, .npz, .npy or ENVI .hdr file. A .npy inside a HAD100
        layout gets its mask from the matching ground-truth PNG; an ENVI
        scene from `<stem>_mask.{npy,png,hdr}` beside it.
      cube_key, gt_key: the keys to use when the file's names are ambiguous.
      drop_bad_bands: ENVI only: keep only the bands its `bbl` marks good.

    Returns:
      The Scene; its cube is a DiskCube (.npy, stored .npz members, v7.3
      .mat, ENVI) or an array; `gt` is None when there is no mask. Values
      (finite numbers) are checked as the cube is read.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a scene file (find_scene_files "
                         "or load_scenes expand folders)")
    if not path.is_file():
        raise InputError(f"{path}: scene file not found")
    if path.suffix.lower() == ".hdr":
        cube, wavelengths, units = open_envi(path, drop_bad_bands)
        gt = None
        if (mask := _envi_mask_path(path)) is not None:
            gt = check_mask(_read_envi_mask(mask), cube.shape[:2], mask)
        return Scene(path.stem, check_disk_cube(cube), gt, str(path),
                     tuple(wavelengths) if wavelengths else None, units)
    if (path.with_suffix(".hdr").is_file() or
            path.with_name(path.name + ".hdr").is_file()) and \
            path.suffix.lower() not in SCENE_SUFFIXES:
        raise InputError(f"{path}: an ENVI data file; give its header (.hdr) "
                         "as the scene")
    arrays = _open_arrays(path)
    shapes = {k: (_stand_in(v.shape, v.dtype) if isinstance(v, (DiskCube, _LazyMember))
                  else v) for k, v in arrays.items()}
    key = _match_key(shapes, CUBE_KEYS, 3, cube_key, "cube", path)
    if key is None:
        raise InputError(f"{path}: no 3-D cube found; keys found: "
                         + ", ".join(f"{k} {np.shape(v)}" for k, v in shapes.items()))
    cube = arrays[key]
    where = f"{path} [{key}]"
    if isinstance(cube, _LazyMember):
        cube = cube.load()
    if isinstance(cube, DiskCube):
        cube.where = where
        cube = check_disk_cube(cube)
    else:
        cube = check_cube(cube, where)
    rest = {k: v for k, v in shapes.items() if k != key}
    gt_name = _match_key(rest, GT_KEYS, 2, gt_key, "mask", path,
                         refuse_named=True)
    if gt_name is not None:
        gt = check_mask(np.asarray(arrays[gt_name]), cube.shape[:2],
                        f"{path} [{gt_name}]")
    elif (png := _had100_mask_path(path)) is not None:
        if not png.is_file():
            raise InputError(f"{path}: HAD100 test image without its "
                             f"ground-truth PNG {png}")
        gt = check_mask(read_png_mask(png), cube.shape[:2], png)
    else:
        gt = None
    return Scene(name=path.stem, cube=cube, gt=gt, path=str(path))


def load_scene(path, cube_key: Optional[str] = None,
               gt_key: Optional[str] = None, drop_bad_bands: bool = False) -> Scene:
    """`open_scene` with the cube read into memory as a checked float32 array."""
    scene = open_scene(path, cube_key, gt_key, drop_bad_bands)
    if isinstance(scene.cube, DiskCube):
        scene = dataclasses.replace(scene, cube=check_cube(np.asarray(scene.cube),
                                                           scene.cube.where))
    return scene


def is_had100_root(folder: pathlib.Path) -> bool:
    return (folder / "ground_truth").is_dir() and any(
        (folder / s).is_dir() for s in ("test", "train"))


def find_scene_files(paths: Iterable, sensor: str = "aviris_ng",
                     split: str = "test") -> list:
    """Expands files, folders of scenes and HAD100 roots into scene files.

    A HAD100 root contributes `<split>/<sensor>/*.npy`; another folder its
    .mat/.npz/.npy files, sorted by name.
    """
    files = []
    for p in map(pathlib.Path, paths):
        if p.is_file():
            files.append(p)
            continue
        if not p.is_dir():
            raise InputError(f"{p}: no such file or folder")
        if is_had100_root(p):
            folder = p / split / sensor
            found = sorted(folder.glob("*.npy")) if folder.is_dir() else []
            where = f"{p} (HAD100 root, {split}/{sensor})"
        else:
            found = sorted(f for f in p.iterdir()
                           if f.is_file() and f.suffix.lower() in SCENE_SUFFIXES
                           and not _is_envi_mask(f))
            where = str(p)
        if not found:
            raise InputError(f"{where}: no scene files found "
                             f"({', '.join(SCENE_SUFFIXES)})")
        files.extend(found)
    return files


def _is_envi_mask(f: pathlib.Path) -> bool:
    """`<stem>_mask.*` beside an ENVI `<stem>.hdr`: a mask, not a scene."""
    return (f.stem.endswith(MASK_SUFFIX) and
            f.with_name(f.stem[:-len(MASK_SUFFIX)] + ".hdr").is_file())


def load_scenes(paths: Iterable, **kwargs) -> list:
    """`find_scene_files` then `load_scene` on each."""
    keys = {k: kwargs.pop(k) for k in ("cube_key", "gt_key", "drop_bad_bands")
            if k in kwargs}
    return [load_scene(f, **keys) for f in find_scene_files(paths, **kwargs)]


def select_bands(cube: np.ndarray, bands: Optional[int] = None,
                 start: int = 0, where="cube") -> np.ndarray:
    """The reference's band selection: `bands` consecutive bands from `start`
    (of an array, or of a DiskCube without reading it)."""
    total = cube.shape[-1]
    if start < 0 or start >= total:
        raise InputError(f"{where}: start band {start} is outside its {total} bands")
    if isinstance(cube, DiskCube):
        stop = total if bands is None else start + bands
        if bands is not None and (bands <= 0 or stop > total):
            select_bands(_stand_in(cube.shape, np.float32), bands, start, where)
        return cube if (start, stop) == (0, total) else cube.select_bands(
            np.arange(start, stop))
    if bands is None:
        return cube[..., start:]
    if bands <= 0:
        raise InputError(f"{where}: the band count must be positive, got {bands}")
    if start + bands > total:
        raise InputError(f"{where}: has {total} bands, fewer than the {bands} "
                         f"asked for from band {start}")
    return cube[..., start:start + bands]


def normalise(cube: np.ndarray, where="cube") -> np.ndarray:
    """The reference normalisation, per image: min-max to [-0.1, 0.1].

    x -> ((x - min) / (max - min) * 2 - 1) * 0.1 over all pixels and bands.
    Works on one image (H, W, B) or a batch (N, H, W, B), each image alone.
    Computed in float64 and returned as float32.
    """
    x = np.asarray(cube, np.float64)
    axes = tuple(range(x.ndim - 3, x.ndim))
    lo = x.min(axis=axes, keepdims=True)
    hi = x.max(axis=axes, keepdims=True)
    if np.any(hi == lo):
        raise InputError(f"{where}: the cube is constant (every value "
                         f"{float(lo.flat[0])}): nothing to normalise or detect")
    return (((x - lo) / (hi - lo) * 2.0 - 1.0) * 0.1).astype(np.float32)


def prepare(scene: Scene, bands: Optional[int] = None, start: int = 0) -> np.ndarray:
    """Band selection then normalisation: the input every model sees."""
    return normalise(select_bands(scene.cube, bands, start, scene.path), scene.path)


def minmax_streamed(cube, rows: int = 128, where="cube") -> Tuple[float, float]:
    """The cube's global min and max, `rows` rows at a time (an array, a
    memory map or a DiskCube); refuses NaN/Inf and a constant cube."""
    lo, hi = np.inf, -np.inf
    for r in range(0, cube.shape[0], rows):
        part = np.asarray(cube[r:r + rows])
        if not np.all(np.isfinite(part)):
            bad = int(np.sum(~np.isfinite(part)))
            raise InputError(f"{where}: the cube has NaN or Inf values ({bad} in "
                             f"rows {r}-{r + part.shape[0] - 1})")
        lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    if hi == lo:
        raise InputError(f"{where}: the cube is constant (every value "
                         f"{float(lo)}): nothing to normalise or detect")
    return lo, hi


_NORMALISE_CHUNK = 1 << 16  # values per float64 scratch (512 KB: in cache)


def normalise_rows(part, lo: float, hi: float) -> np.ndarray:
    """Rows of a cube normalised with its global (lo, hi): `normalise`'s
    arithmetic (float64 per value, float32 out), so the same numbers.

    In cache-sized pieces through one float64 scratch: whole-block float64
    temporaries (four of 240 MB for a 72-row block of a 2048 x 200 scene)
    cost more in page faults than in arithmetic."""
    part = np.asarray(part)
    out = np.empty(part.shape, np.float32)
    src, dst = part.reshape(-1), out.reshape(-1)
    scratch = np.empty(min(src.size, _NORMALISE_CHUNK), np.float64)
    for i in range(0, src.size, _NORMALISE_CHUNK):
        t = scratch[:min(_NORMALISE_CHUNK, src.size - i)]
        np.subtract(src[i:i + t.size], lo, out=t, dtype=np.float64)
        np.divide(t, hi - lo, out=t)
        np.multiply(t, 2.0, out=t)
        np.subtract(t, 1.0, out=t)
        np.multiply(t, 0.1, out=t)
        dst[i:i + t.size] = t
    return out


def normalise_streamed(cube, rows: int = 128, where="cube") -> np.ndarray:
    """`normalise` of one (H, W, B) cube without its float64 copy: the min
    and max in one pass over blocks of `rows` rows, then the scaling."""
    lo, hi = minmax_streamed(cube, rows, where)
    out = np.empty(cube.shape, np.float32)
    for r in range(0, cube.shape[0], rows):
        out[r:r + rows] = normalise_rows(cube[r:r + rows], lo, hi)
    return out
