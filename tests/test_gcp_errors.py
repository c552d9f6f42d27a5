"""One judgement of Google API errors for every client and kind: retry, skip or stop, with a useful message."""

from __future__ import annotations

import json

import httplib2
import pytest
import requests
from google.api_core import exceptions as core
from googleapiclient.errors import HttpError

from services.errors import PermanentError, TargetGone, TransientError
from services.gcp_errors import classify, decode_page_token, encode_page_token, next_page_token


def http_error(status: int, reason: str = "", message: str = "boom", retry_after: str | None = None) -> HttpError:
    headers = {"status": str(status)} | ({"retry-after": retry_after} if retry_after else {})
    body = {"error": {"code": status, "message": message, "errors": [{"reason": reason}] if reason else []}}
    return HttpError(httplib2.Response(headers), json.dumps(body).encode())


@pytest.mark.parametrize(
    ("exc", "expected", "rate_limited"),
    [
        (http_error(429), TransientError, True),
        (http_error(403, "rateLimitExceeded"), TransientError, True),
        (http_error(503), TransientError, False),
        (http_error(400, "resourceNotReady"), TransientError, False),
        (http_error(409, "conflict", "operation in progress"), TransientError, False),
        (http_error(409, "alreadyExists", "already exists"), PermanentError, None),
        (http_error(400, "invalid"), PermanentError, None),
        (core.ResourceExhausted("quota"), TransientError, True),
        (core.Aborted("contention"), TransientError, False),
        (core.InvalidArgument("bad"), PermanentError, None),
        (requests.ConnectionError("reset"), TransientError, False),
    ],
)
def test_every_client_is_judged_alike(exc, expected, rate_limited):
    judged = classify(exc, "doing it")

    assert type(judged) is expected
    if rate_limited is not None:
        assert judged.rate_limited is rate_limited


@pytest.mark.parametrize("exc", [http_error(404), core.NotFound("gone")])
def test_a_404_is_gone_only_when_the_target_itself_is_missing(exc):
    assert isinstance(classify(exc, "reading disk", gone_means_skip=True), TargetGone)
    assert type(classify(exc, "reading bucket")) is PermanentError


def test_permission_errors_name_the_missing_permission():
    named = classify(http_error(403, "forbidden", "Required 'compute.disks.list' permission"), "listing", where="in p1")
    unnamed = classify(http_error(403, "forbidden", "denied"), "listing", permission="file.backups.create")

    assert "missing compute.disks.list" in str(named) and "in p1" in str(named)
    assert "missing file.backups.create" in str(unnamed)


def test_retry_after_is_kept_for_the_queue():
    assert classify(http_error(429, retry_after="17"), "x").retry_after == 17.0


def test_page_tokens_walk_projects_and_refuse_foreign_ones():
    projects = ("p-one", "p-two")

    assert next_page_token(projects, 0, None) == encode_page_token("p-two", "")
    assert next_page_token(projects, 1, None) is None
    assert decode_page_token(next_page_token(projects, 0, "abc"), projects, "disks") == (0, "abc")
    with pytest.raises(PermanentError, match="not one this service issued"):
        decode_page_token("garbage", projects, "disks")
    with pytest.raises(PermanentError, match="no longer lists"):
        decode_page_token(encode_page_token("p-gone", ""), projects, "disks")
