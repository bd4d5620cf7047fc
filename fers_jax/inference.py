"""FERD and FERS detection maps: features from the networks, then RX.

Test time has no training and no parameters to tune (SPEC.md section 6):

* FERD: RX(x + spe_f), the spectral teacher's features added to the input.
* FERS: the spatial student's features too. Above 50 bands,
  RX(x + spe_f + spa_f) ("sum"); at 50 and below the product of
  RX(x + spa_f) and RX(x + spe_f), each min-max scaled ("product"), with the
  reference's float32 batched RX.
"""

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import jax
import numpy as np

from fers_jax import checkpoints, detectors
from fers_jax.errors import InputError

FUSIONS = ("auto", "sum", "product")
PRODUCT_MAX_BANDS = 50  # the reference fuses by product at 50 bands and below


def resolve_fusion(fusion: str, bands: int) -> str:
    if fusion not in FUSIONS:
        raise InputError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if fusion == "auto":
        return "product" if bands <= PRODUCT_MAX_BANDS else "sum"
    return fusion


def resolve_precision(precision: str, fusion: str) -> str:
    """'auto' follows the reference: float32 RX on the product path only."""
    if precision == "auto":
        return "float32" if fusion == "product" else "float64"
    return precision


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """The networks of a method with their variables; a jitted forward.

    Calling it on x (N, H, W, B) returns {'spe_f': ..., ['spa_f': ...]}.
    Convolutions run at full float32 precision: on GPUs XLA would otherwise
    use TF32, which moves features by ~1e-3 and the maps with them.
    """
    bands: int
    forward: Callable
    matmul_precision: str = "highest"

    def __call__(self, x) -> Dict[str, jax.Array]:
        with jax.default_matmul_precision(self.matmul_precision):
            return self.forward(x)


def feature_extractor(teacher_path, student_path: Optional[str] = None,
                      bands: Optional[int] = None) -> FeatureExtractor:
    """Loads the teacher (and student) and compiles their joint forward."""
    teacher, t_vars = checkpoints.load_teacher(teacher_path, bands)
    bands = teacher.config.bands
    if student_path is None:
        def forward(x):
            return {"spe_f": teacher.apply(t_vars, x)["spe_f"]}
    else:
        student, s_vars = checkpoints.load_student(student_path, bands)

        def forward(x):
            return {"spe_f": teacher.apply(t_vars, x)["spe_f"],
                    "spa_f": student.apply(s_vars, x)["spa_f"]}
    return FeatureExtractor(bands=bands, forward=jax.jit(forward))


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


def build_detector(cfg) -> Tuple[Callable, int]:
    """The evaluation detector for cfg.method 'ferd' or 'fers'.

    Returns:
      (detector, bands): detector(x (N, H, W, B)) -> (maps, features), and the
      band count the checkpoint was trained for.
    """
    student = cfg.student if cfg.method == "fers" else None
    extractor = feature_extractor(cfg.teacher, student, cfg.bands)

    def detect(x):
        feats = extractor(x)
        if cfg.method == "ferd":
            precision = "float64" if cfg.precision == "auto" else cfg.precision
            maps = ferd_map(x, feats["spe_f"], precision)
        else:
            maps = fers_map(x, feats["spe_f"], feats["spa_f"], cfg.fusion,
                            cfg.precision)
        features = ({k: np.asarray(v) for k, v in feats.items()}
                    if cfg.export else {})
        return np.asarray(maps), features
    return detect, extractor.bands
