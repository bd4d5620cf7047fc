"""PyTorch weights -> Flax variables, for every model of fers_jax.

Each converter takes a flat state dict (name -> numpy array, as
`fers_jax.torch_io.load_state_dict` returns; a dict of state dicts is
flattened with dotted prefixes) and returns `{'params', 'batch_stats'}`
for the matching Flax module. The expected names are derived from the Flax
module's own variables (see `torch_name`), so every missing, unexpected or
mis-shaped entry is reported by its PyTorch name in one CheckpointError.

Layouts: conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); transposed
conv weight (I, O, kh, kw) -> kernel (kh, kw, O, I) (the same permutation,
with flax's transpose_kernel=True); BN weight/bias -> scale/bias,
running_mean/var -> batch_stats mean/var; num_batches_tracked is dropped.

Kinds (also the CLI's --kind and the `kind` stored with a checkpoint):
  teacher   published teacher folder: convh.pt, enc.pt, pc.pt (SPEC 7)
  student   spa_fen.pt of the spatial student
  frn       the feature restoration net
  stage1    dict of state dicts: encoder, ocbe, decoder, convh, deconvh,
            classifier (the golden tiny file's layout)
  resnet34  torchvision ImageNet ResNet-34 -> the student's `trunk`
  wrn101    torchvision ImageNet Wide-ResNet-101-2 -> the stage-1 `encoder`
            (its layer1 is also the teacher's encoder)

Usage:
  python -m fers_jax.convert --kind teacher SRC --bands N --out DIR
"""

import argparse
import os
import pathlib
import re
from typing import Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fers_jax import configs
from fers_jax.errors import CheckpointError
from fers_jax.models import (FeatureRestorationNet, FerdNet, SpatialStudent,
                             SpectralTeacher)

KINDS = ("teacher", "student", "frn", "stage1", "resnet34", "wrn101")
TEACHER_FILES = {"convh": "convh.pt", "enc": "enc.pt", "pc": "pc.pt"}

# Flax leaf (collection, name) -> PyTorch parameter / buffer suffix.
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Flax module name -> PyTorch's, inside blocks (SE `fc.0`/`fc.2`, LightSPP
# `fuse.0`/`fuse.2`, nn.Sequential shortcuts).
_MODULE_NAMES = {
    "downsample_conv": "downsample.0", "downsample_bn": "downsample.1",
    "upsample_conv": "upsample.0", "upsample_bn": "upsample.1",
    "deconv2": "conv2", "fc1": "fc.0", "fc2": "fc.2",
    "fuse1": "fuse.0", "fuse2": "fuse.2",
}


def _module_name(name: str) -> str:
    """`layer1_0` -> `layer1.0`, `body_3` -> `body.3`, `fc1` -> `fc.0`."""
    if name in _MODULE_NAMES:
        return _MODULE_NAMES[name]
    return re.sub(r"_(\d+)$", r".\1", name)


def _default_names(path: Sequence[str]) -> str:
    return ".".join(_module_name(p) for p in path)


def _teacher_names(path):
    # Files convh.pt / enc.pt / pc.pt, flattened as convh.*, enc.*, pc.*.
    top = {"convh": "convh", "encoder": "enc", "head": "pc"}[path[0]]
    return ".".join([top, *[_module_name(p) for p in path[1:]]])


def _student_names(path):
    if path[0] == "to_rgb":
        return "initial_conv." + path[1]
    if path[0] == "trunk":
        # nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3).
        head = path[1]
        m = re.fullmatch(r"layer(\d+)_(\d+)", head)
        head = f"{3 + int(m[1])}.{m[2]}" if m else {"conv1": "0", "bn1": "1"}[head]
        return ".".join(["get_features", head, *map(_module_name, path[2:])])
    return _default_names(path)


def _stage1_names(path):
    if path[0] == "deconvh":
        return "deconvh.convh"
    if path[:2] == ("classifier", "head"):
        path = ("classifier",) + tuple(path[2:])
    return _default_names(path)


def _imagenet_names(path):
    # torchvision's own names, without our `trunk` / `encoder` level.
    return _default_names(path[1:])


def torch_name(kind: str, path: Sequence[str]) -> str:
    """The PyTorch module name of the Flax module at `path` for `kind`."""
    names = {"teacher": _teacher_names, "student": _student_names,
             "stage1": _stage1_names, "resnet34": _imagenet_names,
             "wrn101": _imagenet_names}.get(kind, _default_names)
    return names(tuple(path))


# Keys that the reference saves but no fers_jax module uses.
_IGNORED = {
    # pc.pt's conv3 is the training classifier's last conv (SPEC 7).
    "teacher": (r"pc\.conv3\.",),
    # The OCBE's conv4/bn4 hold parameters but never run (SPEC 4).
    "stage1": (r"ocbe\.(conv4|bn4)\.",),
    # ImageNet nets: the stem, later stages and classifier are not used.
    "resnet34": (r"layer4\.", r"fc\."),
    "wrn101": (r"conv1\.", r"bn1\.", r"layer4\.", r"fc\."),
}


def _ignored(kind: str, key: str) -> bool:
    if key.endswith("num_batches_tracked"):
        return True
    return any(re.match(p, key) for p in _IGNORED.get(kind, ()))


def convert_state_dict(kind: str, state_dict: Mapping[str, np.ndarray],
                       target, source: str = "checkpoint"):
    """Maps `state_dict` onto the variable tree `target` (shapes only).

    Args:
      kind: one of KINDS, selects the naming rule and the keys to skip.
      state_dict: flat PyTorch names -> arrays.
      target: pytree {'params': ..., 'batch_stats': ...} of arrays or
        ShapeDtypeStructs, e.g. from `abstract_variables`.
      source: the file, for messages.

    Returns:
      The variables, float32 numpy arrays in target's structure.

    Raises:
      CheckpointError naming every missing, unexpected and mis-shaped key.
    """
    out, used, missing, shapes = {}, set(), [], []
    for key, spec in flax.traverse_util.flatten_dict(target).items():
        col, *modules, leaf = key
        name = f"{torch_name(kind, modules)}.{_LEAVES[col, leaf]}"
        if name not in state_dict:
            missing.append(name)
            continue
        used.add(name)
        value = np.asarray(state_dict[name], np.float32)
        if leaf == "kernel":
            if value.ndim != 4:
                shapes.append(f"{name}: {value.shape} is not a conv weight")
                continue
            value = value.transpose(2, 3, 1, 0)
        if value.shape != tuple(spec.shape):
            shapes.append(f"{name}: checkpoint {_torch_shape(value, leaf)}, "
                          f"model {_torch_shape(np.empty(spec.shape), leaf)}")
            continue
        out[key] = value
    unexpected = [k for k in state_dict if k not in used and not _ignored(kind, k)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append(f"shape mismatches {shapes}")
    if problems:
        raise CheckpointError(f"{kind} checkpoint {source} does not fit the "
                              f"model: " + "; ".join(problems))
    return flax.traverse_util.unflatten_dict(out)


def _torch_shape(value, leaf):
    """Shape in PyTorch's layout, for messages."""
    shape = value.shape
    return tuple(shape[i] for i in (3, 2, 0, 1)) if leaf == "kernel" else shape


# --- Models and their expected variables ------------------------------------

def build(kind: str, config):
    """The Flax module for a model kind and config."""
    cls = {"teacher": SpectralTeacher, "stage1": FerdNet,
           "wrn101": FerdNet, "student": SpatialStudent,
           "resnet34": SpatialStudent, "frn": FeatureRestorationNet}[kind]
    return cls(config)


# Partial kinds convert one submodule of a bigger model.
_SUBTREE = {"resnet34": "trunk", "wrn101": "encoder"}


def abstract_variables(kind: str, config):
    """Shapes of the variables `kind` converts into (no computation).

    For resnet34 / wrn101, only the student's `trunk` / the stage-1 graph's
    `encoder` subtree (as {'params': {'trunk': ...}, ...}).
    """
    model = build(kind, config)
    x = jax.ShapeDtypeStruct((1, 32, 32, config.bands), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    shapes = {col: dict(tree) for col, tree in shapes.items()}
    if kind in _SUBTREE:
        sub = _SUBTREE[kind]
        shapes = {col: {sub: tree[sub]} for col, tree in shapes.items()
                  if sub in tree}
    return shapes


def insert_pretrained(variables, pretrained):
    """`variables` with the subtrees of `pretrained` (e.g. an ImageNet trunk
    from kind resnet34) put in place; other entries are kept."""
    out = {col: dict(tree) for col, tree in variables.items()}
    for col, tree in pretrained.items():
        out.setdefault(col, {}).update(tree)
    return out


# --- Configs from the checkpoint's own shapes --------------------------------

def _blocks(sd, prefix):
    """Counts `prefix{j}.` blocks in a state dict."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m[1]) for k in sd if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def _need(sd, key, kind, source):
    if key not in sd:
        raise CheckpointError(f"{kind} checkpoint {source} has no '{key}': not "
                              f"a {kind} checkpoint (keys: {_preview(sd)})")
    return np.asarray(sd[key])


def _preview(sd, n=8):
    keys = list(sd)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _check_bands(kind, source, found: int, bands: Optional[int]):
    if bands is not None and found != bands:
        raise CheckpointError(f"{kind} checkpoint {source} has {found} bands, "
                              f"the model/scene uses {bands}")


def infer_config(kind: str, sd, source: str = "checkpoint", bands=None):
    """The config whose variables the checkpoint holds, from its shapes.

    Block counts and widths come from the keys; everything else keeps the
    reference's value. Refuses a band count different from `bands`.
    """
    if kind in ("teacher", "stage1"):
        enc, convh = ("enc.", "convh.convh.weight") if kind == "teacher" else \
            ("encoder.", "convh.convh.weight")
        w = _need(sd, convh, kind, source)
        _check_bands(kind, source, w.shape[1], bands)
        conv1 = _need(sd, enc + "layer1.0.conv1.weight", kind, source)
        conv3 = _need(sd, enc + "layer1.0.conv3.weight", kind, source)
        fields = dict(bands=int(w.shape[1]), stem_width=int(w.shape[0]),
                      width_per_group=int(conv1.shape[0]),
                      expansion=int(conv3.shape[0]) // 64)
        if kind == "teacher":
            # Later stages are not in a teacher; keep the reference's.
            default = configs.FerdConfig.encoder_blocks
            fields["encoder_blocks"] = (_blocks(sd, "enc.layer1."),) + default[1:]
        else:
            fields["encoder_blocks"] = tuple(
                _blocks(sd, f"encoder.layer{i}.") for i in (1, 2, 3))
            fields["ocbe_blocks"] = _blocks(sd, "ocbe.bn_layer.")
            fields["decoder_blocks"] = tuple(
                _blocks(sd, f"decoder.layer{i}.") for i in (1, 2, 3))
        return configs.FerdConfig(**fields)
    if kind == "student":
        w = _need(sd, "initial_conv.conv.weight", kind, source)
        _check_bands(kind, source, w.shape[1], bands)
        stem = _need(sd, "get_features.0.weight", kind, source)
        fuse = _need(sd, "spp.fuse.0.weight", kind, source)
        return configs.StudentConfig(
            bands=int(w.shape[1]), rgb_width=int(w.shape[0]),
            stem_width=int(stem.shape[0]), spp_width=int(fuse.shape[0]),
            trunk_blocks=tuple(_blocks(sd, f"get_features.{i}.")
                               for i in (4, 5, 6)))
    if kind == "frn":
        w = _need(sd, "final_conv.weight", kind, source)
        _check_bands(kind, source, w.shape[0], bands)
        return configs.FrnConfig(bands=int(w.shape[0]),
                                 blocks=_blocks(sd, "body.") // 2)
    if kind == "resnet34":
        return configs.student(bands or 64)
    if kind == "wrn101":
        return configs.ferd(bands or 64)
    raise CheckpointError(f"unknown checkpoint kind {kind!r}; one of {KINDS}")


# --- Files -------------------------------------------------------------------

def read_torch(kind: str, src) -> dict:
    """Reads the PyTorch file(s) of `kind` into one flat state dict.

    A teacher is a folder with convh.pt, enc.pt and pc.pt (keys prefixed
    `convh.`, `enc.`, `pc.`); every other kind is one file.
    """
    from fers_jax import torch_io  # the only way fers_jax reads .pt files
    src = pathlib.Path(src)
    if kind == "teacher":
        if not src.is_dir():
            raise CheckpointError(f"teacher checkpoint {src} must be a folder "
                                  f"holding {', '.join(TEACHER_FILES.values())}")
        sd = {}
        for prefix, name in TEACHER_FILES.items():
            if not (src / name).is_file():
                raise CheckpointError(f"teacher checkpoint {src} has no {name}")
            sd.update({f"{prefix}.{k}": v for k, v in
                       torch_io.load_state_dict(src / name).items()})
        return sd
    if src.is_dir():
        raise CheckpointError(f"{kind} checkpoint {src} is a folder; expected "
                              "a .pt/.pth file")
    return torch_io.load_state_dict(src)


def from_torch(kind: str, state_dict, bands: Optional[int] = None, config=None,
               source: str = "checkpoint"):
    """Converts a flat state dict of `kind`.

    Args:
      kind: one of KINDS.
      state_dict: flat name -> array (see `read_torch`).
      bands: the band count the caller needs; a checkpoint with another is
        refused. None accepts the checkpoint's.
      config: the model config; by default read off the checkpoint.
      source: the file, for messages.

    Returns:
      (variables, config).
    """
    if kind not in KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}; one of {KINDS}")
    inferred = infer_config(kind, state_dict, source, bands)
    if config is None:
        config = inferred
    elif kind not in _SUBTREE:
        _check_bands(kind, source, inferred.bands, config.bands)
    target = abstract_variables(kind, config)
    return convert_state_dict(kind, state_dict, target, source), config


def convert_file(kind: str, src, bands: Optional[int] = None, config=None):
    """Reads and converts a PyTorch checkpoint: (variables, config)."""
    src = pathlib.Path(src).expanduser()  # named as given in messages
    return from_torch(kind, read_torch(kind, src), bands, config, str(src))


def main(argv=None):
    from fers_jax import checkpoint_store  # saving needs orbax, converting does not
    from fers_jax.cli import HelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m fers_jax.convert",
        description=__doc__.split("\n\n")[0] + "\nWrites an Orbax checkpoint.",
        formatter_class=HelpFormatter)
    parser.add_argument("src", help="PyTorch file (teacher: its folder)")
    parser.add_argument("--kind", required=True, choices=KINDS,
                        help="which model the file holds: teacher (the folder "
                             "with convh.pt/enc.pt/pc.pt), student (spa_fen.pt), "
                             "frn, stage1, or the ImageNet backbones resnet34 "
                             "(student trunk) and wrn101 (stage-1 encoder)")
    parser.add_argument("--bands", type=int, default=None,
                        help="refuse a checkpoint with another band count "
                             "(default: accept the checkpoint's)")
    parser.add_argument("--out", required=True,
                        help="output folder (a fers_jax checkpoint)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing fers_jax checkpoint at --out")
    args = parser.parse_args(argv)
    variables, config = convert_file(args.kind, args.src, args.bands)
    checkpoint_store.save_variables(
        args.out, variables,
        checkpoint_store.model_meta(args.kind, config,
                               source=os.path.abspath(args.src)),
        overwrite=args.overwrite)
    n = sum(np.size(v) for v in jax.tree.leaves(variables))
    print(f"{args.kind}: {n} values from {args.src} -> {args.out}")


if __name__ == "__main__":
    from fers_jax import cli
    raise SystemExit(cli.run(main))
