"""Footprint of the local stack: time for `parking up` to be ready, and idle memory.

Runs `parking up` (embedded PostgreSQL and Redis unless DATABASE_URL / REDIS_URL are set) in a
fresh data directory twice (the first start initialises the data, the second reuses it), waits
for the ready line, lets the stack idle, sums the resident and proportional set sizes of every
process it started, then stops it with SIGINT, like Ctrl-C. Idle means without the demo feed
(PARKING_DEMO_FEED=0): a third start measures the stack with it, under its events.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtests.harness import report
from tests.stack import free_port

ROOT = Path(__file__).resolve().parent.parent


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def embedded_servers(data_dir: Path) -> list[int]:
    """The embedded PostgreSQL (postmaster and its children) and Redis started for ``data_dir``."""
    pids: list[int] = []
    pidfile = data_dir / "postgresql" / "postmaster.pid"
    if pidfile.exists():
        pids += tree(int(pidfile.read_text().split()[0]))
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")).is_relative_to(data_dir / "redis"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in KiB over ``pids``."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def run_once(data_dir: Path, idle_s: float, *, feed: bool = False) -> dict[str, object]:
    env = dict(os.environ)
    env.update(
        PARKING_DATA_DIR=str(data_dir),
        PARKING_DEMO_FEED="1" if feed else "0",
        GATEWAY_PORT=str(free_port()),
        INGESTION_PORT=str(free_port()),
        AVAILABILITY_PORT=str(free_port()),
        RESERVATIONS_PORT=str(free_port()),
    )
    for name in list(env):
        if name.startswith("PARKING_GATEWAY_") and name.endswith("_URL"):
            del env[name]
    log = data_dir.parent / f"up-{time.time_ns()}.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while b"ready in" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("parking up did not become ready:\n" + log.read_text()[-3000:])
            time.sleep(0.1)
        ready_s = time.monotonic() - started
        time.sleep(idle_s)  # on purpose: the measurement is of the stack at rest (or fed)
        pids = tree(proc.pid) + embedded_servers(data_dir)
        rss, pss = memory_kib(pids)
        return {
            "ready_s": round(ready_s, 1),
            "processes": len(pids),
            "rss_mib": round(rss / 1024),
            "pss_mib": round(pss / 1024),
        }
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def main() -> None:
    idle_s = float(os.environ.get("FOOTPRINT_IDLE_SECONDS", "10"))
    with tempfile.TemporaryDirectory(prefix="parking-footprint-") as tmp:
        data = Path(tmp) / "data"
        first = run_once(data, idle_s)
        second = run_once(data, idle_s)
        fed = run_once(data, idle_s, feed=True)
    report(
        "make up footprint",
        {
            "first start (initialises data)": first,
            "second start (reuses data)": second,
            "third start, with the demo feed": fed,
        },
    )


if __name__ == "__main__":
    main()
