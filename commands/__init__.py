"""CLI commands (``flask --app main backup ...``). Each module here exports ``commands``: a list of click
commands or groups that ``cli.py`` adds to the ``backup`` group when one of them is run."""

from __future__ import annotations

import click

from services.runtime import Runtime, Settings

# Command name -> (module defining it, its one-line help): ``backup --help`` lists the commands from here and
# imports a module only to run one of its commands (tests/test_cli_imports.py holds this table to the modules).
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "couchdb": ("commands.couchdb", "Back up, restore and verify CouchDB / Cloudant databases."),
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


# Set to True in the root context's object by a command whose process may end without the interpreter's
# teardown (cli.main): a directory copy leaves large structures that take milliseconds to free one by one.
QUICK_EXIT = "quick_exit"


def quick_exit() -> None:
    """Let this process end without the interpreter's teardown once the command is over (see ``QUICK_EXIT``)."""
    root = click.get_current_context().find_root()
    if isinstance(root.obj, dict):
        root.obj[QUICK_EXIT] = True


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
