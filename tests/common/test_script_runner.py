"""ScriptRunner against the real Redis: concurrent callers share round trips (auto-pipelining)
and still each get their own reply or error."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from typing import Any

import pytest
import redis

from services.common.redis import AutoPipeline, ScriptRunner, _reader, connect, pack_commands

# Echoes its key and argument; fails when asked to; counts its runs in one key.
ECHO = """
redis.call('INCR', KEYS[2])
if ARGV[1] == 'fail' then
  return redis.error_reply('asked to fail')
end
return {KEYS[1], ARGV[1]}
"""


class CountingPool:
    """The client's pool, counting the writes each connection it makes sends to Redis."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool = pool
        self.writes = 0

    def make_connection(self) -> Any:
        conn = self.pool.make_connection()
        send = conn.send_packed_command

        def counted(command: Any, check_health: bool = True) -> None:
            self.writes += 1
            send(command, check_health)

        conn.send_packed_command = counted
        return conn


def runner(client: redis.Redis) -> tuple[ScriptRunner, CountingPool]:
    script = ScriptRunner(client, ECHO)
    counting = CountingPool(client.connection_pool)
    script.pool = counting  # type: ignore[assignment]
    return script, counting


def test_concurrent_callers_get_their_own_replies_in_fewer_round_trips(
    redis_client: redis.Redis,
) -> None:
    script, counting = runner(redis_client)
    runs = f"test:runs:{uuid.uuid4().hex}"
    callers, calls_each = 16, 50
    replies: dict[int, list[Any]] = {n: [] for n in range(callers)}
    start = threading.Barrier(callers, timeout=30)

    def call(n: int) -> None:
        start.wait()
        for i in range(calls_each):
            replies[n].append(script([f"k{n}", runs], [f"{n}:{i}"]))

    threads = [threading.Thread(target=call, args=(n,)) for n in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)

    for n in range(callers):
        assert replies[n] == [[f"k{n}", f"{n}:{i}"] for i in range(calls_each)]
    assert int(redis_client.get(runs) or 0) == callers * calls_each  # each run ran once
    # the script was loaded by one write, and the runs shared the others
    assert counting.writes < callers * calls_each


def test_a_script_redis_forgot_is_loaded_again(redis_client: redis.Redis) -> None:
    script, _ = runner(redis_client)
    runs = f"test:runs:{uuid.uuid4().hex}"
    assert script(["a", runs], ["1"]) == ["a", "1"]
    redis_client.script_flush()
    assert script(["b", runs], ["2"]) == ["b", "2"]
    assert int(redis_client.get(runs) or 0) == 2


def test_a_failing_run_fails_only_its_caller(redis_client: redis.Redis) -> None:
    script, _ = runner(redis_client)
    runs = f"test:runs:{uuid.uuid4().hex}"
    callers = 8
    results: dict[int, Any] = {}
    start = threading.Barrier(callers, timeout=30)

    def call(n: int) -> None:
        start.wait()
        try:
            results[n] = script(["k", runs], ["fail" if n % 2 else str(n)])
        except redis.ResponseError as exc:
            results[n] = exc

    threads = [threading.Thread(target=call, args=(n,)) for n in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for n in range(callers):
        if n % 2:
            assert isinstance(results[n], redis.ResponseError), results[n]
        else:
            assert results[n] == ["k", str(n)]
    assert script(["k", runs], ["after"]) == ["k", "after"]  # the connection is still good


def test_a_dead_redis_fails_every_caller_with_a_redis_error(tmp_path: Any) -> None:
    dead = redis.Redis(unix_socket_path=str(tmp_path / "no-redis.sock"), socket_timeout=1)
    script = ScriptRunner(dead, ECHO)
    with pytest.raises(redis.ConnectionError):
        script(["k", "runs"], ["1"])
    with pytest.raises(redis.ConnectionError):  # and the next caller tries again, not hangs
        script(["k", "runs"], ["2"])


def test_a_caller_gone_while_chosen_to_send_hands_the_batch_on(redis_client: redis.Redis) -> None:
    """A waiting caller killed (a worker shutting down) just as it was chosen to send the next
    batch: the next caller in line sends it, so nobody behind it waits forever."""
    from services.common.redis import _Call

    script, _ = runner(redis_client)
    runs = f"test:runs:{uuid.uuid4().hex}"
    gone = _Call([("EVALSHA", script.sha, 2, "a", runs, "1")])
    behind = _Call([("EVALSHA", script.sha, 2, "b", runs, "2")])
    with script._lock:  # two callers wait behind a batch in flight
        script._sending = True
        script._queue += [gone, behind]
        chosen = script._promote()  # the batch in flight is done: the first waiter is chosen
    assert chosen is gone and gone.lead

    script._abandon(gone)  # ... and is killed before it wakes

    assert behind.lead and behind.done.is_set()
    script._send_queued()  # what the woken caller does
    assert behind.result() == [["b", "2"]]
    assert not script._sending and not script._queue
    assert script(["c", runs], ["3"]) == ["c", "3"]  # and the runner still serves callers


# Under gevent (the lean worker's), with every write to Redis logged as "send".
GEVENT_LOGGED = """
from gevent import monkey
monkey.patch_all()
import sys
import uuid
import gevent
from services.common import redis
from services.common.redis import AutoPipeline, connect

log = []
send = redis._send


def logged(conn, data):
    log.append("send")
    send(conn, data)


redis._send = logged


# A command Redis answers only once the gate opens (BLPOP of a key of its own, pushed to from
# another connection when a condition holds): a caller's reply cannot be there when it reads
# before the callers the test wants behind it have queued, however long the process is
# preempted between its write and its read.
class Gate:
    def __init__(self, url):
        self.key = "test:gate:" + uuid.uuid4().hex
        self.other = connect(url, 5.0)

    def command(self):
        return ("BLPOP", self.key, 4)

    def open_when(self, condition):
        for _ in range(4000):  # about 4 s at most
            if condition():
                break
            gevent.sleep(0.001)
        self.other.lpush(self.key, 1)
"""


def run_gevent(script: str, *args: str) -> str:
    """What ``GEVENT_LOGGED`` + ``script`` prints, run in a process of its own."""
    from tests.stack import ROOT

    return subprocess.run(
        [sys.executable, "-c", GEVENT_LOGGED + script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()


# Three callers in turn: the first sends alone; the second and third queue behind it and go
# together; a fourth arrives while they are in flight. Each batch is answered only once the
# next callers have queued.
GEVENT_ORDER = """
pipeline = AutoPipeline(connect(sys.argv[1], 5.0))
gates = {"first": Gate(sys.argv[1]), "second": Gate(sys.argv[1])}
callers = []


def call(name, then=None):
    pipeline(gates[name].command() if name in gates else ("PING",))
    log.append(name)
    if then is not None:
        callers.append(gevent.spawn(call, then))


callers += [
    gevent.spawn(call, "first", "fourth"),
    gevent.spawn(call, "second"),
    gevent.spawn(call, "third"),
    # the second and third queued behind the first's write
    gevent.spawn(gates["first"].open_when, lambda: len(pipeline._queue) == 2),
    # the fourth (spawned by the first) queued behind the second's
    gevent.spawn(gates["second"].open_when, lambda: "first" in log and len(pipeline._queue) == 1),
]
gevent.joinall(list(callers), timeout=20)
gevent.joinall(callers, timeout=20)  # and the fourth, which the first spawned
print(",".join(log))
"""


def test_the_next_batch_goes_before_the_last_ones_callers_resume(redis_url: str) -> None:
    """Under gevent woken greenlets run in the order they were woken: the caller chosen to
    send the next batch is woken first, so Redis works on it while the finished batch's
    callers do their work (woken last, it waited for all of it)."""
    out = run_gevent(GEVENT_ORDER, redis_url).split(",")
    # the second sends for the second and third; the fourth, queued meanwhile, is chosen
    # next and sends before the third (answered in the second's batch) resumes; the fourth
    # may then be answered before the third runs (the process preempted between the fourth's
    # write and its read: its reply is there when it reads, and it goes on without yielding)
    assert out[:5] == ["send", "first", "send", "second", "send"], out
    assert sorted(out[5:]) == ["fourth", "third"], out


# Three callers ready in the same turn of the event loop: with ``gather`` the first yields
# before it sends, and one write carries all three; without, the first's write is answered
# once the other two have queued behind it.
GEVENT_GATHER = """
gather = sys.argv[2] == "gather"
pipeline = AutoPipeline(connect(sys.argv[1], 5.0), gather=gather)
gate = Gate(sys.argv[1])


def call(name, command=("PING",)):
    pipeline(command)
    log.append(name)


callers = [gevent.spawn(call, "first", ("PING",) if gather else gate.command()),
           gevent.spawn(call, "second"), gevent.spawn(call, "third")]
if not gather:
    callers.append(gevent.spawn(gate.open_when, lambda: len(pipeline._queue) == 2))
gevent.joinall(callers, timeout=20)
print(",".join(log))
"""


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("gather", "send,first,second,third"), ("alone", "send,first,send,second,third")],
)
def test_callers_ready_together_share_one_write_when_gathered(
    redis_url: str, mode: str, expected: str
) -> None:
    """The read path's pipeline gathers: the callers a worker's turn of its event loop made
    ready (requests read together) share the first write; without it the first goes alone."""
    out = run_gevent(GEVENT_GATHER, redis_url, mode)
    assert out == expected, out


class Killed(BaseException):
    """What gevent raises in a greenlet it kills (GreenletExit is a BaseException too)."""


def test_a_caller_killed_while_it_gathers_hands_the_batch_on(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller that would send is killed while it yields for others to queue: the one that
    queued behind it is chosen and sends, so nobody waits forever."""
    from services.common import redis as module
    from services.common.redis import _Call

    pipeline = AutoPipeline(redis_client, gather=True)
    behind = _Call([("ECHO", "behind")])

    def killed_while_yielding(_seconds: float) -> None:
        with pipeline._lock:
            pipeline._queue.append(behind)  # a caller queues while the first yields
        raise Killed

    monkeypatch.setattr(module.time, "sleep", killed_while_yielding)
    with pytest.raises(Killed):
        pipeline(("ECHO", "first"))
    monkeypatch.undo()

    assert behind.lead and behind.done.is_set()
    pipeline._send_queued()  # what the woken caller does
    assert behind.result() == ["behind"]
    assert pipeline(("ECHO", "after")) == ["after"]  # and the pipeline still serves callers
    assert not pipeline._sending and not pipeline._queue


def test_plain_commands_share_round_trips_and_fail_only_their_caller(
    redis_client: redis.Redis,
) -> None:
    """AutoPipeline, under ScriptRunner: several commands per call, replies in order, and a
    command Redis refuses (WRONGTYPE) fails its caller alone while the replies after it are
    still read, so the connection stays in step."""
    pipeline = AutoPipeline(redis_client)
    counting = CountingPool(redis_client.connection_pool)
    pipeline.pool = counting  # type: ignore[assignment]
    prefix = f"test:pipe:{uuid.uuid4().hex}"
    redis_client.set(f"{prefix}:string", "s")
    callers, calls_each = 12, 40
    results: dict[int, list[Any]] = {n: [] for n in range(callers)}
    start = threading.Barrier(callers, timeout=30)

    def call(n: int) -> None:
        start.wait()
        for i in range(calls_each):
            key = f"{prefix}:{n}"
            try:
                if n % 3 == 0 and i % 5 == 0:
                    pipeline(("INCR", key), ("HGETALL", f"{prefix}:string"), ("GET", key))
                    results[n].append("no error")
                else:
                    results[n].append(pipeline(("INCR", key), ("GET", key), ("EXISTS", key)))
            except redis.ResponseError as exc:
                results[n].append(type(exc).__name__)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    for n in range(callers):
        for i, got in enumerate(results[n]):  # INCR counted every call, failed ones too
            if n % 3 == 0 and i % 5 == 0:
                assert got == "ResponseError", (n, i, got)
            else:
                assert got == [i + 1, str(i + 1), 1], (n, i, got)
    assert counting.writes < callers * calls_each
    assert pipeline(("GET", f"{prefix}:string")) == ["s"]


def test_commands_are_packed_as_redis_py_packs_them(redis_client: redis.Redis) -> None:
    conn = redis_client.connection_pool.make_connection()
    commands = [
        ("HGETALL", "lot:0b0c6f1e-7d1c-4e6a-9c0e-2d3f4a5b6c7d"),
        ("EVALSHA", "ab" * 20, 2, "k", "lots:geo", 120.15, 30.25, 1005.0, 26, 1e-05, -3),
        ("SET", "clé", "naïve ✓", b"\x00\xffraw", 0, ""),
    ]
    assert pack_commands(commands) == b"".join(conn.pack_commands(commands))
    with pytest.raises(redis.DataError):
        pack_commands([("SET", "k", True)])


def test_replies_are_read_from_the_parser_whole_however_the_socket_splits_them(
    redis_client: redis.Redis,
) -> None:
    """Replies come from the connection's hiredis reader while it holds a whole one and from
    redis-py's socket reads otherwise: a megabyte value (many reads) between small hashes,
    in order, and the reader is the one in use with the installed redis-py."""
    pipeline = AutoPipeline(redis_client)
    prefix = f"test:big:{uuid.uuid4().hex}"
    big = "x" * (1 << 20)
    redis_client.set(f"{prefix}:big", big)
    redis_client.hset(f"{prefix}:h", mapping={"a": "1", "b": "2"})
    try:
        commands = [("HGETALL", f"{prefix}:h"), ("GET", f"{prefix}:big")] * 5
        replies = pipeline(*commands, ("GET", f"{prefix}:none"))
        assert replies[-1] is None
        for n in range(0, 10, 2):
            got = replies[n]  # a map in RESP3, a flat list in RESP2
            pairs = got.items() if isinstance(got, dict) else zip(got[::2], got[1::2], strict=True)
            assert dict(pairs) == {"a": "1", "b": "2"}
            assert replies[n + 1] == big
        conn = pipeline._idle[-1]
        assert _reader(conn) is conn._parser._reader is not None
    finally:
        redis_client.delete(f"{prefix}:big", f"{prefix}:h")


def _tracked_pipeline(url: str, seen: list[Any], broken: list[int]) -> AutoPipeline:
    """An auto-pipeline on RESP3 connections Redis tracks, their invalidations into ``seen``."""

    def track(conn: Any) -> None:
        conn.on_connect()
        conn._parser.set_invalidation_push_handler(seen.append)
        conn.send_command("CLIENT", "TRACKING", "ON")
        assert conn.read_response() in ("OK", b"OK")

    client = connect(url, 2.0, protocol=3, on_connect=track, health_check_s=0)
    return AutoPipeline(client, on_broken=lambda: broken.append(1))


def test_thousands_of_pushes_before_a_reply_reach_the_handler_in_a_loop(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """A tracked connection idle while 5,000 keys it read change holds 5,000 invalidations
    before its next reply: each reaches the push handler (redis-py's own reading recursed once
    per push, past Python's limit), then the reply comes as it should."""
    seen: list[Any] = []
    broken: list[int] = []
    pipeline = _tracked_pipeline(redis_url, seen, broken)
    keys = [f"test:tracked:{uuid.uuid4().hex}:{n}" for n in range(5000)]
    try:
        redis_client.mset(dict.fromkeys(keys, "0"))
        assert pipeline(*(("GET", k) for k in keys)) == ["0"] * 5000
        for start in range(0, 5000, 500):
            redis_client.mset(dict.fromkeys(keys[start : start + 500], "1"))
        assert pipeline(("GET", keys[0])) == ["1"]
        invalidated = {k for push in seen for k in push[1]}
        assert {k.decode() if isinstance(k, bytes) else k for k in invalidated} == set(keys)
        assert not broken
    finally:
        redis_client.delete(*keys)


def test_pushes_to_an_idle_connection_are_taken_in_before_the_next_batch(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """Two connections (two batches at once): an invalidation for a key read on one reaches
    the handler before a batch the other carries is answered; a flush's (no keys) too; a
    connection killed while idle is dropped, and ``on_broken`` told."""
    seen: list[Any] = []
    broken: list[int] = []
    pipeline = _tracked_pipeline(redis_url, seen, broken)
    key = f"test:tracked:{uuid.uuid4().hex}"
    redis_client.set(key, "0")
    try:
        first, second = (pipeline.pool.make_connection() for _ in range(2))
        second.connect()
        second.send_command("CLIENT", "ID")
        second_id = int(second.read_response())
        pipeline._idle[:] = [first, second]
        assert pipeline(("GET", key)) == ["0"]  # on ``second``, the last idle one
        pipeline._idle.reverse()  # the next batch on ``first``
        redis_client.set(key, "1")
        assert pipeline(("PING",)) == ["PONG"]
        assert [k for push in seen for k in push[1]] in ([key], [key.encode()])
        assert len(pipeline._idle) == 2 and not broken
        redis_client.client_kill_filter(_id=str(second_id))
        assert pipeline(("PING",)) == ["PONG"]  # on ``first``: ``second`` found closed
        assert broken and pipeline._idle == [first]
    finally:
        redis_client.delete(key)
