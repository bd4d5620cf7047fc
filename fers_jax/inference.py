"""FERD and FERS detection maps: features from the networks, then RX.

Test time has no training and no parameters to tune (SPEC.md section 6):

* FERD: RX(x + spe_f), the spectral teacher's features added to the input.
* FERS: the spatial student's features too. Above 50 bands,
  RX(x + spe_f + spa_f) ("sum"); at 50 and below the product of
  RX(x + spa_f) and RX(x + spe_f), each min-max scaled ("product"), with the
  reference's float32 batched RX.
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fers_jax import checkpoints, detectors, parallel, tiling
from fers_jax.errors import InputError
from fers_jax.plan import ScenePlan, plan_for, resolve_fusion, resolve_precision

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """The networks of a method with their variables; a jitted forward.

    Calling it on x (N, H, W, B) returns {'spe_f': ..., ['spa_f': ...]}.
    Convolutions run at full float32 precision: on GPUs XLA would otherwise
    use TF32, which moves features by ~1e-3 and the maps with them.

    With dtype 'bfloat16' the variables and the input are cast to bfloat16
    and the networks compute in it (for accelerators; on CPU it is slower);
    features come back as float32, and RX stays in its own precision.

    The models and variables are kept (`teacher`, `t_vars`, `student`,
    `s_vars`) for `tiled`, the same networks tile by tile.
    """
    bands: int
    forward: Callable
    matmul_precision: str = "highest"
    teacher: Any = None
    t_vars: Any = None
    student: Any = None
    s_vars: Any = None
    dtype: str = "float32"

    def __call__(self, x) -> Dict[str, jax.Array]:
        with jax.default_matmul_precision(self.matmul_precision):
            return self.forward(x)

    def tiled(self, tile, trunk_tile=None):
        """The same features tile by tile (fers_jax.tiling.TiledFeatures)."""
        return tiling.TiledFeatures(self.teacher, self.t_vars, self.student,
                                    self.s_vars, tile, trunk_tile,
                                    dtype=self.dtype,
                                    matmul_precision=self.matmul_precision)


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InputError(f"network dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


def feature_extractor(teacher_path, student_path: Optional[str] = None,
                      bands: Optional[int] = None, dtype: str = "float32",
                      mesh=None) -> FeatureExtractor:
    """Loads the teacher (and student) and compiles their joint forward.

    Args:
      dtype: 'float32' or 'bfloat16' network arithmetic (see FeatureExtractor).
      mesh: the device mesh (fers_jax.parallel.make_mesh) the variables
        are replicated on, for inputs sharded over its 'data' axis
        (parallel.shard_padded); default: one device.
    """
    _check_dtype(dtype)
    name = checkpoints.resolve_pretrained(student_path)
    if name is not None:  # a shipped student runs only with its own teacher
        from fers_jax import pretrained
        pretrained.check_teacher(name, teacher_path)
    teacher, t_vars = checkpoints.load_teacher(teacher_path, bands)
    bands = teacher.config.bands
    student, s_vars = (checkpoints.load_student(student_path, bands)
                       if student_path is not None else (None, None))
    cast = jnp.dtype(dtype)
    mesh = mesh if mesh is not None else parallel.one_device_mesh()
    variables = parallel.replicate(jax.tree.map(lambda a: jnp.asarray(a, cast), (
        t_vars, s_vars)), mesh)

    # The variables are arguments, not closed-over constants: XLA would fold
    # constants into the graph (BatchNorm into the convs, ...) and round
    # differently from the tiled path, which takes them as arguments.
    def batch_forward(variables, x):
        run_t, run_s = variables
        x = jnp.asarray(x, cast)
        out = {"spe_f": teacher.apply(run_t, x)["spe_f"]}
        if student is not None:
            out["spa_f"] = student.apply(run_s, x)["spa_f"]
        return {k: v.astype(jnp.float32) for k, v in out.items()}

    def forward(variables, x):
        if not _one_image_at_a_time(mesh):
            return batch_forward(variables, x)
        return jax.lax.map(lambda xi: jax.tree.map(
            lambda v: v[0], batch_forward(variables, xi[None])), x)
    return FeatureExtractor(bands=bands, forward=_Bound(jax.jit(forward), variables),
                            teacher=teacher, t_vars=t_vars, student=student,
                            s_vars=s_vars, dtype=dtype)


def _one_image_at_a_time(mesh) -> bool:
    """Whether the forward runs the images of a batch one after another
    (lax.map inside the one jitted call) rather than all at once.

    On one CPU device: the same numbers, 25-30% faster for 16 64x64 images
    on a 2-core VM (one image's activations stay in cache, and XLA touches
    less fresh memory), and less memory. Elsewhere the whole batch: GPUs
    and TPUs want the parallelism, and a batch sharded over several
    devices must not be walked image by image.
    """
    return jax.default_backend() == "cpu" and mesh.size == 1


class _Bound:
    """A jitted f(variables, x) with its variables bound: f(x), f.lower(x)."""

    def __init__(self, jitted, variables):
        self.jitted, self.variables = jitted, variables

    def __call__(self, x):
        return self.jitted(self.variables, x)

    def lower(self, x):
        return self.jitted.lower(self.variables, x)


def ferd_map(x, spe_f, precision: str = "float64"):
    """FERD: RX(x + spe_f)."""
    return detectors.rx(x + spe_f, precision)


def fers_map(x, spe_f, spa_f, fusion: str, precision: str = "auto"):
    """FERS: sum or product fusion of the enhanced cubes' RX maps."""
    fusion = resolve_fusion(fusion, x.shape[-1])
    precision = resolve_precision(precision, fusion)
    if fusion == "sum":
        return detectors.rx(x + spe_f + spa_f, precision)
    return detectors.fuse([detectors.rx(x + spa_f, precision),
                           detectors.rx(x + spe_f, precision)], "product")


def build_detector(cfg, mesh=None) -> Tuple[Callable, int]:
    """The evaluation detector for cfg.method 'ferd' or 'fers'.

    The detector computes what its ScenePlan says (fers_jax.plan): whole
    images, or tile by tile (fers_jax.tiling, same maps to float32
    rounding). Whole-image batches are sharded over `mesh`
    (fers_jax.parallel.make_mesh; default: one device), padded to a
    multiple of its size.

    Returns:
      (detector, bands): detector(x (N, H, W, B), plan=None, spill_dir=None,
      progress=False) -> (maps, features), the plan defaulting to
      `plan_for(cfg, x.shape)` (out of core: x a tiling.LazyImage, RX inputs
      spilled to `spill_dir`; `progress`: a bar over tiles); and the band
      count the checkpoint was trained for.
    """
    student = cfg.student if cfg.method == "fers" else None
    mesh = mesh if mesh is not None else parallel.one_device_mesh()
    extractor = feature_extractor(cfg.teacher, student, cfg.bands,
                                  getattr(cfg, "dtype", "float32"), mesh)
    tiled = {}

    def detect(x, plan: Optional[ScenePlan] = None, spill_dir=None,
               progress: bool = False):
        plan = plan if plan is not None else plan_for(cfg, np.shape(x), in_memory=True)
        if plan.tiled:
            if plan.tile not in tiled:
                tiled[plan.tile] = extractor.tiled(plan.tile)
            return tiling.detect_tiled(tiled[plan.tile], x, plan, export=cfg.export,
                                       spill_dir=spill_dir, progress=progress)
        xs, n = parallel.shard_padded(x, mesh)
        feats = extractor(xs)
        if cfg.method == "ferd":
            maps = ferd_map(xs, feats["spe_f"], plan.rx_precision)
        else:
            maps = fers_map(xs, feats["spe_f"], feats["spa_f"], plan.fusion,
                            plan.rx_precision)
        features = ({k: parallel.to_host(v)[:n] for k, v in feats.items()}
                    if cfg.export else {})
        return parallel.to_host(maps)[:n], features
    return detect, extractor.bands
