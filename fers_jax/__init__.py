"""fers_jax: FERS / FERD hyperspectral anomaly detection in JAX and Flax."""

from fers_jax.errors import CheckpointError, FersError, InputError

__all__ = ["CheckpointError", "FersError", "InputError"]
__version__ = "0.1.0"
