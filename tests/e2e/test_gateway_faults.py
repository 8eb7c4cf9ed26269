"""A real gateway process in front of services that misbehave: hang, hang up, babble, or are gone.

The services are sockets this test holds on 127.0.0.1, so each fault is exact: a service that
accepts and never answers (504 ``upstream-timeout`` after the read timeout), one that closes the
connection at once or answers with bytes that are not HTTP (502 ``bad-gateway``), and a port
nothing listens on (503 ``unavailable``, at once).
"""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.stack import Client, Stack, free_port

pytestmark = pytest.mark.e2e

PROBLEM = "application/problem+json"
READ_TIMEOUT_S = 1.0
LOT = "/v1/lots/00000000-0000-0000-0000-000000000000"


class FakeService:
    """A listening socket on 127.0.0.1 whose every connection gets ``mode``'s treatment.

    ``hang``: accepted, read, never answered (held open until the end); ``close``: accepted and
    closed at once; ``garbage``: the request is read and answered with bytes that are not HTTP.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.accepted = 0
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"fake-{mode}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._listener], [], [], 0.05)
            if not readable:
                continue
            conn, _ = self._listener.accept()
            self.accepted += 1
            if self.mode == "close":
                conn.close()
                continue
            conn.settimeout(2.0)
            try:
                conn.recv(65536)
                if self.mode == "garbage":
                    conn.sendall(b"\x00\x01 this is not HTTP at all \xff\xfe\r\n\r\n")
            except OSError:
                pass
            if self.mode == "garbage":
                conn.close()
            else:
                self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._listener.close()


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeService]]:
    services = {"availability": FakeService("hang"), "reservations": FakeService("close")}
    yield services
    for service in services.values():
        service.close()


@pytest.fixture(scope="module")
def gateway(
    database_url: str,
    redis_url: str,
    fakes: dict[str, FakeService],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """Only the gateway, its availability and reservations upstreams fakes, ingestion absent."""
    overrides = {
        "PARKING_GATEWAY_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
        "PARKING_GATEWAY_CONNECT_TIMEOUT_S": "1.0",
        "PARKING_GATEWAY_AVAILABILITY_URL": fakes["availability"].url,
        "PARKING_GATEWAY_RESERVATIONS_URL": fakes["reservations"].url,
        # a port nothing listens on (taken from the kernel and released at once)
        "PARKING_GATEWAY_INGESTION_URL": f"http://127.0.0.1:{free_port()}",
    }
    workdir = Path(tmp_path_factory.mktemp("gateway-faults"))
    stack = Stack(database_url, redis_url, workdir, env_overrides=overrides, names=("gateway",))
    with stack:
        yield stack


def _timed(
    call: Client, method: str, path: str, **kwargs: object
) -> tuple[requests.Response, float]:
    rid = f"fault-{uuid.uuid4()}"
    started = time.monotonic()
    resp = call.request(method, path, headers={"X-Request-ID": rid}, timeout=15, **kwargs)
    elapsed = time.monotonic() - started
    assert resp.headers["X-Request-ID"] == rid
    return resp, elapsed


def _assert_problem(resp: requests.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == PROBLEM
    body = resp.json()
    assert body["status"] == status and body["code"] == code
    # no internal address or port in the answer
    assert "127.0.0.1" not in resp.text


def test_a_service_that_never_answers_is_504_after_the_read_timeout(
    gateway: Stack, fakes: dict[str, FakeService]
) -> None:
    before = fakes["availability"].accepted
    resp, elapsed = _timed(Client(gateway.url), "GET", LOT)
    _assert_problem(resp, 504, "upstream-timeout")
    assert READ_TIMEOUT_S * 0.9 <= elapsed < READ_TIMEOUT_S + 2.0, elapsed
    assert fakes["availability"].accepted == before + 1  # a fresh connection, not retried


@pytest.mark.parametrize("mode", ["close", "garbage"])
def test_a_service_that_hangs_up_or_babbles_is_502(
    gateway: Stack, fakes: dict[str, FakeService], mode: str
) -> None:
    fakes["reservations"].mode = mode
    resp, elapsed = _timed(Client(gateway.url), "GET", LOT + "/quote")
    _assert_problem(resp, 502, "bad-gateway")
    assert elapsed < READ_TIMEOUT_S + 1.0, elapsed


def test_a_service_nobody_listens_for_is_503_at_once(gateway: Stack) -> None:
    admin = Client(gateway.url, gateway.admin_key)
    resp, elapsed = _timed(admin, "POST", "/v1/admin/operators", json={"name": "nobody home"})
    _assert_problem(resp, 503, "unavailable")
    assert resp.headers["Retry-After"] == "1"
    assert elapsed < 2.0, elapsed


def test_the_gateway_still_answers_its_own_routes(gateway: Stack) -> None:
    """The faults of its upstreams leave the gateway itself healthy."""
    assert requests.get(gateway.url + "/healthz", timeout=5).status_code == 200
    assert requests.get(gateway.url + "/readyz", timeout=5).status_code == 200
