"""What the training loop consumes: batches of normalised images, eval scenes.

One pipeline over any random-access source (`len(source)`, `source[i]`, an
item being an (H, W, B) array or a dict with an 'image' entry):

- `tfds_source`: a TFDS dataset written as array_record (`fers_jax.datasets`
  HAD100 or patch builders), read without TensorFlow;
- `scene_source`: background patches cut in memory from scene files, folders
  or a HAD100 root, for quick runs without building a dataset.

`Batches` draws a fresh permutation per epoch from (seed, epoch) alone, so
its position is the small dict `state` = {'epoch', 'step_in_epoch', 'seed',
'num_examples', 'batch_size'}; passing a saved state back continues with
exactly the batches an uninterrupted run would have given. Every image is
band-selected (`data.select_bands`) and normalised on its own
(`data.normalise`, into [-0.1, 0.1]), as the reference does. With
`augment`, each image of an epoch is also turned by one of the square's 8
symmetries (rotations by 90 degrees, with or without a flip), drawn from
(seed, epoch) alone as the order is: an ablation (issue 10), not the
reference.

With `features` ({name: `feature_cache.FrozenFeatures`}, e.g. stage 2's
frozen teacher as 'spe_f') a batch is {'image': images, name: their frozen
features}, each image's features computed once and then read back.
"""

import concurrent.futures
import dataclasses
import os
import pathlib
import queue
import threading
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from fers_jax import data, metrics
from fers_jax.datasets import crops
from fers_jax.errors import InputError

STATE_KEYS = ("epoch", "step_in_epoch", "seed", "num_examples", "batch_size")
SYMMETRIES = 8  # of a square: 4 rotations, each with or without a flip
_AUGMENT_STREAM = 1  # keeps the symmetries' draws apart from the order's


def dihedral(x: np.ndarray, t: int) -> np.ndarray:
    """Symmetry `t` (0 .. 7) of the square applied to an (H, W, ...) image:
    rotation by 90 * (t % 4) degrees, then a left-right flip if t >= 4.
    0 is the identity."""
    y = np.rot90(x, t % 4, axes=(0, 1))
    return np.ascontiguousarray(y[:, ::-1] if t >= 4 else y)


def tfds_source(dataset, split: str = "train", data_dir=None):
    """A random-access source over one split of a TFDS array_record dataset.

    Args:
      dataset: a built `DatasetBuilder` (`datasets.build_had100`,
        `datasets.build_patches`), the folder of a generated dataset (the one
        holding dataset_info.json, e.g. `<data_dir>/had100/aviris_ng/1.0.0`),
        or a registered name such as 'had100/aviris_ng' found in data_dir.
      split: 'train', 'test', or a TFDS slice of one ('train[:90%]').
    """
    import tensorflow_datasets as tfds
    import fers_jax.datasets  # noqa: F401  registers the builders by name
    if isinstance(dataset, tfds.core.DatasetBuilder):
        builder = dataset
    elif (pathlib.Path(dataset) / "dataset_info.json").is_file():
        builder = tfds.builder_from_directory(str(dataset))
    elif str(dataset).split("/")[0].split(":")[0] in fers_jax.datasets.BUILDERS:
        builder = tfds.builder(str(dataset), data_dir=data_dir)
    else:
        # Other names would send TFDS to its community index, which needs
        # TensorFlow; this pipeline reads only what fers_jax builds.
        raise InputError(f"{dataset}: neither a generated dataset folder "
                         f"(with dataset_info.json) nor one of "
                         f"{sorted(fers_jax.datasets.BUILDERS)}")
    if not builder.is_prepared():
        raise InputError(f"{dataset}: the dataset is not built in "
                         f"{builder.data_dir}")
    if split.split("[")[0] not in builder.info.splits:
        raise InputError(f"{dataset}: no split {split!r}; it has "
                         f"{sorted(builder.info.splits)}")
    return builder.as_data_source(split)


def scene_source(paths: Iterable, size: int = 64, stride: Optional[int] = None,
                 sensor: str = "aviris_ng", split: str = "train"):
    """Background patches of scenes, in memory (`datasets.PatchSource`).

    A HAD100 root gives its `<split>/<sensor>` images (64 x 64: one patch
    each); other scenes are cut into size x size patches every `stride`
    pixels, skipping those that touch an anomaly pixel.
    """
    return crops.PatchSource.from_paths(paths, size, stride, sensor=sensor,
                                        split=split)


def check_state(state: Mapping, num_examples: int, batch_size: int,
                seed: int) -> dict:
    """The saved position as a clean dict, if it fits this pipeline."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise InputError(f"input pipeline state {dict(state)} lacks {missing}")
    state = {k: int(state[k]) for k in STATE_KEYS}
    for key, now in (("seed", seed), ("num_examples", num_examples),
                     ("batch_size", batch_size)):
        if state[key] != now:
            # The same position in a different order or dataset is not a resume.
            raise InputError(f"cannot resume the input pipeline: it was saved "
                             f"with {key}={state[key]}, now {key}={now}")
    return state


class Batches:
    """Batches (N, H, W, B) float32 over epochs, prefetched on a thread.

    Args:
      source: random-access images (see the module docstring).
      batch_size: images per batch.
      seed: the shuffling seed (a non-negative int).
      bands, band_start: keep `bands` bands from `band_start` (None: all).
      shuffle: a new permutation every epoch; False reads in source order.
      drop_remainder: drop the last partial batch of each epoch.
      num_epochs: stop after this many epochs (counted from epoch 0, so a
        resumed run stops at the same place); None runs forever.
      state: a `state` from an earlier run, to continue from there.
      prefetch: batches prepared ahead on the background thread.
      workers: threads that normalise the images of a batch in parallel
        (NumPy releases the GIL; one 64x64x200 image takes milliseconds).
        None: up to 4, no more than the CPUs.
      part: (index, count): load only the index-th of `count` equal parts
        of every batch (one host's share of a global batch on many hosts,
        fers_jax.parallel.process_part); the position `state` stays that
        of the whole batch.
      features: {name: `feature_cache.FrozenFeatures`}: batches become
        {'image': images, name: the features of the images, ...}.
      augment: turn every image by a symmetry of the square drawn per
        (seed, epoch, example) (`symmetries`); square images only. Features
        are those of the turned image (a frozen model need not commute
        with the turn), each computed on first use.

    `state` is the position of the next batch; save it with the model. An
    epoch has just ended when `state['step_in_epoch'] == 0`.
    """

    def __init__(self, source, batch_size: int, *, seed: int,
                 bands: Optional[int] = None, band_start: int = 0,
                 shuffle: bool = True, drop_remainder: bool = True,
                 num_epochs: Optional[int] = None,
                 state: Optional[Mapping] = None, prefetch: int = 2,
                 workers: Optional[int] = None, part=(0, 1),
                 features=None, augment: bool = False):
        n = len(source)
        if int(batch_size) != batch_size or batch_size <= 0:
            raise InputError(f"batch size must be a positive integer, got "
                             f"{batch_size!r}")
        index, count = part
        if count < 1 or batch_size % count or not 0 <= index < count:
            raise InputError(f"cannot load part {index} of {count} of "
                             f"batches of {batch_size}")
        self.part = (int(index), int(count))
        if int(seed) != seed or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got "
                             f"{seed!r}")
        self.steps_per_epoch = (n // batch_size if drop_remainder
                                else -(-n // batch_size))
        if self.steps_per_epoch == 0:
            raise InputError(f"the source has {n} images: not one batch of "
                             f"{batch_size}" + (" (drop_remainder)" if n else ""))
        self.source = source
        self.features = dict(features or {})
        self.batch_size = int(batch_size)
        self.bands, self.band_start = bands, band_start
        self.shuffle, self.num_epochs = shuffle, num_epochs
        self.augment = bool(augment)
        self._state = {"epoch": 0, "step_in_epoch": 0, "seed": int(seed),
                       "num_examples": n, "batch_size": self.batch_size}
        if state is not None:
            self._state = check_state(state, n, self.batch_size, int(seed))
            if self._state["step_in_epoch"] >= self.steps_per_epoch:
                raise InputError(f"cannot resume at step "
                                 f"{self._state['step_in_epoch']} of an epoch "
                                 f"of {self.steps_per_epoch} steps")
        self._queue = queue.Queue(maxsize=max(1, int(prefetch)))
        workers = workers or min(4, os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(1, int(workers)), thread_name_prefix="fers-input-normalise")
        self._stop = threading.Event()
        self._thread = None
        self._done = False

    @property
    def state(self) -> dict:
        """Where the next batch comes from (a small JSON-serialisable dict)."""
        return dict(self._state)

    def order(self, epoch: int) -> np.ndarray:
        """The example indices of one epoch, in reading order."""
        n = self._state["num_examples"]
        if not self.shuffle:
            return np.arange(n)
        # Seeded by (seed, epoch) alone: any epoch's order is known without
        # replaying the ones before it, which is what makes resuming exact.
        rng = np.random.default_rng([self._state["seed"], epoch])
        return rng.permutation(n)

    def symmetries(self, epoch: int) -> np.ndarray:
        """Each example's symmetry (`dihedral`) in one epoch, by example
        index: all 0 without `augment`."""
        n = self._state["num_examples"]
        if not self.augment:
            return np.zeros(n, np.int64)
        rng = np.random.default_rng([self._state["seed"], epoch, _AUGMENT_STREAM])
        return rng.integers(SYMMETRIES, size=n)

    def _positions(self):
        """(indices, their symmetries, state after this batch) from the
        current position on."""
        epoch, step = self._state["epoch"], self._state["step_in_epoch"]
        while self.num_epochs is None or epoch < self.num_epochs:
            order, turns = self.order(epoch), self.symmetries(epoch)
            for s in range(step, self.steps_per_epoch):
                idx = order[s * self.batch_size:(s + 1) * self.batch_size]
                index, count = self.part
                size = self.batch_size // count
                idx = idx[index * size:(index + 1) * size]
                e, t = (epoch, s + 1) if s + 1 < self.steps_per_epoch else (epoch + 1, 0)
                yield idx, turns[idx], dict(self._state, epoch=e, step_in_epoch=t)
            epoch, step = epoch + 1, 0

    def load(self, idx, turns=None):
        """The batch at `idx`: its images read, band-selected, normalised,
        turned by `turns` (symmetries, one per image; None: none) and
        stacked (with `features`, a dict with their features too)."""
        images = self.load_images(idx, turns)
        if not self.features:
            return images
        return {"image": images,
                **{name: f(images) for name, f in self.features.items()}}

    def load_images(self, idx, turns=None) -> np.ndarray:
        """Reads, band-selects, normalises and turns (`load`) the images at
        `idx`, stacked."""
        idx = [int(i) for i in idx]
        turns = [0] * len(idx) if turns is None else [int(t) for t in turns]
        getitems = getattr(self.source, "__getitems__", None)
        items = getitems(idx) if getitems else [self.source[i] for i in idx]
        images = list(self._pool.map(self._prepare, zip(idx, items, turns)))
        for (i, item), x in zip(zip(idx, items), images):
            if x.shape != images[0].shape:
                where = _image_of(item, i)[1]
                raise InputError(f"{where}: image of shape {x.shape} in a "
                                 f"batch of {images[0].shape}; the source's "
                                 f"images must share size and band count")
        return np.stack(images)

    def _prepare(self, i_item_turn) -> np.ndarray:
        i, item, turn = i_item_turn
        image, where = _image_of(item, i)
        x = data.select_bands(np.asarray(image), self.bands, self.band_start,
                              where)
        if self.augment and x.shape[0] != x.shape[1]:
            raise InputError(f"{where}: image of {x.shape[0]} x {x.shape[1]} "
                             f"pixels: augmenting by the square's symmetries "
                             f"needs square images")
        return dihedral(data.normalise(x, where), turn)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self):
        try:
            for idx, turns, after in self._positions():
                if not self._put((self.load(idx, turns), after)):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failed(e))

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, daemon=True,
                                            name="fers-input-pipeline")
            self._thread.start()
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.error
        batch, self._state = item
        return batch

    def close(self):
        """Stops the background thread; the state stays where it is."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True)
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_END = object()


@dataclasses.dataclass
class _Failed:
    error: BaseException


def _image_of(item: Any, i: int):
    """The image of one source item and a name for messages."""
    if isinstance(item, Mapping):
        if "image" not in item:
            raise InputError(f"example {i}: no 'image' entry (has "
                             f"{sorted(item)})")
        name = item.get("name")
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        where = f"example {i}" + (f" ({name})" if name else "")
        if item.get("path"):  # the file it was cut from (scene_source)
            where = f"{item['path']}: {where}"
        return item["image"], where
    return item, f"example {i}"


def batches(source, batch_size: int, *, seed: int, **kwargs) -> Batches:
    """`Batches(source, batch_size, seed=seed, **kwargs)`."""
    return Batches(source, batch_size, seed=seed, **kwargs)


@dataclasses.dataclass(frozen=True)
class EvalScene:
    """A scene ready to score: `x` (H, W, B) prepared, `gt` (H, W) uint8."""
    name: str
    x: np.ndarray
    gt: np.ndarray


def load_eval_scenes(paths: Iterable, bands: Optional[int] = None,
                     band_start: int = 0, sensor: str = "aviris_ng",
                     split: str = "test") -> list:
    """Validation or test scenes for per-epoch evaluation.

    Reads with `data.load_scenes` (a HAD100 root gives `<split>/<sensor>`)
    and prepares each with `data.prepare`. Every scene must have a mask with
    both anomaly and background pixels, or its AUC is undefined.
    """
    out = []
    for scene in data.load_scenes(paths, sensor=sensor, split=split):
        reason = metrics.check_scorable(scene.gt, scene.path)
        if reason:
            raise InputError(f"{scene.path}: cannot evaluate on it: {reason}")
        out.append(EvalScene(scene.name, data.prepare(scene, bands, band_start),
                             scene.gt))
    return out
