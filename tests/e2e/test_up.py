"""``make up`` (``parking up``) runs the local stack, Ctrl-C stops it, a restart keeps the data.

It runs as ``make up`` does (the ``parking`` script from the venv, in the repository), with the
embedded PostgreSQL and Redis (no DATABASE_URL / REDIS_URL) in a data directory of the test's
own and free ports, and is stopped like Ctrl-C stops it: SIGINT to its process group. The
processes are found as loadtests/footprint.py finds them: the descendants of ``parking up``, and
the embedded servers (which detach from it) by their files in the data directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loadtests.footprint import embedded_servers, tree
from tests.stack import BIN, ROOT, Client, free_port, wait_for

pytestmark = pytest.mark.e2e

READY_S = 90.0
STOP_S = 40.0


def _started_at(pid: int) -> str | None:
    """The process' start time (field 22 of /proc/PID/stat), None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


@dataclass
class Up:
    """One ``parking up`` run: its process, output, the keys it printed, what it started."""

    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""
    output: str = ""
    processes: dict[int, str] = field(default_factory=dict)  # pid -> start time
    servers: list[int] = field(default_factory=list)  # the embedded PostgreSQL and Redis
    exited: bool = False  # ``parking up`` itself ended after the SIGINT
    left: list[int] = field(default_factory=list)  # what was still running after it

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> list[int]:
        return [pid for pid, start in self.processes.items() if _started_at(pid) == start]


@contextlib.contextmanager
def parking_up(data_dir: Path, admin_key: str, log: Path) -> Iterator[Up]:
    """``parking up`` until it is ready; SIGINT (Ctrl-C) at the end, SIGKILL if that fails."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PARKING_", "TEST_")) and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(
        PARKING_DATA_DIR=str(data_dir),
        PARKING_ADMIN_KEY=admin_key,
        GATEWAY_PORT=str(free_port()),
        INGESTION_PORT=str(free_port()),
        AVAILABILITY_PORT=str(free_port()),
        RESERVATIONS_PORT=str(free_port()),
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "parking"), "up"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    up = Up(proc, log)
    try:

        def ready_or_gone() -> bool:
            return proc.poll() is not None or "ready in" in up.text()

        try:
            wait_for(ready_or_gone, timeout=READY_S, interval=0.2, what="parking up ready")
        except TimeoutError:
            raise AssertionError(f"parking up not ready:\n{up.text()[-3000:]}") from None
        if proc.poll() is not None:
            raise AssertionError(f"parking up exited {proc.returncode}:\n{up.text()[-3000:]}")
        up.output = up.text()
        up.url = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
        yield up
    finally:
        up.servers = embedded_servers(data_dir)
        pids = tree(proc.pid) + up.servers
        up.processes = {p: s for p in pids if (s := _started_at(p)) is not None}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_S)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not up.alive(), timeout=10, interval=0.1, what="every process gone")
        up.exited = proc.poll() is not None
        up.left = left = up.alive()
        if not up.exited or left:  # clean up what this test started, then fail below
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(5)


def _keys(output: str) -> dict[str, str]:
    """The keys ``parking up`` printed: admin, city, and each operator by name."""
    keys = {}
    for line in output.splitlines():
        if m := re.match(r"\s+admin key:\s+(\S+)$", line):
            keys["admin"] = m.group(1)
        elif m := re.match(r"\s+city key:\s+(\S+)$", line):
            keys["city"] = m.group(1)
        elif m := re.match(r"\s+operator:\s+(.+): (\S+)$", line):
            keys[m.group(1)] = m.group(2)
    return keys


def _lot_count(url: str, key: str) -> int:
    client = Client(url, key)
    try:
        resp = client.get("/v1/lots?mine=1&limit=500")
        assert resp.status_code == 200, resp.text
        assert resp.json()["next_cursor"] is None
        return len(resp.json()["items"])
    finally:
        client.session.close()


def _demo_lots_live(url: str, keys: Iterable[str]) -> bool:
    """Whether every lot of the operators with ``keys`` has a live state with some car in it
    somewhere: the feed's first report fills lots to a fifth of their capacity and more."""
    anonymous = Client(url)
    try:
        occupied = 0
        for key in keys:
            owner = Client(url, key)
            try:
                items = owner.get("/v1/lots?mine=1&limit=500").json()["items"]
            finally:
                owner.session.close()
            for item in items:
                detail = anonymous.get(f"/v1/lots/{item['id']}").json()
                if detail["updated_at"] is None:
                    return False
                occupied += sum(detail["occupied"].values())
        return occupied > 0
    finally:
        anonymous.session.close()


def test_make_up_runs_the_stack_stops_on_ctrl_c_and_keeps_its_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    admin_key = "admin-" + uuid.uuid4().hex
    demo: dict[str, str] = {}

    with parking_up(data_dir, admin_key, tmp_path / "up-1.log") as first:
        url = first.url
        assert f"gateway:    {url}" in first.output
        keys = _keys(first.output)
        assert keys["admin"] == admin_key
        assert keys["city"].startswith("pk_city_")
        demo = {k: v for k, v in keys.items() if k not in ("admin", "city")}
        assert len(demo) == 2 and all(v.startswith("pk_operator_") for v in demo.values())

        admin = Client(url, admin_key)
        try:
            created = admin.post("/v1/admin/operators", json={"name": "Up Co"})
            assert created.status_code == 201, created.text
        finally:
            admin.session.close()
        operator = Client(url, created.json()["api_key"])
        try:
            lot = operator.post(
                "/v1/lots",
                json={
                    "name": "Up P1",
                    "location": {"lat": 30.25, "lon": 120.13},
                    "district": "xihu",
                    "capacity": {"standard": 10},
                    "tariff": {"currency": "CNY", "per_hour": "5.00"},
                },
            )
            assert lot.status_code == 201, lot.text
        finally:
            operator.session.close()
        demo_lots = sum(_lot_count(url, key) for key in demo.values())
        assert 40 <= demo_lots <= 60, demo_lots
        # the demo feed reports every demo lot's state, so none reads `unknown` (no data)
        assert "demo feed:" in first.output
        wait_for(
            lambda: _demo_lots_live(url, demo.values()),
            timeout=30,
            interval=0.5,
            what="every demo lot live",
        )
        city = Client(url, keys["city"])
        try:
            assert city.get("/v1/city/snapshot").status_code == 200
        finally:
            city.session.close()

    assert first.exited
    # every process it started: honcho, gunicorn masters and workers, celery, the servers
    assert len(first.processes) >= 8, first.processes
    assert len(first.servers) >= 2, first.servers  # postmaster (and its children), redis
    assert first.left == [], f"left running: {first.left}\n{first.text()[-3000:]}"

    with parking_up(data_dir, admin_key, tmp_path / "up-2.log") as second:
        url = second.url
        keys = _keys(second.output)
        # the demo keys are kept with the data, not made anew
        assert {k: v for k, v in keys.items() if k not in ("admin", "city")} == demo
        assert _lot_count(url, created.json()["api_key"]) == 1  # the operator of the first run
        assert sum(_lot_count(url, key) for key in demo.values()) == demo_lots

    assert second.exited
    assert second.left == [], f"left running: {second.left}\n{second.text()[-3000:]}"
