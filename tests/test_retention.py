"""The one retention rule, held to its properties over generated backup sets (Hypothesis): it never deletes the
newest backup, never goes below the floor, never touches a backup this service did not make or one not yet
complete, and deciding again after deleting deletes nothing more."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.retention import Backup, NotConfirmed, Policy, prune, to_delete

START = datetime(2026, 1, 1, tzinfo=UTC)

backups = st.lists(
    st.builds(
        Backup,
        name=st.text(alphabet="abcdef0123456789", min_size=1, max_size=6),
        created=st.integers(min_value=0, max_value=10_000).map(lambda m: START + timedelta(minutes=m)),
        ours=st.booleans(),
        complete=st.booleans(),
    ),
    max_size=30,
    unique_by=lambda b: b.name,
)
policies = st.builds(Policy, keep=st.one_of(st.none(), st.integers(min_value=0, max_value=12)), floor=st.integers(1, 5))


def _eligible(items):
    return [b for b in items if b.ours and b.complete]


@given(backups, policies)
def test_never_deletes_the_newest_or_below_the_floor(items, policy):
    doomed = to_delete(items, policy, confirmed=None)

    eligible = _eligible(items)
    remaining = [b for b in eligible if b not in doomed]
    if eligible:
        newest = max(eligible, key=lambda b: (b.created, b.name))
        assert newest not in doomed
    assert len(remaining) >= min(len(eligible), policy.floor)
    if policy.keep is not None:
        assert len(remaining) == min(len(eligible), max(policy.keep, policy.floor, 1))


@given(backups, policies)
def test_never_deletes_a_foreign_or_incomplete_backup(items, policy):
    doomed = to_delete(items, policy, confirmed=None)

    assert all(b.ours and b.complete for b in doomed)


@given(backups, policies)
def test_deletes_the_oldest_first_and_keeps_every_newer_one(items, policy):
    doomed = to_delete(items, policy, confirmed=None)

    assert doomed == sorted(doomed, key=lambda b: (b.created, b.name))
    if doomed:
        newest_doomed = max((b.created, b.name) for b in doomed)
        assert all((b.created, b.name) > newest_doomed for b in _eligible(items) if b not in doomed)


@given(backups, policies)
def test_is_idempotent(items, policy):
    doomed = to_delete(items, policy, confirmed=None)
    remaining = [b for b in items if b not in doomed]

    assert to_delete(remaining, policy, confirmed=None) == []


@given(backups, policies)
def test_a_confirmed_backup_that_is_not_listed_stops_all_pruning(items, policy):
    listed = {b.name for b in _eligible(items)}

    with pytest.raises(NotConfirmed):
        to_delete(items, policy, confirmed="not-listed-" + "x" * 7)
    for backup in items:
        if backup.name in listed:
            to_delete(items, policy, confirmed=backup.name)  # listed and complete: allowed


def test_a_late_confirmation_of_an_older_backup_deletes_that_one_not_the_newer():
    older = Backup("monday", START, ours=True)
    newer = Backup("tuesday", START + timedelta(days=1), ours=True)

    assert to_delete([newer, older], Policy(keep=1), confirmed="monday") == [older]


def test_prune_reports_failed_deletes_and_goes_on():
    items = [Backup(f"b{i}", START + timedelta(hours=i), ours=True) for i in range(5)]
    gone, failed = [], []

    def delete(backup):
        if backup.name == "b0":
            raise OSError("in use")
        gone.append(backup.name)

    deleted = prune(items, Policy(keep=2), "b4", delete, on_error=lambda b, exc: failed.append((b.name, str(exc))))

    assert [b.name for b in deleted] == gone == ["b1", "b2"]
    assert failed == [("b0", "in use")]
