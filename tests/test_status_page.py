"""The status page in a real headless browser (Debian's chromium driven by Playwright), plus /api/status and
/metrics. The page must load, show a red target with its error, and refuse a caller without admin auth."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from main import create_app
from services.catalog import FAILED, Catalog
from services.runtime import ROOT
from tests.alerting import AUTH, finished_run, kind_plan, make_plan
from tests.helpers import LOCAL_TOKEN, Clock, make_runtime

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
INVOICE_ERROR = "PERMISSION_DENIED: backup@demo.iam lacks storage.objects.create on bucket demo-backups"


def seed_catalog(catalog: Catalog, clock: Clock):
    """datastore-nightly (RPO 26 h, cron 02:00): one green, one amber and one red target; files-hourly: its
    fan-out failed; disks-weekly: never ran."""
    now = clock.now
    catalog.save(finished_run("datastore-nightly", "Customer", "succeeded", now - timedelta(hours=3)))
    catalog.save(finished_run("datastore-nightly", "Order", "succeeded", now - timedelta(hours=22)))
    catalog.save(finished_run("datastore-nightly", "acme/Invoice", "succeeded", now - timedelta(hours=40)))
    failed = finished_run("datastore-nightly", "acme/Invoice", FAILED, now - timedelta(hours=3), error=INVOICE_ERROR)
    catalog.save(failed)
    share = finished_run(
        "files-hourly",
        "projects/demo-prod/locations/us-central1-a/instances/share-a",
        "succeeded",
        now - timedelta(hours=5),
    )
    share.kind, share.output = "filestore", "projects/demo-prod/locations/us-central1/backups/share-a-20261122t2100"
    catalog.save(share)
    fanout = finished_run("files-hourly", "(fan-out)", FAILED, now - timedelta(hours=1), error="Filestore API: 403")
    catalog.save(fanout)
    return failed


@pytest.fixture
def status_app(tmp_path, datastore):
    clock = Clock()
    plans = [
        make_plan("datastore-nightly", rpo_hours=26),
        kind_plan("files-hourly", "filestore", rpo_hours=2),
        kind_plan("disks-weekly", "disks", rpo_hours=170),
    ]
    rt = make_runtime(
        tmp_path, plans={p.name: p for p in plans}, clock=clock, environ={"BACKUP_METRICS_TOKEN": "scrape-secret-77"}
    )
    catalog = Catalog(datastore)
    failed = seed_catalog(catalog, clock)
    return create_app(rt, catalog=catalog), failed


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            "chromium is not installed: run scripts/ensure-chromium.sh (apt-get install chromium)", pytrace=False
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -r requirements-dev.txt", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_status_page_shows_red_target_with_its_error_and_needs_admin(status_app, serve, browser, tmp_path):
    app, failed = status_app
    with serve(app) as served:
        anonymous = browser.new_page()
        refused = anonymous.goto(served.url + "/")
        admin = browser.new_context(extra_http_headers=AUTH, viewport={"width": 1100, "height": 900})
        page = admin.new_page()
        loaded = page.goto(served.url + "/")
        invoice = page.locator('tr[data-target="acme/Invoice"]')
        invoice_text = invoice.inner_text()
        invoice_health = invoice.get_attribute("data-health")
        healths = {
            name: page.locator(f'tr[data-target="{name}"]').get_attribute("data-health")
            for name in ("Customer", "Order")
        }
        plan_text = page.locator("#plan-datastore-nightly .meta").inner_text()
        fanout_banner = page.locator("#plan-files-hourly .banner").inner_text()
        never_ran = page.locator("#plan-disks-weekly").inner_text()
        page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)
        invoice.get_by_role("link", name="run and log").click()
        page.wait_for_load_state()
        run_text = page.locator("body").inner_text()
        run_title = page.title()

    assert refused.status == 401
    assert loaded.status == 200
    assert invoice_health == "red"
    assert INVOICE_ERROR in invoice_text
    assert "40.0 h" in invoice_text
    assert healths == {"Customer": "green", "Order": "amber"}
    assert "next run 2026-11-24 02:00 UTC" in plan_text and "RPO 26 h" in plan_text
    assert "Fan-out failed" in fanout_banner and "Filestore API: 403" in fanout_banner
    assert "No run of this plan has been recorded yet" in never_ran
    assert failed.run_id in run_title
    assert "export of acme/Invoice started" in run_text and INVOICE_ERROR in run_text
    assert (tmp_path / "status-page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("BACKUP_UPDATE_SCREENSHOTS") == "1":  # refresh the README's picture: make screenshots
        shutil.copy(tmp_path / "status-page.png", ROOT / "docs" / "status-page.png")


COLDLINE_ERROR = "FAILED_PRECONDITION: bucket demo-backups has storage class COLDLINE; exports need STANDARD"


def test_a_failing_latest_run_is_never_green_and_the_headline_counts_it(tmp_path, datastore, serve, browser):
    """The bucket switched to COLDLINE last night: every target's copy is still young, every latest run failed."""
    clock = Clock()
    plan = make_plan("datastore-nightly", rpo_hours=26)
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    catalog = Catalog(datastore)
    for target in ("Customer", "Order", "acme/Invoice"):
        catalog.save(finished_run(plan.name, target, "succeeded", clock.now - timedelta(hours=3)))
        catalog.save(finished_run(plan.name, target, FAILED, clock.now - timedelta(hours=1), error=COLDLINE_ERROR))
    catalog.save(finished_run(plan.name, "Product", "succeeded", clock.now - timedelta(hours=2)))
    app = create_app(rt, catalog=catalog)

    with serve(app) as served:
        page = browser.new_context(extra_http_headers=AUTH).new_page()
        page.goto(served.url + "/")
        headline = page.locator("#headline").inner_text()
        healths = {
            name: page.locator(f'tr[data-target="{name}"]').get_attribute("data-health")
            for name in ("Customer", "Order", "acme/Invoice", "Product")
        }
        plan_health = page.locator("#plan-datastore-nightly").get_attribute("data-health")
    body = app.test_client().get("/api/status", headers=AUTH).get_json()

    assert "all good" not in headline and "3 failing" in headline
    # 3 h old copies are green by age; their latest runs failed, so they are amber.
    assert healths == {"Customer": "amber", "Order": "amber", "acme/Invoice": "amber", "Product": "green"}
    assert plan_health == "amber"
    assert body["counts"] == {"green": 1, "amber": 3, "red": 0, "failing": 3}
    assert body["headline"] == "needs attention: 3 failing"


def test_a_failure_after_a_fresh_copy_turns_the_target_amber(tmp_path, datastore):
    clock = Clock()
    plan = make_plan("datastore-nightly", rpo_hours=26)
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    catalog = Catalog(datastore)
    catalog.save(finished_run(plan.name, "Customer", "succeeded", clock.now - timedelta(hours=2)))
    catalog.save(finished_run(plan.name, "Customer", FAILED, clock.now - timedelta(hours=1), error=COLDLINE_ERROR))

    body = create_app(rt, catalog=catalog).test_client().get("/api/status", headers=AUTH).get_json()

    [target] = body["plans"][0]["targets"]
    assert (target["health"], target["last_status"]) == ("amber", FAILED)
    assert body["health"] == "amber"


def test_status_page_fits_a_phone_screen(status_app, serve, browser, tmp_path):
    app, _failed = status_app
    with serve(app) as served:
        phone = browser.new_context(extra_http_headers=AUTH, viewport={"width": 390, "height": 844}, is_mobile=True)
        page = phone.new_page()
        page.goto(served.url + "/")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        error_visible = page.get_by_text(INVOICE_ERROR).is_visible()
        page.screenshot(path=str(tmp_path / "status-page-phone.png"))

    assert overflow <= 0
    assert error_visible
    if os.environ.get("BACKUP_UPDATE_SCREENSHOTS") == "1":
        shutil.copy(tmp_path / "status-page-phone.png", ROOT / "docs" / "status-page-phone.png")


def test_api_status_is_json_for_scripts(status_app):
    app, _failed = status_app
    client = app.test_client()

    denied = client.get("/api/status")
    body = client.get("/api/status", headers=AUTH).get_json()

    assert denied.status_code == 401
    plans = {p["name"]: p for p in body["plans"]}
    targets = {t["target"]: t for t in plans["datastore-nightly"]["targets"]}
    assert {name: t["health"] for name, t in targets.items()} == {
        "Customer": "green",
        "Order": "amber",
        "acme/Invoice": "red",
    }
    assert targets["acme/Invoice"]["last_error"] == INVOICE_ERROR
    assert targets["Customer"]["location_url"].startswith("https://console.cloud.google.com/storage/browser/")
    assert plans["files-hourly"]["health"] == "red" and plans["files-hourly"]["fanout_error"] == "Filestore API: 403"
    assert plans["disks-weekly"]["never_ran"] is True
    assert body["counts"] == {"green": 1, "amber": 1, "red": 2, "failing": 1}


def test_runs_page_is_html_for_browsers_and_json_for_scripts(status_app):
    app, failed = status_app
    client = app.test_client()

    as_json = client.get(f"/runs/{failed.run_id}", headers=AUTH)
    as_html = client.get(f"/runs/{failed.run_id}", headers=AUTH | {"Accept": "text/html,*/*;q=0.8"})

    assert as_json.get_json()["error"] == INVOICE_ERROR
    assert as_html.content_type.startswith("text/html")
    assert "export of acme/Invoice started" in as_html.get_data(as_text=True)


def parse_metrics(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def test_metrics_accept_the_scrape_token_or_an_admin(status_app):
    app, _failed = status_app
    client = app.test_client()
    now = Clock().now

    anonymous = client.get("/metrics")
    scraper = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret-77"})
    admin = client.get("/metrics", headers={"Authorization": f"Bearer {LOCAL_TOKEN}"})

    assert anonymous.status_code == 401
    assert scraper.status_code == 200 and admin.status_code == 200
    assert scraper.content_type.startswith("text/plain; version=0.0.4")
    samples = parse_metrics(scraper.get_data(as_text=True))
    customer = '{plan="datastore-nightly",target="Customer"}'
    invoice = '{plan="datastore-nightly",target="acme/Invoice"}'
    assert samples["backup_last_success_timestamp_seconds" + customer] == (now - timedelta(hours=3)).timestamp()
    assert samples["backup_last_success_timestamp_seconds" + invoice] == (now - timedelta(hours=40)).timestamp()
    assert samples["backup_last_run_failed" + invoice] == 1
    assert samples["backup_target_health" + invoice] == 2
    assert samples['backup_plan_rpo_seconds{plan="datastore-nightly"}'] == 26 * 3600
    assert samples['backup_plan_fanout_failed{plan="files-hourly"}'] == 1
    assert "# TYPE backup_last_success_timestamp_seconds gauge" in scraper.get_data(as_text=True)


def drill_plan():
    from services.plans import parse_plan

    return parse_plan(
        "datastore-nightly",
        {
            "kind": "datastore",
            "rpo_hours": 26,
            "destination": {"bucket": "demo-backups", "prefix": "datastore"},
            "options": {"location": "us-central1"},
            "drill": {"every": "7d"},
        },
    )


def seed_growth_and_drills(catalog: Catalog, clock: Clock) -> None:
    """Three days of exports with per-kind figures, then a passed drill of Customer and a failed one of Order."""
    from services.catalog import DRILL, RunRecord

    for day, (customers, orders) in enumerate(((1200, 300), (1350, 310), (1600, 330))):
        at = clock.now - timedelta(days=2 - day, hours=1)
        for target, count in (("Customer", customers), ("Order", orders)):
            run = finished_run("datastore-nightly", target, "succeeded", at)
            run.stats = {"kinds": {target: {"entities": count, "bytes": count * 410}}}
            catalog.save(run)
    for target, status, seconds, error in (
        ("Customer", "succeeded", 72.4, None),
        ("Order", FAILED, 15.0, "entity counts differ: Order 330 in the export, 329 restored"),
    ):
        drill = RunRecord(
            run_id=f"drill-{target.lower()}",
            plan="datastore-nightly",
            target=target,
            kind="datastore",
            period=clock.now - timedelta(minutes=30),
            status=status,
            created=clock.now - timedelta(minutes=30),
            started=clock.now - timedelta(minutes=30),
            ended=clock.now - timedelta(minutes=28),
            error=error,
            stats={"restored_in_seconds": seconds},
            purpose=DRILL,
        )
        catalog.save(drill)


def test_the_growth_chart_and_the_last_drill_of_each_target_are_drawn(tmp_path, datastore, serve, browser):
    clock = Clock()
    plan = drill_plan()
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    catalog = Catalog(datastore)
    seed_growth_and_drills(catalog, clock)
    app = create_app(rt, catalog=catalog)

    with serve(app) as served:
        page = browser.new_context(extra_http_headers=AUTH, viewport={"width": 1100, "height": 900}).new_page()
        page.goto(served.url + "/")
        lines = page.locator('figure.chart[data-plan="datastore-nightly"] polyline.series')
        kinds = [lines.nth(i).get_attribute("data-kind") for i in range(lines.count())]
        points = [lines.nth(i).get_attribute("points").split() for i in range(lines.count())]
        box = page.locator('figure.chart[data-plan="datastore-nightly"] svg').bounding_box()
        caption = page.locator('figure.chart[data-plan="datastore-nightly"] figcaption').inner_text()
        customer_drill = page.locator('tr[data-target="Customer"] td.drill')
        order_drill = page.locator('tr[data-target="Order"] td.drill')
        drills = {
            "Customer": (customer_drill.get_attribute("data-drill"), customer_drill.inner_text()),
            "Order": (order_drill.get_attribute("data-drill"), order_drill.inner_text()),
        }
    body = app.test_client().get("/api/status", headers=AUTH).get_json()
    metrics = parse_metrics(app.test_client().get("/metrics", headers=AUTH).get_data(as_text=True))

    assert kinds == ["Customer", "Order"]
    assert [len(p) for p in points] == [3, 3]
    # The newest Customer point is the chart's top (its largest value); y grows downwards in SVG.
    assert float(points[0][-1].split(",")[1]) < float(points[0][0].split(",")[1])
    assert box is not None and box["width"] > 100 and box["height"] > 40
    assert "Customer 1,600" in caption and "Order 330" in caption
    assert drills["Customer"][0] == "passed" and "restored in 1 min 12 s" in drills["Customer"][1]
    assert drills["Order"][0] == "failed" and "329 restored" in drills["Order"][1]
    [shown] = body["plans"]
    assert shown["growth"]["kinds"]["Customer"][-1] == {"day": "2026-11-23", "entities": 1600, "bytes": 656000}
    targets = {t["target"]: t for t in shown["targets"]}
    assert (targets["Customer"]["drill_ok"], targets["Customer"]["last_drill_seconds"]) == (True, 72.4)
    assert targets["Order"]["drill_ok"] is False
    assert metrics['backup_restore_seconds{plan="datastore-nightly",target="Customer"}'] == 72.4
    assert metrics['backup_drill_success{plan="datastore-nightly",target="Customer"}'] == 1
    assert metrics['backup_drill_success{plan="datastore-nightly",target="Order"}'] == 0
    assert metrics['backup_plan_drills{plan="datastore-nightly",result="failed"}'] == 1


def test_the_local_signin_link_sets_a_strict_cookie_once_and_the_page_starts_a_run_once(
    tmp_path, datastore, datastore_emulator, serve, browser
):
    from services.queue import LocalQueue
    from tests.test_datastore import seed

    seed(datastore, "Customer")
    clock = Clock()
    plan = make_plan("datastore-nightly", rpo_hours=26)
    rt = make_runtime(
        tmp_path,
        plans={plan.name: plan},
        clock=clock,
        datastore_admin_endpoint=datastore_emulator["url"],
        environ={"BACKUP_LOCAL_SIGNIN_CODE": "one-time-code-123"},
    )
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    app = create_app(rt, queue=queue, catalog=Catalog(datastore))

    with serve(app) as served:
        context = browser.new_context()
        page = context.new_page()
        signed_in = page.goto(served.url + "/signin?code=one-time-code-123")
        landed = page.url
        [cookie] = context.cookies()
        page.on("dialog", lambda dialog: dialog.accept())
        page.locator('#plan-datastore-nightly button.run[data-dry="0"]').click()
        page.locator("#plan-datastore-nightly .run-result").filter(has_text="started").wait_for()
        result_text = page.locator("#plan-datastore-nightly .run-result").inner_text()
        again = browser.new_context().new_page().goto(served.url + "/signin?code=one-time-code-123")
        wrong = browser.new_context().new_page().goto(served.url + "/signin?code=guess")
        # A form on another site posting with the cookie: no X-Backup-Client header, a cross-site origin.
        forged = context.request.post(
            served.url + "/admin/plans/datastore-nightly/run",
            headers={"Origin": "https://evil.example", "Content-Type": "application/x-www-form-urlencoded"},
            data="dry_run=0",
        )

    assert signed_in.status == 200 and landed == served.url + "/"
    assert cookie["name"] == "backup_local" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert result_text.startswith("started: 1 task(s) queued")
    assert again.status == 403 and wrong.status == 403
    assert forged.status == 403
    assert [t["path"] for t in queue.tasks()] == ["/tasks/datastore-nightly"]  # queued once


def test_a_wrong_local_token_is_named_as_such(tmp_path, datastore):
    app = create_app(make_runtime(tmp_path, plans={"n": make_plan("n")}), catalog=Catalog(datastore))

    answer = app.test_client().get("/api/status", headers={"Authorization": "Bearer not-the-token"})

    assert answer.status_code == 403
    assert "not the local token" in answer.get_json()["error"]


def test_the_run_page_shows_figures_and_durations_as_people_read_them(status_app, datastore):
    app, _failed = status_app
    run = finished_run("datastore-nightly", "Customer", "succeeded", Clock().now)
    run.stats = {"bytes": 2322, "entities": None, "kinds": {"Customer": {"entities": 20, "bytes": 2322}}}
    run.started = run.ended - timedelta(seconds=72)
    Catalog(datastore).save(run)

    html = app.test_client().get(f"/runs/{run.run_id}", headers=AUTH | {"Accept": "text/html"}).get_data(as_text=True)

    assert "2.3 kB" in html and "Customer: bytes 2.3 kB, entities 20" in html
    assert "(1 min 12 s)" in html
    assert '"bytes"' not in html and "None" not in html


def test_runs_in_progress_are_shown_until_they_finish(tmp_path, datastore):
    from services.catalog import RunRecord

    clock = Clock()
    plan = make_plan("datastore-nightly", rpo_hours=26)
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    catalog = Catalog(datastore)
    catalog.save(finished_run(plan.name, "Customer", "succeeded", clock.now - timedelta(hours=20)))
    started = []
    for target in ("Customer", "Order"):
        record = RunRecord(
            run_id=f"run-{target}",
            plan=plan.name,
            target=target,
            kind="datastore",
            period=clock.now,
            created=clock.now,
            started=clock.now,
        )
        started.append(catalog.begin(record)[0])
    client = create_app(rt, catalog=catalog).test_client()

    during = client.get("/api/status", headers=AUTH).get_json()
    page = client.get("/", headers=AUTH).get_data(as_text=True)
    for record in started:
        record.status, record.ended = "succeeded", clock.now + timedelta(minutes=3)
        catalog.update(record, advance=True)
    after = client.get("/api/status", headers=AUTH).get_json()

    [shown] = during["plans"]
    assert sorted(r["target"] for r in shown["running"]) == ["Customer", "Order"]
    customer = next(t for t in shown["targets"] if t["target"] == "Customer")
    assert customer["running_since"] == clock.now.isoformat() and customer["running_run_id"] == "run-Customer"
    assert 'data-running="2"' in page and "running since 02:00 UTC" in page
    assert after["plans"][0]["running"] == []
