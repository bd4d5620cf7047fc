"""The fers_jax checkpoint folder on disk: Orbax variables plus a JSON record.

A checkpoint is a folder:
  variables/      Orbax StandardCheckpointer tree {'params', 'batch_stats'}
  fers_jax.json   {"format": "fers_jax", "kind": ..., "config_class": ...,
                   "config": {...}, ...}: which model the variables belong
                   to, so a loader can refuse the wrong one. It is written
                   last, so its presence marks a complete checkpoint.

Writing and reading the folder only; fers_jax.checkpoints builds models
from it (or from the reference's PyTorch files through fers_jax.convert).
Both fers_jax.convert (its command line saves) and fers_jax.checkpoints
depend on this module, and it on neither.
"""

import json
import pathlib
import shutil
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from fers_jax import configs
from fers_jax.errors import CheckpointError

META_FILE = "fers_jax.json"
VARIABLES_DIR = "variables"
FORMAT = "fers_jax"
FORMAT_VERSION = 1


def model_meta(kind: str, config, **extra) -> dict:
    """The JSON record for variables of `kind` built with `config`."""
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind,
            "config_class": type(config).__name__,
            "config": configs.to_dict(config), **extra}


def is_checkpoint(path) -> bool:
    """Whether `path` is a (complete) fers_jax checkpoint folder."""
    return (pathlib.Path(path) / META_FILE).is_file()


def save_variables(path, variables, meta: dict, overwrite: bool = False):
    """Writes variables and `meta` (see `model_meta`) to the folder `path`.

    Returns the absolute path. Refuses a non-empty folder unless overwrite.
    """
    path = pathlib.Path(path).expanduser()
    # On many hosts (one shared folder) process 0 alone clears the folder
    # and writes the record; every process takes part in Orbax's save.
    primary = jax.process_index() == 0
    if primary:
        _empty_folder(path, overwrite)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"fers_jax save {path}")
    tree = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.resolve() / VARIABLES_DIR, tree)  # absolute
        checkpointer.wait_until_finished()
    if primary:
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path.resolve()


def _empty_folder(path: pathlib.Path, overwrite: bool):
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise CheckpointError(f"{path} exists and is not an empty folder; "
                                  "pass overwrite to replace it")
        if not is_checkpoint(path) and path.is_dir():
            raise CheckpointError(f"{path} is not a fers_jax checkpoint; "
                                  "refusing to replace it")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot create the checkpoint folder "
                              f"({e.strerror})") from None


def read_meta(path) -> dict:
    path = pathlib.Path(path).expanduser()
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a fers_jax checkpoint (no "
                              f"{META_FILE})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / META_FILE} cannot be read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META_FILE} is not a fers_jax record")
    return meta


def load_variables(path, expected_kind: Union[str, Sequence[str], None] = None):
    """Reads a checkpoint written by `save_variables`.

    Args:
      path: the checkpoint folder.
      expected_kind: a kind or kinds to accept; others raise.

    Returns:
      (variables as jax arrays, meta dict).
    """
    path = pathlib.Path(path).expanduser()
    meta = read_meta(path)
    if expected_kind is not None:
        kinds = (expected_kind,) if isinstance(expected_kind, str) else \
            tuple(expected_kind)
        if meta.get("kind") not in kinds:
            raise CheckpointError(
                f"{path} holds a {meta.get('kind')} checkpoint, not "
                f"{' or '.join(kinds)}")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(path.resolve() / VARIABLES_DIR)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds
        raise CheckpointError(f"{path}: variables cannot be read "
                              f"({type(e).__name__}: {e})") from None
    return jax.tree.map(jnp.asarray, dict(tree)), meta


def meta_config(meta: dict, path=""):
    try:
        return configs.from_dict(meta["config_class"], meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model record in {META_FILE} "
                              f"({e})") from None
