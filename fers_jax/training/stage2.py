"""Stage 2, FERS, the rebellious student (SPEC 5): what trains and its loss.

The spectral teacher is frozen and runs in eval mode. In the student,
Conv2RGB and LightSPP train and the ResNet-34 trunk is frozen; the feature
restoration net (FRN) trains. Quirk kept by default (SPEC 3.2): the
reference calls .train() on the whole student, so the frozen trunk's
BatchNorm normalises with batch statistics and updates its running
statistics; `trunk_bn='running'` keeps it in eval mode instead.

Variables are one tree with a subtree per model:
{'params': {'teacher', 'student', 'frn'}, 'batch_stats': {...}}.

The teacher's spe_f depends on the training image alone, so the input
pipeline computes it once per image (`frozen_features`,
fers_jax.feature_cache) and the step reads it from the batch
{'image', 'spe_f'}; given a bare image batch the step computes it.
"""

import dataclasses
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp

from fers_jax import (checkpoints, configs, convert, feature_cache, inference,
                      losses)
from fers_jax.configs import FerdConfig, FrnConfig, StudentConfig
from fers_jax.errors import InputError
from fers_jax.models import (FeatureRestorationNet, SpatialStudent,
                             SpectralTeacher)
from fers_jax.training import state

TRUNK_BN = ("batch", "running")


@dataclasses.dataclass(frozen=True)
class Stage2:
    """The stage-2 training task (hashable: it keys the jit cache).

    Attributes:
      teacher: the frozen teacher's sizes.
      student, frn: the sizes of what trains.
      trunk_bn: 'batch' (reference) or 'running' (eval-mode trunk BN).
      weights: loss weights (the reference's by default).
      fusion: the FERS map used for validation ('auto': as the reference).
    """
    teacher: FerdConfig
    student: StudentConfig
    frn: FrnConfig
    trunk_bn: str = "batch"
    weights: losses.Stage2Weights = losses.Stage2Weights()
    fusion: str = "auto"
    train_trunk: bool = False  # ablation (issue 10): the ResNet-34 trunk trains too

    name = "stage2"
    pretrained_kind = "resnet34"
    pretrained_name = "ResNet-34"

    def __post_init__(self):
        if self.trunk_bn not in TRUNK_BN:
            raise InputError(f"trunk_bn must be one of {TRUNK_BN}, got "
                             f"{self.trunk_bn!r}")
        bands = {self.teacher.bands, self.student.bands, self.frn.bands}
        if len(bands) != 1:
            raise InputError(f"teacher, student and restoration net must "
                             f"share one band count, got {sorted(bands)}")

    @property
    def bands(self) -> int:
        return self.student.bands

    def trainable(self, path) -> bool:
        return (path[0] == "frn"
                or (path[0] == "student"
                    and (path[1] != "trunk" or self.train_trunk)))

    def init_variables(self, key, shape, teacher_variables,
                       imagenet: Optional[str] = None):
        """Initial variables: the given teacher's, a randomly initialised
        student (its trunk from a torchvision .pth when `imagenet` is given)
        and restoration net."""
        x = jnp.zeros(shape, jnp.float32)
        k_student, k_frn = jax.random.split(key)
        student = state.jit_init(SpatialStudent(self.student))(k_student, x)
        student = {col: dict(tree) for col, tree in student.items()}
        if imagenet is not None:
            trunk, _ = convert.convert_file(self.pretrained_kind, imagenet,
                                            config=self.student)
            student = convert.insert_pretrained(student, trunk)
        frn = state.jit_init(FeatureRestorationNet(self.frn))(k_frn, x)
        parts = {"teacher": teacher_variables, "student": student, "frn": frn}
        return {col: {name: dict(v[col]) for name, v in parts.items() if col in v}
                for col in ("params", "batch_stats")}

    def teacher_features(self, teacher_variables, x):
        """The frozen teacher's spe_f (eval mode) for a batch."""
        return SpectralTeacher(self.teacher).apply(teacher_variables, x)["spe_f"]

    def frozen_features(self, variables, chunk: int = 16, folder=None) -> dict:
        """{'spe_f': FrozenFeatures} of the teacher in `variables`, for
        input_pipeline.Batches(features=...)."""
        teacher = {col: variables[col]["teacher"]
                   for col in ("params", "batch_stats")}
        return {"spe_f": feature_cache.FrozenFeatures(
            self.teacher_features, teacher, f"teacher {self.teacher}",
            chunk=chunk, folder=folder)}

    def forward(self, variables, x, train: bool, spe_f=None):
        """(spe_f, spa_f, recon, new batch_stats) for a batch; the teacher
        runs unless `spe_f` (its output for `x`) is given."""
        p, bs = variables["params"], variables["batch_stats"]
        if spe_f is None:
            spe_f = self.teacher_features(
                {"params": p["teacher"], "batch_stats": bs["teacher"]}, x)
        trunk_train = train and self.trunk_bn == "batch"
        out, s_upd = SpatialStudent(self.student).apply(
            {"params": p["student"], "batch_stats": bs["student"]}, x,
            train=trunk_train, mutable=["batch_stats"])
        spa_f = out["spa_f"]
        recon, f_upd = FeatureRestorationNet(self.frn).apply(
            {"params": p["frn"], "batch_stats": bs["frn"]}, spa_f + spe_f,
            train=train, mutable=["batch_stats"])
        new_bs = {"teacher": bs["teacher"], "student": s_upd["batch_stats"],
                  "frn": f_upd["batch_stats"]}
        return spe_f, spa_f, recon, new_bs

    def loss_fn(self, params, frozen, batch_stats, batch):
        """Training-mode forward and the stage-2 loss:
        (total, (terms, new batch_stats)). `batch`: images (N, H, W, B), or
        {'image': images, 'spe_f': the teacher's features of them}."""
        variables = {"params": state.merge(params, frozen),
                     "batch_stats": batch_stats}
        x, spe_f = (batch["image"], batch["spe_f"]) if isinstance(batch, dict) \
            else (batch, None)
        spe_f, spa_f, recon, new_bs = self.forward(variables, x, train=True,
                                                   spe_f=spe_f)
        total, terms = losses.stage2_loss(
            spe_f, spa_f, recon, x, self.weights,
            inference.resolve_fusion(self.fusion, self.bands))
        return total, (terms, new_bs)

    def features(self, variables, x):
        """Test-time features {'spe_f', 'spa_f'} (everything in eval mode)."""
        p, bs = variables["params"], variables["batch_stats"]
        spe_f = self.teacher_features(
            {"params": p["teacher"], "batch_stats": bs["teacher"]}, x)
        spa_f = SpatialStudent(self.student).apply(
            {"params": p["student"], "batch_stats": bs["student"]}, x)["spa_f"]
        return {"spe_f": spe_f, "spa_f": spa_f}

    def detection_map(self, x, feats):
        """The FERS map (sum above 50 bands, product at 50 and below)."""
        return inference.fers_map(x, feats["spe_f"], feats["spa_f"],
                                  self.fusion)

    def export(self, variables, folder) -> dict:
        """Writes `student/`, `frn/` and `teacher/` fers_jax checkpoints
        under `folder`: evaluate.py --method fers --teacher folder/teacher
        --student folder/student. Returns {name: path}."""
        folder = pathlib.Path(folder)
        out = {}
        for name, kind, config in (("student", "student", self.student),
                                   ("frn", "frn", self.frn),
                                   ("teacher", "teacher", self.teacher)):
            part = {col: tree[name] for col, tree in variables.items()
                    if name in tree}
            out[name] = str(checkpoints.save_variables(
                folder / name, part, checkpoints.model_meta(kind, config),
                overwrite=True))
        return out

    def describe(self) -> dict:
        return {"stage": self.name, "teacher": configs.to_dict(self.teacher),
                "student": configs.to_dict(self.student),
                "frn": configs.to_dict(self.frn), "trunk_bn": self.trunk_bn,
                "weights": self.weights._asdict(), "fusion": self.fusion,
                "train_trunk": self.train_trunk}


def task(teacher_config: FerdConfig, size: str = "full", **kwargs) -> Stage2:
    """The stage-2 task for a teacher, student and FRN at 'full' or 'tiny'."""
    bands = teacher_config.bands
    if size == "tiny":
        return Stage2(teacher_config, configs.student_tiny(bands),
                      configs.frn_tiny(bands), **kwargs)
    return Stage2(teacher_config, configs.student(bands), configs.frn(bands),
                  **kwargs)
