"""WSGI helpers of the fast-path tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Counting:
    """The Flask app behind a fast path, counting the requests that reach it."""

    def __init__(self, app: Any) -> None:
        self.app, self.calls = app, 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.calls += 1
        return self.app(environ, start_response)  # type: ignore[no-any-return]
