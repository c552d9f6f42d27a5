"""Loads every fixture module under tests/fixtures (one per local stand-in) and shares the common ones."""

import os
import tempfile
from pathlib import Path

# A `make run` going on in this checkout must not lend its emulators to the tests' CLI commands: the tests look
# for make run's state in a folder of their own.
os.environ["BACKUP_LOCAL_STATE"] = tempfile.mkdtemp(prefix="backup-tests-state-")

pytest_plugins = sorted(
    f"tests.fixtures.{path.stem}"
    for path in (Path(__file__).parent / "fixtures").glob("*.py")
    if path.stem != "__init__"
)
