"""CLI commands (``flask --app main backup ...``). Each module here exports ``commands``: a list of click
commands or groups that ``cli.py`` adds to the ``backup`` group when one of them is run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from services.runtime import ROOT, Runtime, Settings

# Command name -> (module defining it, its one-line help): ``backup --help`` lists the commands from here and
# imports a module only to run one of its commands (tests/test_cli_imports.py holds this table to the modules).
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "couchdb": ("commands.couchdb", "Back up, restore and verify CouchDB / Cloudant databases."),
    "doctor": (
        "commands.doctor",
        "Check every plan (or PLAN) against the live project and print the fixes.",
    ),
    "directory": (
        "commands.files",
        "Timestamped directory copies: run one, verify one against its manifest, restore one.",
    ),
    "restore-disk": ("commands.disks", "Create disk NAME in ZONE from SNAPSHOT and wait until it is READY."),
    "restore-filestore": (
        "commands.files",
        "Restore BACKUP onto SHARE of INSTANCE, after taking a safety backup of that share.",
    ),
    "sqlsync": ("commands.sqlsync", "Copy production into staging with personal data masked (a plan of kind sqlsync)."),
    "trends": ("commands.trends", "Entities and bytes per kind of a datastore PLAN, one line per day with a good run."),
}


# Written by `make run` (localdev.py) while it runs, in its state folder: .local/, or BACKUP_LOCAL_STATE.
LOCAL_ENV_NAME = "env.json"
# What a command needs to reach `make run`'s emulators and queue; the admin token stays in .local/token.
LOCAL_KEYS = (
    "BACKUP_PROJECT",
    "DATASTORE_PROJECT_ID",
    "DATASTORE_EMULATOR_HOST",
    "STORAGE_EMULATOR_HOST",
    "BACKUP_DATASTORE_ADMIN_ENDPOINT",
    "BACKUP_EXPORT_LOCAL_ROOT",
    "BACKUP_SERVICE_URL",
    "BACKUP_QUEUE_BACKEND",
    "BACKUP_LOCAL_QUEUE_DB",
    "BACKUP_WORKER_URL",
    "BACKUP_CREDENTIALS",
    "BACKUP_PLANS",
)


def local_environment(path: Path | None = None) -> dict[str, str]:
    """The environment of a running ``make run`` (empty when none is running): the CLI uses its emulators and
    queue without anything to export, unless the caller chose a project or emulator of their own."""
    if path is None:
        path = Path(os.environ.get("BACKUP_LOCAL_STATE") or ROOT / ".local") / LOCAL_ENV_NAME
    try:
        recorded = json.loads(path.read_text())
        os.kill(int(recorded["pid"]), 0)  # still running?
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    env = recorded.get("env") if isinstance(recorded, dict) else None
    if not isinstance(env, dict):
        return {}
    return {k: str(v) for k, v in env.items() if k in LOCAL_KEYS}


def _with_local_environment() -> None:
    chosen = ("BACKUP_PROJECT", "GOOGLE_CLOUD_PROJECT", "DATASTORE_EMULATOR_HOST", "GAE_ENV", "K_SERVICE")
    if any(os.environ.get(name) for name in chosen):
        return
    for key, value in local_environment().items():
        os.environ.setdefault(key, value)  # the Google clients read the emulator hosts from the process


def _emulator_answers(host: str | None) -> None:
    """A Datastore emulator that is not running would make the client retry for a minute: say so at once."""
    import socket

    from commands.errors import EXIT_UNAVAILABLE, CliError

    if not host:
        return
    name, _, port = host.rpartition(":")
    try:
        with socket.create_connection((name or "127.0.0.1", int(port)), timeout=2):
            return
    except (OSError, ValueError):
        raise CliError(
            f"the Datastore emulator at {host} (DATASTORE_EMULATOR_HOST) is not answering: is `make run` running?",
            EXIT_UNAVAILABLE,
        ) from None


# Set to True in the root context's object by a command whose process may end without the interpreter's
# teardown (cli.main): a directory copy leaves large structures that take milliseconds to free one by one.
QUICK_EXIT = "quick_exit"


def quick_exit() -> None:
    """Let this process end without the interpreter's teardown once the command is over (see ``QUICK_EXIT``)."""
    root = click.get_current_context().find_root()
    if isinstance(root.obj, dict):
        root.obj[QUICK_EXIT] = True


def current_runtime() -> Runtime:
    """The Runtime of this CLI invocation: the Flask app's when run through ``flask``, else one from the env
    (with ``make run``'s emulators when it is running and nothing else was chosen)."""
    ctx = click.get_current_context()
    root = ctx.find_root()
    if isinstance(root.obj, dict) and "runtime" in root.obj:
        return root.obj["runtime"]
    _with_local_environment()
    _emulator_answers(os.environ.get("DATASTORE_EMULATOR_HOST"))
    runtime = Runtime(Settings.from_env())
    if not isinstance(root.obj, dict):
        root.obj = {}
    root.obj["runtime"] = runtime
    return runtime
