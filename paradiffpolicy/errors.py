"""Errors shared across modules (a leaf: imports nothing of the package)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match its configuration."""
