"""Scenes in: loading, finding, band selection and the reference normalisation.

A scene is a hyperspectral cube (H, W, B) with an optional ground-truth mask
(H, W), anomaly = 1. Files come as MATLAB .mat (v5 through scipy, v7.3
through h5py), NumPy .npz/.npy, or a HAD100 folder (`test/<sensor>/*.npy`
with `ground_truth/<sensor>/<stem>.png`, mask = green channel == 255).
"""

import dataclasses
import pathlib
import zipfile
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from fers_jax.errors import InputError

# Names that publishers use for the cube and the mask, in order of preference.
CUBE_KEYS = ("data", "hsi", "cube", "img", "image", "x", "hyperspectral")
GT_KEYS = ("map", "gt", "groundtruth", "ground_truth", "hsi_gt", "mask",
           "label", "labels", "anomaly_map")
SCENE_SUFFIXES = (".mat", ".npz", ".npy")
KEY_OPTIONS = {"cube": "--cube-key", "mask": "--gt-key"}  # evaluate.py's


@dataclasses.dataclass(frozen=True)
class Scene:
    """One hyperspectral image.

    Attributes:
      name: the file stem, used in reports and output file names.
      cube: (H, W, B) float32 array, as stored (not normalised).
      gt: (H, W) uint8 mask with 1 for anomaly pixels, or None.
      path: where it was read from.
    """
    name: str
    cube: np.ndarray
    gt: Optional[np.ndarray]
    path: str

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


def _read_mat(path: pathlib.Path) -> dict:
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
            # HDF5 stores MATLAB's column-major arrays with the axes reversed.
            return {k: np.asarray(v).T for k, v in f.items()
                    if isinstance(v, h5py.Dataset)}
    except Exception as e:
        raise InputError(f"{path}: not a readable MATLAB v7.3 file ({e})") from None


NPY_MAGIC = b"\x93NUMPY"


def _magic(path: pathlib.Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None


def _read_arrays(path: pathlib.Path) -> dict:
    """Reads every array of a .mat/.npz/.npy file into a dict."""
    suffix = path.suffix.lower()
    if suffix == ".mat":
        return _read_mat(path)
    # np.load tells formats apart by their first bytes and takes anything
    # else for a pickle ("contains pickled (object) data"), which misleads
    # about a damaged file: the header is checked here first.
    if suffix == ".npz" and not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a readable .npz file (not a zip "
                         "archive: truncated, damaged or not saved by NumPy)")
    if suffix == ".npy" and _magic(path, len(NPY_MAGIC)) != NPY_MAGIC:
        raise InputError(f"{path}: not a readable .npy file (no NumPy .npy "
                         "header: damaged or another format)")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        if suffix == ".npy":
            return {"data": np.load(path, allow_pickle=False)}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable {suffix} file ({e})") from None
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


def load_scene(path, cube_key: Optional[str] = None,
               gt_key: Optional[str] = None) -> Scene:
    """Reads one scene file.

    Args:
      path: a .mat, .npz or .npy file. A .npy inside a HAD100 layout gets its
        mask from the matching ground-truth PNG.
      cube_key, gt_key: the keys to use when the file's names are ambiguous.

    Returns:
      The Scene; `gt` is None when the file has no mask.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a scene file (find_scene_files "
                         "or load_scenes expand folders)")
    if not path.is_file():
        raise InputError(f"{path}: scene file not found")
    arrays = _read_arrays(path)
    key = _match_key(arrays, CUBE_KEYS, 3, cube_key, "cube", path)
    if key is None:
        raise InputError(f"{path}: no 3-D cube found; keys found: "
                         + ", ".join(f"{k} {np.shape(v)}" for k, v in arrays.items()))
    cube = check_cube(arrays[key], f"{path} [{key}]")
    rest = {k: v for k, v in arrays.items() if k != key}
    gt_name = _match_key(rest, GT_KEYS, 2, gt_key, "mask", path,
                         refuse_named=True)
    if gt_name is not None:
        gt = check_mask(rest[gt_name], cube.shape[:2], f"{path} [{gt_name}]")
    elif (png := _had100_mask_path(path)) is not None:
        if not png.is_file():
            raise InputError(f"{path}: HAD100 test image without its "
                             f"ground-truth PNG {png}")
        gt = check_mask(read_png_mask(png), cube.shape[:2], png)
    else:
        gt = None
    return Scene(name=path.stem, cube=cube, gt=gt, path=str(path))


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
                           if f.is_file() and f.suffix.lower() in SCENE_SUFFIXES)
            where = str(p)
        if not found:
            raise InputError(f"{where}: no scene files found "
                             f"({', '.join(SCENE_SUFFIXES)})")
        files.extend(found)
    return files


def load_scenes(paths: Iterable, **kwargs) -> list:
    """`find_scene_files` then `load_scene` on each."""
    keys = {k: kwargs.pop(k) for k in ("cube_key", "gt_key") if k in kwargs}
    return [load_scene(f, **keys) for f in find_scene_files(paths, **kwargs)]


def select_bands(cube: np.ndarray, bands: Optional[int] = None,
                 start: int = 0, where="cube") -> np.ndarray:
    """The reference's band selection: `bands` consecutive bands from `start`."""
    total = cube.shape[-1]
    if start < 0 or start >= total:
        raise InputError(f"{where}: start band {start} is outside its {total} bands")
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
