"""Server-sent events of a lot's changes: ``GET /v1/lots/{id}/stream``.

Worker model: the availability service (and the gateway in front of it) runs under gunicorn's
gevent worker, so a connected client is a greenlet parked on a queue, not a worker process or
thread: a few kilobytes of memory and no CPU while idle. Each worker process holds ONE Redis
pub/sub subscription to ``lot-changes`` (the :class:`Hub`), whatever the number of clients; on a
change of a lot that someone watches, the hub reads the lot's view once and hands the same frame
to every client of that lot.

Each event's ``id`` is the lot's live version. A client reconnecting with ``Last-Event-ID`` gets
the current state at once if the lot changed meanwhile, and nothing until the next change if it
did not. Changes arriving faster than a client reads are coalesced (the frames carry whole
states, so the latest one is enough). A comment line every ``stream_heartbeat_s`` keeps proxies
from timing the connection out and lets the server notice clients that went away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from services.availability.readpath import ReadPath
from services.common import livestate
from services.common.app import dumps

log = logging.getLogger("parking.availability.stream")

HEARTBEAT = b": keep-alive\n\n"
DELETED = object()


def frame(version: int, view: dict[str, Any]) -> bytes:
    return b"id: %d\nevent: lot\ndata: %s\n\n" % (version, dumps(view))


class Subscriber:
    __slots__ = ("lot_id", "queue")

    def __init__(self, lot_id: str, size: int) -> None:
        self.lot_id = lot_id
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=size)

    def offer(self, item: Any) -> None:
        """Queue ``item``; when the client lags, drop its oldest frame (newer ones supersede)."""
        for _ in range(2):
            try:
                self.queue.put_nowait(item)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.queue.get_nowait()


class Hub:
    """This process's single subscription to ``lot-changes``, fanned out to its clients."""

    def __init__(self, readpath: ReadPath) -> None:
        self.readpath = readpath
        self.tuning = readpath.tuning
        self._subs: dict[str, set[Subscriber]] = {}
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._dirty: set[str] = set()
        self._pid = 0
        self.connected = threading.Event()

    def ensure_started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._subs.clear()
            self._running.clear()
            self._dirty.clear()
            self.connected = threading.Event()
        threading.Thread(target=self._listen, name="lot-changes", daemon=True).start()

    def subscribe(self, lot_id: str) -> Subscriber:
        sub = Subscriber(lot_id, self.tuning.stream_queue)
        with self._lock:
            self._subs.setdefault(lot_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            subs = self._subs.get(sub.lot_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.lot_id]

    def clients(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._subs.values())

    def _listen(self) -> None:
        """Subscribe, dispatch, and resubscribe after any failure (the process's lifetime)."""
        delay = 0.1
        while True:
            pubsub = None
            try:
                pubsub = self.readpath.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(livestate.CHANGES_CHANNEL)
                self.connected.set()
                delay = 0.1
                with self._lock:
                    watched = list(self._subs)
                for lot_id in watched:  # changes may have been missed while disconnected
                    self._changed(lot_id)
                while True:
                    message = pubsub.get_message(timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["data"])
            except Exception as exc:
                self.connected.clear()
                log.warning("lot-changes subscription lost: %s", type(exc).__name__)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
            time.sleep(delay)
            delay = min(2.0, delay * 2)

    def _dispatch(self, data: str) -> None:
        if not self._subs:
            return  # nobody watches anything in this process: skip parsing
        try:
            message = orjson.loads(data)
            lot_id = str(message["lot_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if lot_id not in self._subs:
            return
        if message.get("deleted"):
            self._broadcast(lot_id, DELETED)
            return
        self._changed(lot_id)

    def _changed(self, lot_id: str) -> None:
        """Read and push the lot's state; if it changes again meanwhile, read once more after."""
        with self._lock:
            if lot_id in self._running:
                self._dirty.add(lot_id)
                return
            self._running.add(lot_id)
        threading.Thread(target=self._refresh, args=(lot_id,), daemon=True).start()

    def _refresh(self, lot_id: str) -> None:
        try:
            for _ in range(1000):
                with self._lock:
                    self._dirty.discard(lot_id)
                found = self.readpath.detail(lot_id, datetime.now(UTC))
                self._broadcast(lot_id, DELETED if found is None else (found[0], frame(*found)))
                with self._lock:
                    if lot_id not in self._dirty or lot_id not in self._subs:
                        break
        except Exception as exc:
            log.warning("could not read lot %s for its stream: %s", lot_id, type(exc).__name__)
        finally:
            with self._lock:
                self._running.discard(lot_id)

    def _broadcast(self, lot_id: str, item: Any) -> None:
        with self._lock:
            subs = list(self._subs.get(lot_id, ()))
        for sub in subs:
            sub.offer(item)


def parse_last_event_id(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit() or len(value.strip()) > 19:
        return None
    return int(value.strip())


def events(
    hub: Hub, sub: Subscriber, current: tuple[int, dict[str, Any]], last_event_id: int | None
) -> Iterator[bytes]:
    """The event stream of one client, from ``current`` (read after ``sub`` subscribed) on."""
    heartbeat = hub.tuning.stream_heartbeat_s
    try:
        yield b"retry: %d\n\n" % hub.tuning.stream_retry_ms
        version, view = current
        sent = last_event_id if last_event_id is not None else -1
        if version != sent:
            yield frame(version, view)
            sent = version
        # the first wait is drawn at random, so streams opened together (clients reconnecting
        # after a restart) do not all send their heartbeats in the same instant ever after
        wait = heartbeat * random.uniform(0.5, 1.0)
        while True:
            try:
                item = sub.queue.get(timeout=wait)
            except queue.Empty:
                yield HEARTBEAT
                wait = heartbeat
                continue
            if item is DELETED:
                yield b"event: deleted\ndata: %s\n\n" % orjson.dumps({"id": sub.lot_id})
                return
            version, data = item
            if version > sent:
                sent = version
                yield data
    finally:
        hub.unsubscribe(sub)
