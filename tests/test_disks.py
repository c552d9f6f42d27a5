"""The disks kind against the real googleapiclient and a stateful fake Compute (tests/fakes_compute.py).

Runs are driven the way the queue drives them: start(), then poll() while Pending, retrying the same call on
TransientError, stopping on PermanentError / TargetGone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials

from kinds.disks import snapshots as disks
from services.errors import ConfigError, PermanentError, TargetGone, TransientError
from services.kinds import Done, Pending, RunContext, Target
from services.plans import Plan, parse_plan
from services.runtime import Runtime, Settings
from tests.fakes_compute import ComputeFake, Fault
from tests.fixtures.compute import FAKE_COMPUTE_ENDPOINT, Clock, serve_with_responses

LABEL = "backup-generations"


def make_plan(name: str = "disk-nightly", projects: tuple[str, ...] = ("proj-alpha",), **extra: Any) -> Plan:
    raw: dict[str, Any] = {"kind": "disks", "select": {"projects": list(projects)}}
    raw.update(extra)
    return parse_plan(name, raw)


def make_runtime(compute_clock: Clock) -> Runtime:
    settings = Settings.from_env({"BACKUP_COMPUTE_ENDPOINT": FAKE_COMPUTE_ENDPOINT})
    return Runtime(settings, clock=compute_clock, credentials=AnonymousCredentials())


def all_targets(plan: Plan, rt: Runtime) -> list[Target]:
    targets, token = [], None
    while True:
        page = disks.KIND.enumerate(plan, token, rt)
        targets.extend(page.targets)
        token = page.next_page_token
        if token is None:
            return targets


@dataclass
class Result:
    status: str  # done | failed | skipped
    outcome: Any


def run_like_queue(plan: Plan, target: Target, period: datetime, rt: Runtime, max_deliveries: int = 200) -> Result:
    run = RunContext(
        run_id=f"{plan.name}-{target.key}-{period:%Y%m%d%H%M}", plan=plan.name, target_key=target.key, period=period
    )
    state: dict[str, Any] | None = None
    for _ in range(max_deliveries):
        try:
            outcome = (
                disks.KIND.start(plan, target, run, rt)
                if state is None
                else disks.KIND.poll(plan, target, state, run, rt)
            )
        except TransientError:
            continue  # the queue redelivers the same task
        except PermanentError as exc:
            return Result("failed", exc)
        except TargetGone as exc:
            return Result("skipped", exc)
        if isinstance(outcome, Pending):
            state = outcome.state
            continue
        return Result("done", outcome)
    raise AssertionError(f"{target.key}: no outcome after {max_deliveries} deliveries")


def run_plan(plan: Plan, rt: Runtime) -> dict[str, Result]:
    period = rt.now()
    return {target.key: run_like_queue(plan, target, period, rt) for target in all_targets(plan, rt)}


def key_of(disk: dict[str, Any], project: str = "proj-alpha") -> str:
    scope = (
        "zones/" + disk["zone"].rsplit("/", 1)[-1] if "zone" in disk else "regions/" + disk["region"].rsplit("/", 1)[-1]
    )
    return f"projects/{project}/{scope}/disks/{disk['name']}"


# --- plan settings -----------------------------------------------------------------------------------------


def test_plan_defaults_to_the_backup_generations_label():
    plan = make_plan(options={"guest_flush": True, "storage_locations": ["eu"]})

    assert plan.settings.label_key == LABEL
    assert plan.settings.guest_flush is True
    assert plan.settings.storage_locations == ("eu",)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"select": {"projects": []}}, "select.projects"),
        ({"select": {"projects": ["Not_A_Project"]}}, "select.projects"),
        ({"select": {"projects": ["proj-alpha"], "label": "Bad Key"}}, "select.label"),
        ({"select": {"projects": ["proj-alpha"]}, "options": {"guest_flush": "false"}}, "options.guest_flush"),
        ({"select": {"projects": ["proj-alpha"]}, "options": {"endpoint": "compute.local"}}, "options.endpoint"),
        ({"select": {"projects": ["proj-alpha"]}, "options": {"retension": 3}}, "options.retension"),
    ],
)
def test_bad_plan_settings_name_the_field(raw, field):
    with pytest.raises(ConfigError) as caught:
        parse_plan("disk-nightly", {"kind": "disks", **raw})

    assert f"field '{field}'" in str(caught.value)


# --- snapshot names ----------------------------------------------------------------------------------------


def test_snapshot_names_are_valid_deterministic_and_distinct(compute_clock):
    period = compute_clock()
    long_name = "a" * 40 + "-database-volume-with-a-long-name"  # 63 chars, the GCE maximum
    same_a = disks.DiskRef("proj-alpha", long_name, "1", "3", zone="europe-west1-b")
    same_b = disks.DiskRef("proj-alpha", long_name, "2", "3", zone="europe-west1-c")
    regional = disks.DiskRef("proj-alpha", long_name, "3", "3", region="europe-west1")

    names = [disks.snapshot_name("disk-nightly", "bk", d, period) for d in (same_a, same_b, regional)]

    assert all(len(n) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n) for n in names)
    assert len(set(names)) == 3
    assert names[0] == disks.snapshot_name("disk-nightly", "bk", same_a, period)
    assert names[0] != disks.snapshot_name("disk-nightly", "bk", same_a, compute_clock.advance(hours=1))
    assert names[0] != disks.snapshot_name("disk-hourly", "bk", same_a, period)


# --- enumeration -------------------------------------------------------------------------------------------


def test_enumeration_pages_through_every_project_zonal_and_regional(compute_fake, compute_clock):
    expected = set()
    for project in ("proj-alpha", "proj-beta", "proj-gamma"):
        for i in range(5):
            disk = compute_fake.add_disk(project, f"data-{i}", zone=f"us-east1-{'bcd'[i % 3]}", labels={LABEL: "3"})
            expected.add(key_of(disk, project))
        compute_fake.add_disk(project, "scratch", zone="us-east1-b", labels={"team": "x"})  # not selected
    regional = compute_fake.add_disk("proj-beta", "shared", region="us-east1", labels={LABEL: "2"})
    expected.add(key_of(regional, "proj-beta"))
    plan = make_plan(projects=("proj-alpha", "proj-beta", "proj-gamma"), fanout_page_size=2)

    targets = all_targets(plan, make_runtime(compute_clock))

    assert sorted(t.key for t in targets) == sorted(expected)
    assert len(targets) == len(expected)  # no disk twice
    listed = [path for method, path in compute_fake.calls if path.endswith("aggregated/disks")]
    assert len(listed) == 3 + 3 + 3  # ceil(5/2) pages in alpha and gamma, ceil(6/2) in beta
    shared = next(t for t in targets if t.key.endswith("/shared"))
    assert shared.params["region"] == "us-east1" and shared.params["label_value"] == "2"


def test_a_project_that_does_not_exist_is_reported_as_that_projects_problem(compute_fake, compute_clock):
    compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "1"})
    plan = make_plan(projects=("proj-missing", "proj-alpha"))
    rt = make_runtime(compute_clock)

    first = disks.KIND.enumerate(plan, None, rt)
    second = disks.KIND.enumerate(plan, first.next_page_token, rt)

    assert first.targets == [] and [p.where for p in first.problems] == ["projects/proj-missing"]
    assert "not found in project proj-missing" in first.problems[0].error
    assert [t.key for t in second.targets] == ["projects/proj-alpha/zones/us-east1-b/disks/web"]


def test_a_page_token_from_another_source_is_refused(compute_fake, compute_clock):
    plan = make_plan()

    with pytest.raises(PermanentError, match="page token"):
        disks.KIND.enumerate(plan, "not-a-token", make_runtime(compute_clock))


# --- retention over several runs ---------------------------------------------------------------------------


def test_several_runs_keep_exactly_each_disks_own_count(compute_fake, compute_clock):
    two = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "2"})
    three = compute_fake.add_disk("proj-alpha", "db", zone="us-east1-c", labels={LABEL: "3"})
    regional = compute_fake.add_disk("proj-alpha", "shared", region="us-east1", labels={LABEL: "1"})
    plan, rt = make_plan(), make_runtime(compute_clock)
    periods = []

    for _ in range(5):
        periods.append(compute_clock.advance(hours=1))
        results = run_plan(plan, rt)
        assert {r.status for r in results.values()} == {"done"}

    def stamps(disk):
        return sorted(
            s["name"].rsplit("-", 3)[1] + s["name"].rsplit("-", 3)[2] for s in compute_fake.snapshots_of(disk)
        )

    newest = [f"{p:%Y%m%d%H%M}" for p in periods]
    assert stamps(two) == newest[-2:]
    assert stamps(three) == newest[-3:]
    assert stamps(regional) == newest[-1:]


def test_the_plan_floor_keeps_more_than_a_lower_label(compute_fake, compute_clock):
    disk = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "1"})
    plan, rt = make_plan(retention={"min_keep": 3}), make_runtime(compute_clock)

    for _ in range(5):
        compute_clock.advance(hours=1)
        run_plan(plan, rt)

    assert len(compute_fake.snapshots_of(disk)) == 3


def test_foreign_snapshots_are_never_deleted(compute_fake, compute_clock):
    disk = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "1"})
    other = compute_fake.add_disk("proj-alpha", "other", zone="us-east1-b", labels={})
    ours = {"managed-by": "backup-scheduler", "plan": "disk-nightly", "source-disk-id": disk["id"]}
    foreign = [
        compute_fake.add_snapshot("proj-alpha", "manual-web", source_disk=disk, labels={}),
        compute_fake.add_snapshot("proj-alpha", "other-plan-web", source_disk=disk, labels={**ours, "plan": "weekly"}),
        compute_fake.add_snapshot(
            "proj-alpha", "other-disk", source_disk=other, labels={**ours, "source-disk-id": other["id"]}
        ),
        # Our labels copied onto a snapshot of another disk: the API's sourceDiskId says it is not this disk's.
        compute_fake.add_snapshot("proj-alpha", "copied-labels", source_disk=other, labels=ours),
    ]
    plan, rt = make_plan(), make_runtime(compute_clock)

    for _ in range(3):
        compute_clock.advance(hours=1)
        run_plan(plan, rt)

    remaining = {name for _project, name in compute_fake.snapshots}
    assert {s["name"] for s in foreign} <= remaining
    assert len([s for s in compute_fake.snapshots_of(disk) if s["labels"] == ours]) == 1


def test_snapshots_not_ready_are_neither_counted_nor_deleted(compute_fake, compute_clock):
    disk = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "1"})
    ours = {"managed-by": "backup-scheduler", "plan": "disk-nightly", "source-disk-id": disk["id"]}
    in_flight = compute_fake.add_snapshot("proj-alpha", "in-flight", source_disk=disk, labels=ours, status="CREATING")
    failed = compute_fake.add_snapshot("proj-alpha", "failed-earlier", source_disk=disk, labels=ours, status="FAILED")
    plan, rt = make_plan(), make_runtime(compute_clock)

    for _ in range(2):
        compute_clock.advance(hours=1)
        run_plan(plan, rt)

    names = {s["name"] for s in compute_fake.snapshots_of(disk)}
    assert {in_flight["name"], failed["name"]} <= names
    assert len([s for s in compute_fake.snapshots_of(disk) if s["status"] == "READY"]) == 1


def test_removing_the_label_stops_snapshots_and_deletes_nothing(compute_fake, compute_clock):
    disk = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "1"})
    plan, rt = make_plan(), make_runtime(compute_clock)
    compute_clock.advance(hours=1)
    run_plan(plan, rt)
    before = compute_fake.snapshots_of(disk)
    del disk["labels"][LABEL]

    for _ in range(3):
        compute_clock.advance(hours=1)
        results = run_plan(plan, rt)

    assert results == {}
    assert compute_fake.snapshots_of(disk) == before


def test_a_failed_snapshot_prunes_nothing(compute_fake, compute_clock):
    disk = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "1"})
    plan, rt = make_plan(), make_runtime(compute_clock)
    compute_clock.advance(hours=1)
    run_plan(plan, rt)
    before = [s["name"] for s in compute_fake.snapshots_of(disk) if s["status"] == "READY"]
    compute_fake.failing_disks.add("web")

    compute_clock.advance(hours=1)
    (result,) = run_plan(plan, rt).values()

    assert result.status == "failed" and "nothing pruned" in str(result.outcome)
    assert [s["name"] for s in compute_fake.snapshots_of(disk) if s["status"] == "READY"] == before
    assert not [c for c in compute_fake.calls if c[0] == "DELETE"]


@pytest.mark.parametrize("value", ["abc", "0", "-3", "99999"])
def test_a_bad_label_value_fails_that_disk_only_and_deletes_nothing(compute_fake, compute_clock, value):
    bad = compute_fake.add_disk("proj-alpha", "bad", zone="us-east1-b", labels={LABEL: value})
    good = compute_fake.add_disk("proj-alpha", "good", zone="us-east1-b", labels={LABEL: "1"})
    earlier = compute_fake.add_snapshot(
        "proj-alpha",
        "older-bad",
        source_disk=bad,
        labels={"managed-by": "backup-scheduler", "plan": "disk-nightly", "source-disk-id": bad["id"]},
    )
    plan, rt = make_plan(), make_runtime(compute_clock)

    results = run_plan(plan, rt)

    failure = results[key_of(bad)]
    assert failure.status == "failed"
    assert repr(value) in str(failure.outcome) and key_of(bad) in str(failure.outcome)
    assert compute_fake.snapshots_of(bad) == [earlier]
    assert results[key_of(good)].status == "done" and len(compute_fake.snapshots_of(good)) == 1


# --- idempotency -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id_remembered", [True, False])
def test_a_worker_retried_after_create_makes_one_snapshot(compute_fake, compute_clock, request_id_remembered):
    disk = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "2"})
    plan, rt = make_plan(), make_runtime(compute_clock)
    (target,) = all_targets(plan, rt)
    run = RunContext(run_id="r1", plan=plan.name, target_key=target.key, period=compute_clock())
    first = disks.KIND.start(plan, target, run, rt)  # the worker dies here, before recording anything
    if not request_id_remembered:
        compute_fake.forget_request_ids()  # the retry comes late: Compute answers 409 alreadyExists

    result = run_like_queue(plan, target, compute_clock(), rt)

    assert isinstance(first, Pending)
    assert result.status == "done"
    assert [s["name"] for s in compute_fake.snapshots_of(disk)] == [first.state["snapshot"]]
    assert result.outcome.output.endswith("/" + first.state["snapshot"])


def test_a_double_cron_fire_makes_one_snapshot_per_disk(compute_fake, compute_clock):
    web = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "5"})
    db = compute_fake.add_disk("proj-alpha", "db", region="us-east1", labels={LABEL: "5"})
    plan, rt = make_plan(), make_runtime(compute_clock)

    first, second = run_plan(plan, rt), run_plan(plan, rt)

    assert {r.status for r in [*first.values(), *second.values()]} == {"done"}
    assert len(compute_fake.snapshots_of(web)) == 1 and len(compute_fake.snapshots_of(db)) == 1


def test_injected_rate_limits_and_5xx_still_end_with_every_disks_snapshot(compute_fake, compute_clock):
    created = [
        compute_fake.add_disk("proj-alpha", f"vol-{i}", zone=f"us-east1-{'bcd'[i % 3]}", labels={LABEL: "2"})
        for i in range(12)
    ]
    compute_fake.faults = [
        Fault(share=0.15, status=503, reason="backendError", seed=1),
        Fault(share=0.10, status=429, reason="rateLimitExceeded", seed=2),
        Fault(share=0.05, status=403, reason="userRateLimitExceeded", seed=3),
        Fault(share=0.10, status=500, reason="backendError", after_effect=True, seed=4),  # acted, answer lost
    ]
    plan, rt = make_plan(fanout_page_size=5), make_runtime(compute_clock)

    outcomes = []
    for _ in range(3):
        compute_clock.advance(hours=1)
        targets = []
        token = None
        while True:
            try:
                page = disks.KIND.enumerate(plan, token, rt)
            except TransientError:
                continue  # the fan-out task is retried with the same token
            targets.extend(page.targets)
            token = page.next_page_token
            if token is None:
                break
        outcomes += [run_like_queue(plan, t, compute_clock(), rt).status for t in targets]

    assert compute_fake.injected > 20  # the faults really fired
    assert outcomes == ["done"] * 36
    assert all(len(compute_fake.snapshots_of(d)) == 2 for d in created)


# --- errors ------------------------------------------------------------------------------------------------


def test_permission_denied_names_the_project_and_permission(compute_fake, compute_clock):
    compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "2"})
    compute_fake.deny("proj-alpha", "compute.disks.createSnapshot")
    plan, rt = make_plan(), make_runtime(compute_clock)

    (result,) = run_plan(plan, rt).values()

    assert result.status == "failed"
    assert "proj-alpha" in str(result.outcome) and "compute.disks.createSnapshot" in str(result.outcome)


def test_a_disk_deleted_since_enumeration_is_skipped(compute_fake, compute_clock):
    compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "2"})
    plan, rt = make_plan(), make_runtime(compute_clock)
    (target,) = all_targets(plan, rt)
    compute_fake.disks.clear()

    result = run_like_queue(plan, target, compute_clock(), rt)

    assert result.status == "skipped" and "web" in str(result.outcome)


@pytest.mark.parametrize(
    ("status", "reason", "expected"),
    [
        (429, "rateLimitExceeded", TransientError),
        (403, "rateLimitExceeded", TransientError),
        (503, "backendError", TransientError),
        (400, "invalid", PermanentError),
    ],
)
def test_api_errors_map_to_retry_or_stop(compute_fake, compute_clock, status, reason, expected):
    compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "2"})
    plan, rt = make_plan(), make_runtime(compute_clock)
    (target,) = all_targets(plan, rt)
    compute_fake.faults = [Fault(share=1.0, status=status, reason=reason)]

    with pytest.raises(expected) as caught:
        disks.KIND.start(plan, target, RunContext("r", plan.name, target.key, compute_clock()), rt)

    assert reason in str(caught.value)
    assert getattr(caught.value, "rate_limited", False) == ("RateLimit" in reason or "rateLimit" in reason)
    assert not compute_fake.snapshots


# --- options, endpoint, dry run ----------------------------------------------------------------------------


def test_snapshot_carries_our_labels_and_the_plan_options(compute_fake, compute_clock):
    disk = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "2"})
    plan, rt = make_plan(options={"guest_flush": True, "storage_locations": ["eu"]}), make_runtime(compute_clock)

    (result,) = run_plan(plan, rt).values()

    (snapshot,) = compute_fake.snapshots_of(disk)
    assert result.status == "done" and result.outcome.output == snapshot["selfLink"]
    assert snapshot["labels"] == {
        "managed-by": "backup-scheduler",
        "plan": "disk-nightly",
        "source-disk-id": disk["id"],
    }
    assert snapshot["guestFlush"] is True and snapshot["storageLocations"] == ["eu"]


def test_the_plan_endpoint_overrides_the_environment(compute_fake, compute_responses, compute_clock):
    private = ComputeFake(clock=compute_clock)
    private.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "2"})
    serve_with_responses(private, compute_responses, "https://compute-psc.fake.test/compute/v1/")
    plan = make_plan(options={"endpoint": "https://compute-psc.fake.test"})  # a bare host gets /compute/v1/

    targets = all_targets(plan, make_runtime(compute_clock))

    assert [t.params["name"] for t in targets] == ["web"]
    assert private.calls and not compute_fake.calls


def test_describe_says_what_would_be_created_and_deleted_and_changes_nothing(compute_fake, compute_clock):
    compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "2"})
    compute_fake.add_disk("proj-alpha", "odd", zone="us-east1-b", labels={LABEL: "abc"})
    plan, rt = make_plan(), make_runtime(compute_clock)
    for _ in range(2):
        compute_clock.advance(hours=1)
        run_plan(plan, rt)
    oldest = min(name for _p, name in compute_fake.snapshots)
    snapshots_before, calls_before = dict(compute_fake.snapshots), len(compute_fake.calls)

    lines = {t.params["name"]: disks.KIND.describe(plan, t, rt) for t in all_targets(plan, rt)}

    assert "would create snapshot bk-web-" in lines["web"] and f"would delete {oldest}" in lines["web"]
    assert "would FAIL" in lines["odd"] and "'abc'" in lines["odd"]
    assert compute_fake.snapshots == snapshots_before
    assert all(method == "GET" for method, _path in compute_fake.calls[calls_before:])


def test_start_refuses_a_task_without_its_disk_params(compute_fake, compute_clock):
    plan, rt = make_plan(), make_runtime(compute_clock)
    target = Target(key="projects/proj-alpha/zones/us-east1-b/disks/web", params={"project": "proj-alpha"})

    with pytest.raises(PermanentError, match="params.name"):
        disks.KIND.start(plan, target, RunContext("r", plan.name, target.key, compute_clock()), rt)


def test_done_reports_what_was_pruned(compute_fake, compute_clock):
    compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "1"})
    plan, rt = make_plan(), make_runtime(compute_clock)
    compute_clock.advance(hours=1)
    (first,) = run_plan(plan, rt).values()
    compute_clock.advance(hours=1)

    (second,) = run_plan(plan, rt).values()

    assert isinstance(second.outcome, Done)
    assert second.outcome.stats["pruned"] == [first.outcome.stats["snapshot"]]
    assert second.outcome.stats["kept"] == 1


def test_a_snapshot_already_deleted_by_someone_else_counts_as_pruned(compute_fake, compute_clock):
    disk = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "1"})
    plan, rt = make_plan(), make_runtime(compute_clock)
    compute_clock.advance(hours=1)
    (first,) = run_plan(plan, rt).values()
    compute_fake.deleted_elsewhere.add(first.outcome.stats["snapshot"])
    compute_clock.advance(hours=1)

    (second,) = run_plan(plan, rt).values()

    assert second.status == "done" and second.outcome.stats["prune_errors"] == []
    assert second.outcome.stats["pruned"] == [first.outcome.stats["snapshot"]]
    assert [s["name"] for s in compute_fake.snapshots_of(disk)] == [second.outcome.stats["snapshot"]]


def test_pruning_reads_every_page_of_the_snapshot_listing(compute_fake, compute_clock, monkeypatch):
    monkeypatch.setattr(disks, "API_MAX_RESULTS", 2)  # Compute pages at 500; small pages make paging visible
    disk = compute_fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={LABEL: "2"})
    plan, rt = make_plan(), make_runtime(compute_clock)
    for _ in range(6):
        compute_clock.advance(hours=1)
        compute_fake.add_snapshot(
            "proj-alpha",
            f"older-{compute_clock():%H%M}",
            source_disk=disk,
            labels={"managed-by": "backup-scheduler", "plan": "disk-nightly", "source-disk-id": disk["id"]},
        )
    compute_clock.advance(hours=1)

    (result,) = run_plan(plan, rt).values()

    assert result.status == "done"
    assert [s["name"] for s in compute_fake.snapshots_of(disk)] == sorted(
        [result.outcome.stats["snapshot"], "older-1500"]
    )
    assert len([p for m, p in compute_fake.calls if m == "GET" and p.endswith("global/snapshots")]) == 4
