"""Errors that fers_jax raises for problems a user can fix.

Every entry point catches `FersError` and prints its message on one line, so
a message must name the file (or argument) and the problem.
"""


class FersError(Exception):
    """Base class: a problem with the user's input, files or settings."""


class InputError(FersError, ValueError):
    """A scene, array or argument that fers_jax cannot use as given."""


class CheckpointError(FersError):
    """A checkpoint that is missing, corrupt, unsafe or of the wrong model."""
