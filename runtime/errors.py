"""Errors a user can cause (bad checkpoint, bad option): callers show the message, not a traceback."""

from evalpipe.errors import UserError


class CheckpointError(UserError, ValueError):
    """A model directory, its config or its tensors are not what the runtime can load; the message names the field.

    A UserError, so the CLI prints it on one line and exits with code 2.
    """
