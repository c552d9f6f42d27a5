"""What a fresh clone on another machine needs: nothing tracked points outside the repository, no tracked file
names a path of the machine it was written on, and every dependency is locked with hashes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from services.runtime import ROOT

# Home and work folders of a machine: a tracked file naming one only works where that folder exists.
_MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:home|root|Users|work|mnt/data)/[\w.-]+")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def tracked_files() -> list[tuple[str, str]]:
    """(mode, path) of every file git tracks here; this test needs the checkout's git metadata."""
    listing = subprocess.run(
        ["git", "ls-files", "-s", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
    ).stdout
    entries = []
    for entry in filter(None, listing.split("\0")):
        meta, path = entry.split("\t", 1)
        entries.append((meta.split()[0], path))
    return entries


def test_no_tracked_symlink_leaves_the_repository():
    escaping = []
    for mode, path in tracked_files():
        if mode != "120000":
            continue
        target = os.readlink(ROOT / path)
        resolved = Path(os.path.normpath(ROOT / Path(path).parent / target))
        if os.path.isabs(target) or not resolved.is_relative_to(ROOT):
            escaping.append(f"{path} -> {target}")

    assert escaping == []


def test_no_tracked_text_names_a_machine_path():
    this_file = Path(__file__).relative_to(ROOT).as_posix()
    found = []
    for mode, path in tracked_files():
        if mode == "120000" or path == this_file:
            continue
        try:
            text = (ROOT / path).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary files (screenshots); a deleted file is not in a fresh clone either
        found.extend(f"{path}: {m.group(0)}" for m in _MACHINE_PATH.finditer(text))
        checkout = str(ROOT) + "/"
        if checkout in text:
            found.append(f"{path}: names this checkout's folder {checkout}")

    assert found == []


def test_the_installer_is_pinned_with_hashes_before_anything_else_is_installed():
    # pip 23, which a fresh Python 3.11 venv brings, refuses a hash-locked package asked for with an extra.
    pins = _PIN.findall((ROOT / "requirements-pip.txt").read_text())
    assert [name for name, _ in pins] == ["pip"]
    assert "--hash=sha256:" in (ROOT / "requirements-pip.txt").read_text()
    recipe = (ROOT / "Makefile").read_text()
    assert recipe.index("-r requirements-pip.txt") < recipe.index("-r requirements-dev.txt")


def test_every_dependency_is_locked_with_hashes_and_the_lock_matches_its_input():
    for lock, source in (("requirements.txt", "requirements.in"), ("requirements-dev.txt", "requirements-dev.in")):
        text = (ROOT / lock).read_text()
        blocks = [b for b in re.split(r"\n(?=[A-Za-z0-9])", text) if _PIN.match(b)]
        locked = {m.group(1).lower().replace("_", "-"): m.group(2) for m in (_PIN.match(b) for b in blocks) if m}
        assert blocks and all("--hash=sha256:" in block for block in blocks), f"{lock}: a pin without hashes"
        wanted = dict(_PIN.findall((ROOT / source).read_text()))
        for name, version in wanted.items():
            assert locked.get(name.lower().replace("_", "-")) == version, f"{lock}: {name} is not {version} (make lock)"
