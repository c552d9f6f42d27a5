"""Secrets and outside settings through one seam: a Runtime's own environment, and Secret Manager versions read
with the real client library (REST transport) against `responses`, cached."""

from __future__ import annotations

import base64

import pytest
import responses
from google.auth.credentials import AnonymousCredentials

from services.errors import PermanentError, TransientError
from services.runtime import Runtime, Settings

VERSION = "projects/test-project/secrets/couch-password/versions/3"


def runtime(env=None):
    settings = Settings.from_env({"BACKUP_SECRETMANAGER_ENDPOINT": "https://secrets.test", **(env or {})})
    return Runtime(settings, plans={}, credentials=AnonymousCredentials())


def test_environment_values_come_from_the_runtime_not_the_process(monkeypatch):
    monkeypatch.setenv("COUCH_URL", "http://from-the-process")
    rt = runtime({"COUCH_URL": "  http://couch.internal:5984 "})

    assert rt.secrets.env("COUCH_URL") == "http://couch.internal:5984"
    assert rt.secrets.env("MISSING", "fallback") == "fallback"
    with pytest.raises(PermanentError, match="MISSING_URL \\(the CouchDB server URL\\) is not set"):
        rt.secrets.require_env("MISSING_URL", "the CouchDB server URL")


def test_secret_versions_are_read_once_and_cached():
    rt = runtime()
    with responses.RequestsMock() as mocked:
        mocked.get(
            f"https://secrets.test/v1/{VERSION}:access",
            json={"name": VERSION, "payload": {"data": base64.b64encode(b"hunter2\n").decode()}},
        )

        first, second = rt.secrets.secret(VERSION), rt.secrets.secret(VERSION)

        assert (first, second) == ("hunter2", "hunter2")
        assert len(mocked.calls) == 1


@pytest.mark.parametrize(("status", "error"), [(503, TransientError), (403, PermanentError), (404, PermanentError)])
def test_secret_manager_errors_are_judged_like_every_api(status, error):
    rt = runtime()
    with responses.RequestsMock() as mocked:
        mocked.get(f"https://secrets.test/v1/{VERSION}:access", status=status, json={"error": {"code": status}})

        with pytest.raises(error, match="Secret Manager version"):
            rt.secrets.secret(VERSION)


def test_a_reference_that_is_not_a_secret_version_is_refused_without_a_call():
    with pytest.raises(PermanentError, match="is not a secret version"):
        runtime().secrets.secret("couch-password")
