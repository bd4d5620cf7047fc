"""What a training run does, as data: one record per run (train.py's options).

`TrainConfig` holds every setting; `tiny(...)` is the small variant the
tests and quick CPU runs use (tiny model sizes, small patches, few steps).
Model sizes themselves live in fers_jax.configs.
"""

import dataclasses
from typing import Optional, Tuple

from fers_jax.errors import InputError
from fers_jax.losses import Stage2Weights

STAGES = ("stage1", "stage2")
MODEL_SIZES = ("full", "tiny")
SELECT = ("val", "test", "none")

# The reference's fixed seeds, by (sensor, bands) (SPEC 5).
SEEDS = {("aviris_ng", 200): 820, ("aviris_ng", 100): 810,
         ("aviris_ng", 50): 370, ("aviris", 200): 850}
FALLBACK_SEED = 0


def default_seed(bands: int, sensor: str = "aviris_ng") -> int:
    """The reference's seed for this sensor and band count (0 if it has none)."""
    return SEEDS.get((sensor, bands), FALLBACK_SEED)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
      stage: 'stage1' (FERD reverse distillation) or 'stage2' (FERS student).
      data: HAD100 roots (their train split of `sensor`), scene files or
        folders (cut into background patches), or a built TFDS dataset folder.
      bands, band_start: the first `bands` bands from `band_start`.
      out: the run's folder.
      teacher: stage 2's frozen teacher (published folder, PyTorch stage-1
        file, or a fers_jax teacher/stage1 checkpoint).
      model: 'full' (published sizes) or 'tiny'.
      epochs, steps: length; `steps` (total optimiser steps) overrides epochs.
      batch_size: images per step.
      patch_size, stride: background patches cut from scene files
        (stride None: patch_size).
      augment: turn each training image by a symmetry of the square drawn
        per (seed, epoch, image) (input_pipeline.Batches; an ablation, the
        reference does not).
      val, test: scenes scored after every epoch (mAUC). `test` defaults to
        the test split of HAD100 roots in `data`.
      select: which mAUC picks the best epoch: 'val', 'test' or 'none';
        None: 'val' when `val` is given, else 'test' when there are test
        scenes (the reference's choice), else 'none'.
      resume: continue from the latest checkpoint in `out`.
      imagenet: torchvision .pth of the frozen backbone (Wide-ResNet-101-2
        for stage 1, ResNet-34 for stage 2); None: random init.
      seed: PRNG seed; None: the reference's for (sensor, bands).
      train_trunk: stage 2: the ResNet-34 trunk trains too (an ablation;
        the reference freezes it).
      seeds: K: train K replicas, seeds `seed` .. `seed` + K - 1, in one
        program (one step over the stacked replicas; OUT/seed_<s>/ each, OUT/seeds.json);
        None: one run.
      sensor: HAD100 sensor folder ('aviris_ng' or 'aviris').
      learning_rate, b1, b2, eps: Adam, as torch.optim.Adam.
      trunk_bn: stage 2: 'running' (default: the frozen trunk's BatchNorm in
        eval mode, as at inference) or 'batch' (the reference's train-mode
        quirk; with a random trunk it trains students that collapse at
        inference, see README "Trained models").
      bce_on_logits: stage 1: BCE on the logits instead of the reference's
        BCE on the sigmoid output.
      loss_weights: stage 2: 'name=value,...' overriding the reference's loss
        weights (losses.Stage2Weights: cc, cos, var, mse, ssim, and l1, the
        variance term's L1 part on its own); None: the reference's.
      feature_cache: stage 2: a folder keeping the frozen teacher's spe_f
        of every training image as files (None: in memory, for this run).
      checkpoint_every: also save every this many steps (None: each epoch).
      log_every: write a step record to metrics.jsonl every this many steps.
      progress: show a progress bar.
    """
    stage: str
    data: Tuple[str, ...]
    bands: int
    out: str
    teacher: Optional[str] = None
    model: str = "full"
    epochs: int = 60
    steps: Optional[int] = None
    batch_size: int = 16
    band_start: int = 0
    patch_size: int = 64
    stride: Optional[int] = None
    augment: bool = False
    val: Tuple[str, ...] = ()
    test: Tuple[str, ...] = ()
    select: Optional[str] = None
    resume: bool = False
    imagenet: Optional[str] = None
    seed: Optional[int] = None
    seeds: Optional[int] = None
    sensor: str = "aviris_ng"
    learning_rate: float = 0.005
    b1: float = 0.5
    b2: float = 0.999
    eps: float = 1e-8
    trunk_bn: str = "running"
    bce_on_logits: bool = False
    feature_cache: Optional[str] = None
    loss_weights: Optional[str] = None
    train_trunk: bool = False
    checkpoint_every: Optional[int] = None
    log_every: int = 1
    progress: bool = True

    def __post_init__(self):
        def positive(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got "
                                 f"{value!r}")
        if self.stage not in STAGES:
            raise InputError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.model not in MODEL_SIZES:
            raise InputError(f"the model size (--config) must be one of "
                             f"{MODEL_SIZES}, got {self.model!r}")
        if self.select is not None and self.select not in SELECT:
            raise InputError(f"--select must be one of {SELECT}, got "
                             f"{self.select!r}")
        if not self.data:
            raise InputError("no training data: give --data PATH")
        for name in ("bands", "epochs", "batch_size", "patch_size", "log_every"):
            positive(name, getattr(self, name))
        for name in ("steps", "stride", "checkpoint_every", "seeds"):
            positive(name, getattr(self, name), allow_none=True)
        if self.seed is not None and (not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise InputError(f"seed must be a non-negative integer, got "
                             f"{self.seed!r}")
        if self.learning_rate <= 0:
            raise InputError(f"the learning rate must be positive, got "
                             f"{self.learning_rate}")
        if self.loss_weights is not None:
            if self.stage != "stage2":
                raise InputError("--loss-weights is a stage-2 option")
            # Measured hang, not diagnosed: train.py --seeds with the fa term
            # stopped in its first step (XLA:CPU workers idle); one seed at a
            # time, and the same K-seed step outside train.py, ran.
            if self.stage2_weights.fa and (self.seeds or 1) > 1:
                raise InputError("--loss-weights fa with --seeds: that "
                                 "combination hung on CPU; train each seed on "
                                 "its own (--seed S)")
        if self.stage == "stage2" and not self.teacher:
            raise InputError("stage 2 needs --teacher CKPT (a published "
                             "teacher folder or a stage-1 checkpoint)")

    @property
    def run_seed(self) -> int:
        return self.seed if self.seed is not None else default_seed(
            self.bands, self.sensor)

    @property
    def stage2_weights(self) -> Stage2Weights:
        return Stage2Weights.parse(self.loss_weights or "")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def tiny(stage: str, data, bands: int, out: str, **overrides) -> TrainConfig:
    """The small variant: tiny models on 24x24 patches, a short run."""
    fields = dict(model="tiny", patch_size=24, stride=24, batch_size=4,
                  epochs=2, progress=False)
    fields.update(overrides)
    return TrainConfig(stage=stage, data=tuple(data), bands=bands, out=out,
                       **fields)
