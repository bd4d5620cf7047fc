"""Training data as TensorFlow Datasets, written as array_record.

Both builders store images as read (float32, all or the first N bands, not
normalised) and are read without TensorFlow through `as_data_source()`;
`fers_jax.input_pipeline` does the per-image normalisation and batching.

- `had100`: the HAD100 benchmark (manual download), configs per sensor.
- `patches`: background patches cut from any scenes, for users without HAD100.
- `layout`: writes a HAD100-layout folder from scenes (and its CLI).
- `crops`: where patches go; shared by all of the above.
"""

from fers_jax.datasets.crops import (PatchSource, clean_origins, grid,
                                     patch_origins)
from fers_jax.datasets.had100 import (Had100, Had100Config, build_had100,
                                      had100_root)
from fers_jax.datasets.patches import (HsiPatches, PatchConfig, build_patches,
                                       patch_config)

# Builder names as TFDS registers them (`tfds.builder("had100/aviris_ng")`).
BUILDERS = (Had100.name, HsiPatches.name)


def __getattr__(name):
    # layout is also run as `python -m fers_jax.datasets.layout`; importing it
    # here eagerly would make runpy warn about a module imported twice.
    if name in ("write_layout", "write_mask_png"):
        from fers_jax.datasets import layout
        return getattr(layout, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILDERS", "Had100", "Had100Config", "HsiPatches", "PatchConfig",
    "PatchSource", "build_had100", "build_patches", "clean_origins", "grid",
    "had100_root", "patch_config", "patch_origins", "write_layout",
    "write_mask_png",
]
