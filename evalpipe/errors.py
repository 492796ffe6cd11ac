"""Errors a user can cause or fix. The CLI prints their message on one line and exits with `exit_code`."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the input (config, task, data): exit code 2, nothing written."""

    exit_code = 2


class EndpointError(UserError):
    """The endpoint cannot be reached or does not behave like an OpenAI server: exit code 3."""

    exit_code = 3
