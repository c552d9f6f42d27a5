"""CLI commands (``flask --app main backup ...``). Each module here exports ``commands``: a list of click
commands or groups that ``cli.py`` adds to the ``backup`` group."""

from __future__ import annotations

import click

from services.runtime import Runtime, Settings


def current_runtime() -> Runtime:
    """The Runtime of this CLI invocation: the Flask app's when run through ``flask``, else one from the env."""
    ctx = click.get_current_context()
    root = ctx.find_root()
    if isinstance(root.obj, dict) and "runtime" in root.obj:
        return root.obj["runtime"]
    runtime = Runtime(Settings.from_env())
    if not isinstance(root.obj, dict):
        root.obj = {}
    root.obj["runtime"] = runtime
    return runtime
