"""Flax models of FERS / FERD (NHWC; variables {'params', 'batch_stats'})."""

from fers_jax.models.ferd import (Decoder, FerdNet, OneClassBottleneck,
                                  PixelClassifier, teacher_variables)
from fers_jax.models.frn import FeatureRestorationNet
from fers_jax.models.student import SpatialStudent
from fers_jax.models.teacher import SpectralTeacher

__all__ = ["Decoder", "FeatureRestorationNet", "FerdNet", "OneClassBottleneck",
           "PixelClassifier", "SpatialStudent", "SpectralTeacher",
           "teacher_variables"]
