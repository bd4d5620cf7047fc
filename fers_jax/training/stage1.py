"""Stage 1, FERD reverse distillation (SPEC 4): what trains and its loss.

ConvH, the one-class bottleneck, the decoder, de_ConvH and the pixel
classifier (head + conv3) train; the Wide-ResNet-101-2 encoder is frozen
(ImageNet weights, eval-mode BatchNorm). After training, the spectral
teacher is the ConvH + encoder layer1 + head part (`teacher_variables`).
"""

import dataclasses
import pathlib
from typing import Optional

import jax.numpy as jnp

from fers_jax import checkpoints, configs, convert, inference, losses
from fers_jax.configs import FerdConfig
from fers_jax.models import FerdNet, SpectralTeacher, teacher_variables
from fers_jax.training import state

FROZEN = ("encoder",)


@dataclasses.dataclass(frozen=True)
class Stage1:
    """The stage-1 training task (hashable: it keys the jit cache).

    Attributes:
      config: the stage-1 graph's sizes.
      weights: loss weights (the reference's by default).
      bce_on_logits: False reproduces the reference's BCE on the sigmoid
        output (see losses.stage1_loss); True is the textbook form.
    """
    config: FerdConfig
    weights: losses.Stage1Weights = losses.Stage1Weights()
    bce_on_logits: bool = False

    name = "stage1"
    # The ImageNet net whose weights fill the frozen encoder (convert kind).
    pretrained_kind = "wrn101"
    pretrained_name = "Wide-ResNet-101-2"

    @property
    def bands(self) -> int:
        return self.config.bands

    @property
    def model(self) -> FerdNet:
        return FerdNet(self.config)

    def trainable(self, path) -> bool:
        return path[0] not in FROZEN

    def init_variables(self, key, shape, imagenet: Optional[str] = None):
        """Random initial variables for inputs of `shape` (N, H, W, B), with
        the encoder's from a torchvision .pth when `imagenet` is given."""
        variables = state.jit_init(self.model)(key, jnp.zeros(shape, jnp.float32))
        variables = {col: dict(tree) for col, tree in variables.items()}
        if imagenet is not None:
            pretrained, _ = convert.convert_file(self.pretrained_kind, imagenet,
                                                 config=self.config)
            variables = convert.insert_pretrained(variables, pretrained)
        return variables

    def loss_fn(self, params, frozen, batch_stats, x):
        """One training-mode forward and the stage-1 loss.

        Returns (total, (terms, new batch_stats)); the encoder's running
        statistics come back unchanged (it always runs in eval mode).
        """
        variables = {"params": state.merge(params, frozen),
                     "batch_stats": batch_stats}
        out, updates = self.model.apply(variables, x, train=True,
                                        mutable=["batch_stats"])
        total, terms = losses.stage1_loss(out, x, self.weights,
                                          self.bce_on_logits)
        return total, (terms, updates["batch_stats"])

    def teacher(self, variables):
        """(SpectralTeacher, its variables) inside stage-1 variables."""
        return (SpectralTeacher(self.config),
                teacher_variables(variables, self.config))

    def features(self, variables, x):
        """Test-time features {'spe_f'} of a batch (N, H, W, B)."""
        teacher, tv = self.teacher(variables)
        return {"spe_f": teacher.apply(tv, x)["spe_f"]}

    @staticmethod
    def detection_map(x, feats):
        """FERD: RX(x + spe_f), the map the reference's epoch mAUC scores."""
        return inference.ferd_map(x, feats["spe_f"])

    def export(self, variables, folder) -> dict:
        """Writes `stage1/` (the whole graph) and `teacher/` (its FEN) as
        fers_jax checkpoints under `folder`; either is a --teacher for
        evaluate.py and stage 2. Returns {name: path}."""
        folder = pathlib.Path(folder)
        _, tv = self.teacher(variables)
        return {
            "stage1": str(checkpoints.save_variables(
                folder / "stage1", variables,
                checkpoints.model_meta("stage1", self.config), overwrite=True)),
            "teacher": str(checkpoints.save_variables(
                folder / "teacher", tv,
                checkpoints.model_meta("teacher", self.config), overwrite=True)),
        }

    def describe(self) -> dict:
        return {"stage": self.name, "config": configs.to_dict(self.config),
                "weights": self.weights._asdict(),
                "bce_on_logits": self.bce_on_logits}


def task(bands: int, size: str = "full", **kwargs) -> Stage1:
    """The stage-1 task at the published ('full') or 'tiny' sizes."""
    config = configs.ferd_tiny(bands) if size == "tiny" else configs.ferd(bands)
    return Stage1(config, **kwargs)
