"""Frozen features of training images, computed once per image.

Stage 2's spectral teacher is frozen and runs in eval mode, so its spe_f
for a training image is the same every epoch. `FrozenFeatures` computes it
the first time the image is read and keeps it (in memory, or as .npy files
in a folder for sets too large for memory); `input_pipeline.Batches`
(its `features` argument) then yields {'image', 'spe_f'} batches and the
step skips the teacher.

An entry's key is a digest of everything the value depends on: the
frozen model's variables and name, and the prepared image's shape, dtype
and bytes (so the band range, the crop and the normalisation are in it).
A changed teacher, band range or patch geometry can never reuse a stale
entry; it misses and is computed again.

Values do not depend on which other images shared the computation: misses
are computed in chunks padded to one fixed size (one compilation), and the
model is per-image (eval-mode BatchNorm, no cross-batch statistics), which
tests/test_feature_cache.py checks bitwise.

Only what is frozen AND sees the input alone can be cached: stage 2's
teacher. The student's frozen ResNet-34 trunk sits behind the trainable
Conv2RGB, and stage 1's frozen encoder behind the trainable ConvH, so their
outputs change every step.
"""

import hashlib
import os
import pathlib
import tempfile
import threading
from typing import Callable, Optional

import jax
import numpy as np

from fers_jax.errors import InputError


def digest_tree(tree) -> str:
    """A hex digest of a pytree of arrays: paths, shapes, dtypes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        a = np.asarray(local_value(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def local_value(x):
    """A host copy of an array, also of one replicated over many hosts."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


class _MemoryStore:
    def __init__(self):
        self._items = {}

    def get(self, key):
        return self._items.get(key)

    def put(self, key, value):
        self._items[key] = value


class _FolderStore:
    """One .npy file per entry, written to a temporary file and renamed
    into place, so a killed run never leaves a half-written entry."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{folder}: cannot create the feature cache "
                             f"folder ({e.strerror})") from None

    def _path(self, key) -> pathlib.Path:
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, key):
        try:
            return np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError):
            return None  # absent, or unreadable: computed again

    def put(self, key, value):
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, value, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise


class FrozenFeatures:
    """A frozen model's output per image, computed on first use.

    Args:
      fn: `fn(variables, x) -> features`, pure and per-image (eval mode),
        on batches (N, H, W, B).
      variables: the frozen model's variables (a pytree of arrays).
      name: what the model is (its config, say); part of every key.
      chunk: misses are computed this many at a time (padded), one shape.
      folder: keep the entries as files there; None: in memory.

    Calling it on a batch of prepared images (N, H, W, B) returns their
    features stacked. `hits` and `misses` count images.
    """

    def __init__(self, fn: Callable, variables, name: str, chunk: int = 16,
                 folder: Optional[str] = None):
        self.variables = jax.tree.map(local_value, variables)
        self.model_digest = digest_tree(self.variables) + ":" + str(name)
        self.chunk = int(chunk)
        self._fn = jax.jit(fn)
        self._store = _FolderStore(folder) if folder else _MemoryStore()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def key(self, image: np.ndarray) -> str:
        h = hashlib.blake2b(self.model_digest.encode(), digest_size=20)
        h.update(f"{image.shape}{image.dtype.str}".encode())
        h.update(np.ascontiguousarray(image).tobytes())
        return h.hexdigest()

    def compute(self, images: np.ndarray) -> np.ndarray:
        """The features of `images`, in chunks of `chunk` (the last padded
        with zeros), without the cache."""
        out = []
        for i in range(0, len(images), self.chunk):
            part = images[i:i + self.chunk]
            pad = self.chunk - len(part)
            if pad:
                part = np.concatenate([part, np.zeros((pad,) + part.shape[1:],
                                                      part.dtype)])
            out.append(np.asarray(self._fn(self.variables, part))[:self.chunk - pad])
        return np.concatenate(out)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        keys = [self.key(x) for x in images]
        with self._lock:
            found = [self._store.get(k) for k in keys]
            missing = [i for i, v in enumerate(found) if v is None]
            if missing:
                for i, value in zip(missing, self.compute(images[missing])):
                    self._store.put(keys[i], value)
                    found[i] = value
            self.misses += len(missing)
            self.hits += len(keys) - len(missing)
        return np.stack(found)
