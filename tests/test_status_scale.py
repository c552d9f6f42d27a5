"""The status page, /api/status and /metrics read per-plan summaries kept by every run (services/summary.py), not
every target or the run history: counts match the targets' own health at any moment, a large plan shows what needs
attention and folds the rest, one plan pages through all its targets, and the work of a request is bounded."""

from __future__ import annotations

from datetime import timedelta

from main import create_app
from services import summary
from services.catalog import FAILED, NAMESPACE, SUCCEEDED, Catalog
from services.status import SMALL_PLAN, health
from tests.alerting import AUTH, finished_run, kind_plan, make_plan
from tests.helpers import Clock, make_runtime

BIG = 2 * SMALL_PLAN + 20


class CountingClient:
    """A Datastore client that counts the entities it hands back (lookups and queries)."""

    def __init__(self, client):
        self._client = client
        self.entities = 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def get(self, key, **kwargs):
        found = self._client.get(key, **kwargs)
        self.entities += found is not None
        return found

    def get_multi(self, keys, **kwargs):
        found = self._client.get_multi(keys, **kwargs)
        self.entities += len(found)
        return found

    def query(self, **kwargs):
        counter = self
        query = self._client.query(**kwargs)
        fetch = query.fetch

        def counted(*args, **kw):
            for entity in fetch(*args, **kw):
                counter.entities += 1
                yield entity

        query.fetch = counted
        return query


def seed_big_plan(catalog: Catalog, clock: Clock, failing: int = 7) -> list[str]:
    """BIG targets with a good copy 2 h ago; the first ``failing`` of them failed an hour later."""
    names = [f"projects/demo/zones/us-central1-a/disks/disk-{i:03d}" for i in range(BIG)]
    for name in names:
        catalog.save(finished_run("disks-prod", name, SUCCEEDED, clock.now - timedelta(hours=2)))
    for name in names[:failing]:
        catalog.save(finished_run("disks-prod", name, FAILED, clock.now - timedelta(hours=1), error="quota exceeded"))
    return names


def test_plan_counts_match_every_targets_own_health_as_time_passes(tmp_path, datastore):
    clock = Clock()
    plan = make_plan("mixed", rpo_hours=10)
    catalog = Catalog(datastore)
    for i in range(60):  # good copies of many ages, some failing afterwards, some never good
        name = f"t{i:02d}"
        if i % 7:
            catalog.save(finished_run("mixed", name, SUCCEEDED, clock.now - timedelta(minutes=37 * i)))
        if i % 5 == 0:
            catalog.save(finished_run("mixed", name, FAILED, clock.now - timedelta(minutes=3), error="boom"))
    states = catalog.target_states("mixed")

    for hours in (0, 2, 5, 9, 30):
        now = clock.now + timedelta(hours=hours)
        [shards] = summary.read_shards(datastore, NAMESPACE, ["mixed"], require_built=False).values()
        counted = summary.judge("mixed", shards, plan.rpo_hours, now)
        expected = {"green": 0, "amber": 0, "red": 0}
        for state in states:
            colour = health(state.last_good_at, plan.rpo_hours, now, failing=state.last_status == FAILED)
            expected[colour] += 1
        # Counts are to the minute: a target at most a minute from its threshold may be counted either way.
        assert (counted.green, counted.amber, counted.red) == (expected["green"], expected["amber"], expected["red"])
        # 7 targets never ran (no state); 2 of the 53 others never had a good copy.
        assert counted.total == 53 and counted.failing == 12 and counted.no_good == 2


def test_a_large_plan_shows_what_needs_attention_and_folds_the_rest(tmp_path, datastore):
    clock = Clock()
    plan = kind_plan("disks-prod", "disks", rpo_hours=26)
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    seed_big_plan(Catalog(datastore), clock)
    counting = CountingClient(datastore)
    client = create_app(rt, catalog=Catalog(counting)).test_client()
    client.get("/api/status", headers=AUTH)  # the first view builds the plan's summary once (a new plan)
    counting.entities = 0

    body = client.get("/api/status", headers=AUTH).get_json()
    read_for_json = counting.entities
    page = client.get("/", headers=AUTH).get_data(as_text=True)

    [shown] = body["plans"]
    assert shown["summary"] == {
        "targets": BIG,
        "green": BIG - 7,
        "amber": 7,
        "red": 0,
        "failing": 7,
        "no_good_copy": 0,
        "oldest_good_at": shown["summary"]["oldest_good_at"],
        "drills": {},
    }
    assert [t["health"] for t in shown["targets"]] == ["amber"] * 7
    assert all(t["last_status"] == FAILED for t in shown["targets"]) and shown["folded"] == BIG - 7
    assert body["counts"] == {"green": BIG - 7, "amber": 7, "red": 0, "failing": 7}
    # 17 summary entities, 7 targets, their alerts and attention entities: not the plan's BIG targets.
    assert read_for_json < 60
    assert f"{BIG - 7:,} more targets" in page and page.count('class="target ') == 7


def test_one_plan_pages_through_every_target(tmp_path, datastore):
    clock = Clock()
    plan = kind_plan("disks-prod", "disks", rpo_hours=26)
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    names = seed_big_plan(Catalog(datastore), clock)
    client = create_app(rt, catalog=Catalog(datastore)).test_client()

    seen: list[str] = []
    cursor = None
    for _ in range(10):
        query = {"plan": "disks-prod"} | ({"cursor": cursor} if cursor else {})
        [shown] = client.get("/api/status", query_string=query, headers=AUTH).get_json()["plans"]
        seen += [t["target"] for t in shown["targets"]]
        cursor = shown["next_cursor"]
        if not cursor:
            break
    missing = client.get("/api/status?plan=nope", headers=AUTH)

    assert sorted(set(seen)) == sorted(names)
    assert seen[:7] == sorted(names[:7])  # the first page leads with the failing targets
    assert missing.status_code == 404 and "no plan named 'nope'" in missing.get_json()["error"]


def test_targets_recorded_before_summaries_existed_are_counted(tmp_path, datastore):
    clock = Clock()
    plan = kind_plan("disks-prod", "disks", rpo_hours=26)
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    seed_big_plan(Catalog(datastore), clock)
    query = datastore.query(kind=summary.SUMMARY_KIND, namespace=NAMESPACE)
    datastore.delete_multi([e.key for e in query.fetch()])  # as an older version left the catalog

    body = create_app(rt, catalog=Catalog(datastore)).test_client().get("/api/status", headers=AUTH).get_json()

    assert body["counts"] == {"green": BIG - 7, "amber": 7, "red": 0, "failing": 7}


def test_metrics_of_a_large_plan_are_per_plan_and_per_target_only_where_attention_is_needed(tmp_path, datastore):
    clock = Clock()
    plan = kind_plan("disks-prod", "disks", rpo_hours=26)
    rt = make_runtime(tmp_path, plans={plan.name: plan}, clock=clock)
    names = seed_big_plan(Catalog(datastore), clock)

    text = create_app(rt, catalog=Catalog(datastore)).test_client().get("/metrics", headers=AUTH).get_data(as_text=True)

    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}
    assert samples['backup_plan_targets{plan="disks-prod",health="green"}'] == BIG - 7
    assert samples['backup_plan_targets{plan="disks-prod",health="amber"}'] == 7
    assert samples['backup_plan_failing_targets{plan="disks-prod"}'] == 7
    failing = {k for k in samples if k.startswith("backup_last_run_failed{")}
    assert failing == {f'backup_last_run_failed{{plan="disks-prod",target="{n}"}}' for n in names[:7]}
