"""`make run`: the whole service on this machine with no cloud account.

Starts the Datastore emulator (from the installed Cloud SDK) seeded with demo kinds, a GCS emulator with the demo
bucket, the app under gunicorn, the local queue's dispatcher and the local cron runner; triggers the demo plan
once and prints where to look. Ctrl-C stops everything it started. State lives in .local/.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from services import logs
from services.localcron import LocalCron
from services.queue import LocalDispatcher, LocalQueue, load_queue_configs
from services.schedule import load_cron

ROOT = Path(__file__).resolve().parent
STATE = ROOT / ".local"
PROJECT = "demo-backups"
DEMO_PLAN = "datastore-nightly"
DEMO_BUCKET = "demo-backups"
log = logging.getLogger("localdev")


def sdk_root() -> Path:
    gcloud = shutil.which("gcloud")
    if not gcloud:
        sys.exit("The Google Cloud SDK is needed for the Datastore emulator: install google-cloud-cli")
    out = subprocess.run([gcloud, "info", "--format=value(installation.sdk_root)"], capture_output=True, text=True)
    return Path(out.stdout.strip())


def wait_for(url: str, what: str, process: subprocess.Popen | None = None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            sys.exit(f"{what} exited with code {process.returncode}; see .local/*.log")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    sys.exit(f"{what} did not come up at {url} within {timeout:.0f}s")


def start_datastore(port: int) -> subprocess.Popen:
    jar = sdk_root() / "platform" / "cloud-datastore-emulator" / "CloudDatastore.jar"
    if not jar.exists():
        sys.exit(f"Datastore emulator missing ({jar}): install google-cloud-cli-datastore-emulator")
    if not shutil.which("java"):
        sys.exit("Java is needed for the Datastore emulator: install openjdk-17-jre-headless")
    log_file = open(STATE / "datastore.log", "w")  # noqa: SIM115 - lives as long as the emulator
    return subprocess.Popen(
        [
            "java",
            "-cp",
            str(jar),
            "com.google.cloud.datastore.emulator.CloudDatastore",
            "start",
            "--testing",
            "--host=127.0.0.1",
            f"--port={port}",
            "--store_on_disk=false",
            str(STATE / "datastore"),
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )


def seed_demo_data() -> None:
    from google.cloud import datastore, storage

    client = datastore.Client(project=PROJECT)
    if not list(client.query(kind="Customer").fetch(limit=1)):
        for i in range(20):
            customer = datastore.Entity(client.key("Customer", f"c{i}"))
            customer.update({"name": f"Customer {i}", "tier": "gold" if i % 5 == 0 else "standard"})
            order = datastore.Entity(client.key("Order", f"o{i}"))
            order.update({"customer": f"c{i}", "total": 10.5 * i})
            client.put_multi([customer, order])
        invoice = datastore.Entity(client.key("Invoice", "inv-1", namespace="acme"))
        invoice.update({"amount": 99})
        client.put(invoice)
    gcs = storage.Client(project=PROJECT)
    if gcs.lookup_bucket(DEMO_BUCKET) is None:
        gcs.create_bucket(DEMO_BUCKET)
        # The emulator keeps location and class only when patched; Datastore exports need both right.
        gcs._connection.api_request(
            method="PATCH", path=f"/b/{DEMO_BUCKET}", data={"location": "us-central1", "storageClass": "STANDARD"}
        )


def main() -> None:
    logs.configure(on_app_engine=False)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)  # one line per request is noise here
    STATE.mkdir(exist_ok=True)
    app_port = int(os.environ.get("PORT", "8080"))
    ds_port, gcs_port = app_port + 1, app_port + 2
    token = os.environ.get("BACKUP_LOCAL_TOKEN") or secrets.token_urlsafe(24)
    (STATE / "token").write_text(token + "\n")
    service_url = f"http://127.0.0.1:{app_port}"
    env = {
        "BACKUP_PROJECT": PROJECT,
        "DATASTORE_PROJECT_ID": PROJECT,
        "DATASTORE_EMULATOR_HOST": f"127.0.0.1:{ds_port}",
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs_port}",
        "BACKUP_DATASTORE_ADMIN_ENDPOINT": f"http://127.0.0.1:{ds_port}",
        "BACKUP_EXPORT_LOCAL_ROOT": str(STATE / "exports"),
        "BACKUP_LOCAL_TOKEN": token,
        "BACKUP_SERVICE_URL": service_url,
        "BACKUP_QUEUE_BACKEND": "local",
        "BACKUP_LOCAL_QUEUE_DB": str(STATE / "queue.sqlite3"),
    }
    os.environ.update(env)
    children: list[subprocess.Popen] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    dispatcher = cron = gcs_server = None
    try:
        children.append(start_datastore(ds_port))
        from gcp_storage_emulator.server import create_server

        gcs_server = create_server("127.0.0.1", gcs_port, in_memory=False, data_dir=str(STATE / "gcs"))
        gcs_server.start()
        wait_for(f"http://127.0.0.1:{ds_port}/", "the Datastore emulator", children[0])
        seed_demo_data()
        app_log = open(STATE / "app.log", "w")  # noqa: SIM115 - lives as long as the app
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--bind",
                    f"127.0.0.1:{app_port}",
                    "--workers",
                    "1",
                    "--threads",
                    "8",
                    "--timeout",
                    "0",
                    "main:app",
                ],
                cwd=ROOT,
                env=os.environ.copy(),
                stdout=app_log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(f"{service_url}/healthz", "the app", children[-1])
        queue = LocalQueue(STATE / "queue.sqlite3")
        dispatcher = LocalDispatcher(queue, service_url, token, load_queue_configs(ROOT / "queue.yaml")).start()
        cron = LocalCron(load_cron(ROOT / "cron.yaml"), service_url, token).start()
        started = requests.post(
            f"{service_url}/admin/plans/{DEMO_PLAN}/run", headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
        print(
            f"""
backup-scheduler is running on {service_url} (app log: .local/app.log)
  demo plan '{DEMO_PLAN}' started: {started.text.strip()}
  runs:        curl -H "Authorization: Bearer $(cat .local/token)" {service_url}/runs
  run a plan:  curl -X POST -H "Authorization: Bearer $(cat .local/token)" {service_url}/admin/plans/{DEMO_PLAN}/run
  CLI:         BACKUP_LOCAL_QUEUE_DB=.local/queue.sqlite3 DATASTORE_EMULATOR_HOST=127.0.0.1:{ds_port} \\
               BACKUP_PROJECT={PROJECT} ./backup runs
  exports:     gs://{DEMO_BUCKET}/datastore/... in the GCS emulator ({env["STORAGE_EMULATOR_HOST"]}), .local/exports
Ctrl-C stops everything.
""",
            flush=True,
        )
        while not stop.is_set():
            for child in children:
                if child.poll() is not None:
                    log.error("%s exited with %s; stopping", child.args[0], child.returncode)
                    stop.set()
            stop.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping ...", flush=True)
        for part in (cron, dispatcher):
            if part is not None:
                part.stop()
        for child in reversed(children):
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        if gcs_server is not None:
            gcs_server.stop()


if __name__ == "__main__":
    main()
