"""Loads every fixture module under tests/fixtures (one per local stand-in) and shares the common ones."""

from pathlib import Path

pytest_plugins = sorted(
    f"tests.fixtures.{path.stem}"
    for path in (Path(__file__).parent / "fixtures").glob("*.py")
    if path.stem != "__init__"
)
