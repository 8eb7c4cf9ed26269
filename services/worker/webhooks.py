"""City webhooks: subscriptions, what to notify, and signed deliveries with retries.

Status changes are found by comparing each lot's committed counts in PostgreSQL with the status
last notified (``lot_notify_state``), on a short beat period, rather than by listening to Redis'
``lot-changes`` channel: pub/sub drops whatever is published while no worker listens (restarts,
deploys), while the comparison is durable, idempotent and catches up after any outage. A change
and the deliveries it enqueues commit in one transaction, guarded by the change counter, so two
scans cannot notify one change twice.

Deliveries form a table-driven queue: a delivery is claimed with a lease (``next_attempt_at``
moved ahead, ``FOR UPDATE SKIP LOCKED``), posted outside any transaction, and recorded; a worker
killed mid-request leaves the lease to expire and the delivery is tried again. The receiver
gets ``X-Parking-Delivery`` to drop repeats, ``X-Parking-Timestamp`` (Unix seconds) and
``X-Parking-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``. Failed
attempts are retried with exponential backoff up to a maximum number of attempts.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import urllib3
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

log = logging.getLogger("parking.worker.webhooks")

EVENTS = ("lot.full", "lot.available", "district.snapshot")
TIMESTAMP_HEADER = "X-Parking-Timestamp"
SIGNATURE_HEADER = "X-Parking-Signature"
DELIVERY_HEADER = "X-Parking-Delivery"
EVENT_HEADER = "X-Parking-Event"
_SUBSCRIPTION_COLUMNS = "id::text AS id, url, events, created_at"


# Subscriptions (the city API's repository) ------------------------------------------------


def create_subscription(
    conn: psycopg.Connection[Any],
    *,
    city_client_id: str,
    url: str,
    events: list[str],
    secret: str | None,
) -> dict[str, Any]:
    """Insert a subscription; return it with its secret (generated if none was given)."""
    secret = secret or secrets.token_urlsafe(32)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "INSERT INTO city_subscriptions (city_client_id, url, events, secret)"
            f" VALUES (%s, %s, %s, %s) RETURNING {_SUBSCRIPTION_COLUMNS}",
            (city_client_id, url, sorted(set(events)), secret),
        )
        row = cur.fetchone()
    assert row is not None
    return {**row, "secret": secret}


def list_subscriptions(conn: psycopg.Connection[Any], *, city_client_id: str) -> list[dict]:
    """The city client's live subscriptions, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {_SUBSCRIPTION_COLUMNS} FROM city_subscriptions"
            " WHERE city_client_id = %s AND deleted_at IS NULL ORDER BY created_at, id",
            (city_client_id,),
        )
        return cur.fetchall()


def get_subscription(
    conn: psycopg.Connection[Any], *, city_client_id: str, subscription_id: str
) -> dict[str, Any] | None:
    """One live subscription of the city client, or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {_SUBSCRIPTION_COLUMNS} FROM city_subscriptions WHERE id::text = %s"
            " AND city_client_id = %s AND deleted_at IS NULL",
            (subscription_id, city_client_id),
        )
        return cur.fetchone()


def delete_subscription(
    conn: psycopg.Connection[Any], *, city_client_id: str, subscription_id: str
) -> bool:
    """Stop a subscription (its pending deliveries are dropped); False if not found."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE city_subscriptions SET deleted_at = now() WHERE id::text = %s"
            " AND city_client_id = %s AND deleted_at IS NULL RETURNING id",
            (subscription_id, city_client_id),
        ).fetchone()
        if row is None:
            return False
        conn.execute(
            "UPDATE webhook_deliveries SET status = 'failed', last_error = 'unsubscribed'"
            " WHERE subscription_id = %s AND status = 'pending'",
            (row[0],),
        )
    return True


def list_deliveries(
    conn: psycopg.Connection[Any], *, subscription_id: str, limit: int = 100
) -> list[dict[str, Any]]:
    """The subscription's delivery log, newest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT id, event, status, attempts, last_status_code, last_error, next_attempt_at,"
            " created_at, delivered_at FROM webhook_deliveries WHERE subscription_id::text = %s"
            " ORDER BY id DESC LIMIT %s",
            (subscription_id, limit),
        )
        return cur.fetchall()


# What to notify ----------------------------------------------------------------------------

_LOT_STATUS = """
SELECT l.id::text AS lot_id, l.name, l.district, sum(o.capacity)::int AS capacity,
  sum(o.occupied)::int AS occupied, n.status AS notified, coalesce(n.changes, 0) AS changes
FROM lots l JOIN lot_occupancy o ON o.lot_id = l.id
LEFT JOIN lot_notify_state n ON n.lot_id = l.id
WHERE l.deleted_at IS NULL
GROUP BY l.id, n.status, n.changes
"""


def _enqueue(
    conn: psycopg.Connection[Any], *, event: str, dedupe_key: str, payload: dict[str, Any]
) -> int:
    """One delivery per live subscription to ``event``; repeats of a dedupe key are ignored."""
    cur = conn.execute(
        "INSERT INTO webhook_deliveries (subscription_id, event, dedupe_key, payload)"
        " SELECT id, %s, %s, %s FROM city_subscriptions"
        " WHERE deleted_at IS NULL AND %s = ANY(events)"
        " ON CONFLICT (subscription_id, dedupe_key) DO NOTHING",
        (event, dedupe_key, Jsonb(payload), event),
    )
    return cur.rowcount


def detect_status_changes(conn: psycopg.Connection[Any], *, now: datetime) -> int:
    """Enqueue lot.full / lot.available for every lot whose status crossed full since the
    last notification; return the number of changes."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_LOT_STATUS)
        lots = cur.fetchall()
    changes = 0
    for lot in lots:
        status = (
            "full" if lot["capacity"] > 0 and lot["occupied"] >= lot["capacity"] else "available"
        )
        previous = lot["notified"] or "available"
        if lot["notified"] is not None and status == previous:
            continue  # the common case: nothing to write
        with conn.transaction():
            if lot["notified"] is None:
                claimed = conn.execute(
                    "INSERT INTO lot_notify_state (lot_id, status, changes, changed_at)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING changes",
                    (lot["lot_id"], status, 1 if status != previous else 0, now),
                ).fetchone()
            else:
                claimed = conn.execute(
                    "UPDATE lot_notify_state SET status = %s, changes = changes + 1,"
                    " changed_at = %s WHERE lot_id = %s AND changes = %s RETURNING changes",
                    (status, now, lot["lot_id"], lot["changes"]),
                ).fetchone()
            if claimed is None or status == previous:
                continue
            event = f"lot.{status}"
            payload = {
                "event": event,
                "at": now.isoformat(),
                "lot": {
                    "id": lot["lot_id"],
                    "name": lot["name"],
                    "district": lot["district"],
                    "capacity": lot["capacity"],
                    "occupied": lot["occupied"],
                    "free": max(0, lot["capacity"] - lot["occupied"]),
                },
            }
            _enqueue(
                conn,
                event=event,
                dedupe_key=f"{event}:{lot['lot_id']}:{claimed[0]}",
                payload=payload,
            )
            changes += 1
    return changes


def district_totals(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every district's committed capacity, occupied, free and rate, by name."""
    rows = conn.execute(
        "SELECT l.district, sum(o.capacity)::int, sum(o.occupied)::int, count(DISTINCT l.id)::int"
        " FROM lots l JOIN lot_occupancy o ON o.lot_id = l.id WHERE l.deleted_at IS NULL"
        " GROUP BY l.district ORDER BY l.district"
    ).fetchall()
    return [
        {
            "district": d,
            "capacity": c,
            "occupied": o,
            "free": max(0, c - o),
            "occupancy_rate": round(o / c, 4) if c else None,
            "lots": n,
        }
        for d, c, o, n in rows
    ]


def enqueue_district_snapshots(
    conn: psycopg.Connection[Any], *, now: datetime, every_s: float
) -> int:
    """One district.snapshot per subscriber and period (a second call in a period is a no-op)."""
    period = int(now.timestamp() // every_s)
    subscribed = conn.execute(
        "SELECT 1 FROM city_subscriptions WHERE deleted_at IS NULL"
        " AND 'district.snapshot' = ANY(events) LIMIT 1"
    ).fetchone()
    if not subscribed:
        return 0
    payload = {
        "event": "district.snapshot",
        "generated_at": now.isoformat(),
        "districts": district_totals(conn),
    }
    with conn.transaction():
        return _enqueue(
            conn,
            event="district.snapshot",
            dedupe_key=f"district.snapshot:{period}",
            payload=payload,
        )


# Deliveries ---------------------------------------------------------------------------------


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``"<timestamp>.<body>"``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def backoff(attempts: int, *, base_s: float, max_s: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones."""
    return float(min(max_s, base_s * 2 ** max(0, attempts - 1)))


def claim_due(
    conn: psycopg.Connection[Any], *, now: datetime, lease_s: float, limit: int = 50
) -> list[dict[str, Any]]:
    """Take up to ``limit`` due deliveries, leasing them so no other worker sends them."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "UPDATE webhook_deliveries d SET attempts = d.attempts + 1, next_attempt_at = %s"
            " FROM city_subscriptions s WHERE s.id = d.subscription_id AND d.id IN ("
            "   SELECT id FROM webhook_deliveries WHERE status = 'pending'"
            "   AND next_attempt_at <= %s ORDER BY next_attempt_at LIMIT %s"
            "   FOR UPDATE SKIP LOCKED)"
            " RETURNING d.id, d.event, d.payload, d.attempts, d.created_at, s.url, s.secret",
            (now + timedelta(seconds=lease_s), now, limit),
        )
        return cur.fetchall()


def body_of(delivery: dict[str, Any]) -> bytes:
    """The delivery's body: the same bytes on every attempt."""
    return orjson.dumps(
        {
            "id": str(delivery["id"]),
            "event": delivery["event"],
            "created_at": delivery["created_at"].astimezone(UTC).isoformat(),
            "data": delivery["payload"],
        }
    )


def public_destination(url: str) -> bool:
    """Whether every address ``url``'s host resolves to is a public one.

    Keeps city-supplied URLs from reaching the platform's own network (loopback, private,
    link-local such as cloud metadata). The name is resolved again when connecting, so this
    narrows rather than closes DNS rebinding; an egress proxy is the complete answer.
    """
    host = urllib3.util.parse_url(url).host
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    return bool(addresses) and all(a.is_global and not a.is_multicast for a in addresses)


def send(
    http: urllib3.PoolManager,
    delivery: dict[str, Any],
    *,
    timeout_s: float,
    now: datetime,
    allow_private: bool = False,
) -> tuple[int | None, str | None]:
    """POST one signed delivery; (status code, error)."""
    if not allow_private and not public_destination(delivery["url"]):
        return None, "destination not allowed (not a public address)"
    body = body_of(delivery)
    timestamp = str(int(now.timestamp()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "parking-webhooks/1",
        EVENT_HEADER: delivery["event"],
        DELIVERY_HEADER: str(delivery["id"]),
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(delivery["secret"], timestamp, body),
    }
    try:
        resp = http.request(
            "POST",
            delivery["url"],
            body=body,
            headers=headers,
            timeout=urllib3.Timeout(total=timeout_s),
            retries=False,
            redirect=False,
            preload_content=True,
        )
    except urllib3.exceptions.HTTPError as exc:
        return None, type(exc).__name__
    return resp.status, None


def record(
    conn: psycopg.Connection[Any],
    delivery: dict[str, Any],
    *,
    status_code: int | None,
    error: str | None,
    now: datetime,
    max_attempts: int,
    backoff_s: float,
    backoff_max_s: float,
) -> str:
    """Store the attempt's outcome; return the delivery's new status."""
    ok = status_code is not None and 200 <= status_code < 300
    if ok:
        status = "delivered"
    elif delivery["attempts"] >= max_attempts:
        status = "failed"
    else:
        status = "pending"
    retry_at = now + timedelta(
        seconds=backoff(delivery["attempts"], base_s=backoff_s, max_s=backoff_max_s)
    )
    conn.execute(
        "UPDATE webhook_deliveries SET status = %s, last_status_code = %s, last_error = %s,"
        " next_attempt_at = %s, delivered_at = CASE WHEN %s THEN %s END"
        " WHERE id = %s AND attempts = %s AND status = 'pending'",
        (
            status,
            status_code,
            error or (None if ok else f"HTTP {status_code}"),
            retry_at,
            ok,
            now,
            delivery["id"],
            delivery["attempts"],
        ),
    )
    return status


def deliver_due(
    conn: psycopg.Connection[Any],
    http: urllib3.PoolManager,
    *,
    timeout_s: float,
    max_attempts: int,
    backoff_s: float,
    backoff_max_s: float,
    allow_private: bool = False,
    limit: int = 32,
    senders: int = 8,
) -> dict[str, int]:
    """Send every due delivery once; count the outcomes."""
    counts = {"delivered": 0, "pending": 0, "failed": 0}
    now = datetime.now(UTC)
    due = claim_due(conn, now=now, lease_s=timeout_s * 2 + 30, limit=limit)
    if not due:
        return counts

    def attempt(delivery: dict[str, Any]) -> tuple[int | None, str | None]:
        return send(
            http, delivery, timeout_s=timeout_s, now=datetime.now(UTC), allow_private=allow_private
        )

    # Slow receivers wait in parallel, so one of them cannot hold up the others for long.
    with ThreadPoolExecutor(max_workers=min(senders, len(due))) as pool:
        answers = list(pool.map(attempt, due))
    for delivery, (status_code, error) in zip(due, answers, strict=True):
        status = record(
            conn,
            delivery,
            status_code=status_code,
            error=error,
            now=datetime.now(UTC),
            max_attempts=max_attempts,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )
        counts[status] += 1
        log.info(
            "webhook attempt",
            extra={
                "delivery_id": delivery["id"],
                "event": delivery["event"],
                "attempt": delivery["attempts"],
                "status_code": status_code,
                "error": error,
                "outcome": status,
            },
        )
    return counts
