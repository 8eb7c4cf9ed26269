"""``/healthz`` (the process answers) and ``/readyz`` (its dependencies answer)."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue

from services.common.errors import Problem


def init_app(app: Flask, checks: dict[str, Callable[[], None]]) -> None:
    def healthz() -> ResponseReturnValue:
        return jsonify(status="ok")

    def readyz() -> ResponseReturnValue:
        failed = []
        for name, check in checks.items():
            try:
                check()
            except Exception:
                failed.append(name)
        if failed:
            raise Problem(503, f"not ready: {', '.join(failed)} unavailable", code="unavailable")
        return jsonify(status="ready", checks=sorted(checks))

    app.add_url_rule("/healthz", "healthz", healthz)
    app.add_url_rule("/readyz", "readyz", readyz)
