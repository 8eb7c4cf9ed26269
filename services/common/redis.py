"""The Redis client: one connection pool per process, created after the fork."""

from __future__ import annotations

import hashlib
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from redis._parsers import hiredis as _hiredis_parsers
from redis.exceptions import NoScriptError

from services.common.config import CommonSettings
from services.common.sockets import send_all

# redis-py's hiredis parser, whose reader the auto-pipeline reads replies from directly (None
# in a redis-py without them: then every reply goes through its layers)
_HIREDIS_PARSER: Any = getattr(_hiredis_parsers, "_HiredisParser", None)
NOT_ENOUGH_DATA: Any = getattr(_hiredis_parsers, "NOT_ENOUGH_DATA", None)


class RedisClient:
    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self._client: redis.Redis | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def client(self) -> redis.Redis:
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = connect(self.settings.redis_url, self.settings.redis_timeout_s)
                    self._pid = os.getpid()
        return self._client

    def ping(self) -> None:
        self.client.ping()


def connect(
    url: str,
    timeout_s: float = 0.5,
    *,
    protocol: int = 3,
    on_connect: Callable[[Any], None] | None = None,
    health_check_s: int = 30,
) -> redis.Redis:
    """A client for ``url`` (redis://, rediss:// or unix://) with short timeouts, speaking
    RESP3 unless ``protocol`` is 2. ``on_connect(connection)``, if given, sets up each new
    connection in place of redis-py's handshake (and must call ``connection.on_connect()``);
    a connection idle ``health_check_s`` (0: never) is pinged before its next command."""
    extra: dict[str, Any] = {} if on_connect is None else {"redis_connect_func": on_connect}
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=health_check_s,
        decode_responses=True,
        protocol=protocol,
        **extra,
    )


_PENDING: Any = object()


class _Call:
    """One caller's commands, then their replies or its error."""

    __slots__ = ("commands", "done", "error", "lead", "reply")

    def __init__(self, commands: Sequence[Sequence[Any]]) -> None:
        self.commands = commands
        self.reply: Any = _PENDING
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.lead = False  # woken to send the next batch, not with an answer

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.reply


def pack_commands(commands: Iterable[Sequence[Any]]) -> bytes:
    """``commands`` in the Redis protocol, as redis-py packs them (UTF-8 strings, ints and
    floats in their shortest form, bytes as they are) at a third of its cost: packing was a
    tenth of a nearby search's CPU, 78 small commands a search."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                data = arg.encode()
            elif isinstance(arg, bytes):
                data = arg
            elif isinstance(arg, int | float) and not isinstance(arg, bool):
                data = repr(arg).encode()
            else:
                raise redis.DataError(f"cannot send {type(arg).__name__} to Redis")
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class AutoPipeline:
    """Commands sent over a connection of its own, with the calls that arrive while a write is
    in flight sent together in the next one (auto-pipelining, as ioredis does).

    redis-py's command path goes through layers per call that cost more CPU than the commands
    on the platform's hottest reads (lot detail, nearby search): a pool checkout that polls the
    socket for stray bytes, a retry wrapper, observability hooks. This sends on a redis-py
    connection it holds (made by the client's pool, so with its URL, timeouts and decoding).
    Under load one write and one read then carry many callers' commands, which saves both this
    process and Redis a system call and a wake-up per call; a caller alone is sent at once.
    Each caller gets its own replies or error (the first error among its commands); a
    connection that failed in any way is disconnected, never reused, and every call it carried
    gets redis-py's error; ``on_broken()``, if given, is told (a connection's RESP3 pushes may
    have been lost with it).

    With ``gather``, a caller that finds nobody sending yields once before it sends (under
    gevent: the greenlets ready in the same turn of the event loop run first, as ioredis sends
    what a tick queued), so the requests a worker read together share one write and one read
    instead of the first going alone: lot detail's PING alone in its batch was most of what the
    route cost on top of the floor.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        on_broken: Callable[[], None] | None = None,
        gather: bool = False,
    ) -> None:
        self.pool = client.connection_pool
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._queue: list[_Call] = []
        self._sending = False
        self._on_broken = on_broken
        self._gather = gather

    def __call__(self, *commands: Sequence[Any]) -> list[Any]:
        """The replies of ``commands`` (each a command and its arguments), in order."""
        call = _Call(commands)
        with self._lock:
            self._queue.append(call)
            lead = not self._sending
            self._sending = True
        if lead and self._gather:
            call.lead = True  # (so that, killed while it yields, it hands the batch on)
            try:
                time.sleep(0)  # one turn for the callers ready now: they queue behind it
            except BaseException:
                self._abandon(call)
                raise
        if not lead:
            try:
                call.done.wait()
            except BaseException:  # killed while waiting (a worker shutting down): let go
                self._abandon(call)
                raise
            if not call.lead:
                return call.result()  # type: ignore[no-any-return]
        self._send_queued()
        return call.result()  # type: ignore[no-any-return]

    def _send_queued(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            self._run(batch)
        finally:
            with self._lock:
                after = self._promote()
            # the next batch's sender first: under gevent woken greenlets run in the order they
            # were woken, so Redis works on the next batch while this one's callers go on (woken
            # last, it waited for their work: at 100,000 lots a nearby search's p50 at a fixed
            # 1,000/s was 5.6-6.3 ms against 3.5-3.8, rounds alternated in one run)
            if after is not None:
                after.done.set()
            for call in batch:
                call.done.set()

    def _promote(self) -> _Call | None:
        """Under the lock: the first caller that arrived meanwhile sends the next batch (or
        nobody is sending any more)."""
        after = self._queue[0] if self._queue else None
        if after is None:
            self._sending = False
        else:
            after.lead = True
        return after

    def _abandon(self, call: _Call) -> None:
        """``call``'s caller is gone: drop it from the queue, and if it had been chosen to
        send the next batch, choose another (a batch nobody sends would stall every caller)."""
        with self._lock:
            if call in self._queue:
                self._queue.remove(call)
            after = self._promote() if call.lead else None
        if after is not None:
            after.done.set()

    def _run(self, batch: list[_Call]) -> None:
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self.pool.make_connection()
        try:
            if self._idle:  # (one connection carries the batches but after a failure)
                self._drain_idle()
            unknown = self._exchange(conn, batch)
            if unknown:
                self._reload(conn, unknown)
        except BaseException as exc:
            conn.disconnect()
            if self._on_broken is not None:
                self._on_broken()
            for call in batch:
                if call.reply is _PENDING and call.error is None:
                    call.error = (
                        exc if isinstance(exc, Exception) else redis.ConnectionError(repr(exc))
                    )
            if not isinstance(exc, Exception):
                raise
            return
        self._idle.append(conn)

    def _drain_idle(self) -> None:
        """Under the send: take in what Redis pushed to the other idle connections since their
        last replies, without waiting; one holding anything but pushes, or closed, is dropped."""
        for conn in list(self._idle):
            try:
                clean = _take_pushes(conn)
            except (OSError, redis.RedisError):
                clean = False
            if not clean:
                self._idle.remove(conn)
                conn.disconnect()
                if self._on_broken is not None:
                    self._on_broken()

    def _reload(self, conn: Any, unknown: list[_Call]) -> None:
        """Calls that named a script Redis lacks: they fail (a script runner loads it)."""
        for call in unknown:
            call.error = NoScriptError("no such script")

    def _exchange(self, conn: Any, calls: list[_Call]) -> list[_Call]:
        """Send ``calls`` in one write, read their replies; return those that named a script
        Redis lacks."""
        _send(conn, pack_commands(cmd for call in calls for cmd in call.commands))
        reader = _reader(conn)
        unknown: list[_Call] = []
        for call in calls:
            replies: list[Any] = []
            missing = False
            for _ in call.commands:  # every reply is read, so the connection stays in step
                try:
                    replies.append(_reply(conn, reader))
                except NoScriptError:
                    missing = True
                except redis.ResponseError as exc:  # the command failed; the connection is fine
                    call.error = call.error or exc
            if missing:
                unknown.append(call)
            elif call.error is None:
                call.reply = replies
        return unknown


def _send(conn: Any, data: bytes) -> None:
    """``conn.send_packed_command(data)``, straight to the socket of a connected ``conn``
    with no health check due: redis-py's way, through gevent's ``sendall``, asks the socket
    for its send buffer's size (a system call) at every write."""
    sock = conn._sock
    if sock is None or (conn.health_check_interval and time.monotonic() > conn.next_health_check):
        conn.send_packed_command([data])
        return
    try:
        send_all(sock, data)
    except OSError as exc:  # as redis-py answers a failed write (the caller drops ``conn``)
        conn.disconnect()
        raise redis.ConnectionError(f"Error while writing to socket: {exc!r}") from exc


def _reader(conn: Any) -> Any:
    """The hiredis reader of a connected ``conn``, or None (then replies are read through
    ``conn.read_response``)."""
    parser = getattr(conn, "_parser", None)
    if _HIREDIS_PARSER is None or not isinstance(parser, _HIREDIS_PARSER):
        return None
    return getattr(parser, "_reader", None)


def _reply(conn: Any, reader: Any) -> Any:
    """The next reply on ``conn``, parsed by its hiredis reader, which is fed from the socket
    as redis-py feeds it (its timeouts and errors): going through redis-py's layers for each of
    a search's 45 replies cost more CPU than parsing them. An error reply is raised, as
    redis-py raises it; a push message (RESP3: a tracked connection's invalidations) goes to
    the parser's handlers, in a loop (redis-py's ``read_response`` recurses once per push, and
    a refill's thousands of invalidations in a row exceeded Python's recursion limit)."""
    if reader is None:
        return conn.read_response()
    parser = conn._parser
    push = getattr(parser, "_hiredis_PushNotificationType", None)
    for _ in range(100_000_000):  # each turn parses a reply or reads more bytes
        reply = reader.gets()
        if reply is NOT_ENOUGH_DATA:
            parser.read_from_socket()
            continue
        if push is not None and isinstance(reply, push):
            parser.handle_push_response(reply)
            continue
        if isinstance(reply, Exception):
            raise reply
        return reply
    raise redis.ConnectionError("no end to the replies")


def _poll_now() -> Any:
    """A ``select.poll`` that never yields to another greenlet (gevent patches the module's)."""
    from gevent import monkey

    return monkey.get_original("select", "poll")()


def _take_pushes(conn: Any) -> bool:
    """Hand the RESP3 pushes waiting on idle ``conn`` to its parser's handlers, without
    waiting for more; False if it holds anything else (a reply nobody asked for) or closed."""
    sock: Any = getattr(conn, "_sock", None)
    reader = _reader(conn) if sock is not None else None
    if reader is None:
        return sock is None  # not connected: nothing pending (a hiredis-less redis-py: unknown)
    poller = _poll_now()
    poller.register(sock.fileno(), select.POLLIN)
    for _ in range(64):
        if not poller.poll(0):
            break
        data = sock.recv(65536)
        if not data:
            return False
        reader.feed(data)
    push = getattr(conn._parser, "_hiredis_PushNotificationType", None)
    for _ in range(1_000_000):
        reply = reader.gets()
        if reply is NOT_ENOUGH_DATA:
            return True
        if push is None or not isinstance(reply, push):
            return False
        conn._parser.handle_push_response(reply)
    return False


class ScriptRunner(AutoPipeline):
    """One Lua script run with ``EVALSHA`` through an :class:`AutoPipeline`, loading the
    script once when Redis does not know it (redis-py's ``Script.__call__`` without its layers
    per call)."""

    def __init__(self, client: redis.Redis, source: str) -> None:
        super().__init__(client)
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis' script id

    def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:  # type: ignore[override]
        return super().__call__(("EVALSHA", self.sha, len(keys), *keys, *args))[0]

    def _reload(self, conn: Any, unknown: list[_Call]) -> None:
        conn.send_command("SCRIPT", "LOAD", self.source)
        conn.read_response()
        for call in self._exchange(conn, unknown):
            call.error = NoScriptError("the script was loaded and is still unknown")


def celery_broker_url(url: str) -> str:
    """Kombu spells Unix socket URLs ``redis+socket://``."""
    if url.startswith("unix://"):
        return "redis+socket://" + url.removeprefix("unix://")
    return url
