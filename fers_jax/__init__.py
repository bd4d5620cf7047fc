"""fers_jax: FERS / FERD hyperspectral anomaly detection in JAX and Flax.

The Python API (fers_jax.api), loaded on first use:

  load_scene(path) / load_scenes(paths)  scenes (cube, mask, name, path)
  detect(cube, method, **options)        a detection map: rx, lrx, crd,
                                         ferd, fers (teacher=, student=)
  detector(method, **options)            the same, models loaded once
  score(map, gt)                         AUC, 3D ROC areas, best F1
"""

from fers_jax.errors import CheckpointError, FersError, InputError

_API = ("detect", "detector", "load_scene", "load_scenes", "score")
__all__ = ["CheckpointError", "FersError", "InputError", *_API]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import fers_jax.data` (and every other submodule) would
    # otherwise pull in JAX through the API's imports.
    if name in _API:
        from fers_jax import api
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
