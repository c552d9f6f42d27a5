"""The ``filestore`` kind through the real googleapiclient (``file v1``, static discovery) against a stateful
fake at the HTTP edge: label-driven retention over several runs, foreign backups untouched, failures prune
nothing, errors mapped for the worker, restore only after a safety backup."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.auth.credentials import AnonymousCredentials

from kinds.filestore import backups as filestore
from kinds.filestore import restore as filestore_restore
from services.errors import ConfigError, PermanentError, TargetGone, TransientError
from services.kinds import Done, Pending, RunContext, Target
from services.plans import parse_plan
from services.runtime import Runtime, Settings
from tests.fakes_filestore import FilestoreFake
from tests.fixtures.filestore import FAKE_FILE_ENDPOINT, serve

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
OURS = {"managed-by": "backup-scheduler", "plan": "shares-nightly"}


def make_plan(min_keep: int = 1, projects=("proj-one",), **options):
    raw = {
        "kind": "filestore",
        "select": {"projects": list(projects), "label": "backup-keep"},
        "retention": {"min_keep": min_keep},
    }
    if options:
        raw["options"] = options
    return parse_plan("shares-nightly", raw)


def runtime(env: dict[str, str] | None = None) -> Runtime:
    return Runtime(
        Settings.from_env({"BACKUP_FILE_ENDPOINT": FAKE_FILE_ENDPOINT, **(env or {})}),
        clock=lambda: T0,
        credentials=AnonymousCredentials(),
    )


def run_once(plan, target: Target, rt: Runtime, when: datetime):
    """What the worker does: start, then poll while Pending (the fake moves one step per read)."""
    run = RunContext(run_id=f"run-{when:%d%H}", plan=plan.name, target_key=target.key, period=when)
    outcome = filestore.KIND.start(plan, target, run, rt)
    for _ in range(30):
        if not isinstance(outcome, Pending):
            return outcome
        outcome = filestore.KIND.poll(plan, target, outcome.state, run, rt)
    raise AssertionError(f"still pending after 30 polls: {outcome}")


def all_targets(plan, rt) -> list[Target]:
    targets, token = [], None
    while True:
        page = filestore.KIND.enumerate(plan, token, rt)
        targets += page.targets
        token = page.next_page_token
        if not token:
            return targets


def test_enumeration_pages_through_locations_and_projects(filestore_fake: FilestoreFake):
    fake = filestore_fake
    fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "3"})
    fake.add_instance("proj-one", "us-central1", "builds", {"backup-keep": "2"})
    fake.add_instance("proj-one", "europe-west1-b", "media", {"backup-keep": "5"})
    fake.add_instance("proj-one", "us-central1-a", "scratch", {"team": "x"})  # not labelled: not a target
    fake.add_instance("proj-two", "us-east1-b", "ledger", {"backup-keep": "7"})
    plan = make_plan(projects=("proj-one", "proj-two"))

    targets = all_targets(plan, runtime())

    assert sorted(t.key for t in targets) == [
        "projects/proj-one/locations/europe-west1-b/instances/media",
        "projects/proj-one/locations/us-central1-a/instances/home",
        "projects/proj-one/locations/us-central1/instances/builds",
        "projects/proj-two/locations/us-east1-b/instances/ledger",
    ]
    assert {t.params["share"] for t in targets} == {"vol1"}


def test_label_retention_over_several_runs_leaves_foreign_backups_alone(filestore_fake: FilestoreFake):
    fake = filestore_fake
    home = fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "2"})
    other = fake.add_instance("proj-one", "us-central1-a", "other", {})
    region = "projects/proj-one/locations/us-central1/backups"
    fake.add_backup(f"{region}/manual-by-alice", home, {})
    fake.add_backup(f"{region}/other-plan", home, {"managed-by": "backup-scheduler", "plan": "weekly"})
    # Claims to be ours for "home" but was made from another instance: must not count or be deleted.
    fake.add_backup(f"{region}/spoofed", other, {**OURS, "source-instance": "home"})
    plan = make_plan()
    rt = runtime()
    [target] = all_targets(plan, rt)

    outcomes = [run_once(plan, target, rt, T0 + timedelta(days=day)) for day in range(4)]

    assert all(isinstance(o, Done) for o in outcomes)
    ours = [n for n in fake.backups_of(home) if fake.backups[n]["labels"].get("plan") == "shares-nightly"]
    assert ours == [f"{region}/shares-nightly-home-202611250200", f"{region}/shares-nightly-home-202611260200"]
    assert {f"{region}/manual-by-alice", f"{region}/other-plan", f"{region}/spoofed"} <= set(fake.backups)
    assert outcomes[3].output == f"{region}/shares-nightly-home-202611260200"
    assert outcomes[3].stats["pruned"] == [f"{region}/shares-nightly-home-202611240200"]
    labels = fake.backups[outcomes[3].output]["labels"]
    assert labels == {**OURS, "source-instance": "home"}


def test_retention_floor_wins_over_a_smaller_label(filestore_fake: FilestoreFake):
    filestore_fake.add_instance("proj-one", "us-central1", "builds", {"backup-keep": "1"})
    plan = make_plan(min_keep=3)
    rt = runtime()
    [target] = all_targets(plan, rt)

    for day in range(5):
        run_once(plan, target, rt, T0 + timedelta(days=day))

    assert len(filestore_fake.backups_of(target.key)) == 3


def test_a_failed_backup_prunes_nothing(filestore_fake: FilestoreFake):
    fake = filestore_fake
    home = fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "1"})
    plan = make_plan()
    rt = runtime()
    [target] = all_targets(plan, rt)
    run_once(plan, target, rt, T0)
    before = fake.backups_of(home)
    fake.failing_instances.add(home)

    with pytest.raises(PermanentError, match="nothing was pruned"):
        run_once(plan, target, rt, T0 + timedelta(days=1))

    assert set(before) <= set(fake.backups_of(home))
    assert fake.backups[before[0]]["state"] == "READY"


@pytest.mark.parametrize("value", ["abc", "0", "1001", "-2", ""])
def test_a_bad_label_value_fails_that_instance_and_creates_nothing(filestore_fake: FilestoreFake, value: str):
    fake = filestore_fake
    home = fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": value})
    region = "projects/proj-one/locations/us-central1/backups"
    fake.add_backup(f"{region}/shares-nightly-home-old", home, {**OURS, "source-instance": "home"})
    plan = make_plan()
    rt = runtime()
    [target] = all_targets(plan, rt)

    with pytest.raises(PermanentError, match="backup-keep"):
        run_once(plan, target, rt, T0)

    assert fake.backups_of(home) == [f"{region}/shares-nightly-home-old"]
    assert not [c for c in fake.calls if c[0] in ("POST", "DELETE")]


def test_a_second_delivery_of_the_same_run_finds_its_backup(filestore_fake: FilestoreFake):
    home = filestore_fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "5"})
    plan = make_plan()
    rt = runtime()
    [target] = all_targets(plan, rt)

    first = run_once(plan, target, rt, T0)
    second = run_once(plan, target, rt, T0)

    assert first.output == second.output
    assert filestore_fake.backups_of(home) == [first.output]


def test_prune_deletes_one_backup_at_a_time(filestore_fake: FilestoreFake):
    fake = filestore_fake
    home = fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "1"})
    region = "projects/proj-one/locations/us-central1/backups"
    for age in (3, 2, 1):
        fake.add_backup(f"{region}/old-{age}", home, {**OURS, "source-instance": "home"}, age_days=age)
    plan = make_plan()
    rt = runtime()
    [target] = all_targets(plan, rt)

    outcome = run_once(plan, target, rt, T0)

    assert fake.backups_of(home) == [outcome.output]
    assert outcome.stats["pruned"] == [f"{region}/old-3", f"{region}/old-2", f"{region}/old-1"]
    deletes = [i for i, c in enumerate(fake.calls) if c[0] == "DELETE"]
    assert len(deletes) == 3
    # between two deletes the worker read the previous delete's operation
    assert all(any("operations" in p for _, p in fake.calls[a:b]) for a, b in zip(deletes, deletes[1:], strict=False))


def test_a_pending_delete_elsewhere_in_the_chain_makes_prune_wait(filestore_fake: FilestoreFake):
    fake = filestore_fake
    home = fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "1"})
    region = "projects/proj-one/locations/us-central1/backups"
    fake.add_backup(f"{region}/old", home, {**OURS, "source-instance": "home"})
    fake.add_backup(f"{region}/being-deleted", home, {})
    fake._delete_backup(f"{region}/being-deleted")  # someone's delete still running in this chain
    plan = make_plan()
    rt = runtime()
    [target] = all_targets(plan, rt)
    run = RunContext(run_id="r", plan=plan.name, target_key=target.key, period=T0)
    outcome = filestore.KIND.start(plan, target, run, rt)
    while outcome.state.get("phase") != "prune":
        outcome = filestore.KIND.poll(plan, target, outcome.state, run, rt)

    assert isinstance(outcome, Pending)
    assert f"{region}/old" in fake.backups
    assert any("waiting" in line for line in run.log_lines)


@pytest.mark.parametrize(
    ("status", "error", "match"),
    [
        (429, TransientError, "rate limited in project proj-one"),
        (503, TransientError, "answered 503"),
        (404, TargetGone, "not found in project proj-one"),
    ],
)
def test_api_errors_map_to_retry_skip_or_fail(filestore_fake: FilestoreFake, status, error, match):
    filestore_fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "2"})
    plan = make_plan()
    rt = runtime()
    [target] = all_targets(plan, rt)
    filestore_fake.injected.append(("POST" if status != 404 else "GET", "backups" if status != 404 else "", status))

    with pytest.raises(error, match=match):
        run_once(plan, target, rt, T0)


def test_permission_denied_names_the_project_and_permission(filestore_fake: FilestoreFake):
    filestore_fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "2"})
    plan = make_plan()
    rt = runtime()
    [target] = all_targets(plan, rt)
    filestore_fake.denied["proj-one"] = "file.backups.create"

    with pytest.raises(PermanentError) as caught:
        run_once(plan, target, rt, T0)

    assert "proj-one" in str(caught.value)
    assert "file.backups.create" in str(caught.value)


def test_the_plan_endpoint_wins_over_the_environment(filestore_responses):
    psc = "https://file-psc.fake.test/"
    fake = serve(FilestoreFake(psc), filestore_responses, psc)
    fake.add_instance("proj-one", "us-central1", "builds", {"backup-keep": "2"})
    plan = make_plan(endpoint=psc)

    targets = all_targets(plan, runtime({"BACKUP_FILE_ENDPOINT": "https://unused.fake.test/"}))

    assert [t.key for t in targets] == ["projects/proj-one/locations/us-central1/instances/builds"]


def test_bad_plan_settings_name_the_field():
    with pytest.raises(ConfigError, match="select.label"):
        parse_plan("bad", {"kind": "filestore", "select": {"label": "Has Spaces"}})
    with pytest.raises(ConfigError, match="options.endpoint"):
        parse_plan("bad", {"kind": "filestore", "options": {"endpoint": "file.googleapis.com"}})


# --- restore ---------------------------------------------------------------------------------------------------


def test_restore_takes_a_safety_backup_of_the_target_first(filestore_fake: FilestoreFake):
    fake = filestore_fake
    home = fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "2"})
    plan = make_plan()
    rt = runtime()
    [target] = all_targets(plan, rt)
    good = run_once(plan, target, rt, T0).output
    messages: list[str] = []

    result = filestore_restore.restore_filestore(
        rt, backup=good, instance=home, share="vol1", sleep=lambda s: None, on_progress=messages.append
    )

    safety = fake.backups[result.safety_backup]
    assert safety["state"] == "READY"
    assert safety["labels"] == {"managed-by": "backup-scheduler", "purpose": "pre-restore", "source-instance": "home"}
    assert fake.restores == [{"fileShare": "vol1", "sourceBackup": good, "instance": home}]
    first_restore_call = next(i for i, c in enumerate(fake.calls) if c[1].endswith(":restore"))
    safety_create = next(i for i, c in enumerate(fake.calls) if c[0] == "POST" and c[1].endswith("/backups"))
    assert safety_create < first_restore_call


def test_restore_does_nothing_when_the_safety_backup_fails(filestore_fake: FilestoreFake):
    fake = filestore_fake
    home = fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "2"})
    plan = make_plan()
    rt = runtime()
    [target] = all_targets(plan, rt)
    good = run_once(plan, target, rt, T0).output
    fake.failing_instances.add(home)

    with pytest.raises(PermanentError, match="safety backup"):
        filestore_restore.restore_filestore(rt, backup=good, instance=home, share="vol1", sleep=lambda s: None)

    assert fake.restores == []
    assert not [c for c in fake.calls if c[1].endswith(":restore")]


def test_restore_refuses_an_unknown_share_before_creating_anything(filestore_fake: FilestoreFake):
    fake = filestore_fake
    home = fake.add_instance("proj-one", "us-central1-a", "home", {"backup-keep": "2"})
    fake.add_backup("projects/proj-one/locations/us-central1/backups/b1", home, {})

    with pytest.raises(PermanentError, match="no file share 'data'"):
        filestore_restore.restore_filestore(
            runtime(), backup="projects/proj-one/locations/us-central1/backups/b1", instance=home, share="data"
        )

    assert not [c for c in fake.calls if c[0] == "POST"]


def test_restore_waits_out_the_rate_limit(filestore_fake: FilestoreFake):
    fake = filestore_fake
    home = fake.add_instance("proj-one", "us-central1-a", "home", {})
    fake.add_backup("projects/proj-one/locations/us-central1/backups/b1", home, {})
    fake.injected.append(("POST", ":restore", 429))
    slept: list[float] = []

    filestore_restore.restore_filestore(
        runtime(),
        backup="projects/proj-one/locations/us-central1/backups/b1",
        instance=home,
        share="vol1",
        sleep=slept.append,
        rate_limit_wait_seconds=120,
    )

    assert 120 in slept
    assert len(fake.restores) == 1
