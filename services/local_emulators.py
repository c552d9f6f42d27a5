"""Where the Cloud SDK's emulators are and how to start them: shared by `make run` (localdev.py) and the tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from services.errors import ConfigError


def sdk_root() -> Path:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise ConfigError(
            "the Google Cloud SDK is not installed: install google-cloud-cli with its Datastore emulator"
            " (google-cloud-cli-datastore-emulator)"
        )
    out = subprocess.run([gcloud, "info", "--format=value(installation.sdk_root)"], capture_output=True, text=True)
    return Path(out.stdout.strip())


def datastore_emulator_command(port: int, data_dir: Path, on_disk: bool = False) -> list[str]:
    """The command line of the Datastore emulator on 127.0.0.1:``port``, strongly consistent; in memory, or
    (``on_disk``: `make run`, so run history survives a restart) kept in ``data_dir``."""
    jar = sdk_root() / "platform" / "cloud-datastore-emulator" / "CloudDatastore.jar"
    if not jar.exists():
        raise ConfigError(f"Datastore emulator not found at {jar}: install google-cloud-cli-datastore-emulator")
    if shutil.which("java") is None:
        raise ConfigError("java is not installed: the Datastore emulator needs Java 11+ (openjdk-17-jre-headless)")
    return [
        "java", "-cp", str(jar), "com.google.cloud.datastore.emulator.CloudDatastore", "start", "--testing",
        "--host=127.0.0.1", f"--port={port}", f"--store_on_disk={str(on_disk).lower()}", "--consistency=1.0",
        str(data_dir),
    ]  # fmt: skip
