"""One whole disk run over real HTTP: the fake Compute served on 127.0.0.1, reached through the endpoint
override from the environment, exactly as a local run of the service (or the benchmark) reaches it."""

from __future__ import annotations

from google.auth.credentials import AnonymousCredentials

from kinds.disks import snapshots as disks
from services.kinds import Done, Pending, RunContext
from services.plans import parse_plan
from services.runtime import Runtime, Settings
from tests.fakes_compute import ComputeFake, FakeServer


def test_a_run_over_real_http_snapshots_and_prunes(compute_clock):
    fake = ComputeFake(clock=compute_clock)
    disk = fake.add_disk("proj-alpha", "web", zone="us-east1-b", labels={"backup-generations": "1"})
    plan = parse_plan("disk-nightly", {"kind": "disks", "select": {"projects": ["proj-alpha"]}})

    with FakeServer(fake) as server:
        rt = Runtime(
            Settings.from_env({"BACKUP_COMPUTE_ENDPOINT": server.endpoint}),
            clock=compute_clock,
            credentials=AnonymousCredentials(),
        )
        outputs = []
        for _ in range(2):
            period = compute_clock.advance(hours=1)
            (target,) = disks.KIND.enumerate(plan, None, rt).targets
            run = RunContext(run_id="r", plan=plan.name, target_key=target.key, period=period)
            outcome = disks.KIND.start(plan, target, run, rt)
            while isinstance(outcome, Pending):
                outcome = disks.KIND.poll(plan, target, outcome.state, run, rt)
            assert isinstance(outcome, Done)
            outputs.append(outcome.output)

    (kept,) = fake.snapshots_of(disk)
    assert outputs[-1] == kept["selfLink"] and outputs[0] != outputs[-1]
    assert not server.thread.is_alive()
