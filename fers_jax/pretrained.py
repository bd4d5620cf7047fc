"""The project's own trained FERS students, by name (issue 10).

  python -m fers_jax.pretrained --list          # the model cards
  python evaluate.py --method fers --student fers-50 --bands 50 \\
      --teacher ../shared/reference/checkpoints/saved_models/50bands ...

Each model is a card (`<name>.json`: data, bands, settings, steps, seed,
per-scene validation AUC against FERD, the sha256 of the teacher files it
was trained against, date, code commit) and its weights in float32 as
trained: `<name>.npz` holds what trained (Conv2RGB, LightSPP) and the card
names the frozen ResNet-34 trunk it ran on, stored once by content hash in
`trunk-<sha256[:16]>.npz` (params and BatchNorm statistics), so students
sharing a trunk share its file. A student is only meaningful with the
teacher it was trained against: `check_teacher` refuses any other.

Files live in fers_jax/pretrained_models/ (package data), so a fresh clone
needs nothing else.
"""

import argparse
import hashlib
import io
import json
import pathlib
import sys
from typing import Dict, Optional

import flax
import numpy as np

from fers_jax import configs
from fers_jax.errors import CheckpointError

MODELS_DIR = pathlib.Path(__file__).resolve().parent / "pretrained_models"
TRUNK = "trunk"


def names() -> list:
    """The registered model names (cards in MODELS_DIR)."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def is_name(value) -> bool:
    """Whether `value` names a registered model (a plain name, no path)."""
    value = str(value)
    return "/" not in value and value in names()


def card(name: str) -> dict:
    if not is_name(name):
        raise CheckpointError(f"{name}: no such pretrained model (registered: "
                              f"{', '.join(names()) or 'none'})")
    return json.loads((MODELS_DIR / f"{name}.json").read_text())


# --- Files -----------------------------------------------------------------------

def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flat_np(tree) -> Dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v, np.float32)
            for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _unflat(arrays) -> dict:
    return flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")): np.asarray(v) for k, v in arrays.items()})


def _npz_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: arrays[k] for k in sorted(arrays)})
    return buf.getvalue()


def trunk_digest(trunk_arrays: Dict[str, np.ndarray]) -> str:
    """Content hash of a trunk: names, shapes and float32 bytes, in order."""
    h = hashlib.sha256()
    for k in sorted(trunk_arrays):
        a = np.ascontiguousarray(trunk_arrays[k], np.float32)
        h.update(k.encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def write_model(name: str, student_variables: dict, student_config,
                card_fields: dict,
                folder: Optional[pathlib.Path] = None) -> dict:
    """Stores a student under `name`: its trained parts in <name>.npz, its
    trunk in trunk-<hash>.npz (once for every student that shares it), and
    the card in <name>.json. Returns the card written."""
    folder = pathlib.Path(folder or MODELS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {}
    for col in ("params", "batch_stats"):
        for k, v in _flat_np(student_variables.get(col, {})).items():
            flat[f"{col}/{k}"] = v
    trunk = {k: v for k, v in flat.items() if k.split("/")[1] == TRUNK}
    own = {k: v for k, v in flat.items() if k.split("/")[1] != TRUNK}
    digest = trunk_digest(trunk)
    trunk_file = folder / f"trunk-{digest[:16]}.npz"
    if not trunk_file.exists():
        trunk_file.write_bytes(_npz_bytes(trunk))
    (folder / f"{name}.npz").write_bytes(_npz_bytes(own))
    full = {"name": name, "bands": student_config.bands, **card_fields,
            "model": {"config_class": type(student_config).__name__,
                      "config": configs.to_dict(student_config)},
            "files": {"student": f"{name}.npz", "trunk": trunk_file.name},
            "sha256": {f"{name}.npz": sha256_file(folder / f"{name}.npz"),
                       trunk_file.name: sha256_file(trunk_file)},
            "trunk_digest": digest}
    (folder / f"{name}.json").write_text(json.dumps(full, indent=1) + "\n")
    return full


def load(name: str, folder: Optional[pathlib.Path] = None):
    """(SpatialStudent, variables) of a registered model; the stored files'
    sha256 must match its card."""
    from fers_jax.models import SpatialStudent
    folder = pathlib.Path(folder or MODELS_DIR)
    c = card(name) if folder == MODELS_DIR else json.loads(
        (folder / f"{name}.json").read_text())
    flat = {}
    for role in ("trunk", "student"):
        path = folder / c["files"][role]
        if not path.is_file():
            raise CheckpointError(f"{name}: its {role} file {path} is missing")
        if sha256_file(path) != c["sha256"][path.name]:
            raise CheckpointError(f"{name}: {path} differs from the file its "
                                  f"card records (sha256 mismatch)")
        with np.load(path) as f:
            flat.update({k: f[k] for k in f.files})
    tree = _unflat(flat)
    variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    config = configs.from_dict(c["model"]["config_class"], c["model"]["config"])
    return SpatialStudent(config), variables


def check_teacher(name: str, teacher_path) -> None:
    """Refuses (one-line CheckpointError) a teacher whose files are not the
    ones model `name` was trained against (by the card's sha256)."""
    want = card(name)["teacher_sha256"]
    path = pathlib.Path(teacher_path).expanduser()
    for fname, digest in want.items():
        f = path / fname if path.is_dir() else path
        if not f.is_file() or sha256_file(f) != digest:
            raise CheckpointError(
                f"{teacher_path}: not the teacher {name} was trained against "
                f"({fname} {'missing' if not f.is_file() else 'differs'}; "
                f"want the files of {card(name)['teacher']})")


# --- The cards, printed --------------------------------------------------------------

def format_card(c: dict) -> str:
    val = c.get("validation", {})
    lines = [f"{c['name']}: FERS student, {c['bands']} bands "
             f"({c.get('summary', '')})",
             f"  teacher     {c['teacher']} (sha256 "
             + ", ".join(f"{k} {v[:12]}" for k, v in c["teacher_sha256"].items())
             + ")",
             f"  data        {', '.join(c['data'])}",
             f"  settings    {json.dumps(c['settings'])}",
             f"  trained     {c['steps']} steps (epoch {c['epoch']}), seed "
             f"{c['seed']}; {c['date']}, code {c['code_commit']}"]
    if val:
        lines.append(f"  validation  {c.get('validation_scenes', '')}: mAUC FERS "
                     f"{val['fers_mauc']:.4f} vs FERD {val['ferd_mauc']:.4f}")
        for scene, row in val["per_scene"].items():
            lines.append(f"    {scene:<16} FERS {row['fers']:.4f}  FERD "
                         f"{row['ferd']:.4f}")
    if c.get("notes"):
        lines.append(f"  notes       {c['notes']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fers_jax.pretrained",
                                description="fers_jax's trained students")
    p.add_argument("--list", action="store_true", help="print every model card")
    p.add_argument("--json", metavar="NAME", help="print one card as JSON")
    args = p.parse_args(argv)
    if args.json:
        print(json.dumps(card(args.json), indent=1))
    else:
        for n in names():
            print(format_card(card(n)) + "\n")
        if not names():
            print("no pretrained models registered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
