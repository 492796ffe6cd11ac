"""Errors a user can cause or fix. The CLI prints their message on one line and exits with `exit_code`."""

from __future__ import annotations

# A mistake in the input (config, task, data): exit code 2, nothing written. The class is the runtime's, so that
# a runtime error (a CheckpointError from `evalpipe serve`, say) is a UserError here too; runtime never imports evalpipe.
from runtime.errors import UserError


class EndpointError(UserError):
    """The endpoint cannot be reached or does not behave like an OpenAI server: exit code 3."""

    exit_code = 3
