"""A gunicorn worker: gevent's greenlets with a lean HTTP/1.1 loop parsed by ``httptools``.

``gunicorn -k services.common.leanworker.LeanWorker``. gunicorn stays the process manager
(master, forks, signals, heartbeats, graceful shutdown, the hooks in gunicorn_conf); this
worker only replaces what gunicorn's async workers do per request: build a ``Request`` object
through layers of Python (its unreader, parser, message and response classes, a timeout context
per request), which cost more CPU than the platform's hot routes themselves. Here a connection is
one greenlet that feeds bytes to llhttp (the parser of Node.js, through ``httptools``), builds the
WSGI environ straight from the parsed fields and writes each answer with one ``sendall`` when its
length is known, chunked otherwise (server-sent events).

What it keeps of gunicorn's HTTP behaviour: keep-alive with the ``keepalive`` timeout, also as a
deadline for a request's head to arrive (slow clients are cut off); ``limit_request_line`` (414),
``limit_request_fields`` and ``limit_request_field_size`` (431); header names with underscores
dropped (they would alias real headers in the environ); malformed requests refused (400) and the
connection closed; ``Expect: 100-continue``; pipelined requests answered in order; HTTP/1.0;
``HEAD``; ``max_requests``. On shutdown, connections idle between requests close within a
second (busy ones finish their answer first), so a graceful stop does not wait out clients'
keep-alive. A request body is read whole before the app runs, at most ``LEAN_MAX_BODY_BYTES``
(default 4 MiB, above every route's own limit), else 413. Refusals are written by
``gunicorn.util.write_error``, which gunicorn_conf makes problem+json.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

import gevent
import httptools
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

from services.common.sockets import send_all

MAX_BODY = int(os.environ.get("LEAN_MAX_BODY_BYTES", str(4 * 1024 * 1024)))
_RECV = 65536
LINGER_S, LINGER_BYTES = 2.0, 64 * 1024 * 1024
IDLE_CHECK_S = 1.0  # how often a connection waiting for its next request looks for shutdown
_NO_BODY = frozenset({204, 304})
_QUIET = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)
_date: list[Any] = [0, b""]


def _http_date() -> bytes:
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, formatdate(now, usegmt=True).encode()
    date: bytes = _date[1]
    return date


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class _Request:
    __slots__ = ("body", "body_size", "headers", "keep_alive", "method", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True


class _Connection:
    """One client connection: the parser's callbacks and the request/answer loop."""

    def __init__(self, worker: LeanWorker, client: Any, addr: Any, server: tuple[str, str]):
        self.worker = worker
        self.limits = worker.limits
        self.client = client
        self.addr = addr
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.current: _Request | None = None
        self.ready: deque[_Request] = deque()
        self.head_bytes = 0
        self.upgrade = False

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = _Request()

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.url += url
        if len(self.current.url) > self.limits.request_line > 0:
            raise _Refused(414, "Request-URI Too Long")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        headers = self.current.headers
        if len(headers) >= self.limits.fields:
            raise _Refused(431, "Request Header Fields Too Large")
        if len(name) + len(value) + 2 > self.limits.field_size > 0:
            raise _Refused(431, "Request Header Fields Too Large")
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.current
        assert request is not None
        parser = self.parser
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        for name, value in request.headers:
            lower = name.lower()
            if lower == b"content-length" and value.strip().isdigit():
                if int(value) > MAX_BODY:
                    raise _Refused(413, "Request Entity Too Large")
            elif lower == b"expect" and value.strip().lower() == b"100-continue":
                self.client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        request = self.current
        assert request is not None
        request.body_size += len(body)
        if request.body_size > MAX_BODY:
            raise _Refused(413, "Request Entity Too Large")
        request.body.append(body)

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.ready.append(self.current)
        self.current = None
        self.head_bytes = 0

    # -- the loop -----------------------------------------------------------------------------

    def serve(self) -> None:
        worker = self.worker
        while worker.alive:
            request = self._next_request()
            if request is None:
                return
            keep = self._answer(request) and request.keep_alive and not self.upgrade
            worker.nr += 1
            if worker.nr >= worker.max_requests:
                worker.log.info("Autorestarting worker after current request.")
                worker.alive = False
            if not keep:
                return

    def _next_request(self) -> _Request | None:
        """The next whole request, or None when the client is gone, idle too long or refused."""
        deadline = time.monotonic() + self.limits.keepalive
        limit_head = self.limits.head
        while not self.ready:
            if self.upgrade:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.current is None and not self.worker.alive:
                return None  # idle between requests while the worker shuts down: close now
            data = None
            with gevent.Timeout(min(left, IDLE_CHECK_S), False):
                data = self.client.recv(_RECV)
            if data is None:
                continue  # a slice of the wait passed: look at the deadline and the worker
            if not data:  # closed by the client
                return None
            if self.current is None or not self.current.method:
                self.head_bytes += len(data)
                if self.head_bytes > limit_head:
                    self._refuse(431, "Request Header Fields Too Large")
                    return None
            try:
                self.parser.feed_data(data)
            except _Refused as refused:
                self._refuse(refused.status, refused.reason)
                return None
            except httptools.HttpParserUpgrade:
                self.upgrade = True  # answered as a plain request, then the connection closes
            except httptools.HttpParserError as exc:
                cause = exc.__context__
                if isinstance(cause, _Refused):
                    self._refuse(cause.status, cause.reason)
                else:
                    self._refuse(400, "Bad Request")
                return None
        return self.ready.popleft()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a refusal and close; if the client may still be sending (a body past the
        bound), drain its bytes for a moment first, so the answer is not lost to a reset."""
        try:
            util.write_error(self.client, status, reason, reason)
            if status == 413:
                self.client.shutdown(socket.SHUT_WR)
                with gevent.Timeout(LINGER_S, False):
                    for _ in range(LINGER_BYTES // _RECV):
                        if not self.client.recv(_RECV):
                            break
        except OSError:
            pass

    def _environ(self, request: _Request) -> dict[str, Any]:
        url = httptools.parse_url(request.url)
        path = url.path or b"/"
        environ: dict[str, Any] = {
            "REQUEST_METHOD": request.method.decode("latin-1"),
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": (url.query or b"").decode("latin-1"),
            "RAW_URI": request.url.decode("latin-1"),
            "SERVER_PROTOCOL": f"HTTP/{request.version}",
            "SERVER_NAME": self.server[0],
            "SERVER_PORT": self.server[1],
            "SERVER_SOFTWARE": "gunicorn",
            "REMOTE_ADDR": self.addr[0] if isinstance(self.addr, tuple) else "",
            "REMOTE_PORT": str(self.addr[1]) if isinstance(self.addr, tuple) else "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b"".join(request.body)),
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": self.limits.multiprocess,
            "wsgi.run_once": False,
            "gunicorn.socket": self.client,
        }
        for raw_name, raw_value in request.headers:
            if b"_" in raw_name:
                continue  # would alias a real header once dashes become underscores
            name = raw_name.decode("latin-1").upper().replace("-", "_")
            value = raw_value.decode("latin-1").strip()
            key = name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name
            if key in environ and key.startswith("HTTP_"):
                environ[key] += "," + value
            else:
                environ[key] = value
        return environ

    def _answer(self, request: _Request) -> bool:
        """Run the app for ``request`` and write its answer; whether the connection may stay."""
        environ = self._environ(request)
        head_only = request.method == b"HEAD"
        state: dict[str, Any] = {}

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            if exc_info is not None and state.get("sent"):
                raise exc_info[1].with_traceback(exc_info[2])
            state["status"], state["headers"] = status, headers
            return write

        def write(data: bytes) -> None:
            self._send(state, [data], head_only, request, final=False)

        try:
            result: Iterable[bytes] = self.worker.wsgi(environ, start_response)
        except Exception:
            self.worker.log.exception("Error handling request %s", environ["RAW_URI"])
            self._refuse(500, "Internal Server Error")
            return False
        try:
            if isinstance(result, list):
                return self._send(state, result, head_only, request, final=True)
            for chunk in result:
                if chunk:
                    self._send(state, [chunk], head_only, request, final=False)
            return self._send(state, [], head_only, request, final=True)
        except OSError:
            raise
        except Exception:
            self.worker.log.exception("Error handling request %s", environ["RAW_URI"])
            if not state.get("sent"):
                self._refuse(500, "Internal Server Error")
            return False
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def _send(
        self,
        state: dict[str, Any],
        chunks: list[bytes],
        head_only: bool,
        request: _Request,
        *,
        final: bool,
    ) -> bool:
        """Write ``chunks`` of the answer (its head first, once); whether it may keep alive."""
        if "status" not in state:
            raise RuntimeError("the app sent a body before start_response")
        out: list[bytes] = []
        if not state.get("sent"):
            state["sent"] = True
            status: str = state["status"]
            code = int(status[:3])
            length = None
            own = b"Date: " + _http_date() + b"\r\nServer: gunicorn\r\n"
            lines = [f"HTTP/1.1 {status}\r\n".encode("latin-1")]
            for name, value in state["headers"]:
                lower = name.lower()
                if lower == "content-length":
                    length = value
                    continue
                if lower in ("connection", "transfer-encoding"):
                    continue  # framing is this server's business
                if lower in ("date", "server"):
                    own = b""  # the app's own (a proxied answer's): kept, not doubled
                lines.append(f"{name}: {value}\r\n".encode("latin-1"))
            no_body = head_only or code in _NO_BODY or code < 200
            if length is not None:
                lines.append(f"Content-Length: {length}\r\n".encode("latin-1"))
            chunked = length is None and not no_body and request.version == "1.1"
            if length is None and final and not no_body:  # the whole body is here: say its size
                chunked = False
                lines.append(b"Content-Length: %d\r\n" % sum(len(c) for c in chunks))
            elif length is None and not chunked and not no_body:
                request.keep_alive = False  # HTTP/1.0, unknown length: the close ends the body
            state["chunked"], state["no_body"] = chunked, no_body
            keep = request.keep_alive and self.worker.alive and not self.upgrade
            state["keep"] = keep
            lines.append(b"Connection: keep-alive\r\n" if keep else b"Connection: close\r\n")
            if chunked:
                lines.append(b"Transfer-Encoding: chunked\r\n")
            lines.append(own + b"\r\n")
            out.append(b"".join(lines))
        if not state["no_body"]:
            if state["chunked"]:
                out += [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c]
                if final:
                    out.append(b"0\r\n\r\n")
            else:
                out += chunks
        if out:
            send_all(self.client, b"".join(out))
        return bool(state["keep"])


@dataclass(frozen=True, slots=True)
class _Limits:
    """gunicorn's settings this loop reads per request, read once (its ``cfg`` is slow)."""

    request_line: int
    fields: int
    field_size: int
    keepalive: float
    multiprocess: bool

    @property
    def head(self) -> int:
        return self.request_line + self.fields * (self.field_size or 8190)


class LeanWorker(GeventWorker):
    """gunicorn's gevent worker with the lean HTTP/1.1 loop above per connection."""

    def init_process(self) -> None:
        cfg = self.cfg
        self.limits = _Limits(
            cfg.limit_request_line,
            cfg.limit_request_fields,
            cfg.limit_request_field_size,
            float(cfg.keepalive),
            cfg.workers > 1,
        )
        super().init_process()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        client.setblocking(1)
        try:
            host, port = listener.getsockname()[:2]
            server = (str(host), str(port))
        except (OSError, ValueError):
            server = ("", "")
        try:
            _Connection(self, client, addr, server).serve()
        except gevent.GreenletExit:
            pass
        except OSError as exc:
            if exc.errno not in _QUIET:
                self.log.exception("Socket error processing request.")
        except Exception:
            self.log.exception("Error processing a connection")
        finally:
            util.close(client)
