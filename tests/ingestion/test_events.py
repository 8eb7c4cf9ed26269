"""POST /v1/events through the gateway: outcomes, state, the log, Redis and bad input."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis

from services.common.auth import plate_hash
from tests.ingestion.helpers import (
    count,
    create_lot,
    gate,
    gate_lot_body,
    occupancy,
    post,
    redis_occupancy,
    space,
    space_lot_body,
    truth,
)
from tests.stack import Client, Stack, wait_for

PROBLEM = "application/problem+json"


def _log_count(conn: psycopg.Connection[Any], operator_id: str) -> tuple[int, int]:
    events = conn.execute(
        "SELECT count(*) FROM events WHERE operator_id = %s", (operator_id,)
    ).fetchone()
    ids = conn.execute(
        "SELECT count(*) FROM event_ids WHERE operator_id = %s", (operator_id,)
    ).fetchone()
    assert events is not None and ids is not None
    return events[0], ids[0]


def test_space_events_move_forward_only_and_duplicates_change_nothing(
    new_operator: Any, conn: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    operator_id, operator = new_operator()
    lot = create_lot(operator, space_lot_body(4))
    lid = lot["id"]
    first = space(lid, "A-000", True, 10)
    body = post(
        operator,
        [first, space(lid, "A-001", True, 10), space(lid, "A-003", True, 10), dict(first)],
    )
    assert body == {"accepted": 3, "duplicate": 1, "stale": 0, "rejected": []}
    assert occupancy(conn, lid) == {"standard": 2, "ev": 1}
    # An older observation of A-000 is stale; a newer one wins; a replay is a duplicate.
    body = post(
        operator,
        [space(lid, "A-000", False, 5), space(lid, "A-001", False, 20), first],
    )
    assert body == {"accepted": 1, "duplicate": 1, "stale": 1, "rejected": []}
    assert occupancy(conn, lid) == {"standard": 1, "ev": 1}
    assert redis_occupancy(redis_client, lid) == {"standard": 1, "ev": 1}
    state = redis_client.hgetall(f"lot:{lid}")
    assert state["u"].startswith("2026-01-01T00:00:20")
    log, ids = _log_count(conn, operator_id)
    assert (log, ids) == (5, 5)  # accepted and stale are logged, duplicates are not
    stale = conn.execute(
        "SELECT count(*) FROM events WHERE lot_id = %s AND stale", (lid,)
    ).fetchone()
    assert stale == (1,)


def test_within_a_batch_events_apply_in_observed_order(
    new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    _, operator = new_operator()
    lot = create_lot(operator, space_lot_body(2))
    lid = lot["id"]
    events = [
        space(lid, "A-000", False, 30),
        space(lid, "A-000", True, 20),
        space(lid, "A-001", True, 5),
        space(lid, "A-001", False, 1),
    ]
    assert post(operator, events)["accepted"] == 4
    assert occupancy(conn, lid) == truth(lot, events) == {"standard": 1}
    # ties on observed_at are broken by event id
    tie_a = space(lid, "A-000", True, 40, eid="tie-a")
    tie_b = space(lid, "A-000", False, 40, eid="tie-b")
    assert post(operator, [tie_b])["accepted"] == 1
    assert post(operator, [tie_a])["stale"] == 1
    assert occupancy(conn, lid) == truth(lot, [*events, tie_a, tie_b]) == {"standard": 1}


def test_gate_lots_clamp_and_reset_on_newer_snapshots(
    new_operator: Any, conn: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    _, operator = new_operator()
    lot = create_lot(operator, gate_lot_body({"standard": 3, "ev": 1}))
    lid = lot["id"]
    sent: list[dict] = []

    def send(events: list[dict]) -> dict[str, Any]:
        sent.extend(events)
        return post(operator, events)

    entries = [gate(lid, "entry", t) for t in (1, 2, 3, 4)] + [gate(lid, "entry", 5, "ev")]
    assert send(entries)["accepted"] == 5
    assert occupancy(conn, lid) == {"standard": 3, "ev": 1}  # clamped at capacity
    assert send([gate(lid, "exit", t) for t in (6, 7, 8, 9, 10)])["accepted"] == 5
    assert occupancy(conn, lid) == {"standard": 0, "ev": 1}  # clamped at zero
    # A count snapshot at t=20 resets the standard count; gate events after it still count,
    # whatever order they arrive in, and one observed before it is stale.
    assert send([gate(lid, "entry", 25)])["accepted"] == 1
    assert send([count(lid, {"standard": 1}, 20)])["accepted"] == 1
    assert occupancy(conn, lid) == truth(lot, sent) == {"standard": 2, "ev": 1}
    body = send([gate(lid, "entry", 15), gate(lid, "exit", 30), gate(lid, "exit", 31, "ev")])
    assert body == {"accepted": 2, "duplicate": 0, "stale": 1, "rejected": []}
    assert occupancy(conn, lid) == truth(lot, sent) == {"standard": 1, "ev": 0}
    # An older snapshot is stale; a count above capacity is clamped.
    assert send([count(lid, {"standard": 0}, 10)])["stale"] == 1
    assert send([count(lid, {"standard": 9, "ev": 1}, 40)])["accepted"] == 1
    assert occupancy(conn, lid) == truth(lot, sent) == {"standard": 3, "ev": 1}
    assert redis_occupancy(redis_client, lid) == {"standard": 3, "ev": 1}


def test_rejections_are_reported_by_index_and_change_nothing(
    stack: Stack, new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    operator_id, operator = new_operator()
    _, other = new_operator()
    spaces = create_lot(operator, space_lot_body(2))
    gates = create_lot(operator, gate_lot_body({"standard": 5}))
    foreign = create_lot(other, space_lot_body(2))
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    events = [
        space(spaces["id"], "A-000", True, 1),  # 0 accepted
        space(foreign["id"], "A-000", True, 1),  # 1 another operator's lot
        space(spaces["id"], "Z-999", True, 1),  # 2 no such space
        gate(spaces["id"], "entry", 1),  # 3 a space lot takes no gate events
        space(gates["id"], "A-000", True, 1),  # 4 a gate lot takes no space events
        gate(gates["id"], "entry", 1, "ev"),  # 5 no ev spaces there
        {**space(spaces["id"], "A-001", True, 1), "observed_at": future},  # 6 future
        {**space(spaces["id"], "A-001", True, 1), "occupied": "yes"},  # 7 invalid
        {"id": "x", "type": "teleport"},  # 8 invalid
        "not an event",  # 9 invalid
        {**space(spaces["id"], "A-001", True, 1), "observed_at": "2026-01-01T00:00:00"},  # 10
        count(gates["id"], {"standard": 2, "motorcycle": 1}, 1),  # 11 no motorcycle spaces
        {**space(spaces["id"], "A-001", True, 1), "lot_id": "not-a-uuid"},  # 12 invalid
        {**gate(gates["id"], "entry", 2), "owner": "me"},  # 13 extra field
    ]
    body = post(operator, events)
    assert body["accepted"] == 1 and body["duplicate"] == 0 and body["stale"] == 0
    codes = {r["index"]: r["code"] for r in body["rejected"]}
    assert codes == {
        1: "unknown-lot",
        2: "unknown-space",
        3: "wrong-lot-kind",
        4: "wrong-lot-kind",
        5: "unknown-space-type",
        6: "observed-in-future",
        7: "invalid",
        8: "invalid",
        9: "invalid",
        10: "invalid",
        11: "unknown-space-type",
        12: "invalid",
        13: "invalid",
    }
    assert all(r["detail"] for r in body["rejected"])
    assert _log_count(conn, operator_id) == (1, 1)
    assert occupancy(conn, foreign["id"]) == {"standard": 0}
    assert occupancy(conn, gates["id"]) == {"standard": 0}
    # a rejected event's id was not consumed
    fixed = {**events[2], "space_id": "A-001"}
    assert post(operator, [fixed])["accepted"] == 1


def test_plates_are_kept_only_as_keyed_hashes(
    stack: Stack, new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    _, operator = new_operator()
    lot = create_lot(operator, gate_lot_body())
    entry = gate(lot["id"], "entry", 1, plate="浙A 12345")
    assert post(operator, [entry])["accepted"] == 1
    row = conn.execute(
        "SELECT plate_hash FROM events WHERE lot_id = %s AND event_id = %s",
        (lot["id"], entry["id"]),
    ).fetchone()
    assert row is not None
    key = stack.env["PARKING_PLATE_HASH_KEY"]
    assert bytes(row[0]) == plate_hash(key, "浙A12345")
    dump = conn.execute(
        "SELECT row_to_json(e)::text FROM events e WHERE lot_id = %s", (lot["id"],)
    ).fetchone()
    assert dump is not None and "12345" not in dump[0]


def test_the_log_is_partitioned_by_observed_day(
    new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    _, operator = new_operator()
    lot = create_lot(operator, space_lot_body(1))
    now = datetime.now(UTC).replace(microsecond=0)
    event = {**space(lot["id"], "A-000", True, 0), "observed_at": now.isoformat()}
    assert post(operator, [event])["accepted"] == 1
    row = conn.execute(
        "SELECT tableoid::regclass::text FROM events WHERE event_id = %s", (event["id"],)
    ).fetchone()
    assert row == (f"events_{now:%Y%m%d}",)


def test_a_change_is_published_for_the_availability_service(
    new_operator: Any, redis_client: redis.Redis
) -> None:
    _, operator = new_operator()
    lot = create_lot(operator, space_lot_body(2))
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("lot-changes")
    seen: list[dict[str, Any]] = []
    try:
        wait_for(lambda: pubsub.get_message(timeout=0.1) is None, timeout=5)
        assert post(operator, [space(lot["id"], "A-001", True, 3)])["accepted"] == 1

        def published() -> bool:
            message = pubsub.get_message(timeout=0.2)
            if message is not None:
                data = json.loads(message["data"])
                if data.get("lot_id") == lot["id"]:
                    seen.append(data)
            return any(m.get("o") == {"standard": 1} for m in seen)

        wait_for(published, timeout=10, what=f"a lot-changes message; saw {seen}")
        assert [m["v"] for m in seen if m.get("o") == {"standard": 1}] == [2]
    finally:
        pubsub.close()


def test_bad_batches_are_problems_and_change_nothing(
    stack: Stack, new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    operator_id, operator = new_operator()
    lot = create_lot(operator, space_lot_body(1))
    good = space(lot["id"], "A-000", True, 1)
    cases: list[tuple[Any, int]] = [
        ({"events": [good] * 1001}, 413),
        ({"events": []}, 422),
        ({"events": "all"}, 422),
        ({}, 422),
        ([good], 422),
        ({"events": [good], "more": 1}, 422),
    ]
    for body, status in cases:
        resp = operator.post("/v1/events", json=body)
        assert resp.status_code == status, (body if status != 413 else "1001", resp.text)
        assert resp.headers["Content-Type"] == PROBLEM
        assert resp.json()["code"] == ("payload-too-large" if status == 413 else "validation")
    for raw in (b'{"events": [', b"\xff\xfe", b""):
        resp = operator.post("/v1/events", data=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code in (400, 422) and resp.headers["Content-Type"] == PROBLEM
    resp = operator.post("/v1/events", data=b"events", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415 and resp.headers["Content-Type"] == PROBLEM
    big = {"events": [{**good, "id": "x" * 100, "pad": "y" * 2000}] * 600}
    resp = operator.post("/v1/events", json=big)
    assert resp.status_code == 413 and resp.headers["Content-Type"] == PROBLEM
    assert _log_count(conn, operator_id) == (0, 0)
    assert occupancy(conn, lot["id"]) == {"standard": 0}


def test_only_operators_push_events(stack: Stack, anonymous: Any, new_city: Any) -> None:
    assert anonymous.post("/v1/events", json={"events": []}).status_code == 401
    _, city = new_city()
    assert city.post("/v1/events", json={"events": []}).status_code == 403


def test_any_printable_id_is_idempotent(new_operator: Any, conn: psycopg.Connection[Any]) -> None:
    _, operator = new_operator()
    lot = create_lot(operator, gate_lot_body({"standard": 50}))
    ids = ['a"b', "c\\d", "e,f", "{g}", "浙A-1", " spaced out ", "NULL", "x" * 128, "'; --"]
    events = [{**gate(lot["id"], "entry", i), "id": eid} for i, eid in enumerate(ids)]
    assert post(operator, events)["accepted"] == len(ids)
    assert post(operator, events[::-1])["duplicate"] == len(ids)
    stored = conn.execute("SELECT event_id FROM events WHERE lot_id = %s", (lot["id"],)).fetchall()
    assert sorted(r[0] for r in stored) == sorted(ids)
    assert occupancy(conn, lot["id"]) == {"standard": len(ids)}


def test_rejections_name_their_reason_and_keep_their_index(
    stack: Stack, new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    """The details of each rejection, in the fast path (every event well-formed) and when some
    are malformed (the others keep their batch index)."""
    operator_id, operator = new_operator()
    _, other = new_operator()
    spaces = create_lot(operator, space_lot_body(2))
    gates = create_lot(operator, gate_lot_body({"standard": 5}))
    foreign = create_lot(other, space_lot_body(2))
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    well_formed = [
        {**space(spaces["id"], "A-000", True, 1), "observed_at": future},
        space(foreign["id"], "A-000", True, 1),
        space(spaces["id"], "Z-999", True, 1),
        gate(spaces["id"], "entry", 1),
        space(gates["id"], "A-000", True, 1),
        gate(gates["id"], "exit", 1, "ev"),
        count(gates["id"], {"motorcycle": 1, "ev": 1, "standard": 2}, 1),
        space(spaces["id"], "A-001", True, 1),
    ]
    details = [
        (0, "observed-in-future", "observed_at is more than 300 s in the future"),
        (1, "unknown-lot", "no such lot of yours"),
        (2, "unknown-space", "the lot has no such space"),
        (3, "wrong-lot-kind", "the lot is counted by space sensors: send space events"),
        (4, "wrong-lot-kind", "the lot is counted at its gates: send entry, exit or count"),
        (5, "unknown-space-type", "the lot has no ev spaces"),
        (6, "unknown-space-type", "the lot has no ev, motorcycle spaces"),
    ]
    body = post(operator, well_formed)
    assert body["accepted"] == 1
    assert [(r["index"], r["code"], r["detail"]) for r in body["rejected"]] == details
    # the same events, after a malformed one and with another in between: indexes shift
    again = [dict(e, id=e["id"] + "-2") for e in well_formed]
    mixed = ["not an event", *again[:4], {"id": "x", "type": "teleport"}, *again[4:]]
    body = post(operator, mixed)
    assert body["accepted"] == 1 and body["duplicate"] == 0 and body["stale"] == 0
    shift = {i: i + 1 if i < 4 else i + 2 for i in range(8)}
    assert [(r["index"], r["code"]) for r in body["rejected"]] == sorted(
        [(0, "invalid"), (5, "invalid")] + [(shift[i], code) for i, code, _ in details]
    )
    assert _log_count(conn, operator_id) == (2, 2)


def test_a_repeated_id_is_a_duplicate_of_its_first_valid_occurrence(
    stack: Stack, new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    operator_id, operator = new_operator()
    lot = create_lot(operator, space_lot_body(2))
    lid = lot["id"]
    # the first carrier of "dup" is rejected, so the second is the one accepted
    events = [
        space(lid, "Z-999", True, 1, "dup"),
        space(lid, "A-000", True, 5, "dup"),
        space(lid, "A-001", True, 6, "dup"),
        space(lid, "A-001", True, 4, "older"),
    ]
    body = post(operator, events)
    assert body == {
        "accepted": 2,
        "duplicate": 1,
        "stale": 0,
        "rejected": [{"index": 0, "code": "unknown-space", "detail": "the lot has no such space"}],
    }
    assert occupancy(conn, lid) == {"standard": 2}
    row = conn.execute(
        "SELECT event_id, observed_at FROM spaces WHERE lot_id = %s AND space_id = 'A-001'", (lid,)
    ).fetchone()
    assert row is not None and row[0] == "older"
    assert _log_count(conn, operator_id) == (2, 2)
    # across batches: all duplicates, nothing changes
    body = post(operator, events[1:])
    assert body["duplicate"] == 3 and body["accepted"] == 0
    assert _log_count(conn, operator_id) == (2, 2)


def test_concurrent_replays_of_a_batch_claim_each_id_once(
    new_operator: Any, conn: psycopg.Connection[Any]
) -> None:
    """Ids are claimed by a plain insert: the batches that lose the race to the first one fail
    on the key, run again leaving out the claimed ids, and answer duplicates, whatever the
    overlap."""
    operator_id, operator = new_operator()
    lot = create_lot(operator, gate_lot_body({"standard": 500}))
    events = [gate(lot["id"], "entry", i) for i in range(60)]
    # each client sends the whole batch, or a part overlapping the others', at the same time
    batches = [events, events, events[::-1], events[:40], events[20:], events[10:50]]
    clients = [Client(operator.base) for _ in batches]  # a session per thread
    for client in clients:
        client.session.headers.update(operator.session.headers)
    start = threading.Barrier(len(batches))
    answers: list[dict[str, Any]] = [{} for _ in batches]

    def run(i: int) -> None:
        start.wait(timeout=30)
        answers[i] = post(clients[i], batches[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(a for a in answers), answers
    assert [a["accepted"] + a["duplicate"] for a in answers] == [len(b) for b in batches]
    assert sum(a["accepted"] for a in answers) == len(events)
    assert all(a["stale"] == 0 and a["rejected"] == [] for a in answers)
    assert _log_count(conn, operator_id) == (len(events), len(events))
    assert occupancy(conn, lot["id"]) == {"standard": len(events)}
