"""fers_jax checkpoints: models and their variables from disk.

A fers_jax checkpoint is a folder of Orbax variables and a JSON record of
the model (fers_jax.checkpoint_store, whose names are re-exported here).

`load_teacher` / `load_student` / `load_frn` / `load_stage1` accept such a
folder, a train.py run folder (its best/ or final/ model, see
`resolve_checkpoint`) or the reference's PyTorch files (read through
fers_jax.torch_io, converted by fers_jax.convert) and return
(model, variables).

Messages name a path as it was given (a symbolic link stays the link);
only Orbax, which needs absolute paths, is handed the resolved one.
"""

import pathlib
import sys
from typing import Optional

import flax
import numpy as np

from fers_jax import convert
from fers_jax.checkpoint_store import (  # noqa: F401 - the folder format, re-exported
    FORMAT, FORMAT_VERSION, META_FILE, VARIABLES_DIR, is_checkpoint,
    load_variables, meta_config, model_meta, read_meta, save_variables)
from fers_jax.errors import CheckpointError
from fers_jax.models import ferd

def _check_structure(kind, variables, config, path):
    """Same tree and shapes as the model of `config` expects."""
    want = convert.abstract_variables(kind, config)
    flat_want = {k: tuple(v.shape) for k, v in _flat(want).items()}
    flat_got = {k: tuple(np.shape(v)) for k, v in _flat(variables).items()}
    missing = sorted(set(flat_want) - set(flat_got))
    unexpected = sorted(set(flat_got) - set(flat_want))
    shapes = sorted(k for k in set(flat_want) & set(flat_got)
                    if flat_want[k] != flat_got[k])
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{kind} checkpoint {path} does not fit its model: missing "
            f"{missing}, unexpected {unexpected}, shape mismatches {shapes}")


def _flat(tree):
    return {"/".join(k): v for k, v in
            flax.traverse_util.flatten_dict(tree).items()}


# What train.py writes under its --out: the models of the best epoch and of
# the last step, each a folder of fers_jax checkpoints named by their kind.
RUN_EXPORTS = ("best", "final")


def resolve_checkpoint(path, kind: str, say=None) -> pathlib.Path:
    """The checkpoint that a --teacher / --student argument names.

    The one place where such an argument becomes a path, for evaluate.py,
    train.py and the Python API alike:

    - a fers_jax checkpoint folder, a PyTorch file or the published
      folder: itself;
    - (students) a registered model's name such as `fers-50` is not a path:
      `resolve_pretrained` and `load_student` take it before this runs;
    - a train.py run folder `DIR`: `DIR/best/<kind>` when present, else
      `DIR/final/<kind>`; an export folder (`DIR/best`, `DIR/final`): its
      `<kind>`. Which one is used is said on stderr (or to `say`).

    The path is returned as given (expanded `~`, not resolved), so that
    messages name what the user typed.

    Raises CheckpointError when nothing is given, the path does not exist,
    or a run folder holds no finished model of `kind`.
    """
    if path is None or str(path) == "":
        raise CheckpointError(f"no {kind} checkpoint given")
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        hint = ""
        if kind == "student":  # registry names: load_student / resolve_pretrained
            from fers_jax import pretrained
            hint = (f" (nor a trained model's name: "
                    f"{', '.join(pretrained.names())})" if pretrained.names() else "")
        raise CheckpointError(f"{kind} checkpoint {path} does not exist{hint}")
    if not path.is_dir() or is_checkpoint(path):
        return path
    candidates = [path / e / kind for e in RUN_EXPORTS] + [path / kind]
    chosen = next((c for c in candidates if is_checkpoint(c)), None)
    if chosen is None:
        if any((path / e).is_dir() for e in (*RUN_EXPORTS, "checkpoints")):
            raise CheckpointError(
                f"{kind} checkpoint {path} is a train.py run folder with no "
                f"{kind} model in best/ or final/ (a run still going, stopped "
                "early, or of the other stage)")
        return path  # the published folder, or what the loader refuses
    (say or _say)(f"{kind}: using {chosen} (from {path})")
    return chosen


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _load(kind: str, path, bands: Optional[int], config=None,
          accept_stage1: bool = False):
    """(config, variables) of `kind` from a fers_jax folder or PyTorch files."""
    path = resolve_checkpoint(path, kind)
    if is_checkpoint(path):
        kinds = (kind, "stage1") if accept_stage1 else (kind,)
        variables, meta = load_variables(path, expected_kind=kinds)
        stored = meta_config(meta, path)
        if bands is not None and stored.bands != bands:
            raise CheckpointError(f"{kind} checkpoint {path} has {stored.bands} "
                                  f"bands, the model/scene uses {bands}")
        _check_structure(meta["kind"], variables, stored, path)
        if meta["kind"] == "stage1" and kind == "teacher":
            variables = ferd.teacher_variables(variables, stored)
        return stored, variables
    if accept_stage1 and path.is_file():
        # A PyTorch stage-1 dict of state dicts: keep its FEN part.
        sd = convert.read_torch("stage1", path)
        if "convh.convh.weight" not in sd:
            raise CheckpointError(
                f"{kind} checkpoint {path} is neither the published folder "
                f"({', '.join(convert.TEACHER_FILES.values())}), a stage-1 "
                "file (encoder, ocbe, decoder, convh, deconvh, classifier) "
                "nor a fers_jax checkpoint")
        variables, config = convert.from_torch("stage1", sd, bands, config,
                                               str(path))
        return config, ferd.teacher_variables(variables, config)
    variables, config = convert.convert_file(kind, path, bands, config)
    return config, variables


def load_teacher(path, bands: Optional[int] = None, config=None):
    """The spectral teacher from any of:

    - the published folder with convh.pt, enc.pt, pc.pt;
    - a PyTorch stage-1 file (dict of state dicts; its FEN part is used);
    - a fers_jax checkpoint of kind teacher or stage1.

    Args:
      path: file or folder.
      bands: the scene's band count; a checkpoint with another is refused.
      config: only for PyTorch files whose sizes are not the published ones
        and cannot be read off the keys.

    Returns:
      (SpectralTeacher, variables): `model.apply(variables, x)['spe_f']`.
    """
    config, variables = _load("teacher", path, bands, config, accept_stage1=True)
    return convert.build("teacher", config), variables


def resolve_pretrained(path) -> Optional[str]:
    """The registry name (fers_jax.pretrained) that `path` stands for, or
    None: a registered name that is not also an existing file or folder."""
    from fers_jax import pretrained
    if path is None or pathlib.Path(str(path)).expanduser().exists():
        return None
    return str(path) if pretrained.is_name(path) else None


def load_student(path, bands: Optional[int] = None, config=None):
    """The spatial student from spa_fen.pt, a fers_jax checkpoint, or the
    name of one of the project's trained students (fers_jax.pretrained,
    e.g. 'fers-50').

    Returns (SpatialStudent, variables).
    """
    name = resolve_pretrained(path)
    if name is not None:
        from fers_jax import pretrained
        model, variables = pretrained.load(name)
        if bands is not None and model.config.bands != bands:
            raise CheckpointError(f"{name} has {model.config.bands} bands, the "
                                  f"model/scene uses {bands}")
        return model, variables
    config, variables = _load("student", path, bands, config)
    return convert.build("student", config), variables


def load_frn(path, bands: Optional[int] = None, config=None):
    """The feature restoration net: (FeatureRestorationNet, variables)."""
    config, variables = _load("frn", path, bands, config)
    return convert.build("frn", config), variables


def load_stage1(path, bands: Optional[int] = None, config=None):
    """The stage-1 graph: (FerdNet, variables)."""
    config, variables = _load("stage1", path, bands, config)
    return convert.build("stage1", config), variables
