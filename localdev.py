"""`make run`: the whole service on this machine with no cloud account.

Starts the Datastore emulator (from the installed Cloud SDK) seeded with demo kinds, a GCS emulator with the demo
bucket, the app under gunicorn, a second gunicorn standing in for the Cloud Run worker (the queues in
BACKUP_WORKER_QUEUES go there, as in production), the local queue's dispatcher and the local cron runner; triggers
the demo plan once and prints where to look. Ctrl-C stops everything it started. State lives in .local/ (or
BACKUP_LOCAL_STATE); BACKUP_PLANS and BACKUP_JOB_BUDGET_SECONDS are honoured as by the service.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from services import logs
from services.errors import ConfigError
from services.local_emulators import datastore_emulator_command
from services.localcron import LocalCron
from services.queue import LocalDispatcher, LocalQueue, load_queue_configs
from services.schedule import load_cron

ROOT = Path(__file__).resolve().parent
STATE = Path(os.environ.get("BACKUP_LOCAL_STATE") or ROOT / ".local").resolve()
PROJECT = "demo-backups"
DEMO_PLAN = "datastore-nightly"
DEMO_BUCKET = "demo-backups"
log = logging.getLogger("localdev")


def wait_for(
    url: str, what: str, process: subprocess.Popen | None = None, timeout: float = 90, log_name: str | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = ""
            if log_name and (STATE / log_name).exists():
                lines = (STATE / log_name).read_text(errors="replace").splitlines()
                tail = "\n" + "\n".join(f"  | {line}" for line in lines[-15:])  # the error is at the end
            sys.exit(f"{what} exited with code {process.returncode} (.local/{log_name or '*.log'}):{tail}")
        try:
            if requests.get(url, timeout=5).status_code < 500:
                return
        except requests.RequestException:
            pass  # not listening yet, or still importing
        time.sleep(0.2)
    sys.exit(f"{what} did not come up at {url} within {timeout:.0f}s")


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (0600), whatever the umask and an older file say."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def env_for_cli(env: dict[str, str]) -> dict[str, str]:
    """What ./backup needs from this run (commands.LOCAL_KEYS): never the admin token."""
    from commands import LOCAL_KEYS

    return {key: value for key, value in env.items() if key in LOCAL_KEYS}


def start_gunicorn(port: int, log_name: str) -> subprocess.Popen:
    """The app (the same code serves App Engine and the Cloud Run worker) on 127.0.0.1:``port``."""
    log_file = open(STATE / log_name, "w")  # noqa: SIM115 - lives as long as the process
    command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "8"]
    command += ["--timeout", "0", "--no-control-socket", "main:app"]  # two servers: no shared socket in ~/
    return subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(), stdout=log_file, stderr=subprocess.STDOUT)


def start_datastore(port: int) -> subprocess.Popen:
    try:
        command = datastore_emulator_command(port, STATE / "datastore", on_disk=True)
    except ConfigError as exc:
        sys.exit(str(exc))
    log_file = open(STATE / "datastore.log", "w")  # noqa: SIM115 - lives as long as the emulator
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)


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


def drill_when_backed_up(service_url: str, auth: dict[str, str], stop: threading.Event) -> None:
    """Once the demo plan's first backups are good, ask for the drills that are due (cron asks hourly), so a
    newcomer sees a restore drill and its time without waiting for the hour."""
    while not stop.wait(2.0):
        try:
            runs = requests.get(f"{service_url}/runs?plan={DEMO_PLAN}", headers=auth, timeout=10).json()
        except (requests.RequestException, ValueError):
            continue
        targets = runs.get("targets") or []
        if targets and all(t.get("last_good_output") for t in targets):
            answer = requests.get(f"{service_url}/cron/_drills", headers=auth, timeout=30)
            log.info("restore drills of %s requested: %s", DEMO_PLAN, answer.text.strip())
            return


def port_in_use(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def check_before_starting(ports: dict[str, int]) -> None:
    """Refuse at once, in one line, what would otherwise fail later and less clearly: a port taken (another
    `make run`, most likely: its readiness checks would answer ours) or plans that do not load."""
    for what, port in ports.items():
        if port_in_use(port):
            sys.exit(
                f"make run: port {port} ({what}) is in use, probably by another `make run` (see `lsof -i :{port}`):"
                f" stop it, or use other ports: PORT={ports['the app'] + 100} make run"
            )
    from services.deployment import check_deployment_files
    from services.plans import load_plans

    plans_path = Path(os.environ.get("BACKUP_PLANS") or ROOT / "plans.yaml")
    try:
        check_deployment_files(load_plans(plans_path), ROOT / "queue.yaml", ROOT / "cron.yaml")
    except ConfigError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        sys.exit(78)


def main() -> None:
    logs.configure(on_app_engine=False)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)  # one line per request is noise here
    app_port = int(os.environ.get("PORT", "8080"))
    ds_port, gcs_port, worker_port = app_port + 1, app_port + 2, app_port + 3
    check_before_starting(
        {
            "the app": app_port,
            "the Datastore emulator": ds_port,
            "the GCS emulator": gcs_port,
            "the worker": worker_port,
        }
    )
    STATE.mkdir(mode=0o700, exist_ok=True)
    STATE.chmod(0o700)  # run records, exports and the token: this user's only
    token = os.environ.get("BACKUP_LOCAL_TOKEN") or secrets.token_urlsafe(24)
    write_private(STATE / "token", token + "\n")
    signin_code = secrets.token_urlsafe(16)  # one use: the link printed below signs one browser in
    service_url = f"http://127.0.0.1:{app_port}"
    worker_url = f"http://127.0.0.1:{worker_port}"
    env = {
        "BACKUP_PROJECT": PROJECT,
        "DATASTORE_PROJECT_ID": PROJECT,
        "DATASTORE_EMULATOR_HOST": f"127.0.0.1:{ds_port}",
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs_port}",
        "BACKUP_DATASTORE_ADMIN_ENDPOINT": f"http://127.0.0.1:{ds_port}",
        "BACKUP_EXPORT_LOCAL_ROOT": str(STATE / "exports"),
        "BACKUP_LOCAL_TOKEN": token,
        "BACKUP_LOCAL_SIGNIN_CODE": signin_code,
        "BACKUP_SERVICE_URL": service_url,
        "BACKUP_WORKER_URL": worker_url,
        "BACKUP_QUEUE_BACKEND": "local",
        "BACKUP_LOCAL_QUEUE_DB": str(STATE / "queue.sqlite3"),
    }
    # The demo talks only to emulators; your own plans (BACKUP_PLANS) against real APIs want BACKUP_CREDENTIALS=default.
    env.setdefault("BACKUP_CREDENTIALS", os.environ.get("BACKUP_CREDENTIALS", "anonymous"))
    os.environ.update(env)
    # The CLI (./backup) reads this while we run, so its commands reach these emulators with nothing exported.
    write_private(STATE / "env.json", json.dumps({"pid": os.getpid(), "env": env_for_cli(dict(os.environ))}))
    children: list[subprocess.Popen] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    dispatcher = cron = gcs_server = None
    try:
        children.append(start_datastore(ds_port))
        from gcp_storage_emulator.server import create_server

        gcs_server = create_server("127.0.0.1", gcs_port, in_memory=False, data_dir=str(STATE / "gcs"))
        gcs_server.start()
        wait_for(f"http://127.0.0.1:{ds_port}/", "the Datastore emulator", children[0], log_name="datastore.log")
        seed_demo_data()
        children.append(start_gunicorn(app_port, "app.log"))
        wait_for(f"{service_url}/healthz", "the app", children[-1], log_name="app.log")
        children.append(start_gunicorn(worker_port, "worker.log"))
        wait_for(f"{worker_url}/healthz", "the worker", children[-1], log_name="worker.log")
        worker_queues = [q.strip() for q in os.environ.get("BACKUP_WORKER_QUEUES", "directory,sqlsync").split(",")]
        queue = LocalQueue(STATE / "queue.sqlite3")
        dispatcher = LocalDispatcher(
            queue,
            service_url,
            token,
            load_queue_configs(ROOT / "queue.yaml"),
            routes={name: worker_url for name in worker_queues if name},
        ).start()
        cron = LocalCron(load_cron(ROOT / "cron.yaml"), service_url, token).start()
        auth = {"Authorization": f"Bearer {token}", "X-Backup-Client": "make-run"}
        started = requests.post(f"{service_url}/admin/plans/{DEMO_PLAN}/run", headers=auth, timeout=60)
        threading.Thread(target=drill_when_backed_up, args=(service_url, auth, stop), daemon=True).start()
        print(
            f"""
backup-scheduler is running on {service_url} (app log: .local/app.log)
  demo plan '{DEMO_PLAN}' started: {started.text.strip()}
               its restore drill follows once every kind is backed up (restore times on the status page)
  status page: {service_url}/signin?code={signin_code}
               (open it once in your browser: it signs that browser in for this run)
  status JSON: curl -H "Authorization: Bearer $(cat .local/token)" {service_url}/api/status
  runs:        curl -H "Authorization: Bearer $(cat .local/token)" {service_url}/runs
  run a plan:  curl -X POST -H "Authorization: Bearer $(cat .local/token)" -H "X-Backup-Client: curl" \\
               {service_url}/admin/plans/{DEMO_PLAN}/run
  CLI:         ./backup runs    (uses these emulators while make run is running)
  exports:     gs://{DEMO_BUCKET}/datastore/... in the GCS emulator ({env["STORAGE_EMULATOR_HOST"]}), .local/exports
Ctrl-C stops everything.
""",
            flush=True,
        )
        while not stop.is_set():
            for child in children:
                if child.poll() is not None:
                    # Ctrl-C reaches the children too: one that stopped cleanly is not an error.
                    level = logging.INFO if child.returncode in (0, -signal.SIGINT, -signal.SIGTERM) else logging.ERROR
                    log.log(level, "%s exited with %s; stopping", child.args[0], child.returncode)
                    stop.set()
            stop.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave children behind
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
        (STATE / "env.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
