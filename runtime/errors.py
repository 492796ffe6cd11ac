"""Errors a user can cause (bad checkpoint, bad option): callers show the message, not a traceback.

`UserError` is the base of every such error in both packages: evalpipe's errors derive from it too
(evalpipe.errors re-exports it), so one handler (runtime.console.user_errors) serves every command.
"""


class UserError(Exception):
    """A mistake the user can fix: the CLI prints `error: <message>` on one line and exits with `exit_code`."""

    exit_code = 2


class CheckpointError(UserError, ValueError):
    """A model directory, its config or its tensors are not what the runtime can load; the message names the field.

    A UserError, so the CLI prints it on one line and exits with code 2.
    """
