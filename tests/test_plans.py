"""plans.yaml validation: typed plans, and errors that name the plan and the field."""

from __future__ import annotations

import pytest

from services.errors import ConfigError
from services.plans import load_plans, parse_plans


def datastore_plan(**overrides):
    raw = {
        "kind": "datastore",
        "destination": {"bucket": "b"},
        "options": {"location": "us-central1"},
    }
    raw.update(overrides)
    return {"plans": {"nightly": raw}}


def test_valid_plan_is_typed():
    plan = parse_plans(datastore_plan(retention={"keep": 7}, rpo_hours=26))["nightly"]

    assert plan.kind == "datastore"
    assert plan.queue == "datastore-exports"
    assert plan.retention.keep == 7 and plan.retention.min_keep == 1
    assert plan.rpo_hours == 26.0
    assert plan.settings.bucket == "b" and plan.settings.prefix == "datastore"
    assert plan.settings.namespaces is None and plan.settings.grouped is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "tape"}, "plan 'nightly', field 'kind': expected one of"),
        ({"retension": {"keep": 3}}, "plan 'nightly', field 'retension': unknown field"),
        ({"retention": {"keep": "7"}}, "field 'retention.keep': expected an integer, got '7'"),
        ({"notify": {"on_failure": "false"}}, "field 'notify.on_failure': expected true or false (unquoted)"),
        ({"destination": {"bucket": "gs://b/x"}}, "field 'destination.bucket': expected a bucket name"),
        ({"options": {}}, "field 'options.location': is required"),
        ({"options": {"location": "us-central1", "grouping": "some"}}, "field 'options.grouping': expected one of"),
        ({"retention": {"keep": 1, "min_keep": 3}}, "field 'retention.keep': must be >= retention.min_keep"),
        ({"select": {"kinds": "Customer"}}, "field 'select.kinds': expected a list of non-empty strings"),
    ],
)
def test_invalid_plan_error_names_plan_and_field(overrides, message):
    with pytest.raises(ConfigError) as raised:
        parse_plans(datastore_plan(**overrides))

    assert message in str(raised.value)
    assert str(raised.value).startswith("plans.yaml: plan 'nightly'")


def test_bad_plan_name_and_empty_file_are_refused():
    with pytest.raises(ConfigError, match="plan 'Nightly!'"):
        parse_plans({"plans": {"Nightly!": {"kind": "datastore"}}})
    with pytest.raises(ConfigError, match="expected a top-level 'plans:' mapping"):
        parse_plans(None)


def test_invalid_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "plans.yaml"
    path.write_text("plans:\n  nightly: [unclosed\n")

    with pytest.raises(ConfigError, match="plans.yaml: not valid YAML"):
        load_plans(path)


def test_app_start_up_stops_on_an_invalid_plans_file(tmp_path):
    from main import create_app
    from tests.helpers import make_runtime

    path = tmp_path / "plans.yaml"
    path.write_text("plans:\n  nightly:\n    kind: datastore\n    destination: {bucket: b}\n")

    with pytest.raises(ConfigError, match="plan 'nightly', field 'options.location': is required"):
        create_app(make_runtime(tmp_path, plans_path=path))


def test_start_up_refuses_plans_queues_and_cron_jobs_that_do_not_agree(tmp_path):
    from services.deployment import check_deployment_files
    from services.runtime import ROOT

    plans = parse_plans(datastore_plan())
    stray_cron = tmp_path / "cron.yaml"
    stray_cron.write_text("cron:\n- url: /cron/weekly\n  schedule: every monday 09:00\n")
    no_polls = tmp_path / "queue.yaml"
    no_polls.write_text("queue:\n- name: fanout\n- name: notify\n- name: datastore-exports\n")
    odd_queue = parse_plans(datastore_plan(queue="nowhere"))

    with pytest.raises(ConfigError, match=r"cron.yaml: entry 1 \(/cron/weekly\): no plan named 'weekly'"):
        check_deployment_files(plans, ROOT / "queue.yaml", stray_cron)
    with pytest.raises(ConfigError, match="queue.yaml: queue 'polls' is missing"):
        check_deployment_files(plans, no_polls, ROOT / "cron.yaml")
    with pytest.raises(ConfigError, match="field 'queue': 'nowhere' is not a queue in queue.yaml"):
        check_deployment_files(odd_queue, ROOT / "queue.yaml", tmp_path / "none.yaml")
