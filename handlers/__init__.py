"""HTTP only: parse, authorise, call one service, map the result to a status code."""

from __future__ import annotations

from typing import Any

from flask import current_app


def runtime() -> Any:
    return current_app.extensions["backup"]["runtime"]


def catalog() -> Any:
    return current_app.extensions["backup"]["catalog"]()


def queue() -> Any:
    return current_app.extensions["backup"]["queue"]()
