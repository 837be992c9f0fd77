"""Errors shared across modules (a leaf: imports nothing of the package)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match its configuration."""


class InferenceUnavailable(RuntimeError):
    """A policy call failed for the machinery, not the policy: its worker process died, its server
    could not be reached or did not answer in time. The caller holds, retries (after
    ``recover()``) and counts the fault; an episode hit by one is marked, not scored as a failure."""
