"""Errors a user can cause (bad checkpoint, bad option): callers show the message, not a traceback."""


class CheckpointError(ValueError):
    """A model directory, its config or its tensors are not what the runtime can load; the message names the field."""
