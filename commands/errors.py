"""How the CLI reports an error: one ``Error:`` line on stderr and an exit code a script can act on.

The codes follow sysexits(3), as ``sqlsync`` already did, so "try again later" (75) is told apart from "fix
something first" (77, 78) and from "the work itself failed" (1). docs/cli.md lists them; commands with codes of
their own (``couchdb``: mismatch, not empty) document those beside their help.
"""

from __future__ import annotations

import click

EXIT_FAILED = 1  # the work failed: a fan-out, a restore, a check found a problem
EXIT_USAGE = 2  # a bad argument or option, an unknown plan (click's own code for usage errors)
EXIT_UNAVAILABLE = 69  # a service could not be reached: an emulator, a Google API, a database
EXIT_SOFTWARE = 70  # an error nobody expected: a bug (rerun with --debug and report the traceback)
EXIT_TEMPFAIL = 75  # worth retrying: quota, rate limits, a service briefly unavailable
EXIT_NOPERM = 77  # no credentials, or the credentials are not allowed to do this
EXIT_CONFIG = 78  # plans.yaml, cron.yaml, queue.yaml or a setting is invalid

NO_CREDENTIALS = (
    "no Google credentials found: run `gcloud auth application-default login` (or set"
    " GOOGLE_APPLICATION_CREDENTIALS), or start `make run` to use the local emulators"
)


class CliError(click.ClickException):
    """An error shown as one line, with the exit code saying what kind of error it is."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


def _first_line(text: object, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def explain(exc: BaseException) -> CliError:
    """The one-line error and exit code for ``exc``, an exception a command did not handle itself."""
    import requests
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    from services.errors import BackupError, ConfigError, PermanentError, TargetGone, TransientError

    if isinstance(exc, ConfigError):
        return CliError(_first_line(exc), EXIT_CONFIG)
    if isinstance(exc, auth.DefaultCredentialsError):
        return CliError(NO_CREDENTIALS, EXIT_NOPERM)
    if isinstance(exc, auth.RefreshError):
        return CliError(f"Google credentials were refused: {_first_line(exc)}", EXIT_NOPERM)
    if isinstance(exc, api.Unauthenticated | api.PermissionDenied | api.Forbidden):
        return CliError(f"not allowed: {_first_line(exc.message)}", EXIT_NOPERM)
    if isinstance(exc, api.TooManyRequests | api.ResourceExhausted):
        return CliError(f"rate limited, try again later: {_first_line(exc.message)}", EXIT_TEMPFAIL)
    if isinstance(exc, api.ServiceUnavailable | api.DeadlineExceeded | api.RetryError | auth.TransportError):
        return CliError(f"could not reach the service: {_first_line(exc)}", EXIT_UNAVAILABLE)
    if isinstance(exc, requests.ConnectionError | requests.Timeout | ConnectionError):
        return CliError(f"could not connect: {_first_line(exc)}", EXIT_UNAVAILABLE)
    if isinstance(exc, api.GoogleAPICallError):
        return CliError(f"{type(exc).__name__}: {_first_line(exc.message)}", EXIT_FAILED)
    if isinstance(exc, TransientError):
        return CliError(f"{_first_line(exc)} (worth retrying)", EXIT_TEMPFAIL)
    if isinstance(exc, PermanentError | TargetGone | BackupError):
        return CliError(_first_line(exc), EXIT_FAILED)
    if isinstance(exc, OSError) and exc.filename:
        return CliError(f"{exc.strerror or type(exc).__name__}: {exc.filename}", EXIT_FAILED)
    return CliError(
        f"unexpected {type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the traceback)", EXIT_SOFTWARE
    )
