"""A key given twice in plans.yaml, cron.yaml or queue.yaml is refused with its line, instead of the last one
silently winning (PyYAML's default)."""

from __future__ import annotations

import pytest

from services.errors import ConfigError
from services.plans import load_plans
from services.queue import load_queue_configs
from services.schedule import load_cron

PLAN = """\
  nightly:
    kind: datastore
    rpo_hours: 26
    destination: {bucket: demo-backups}
    options: {location: us-central1}
"""


def test_a_plan_pasted_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "plans.yaml"
    path.write_text("plans:\n" + PLAN + PLAN.replace("rpo_hours: 26", "rpo_hours: 2"))

    with pytest.raises(ConfigError) as caught:
        load_plans(path)

    assert str(caught.value) == "plans.yaml, line 7: 'nightly' is given twice (first on line 2); only one may stay"


def test_a_field_given_twice_inside_a_plan_is_refused(tmp_path):
    path = tmp_path / "plans.yaml"
    path.write_text("plans:\n" + PLAN + "    rpo_hours: 48\n")

    with pytest.raises(ConfigError, match=r"plans.yaml, line 7: 'rpo_hours' is given twice \(first on line 4\)"):
        load_plans(path)


def test_queue_and_cron_files_refuse_repeats_too(tmp_path):
    queues = tmp_path / "queue.yaml"
    queues.write_text("queue:\n- name: notify\n  rate: 2/s\n- name: notify\n  rate: 5/s\n")
    cron = tmp_path / "cron.yaml"
    cron.write_text("cron:\n- url: /cron/_stale\n  schedule: every 1 hours\n  schedule: every 2 hours\n")

    with pytest.raises(ConfigError, match="queue.yaml: queue 'notify' is defined twice"):
        load_queue_configs(queues)
    with pytest.raises(ConfigError, match=r"cron.yaml, line 4: 'schedule' is given twice \(first on line 3\)"):
        load_cron(cron)
