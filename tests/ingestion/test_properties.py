"""Invariant 1 (ARCHITECTURE.md): whatever the order, duplication or concurrency of delivery,
every lot's live count is what its events imply, and each event is counted exactly once.

Random events with duplicates and shuffled order go from several concurrent clients through
the real gateway and gunicorn workers; the counts in PostgreSQL and Redis are then compared
with the truth computed from the events.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import psycopg
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ingestion.helpers import (
    at,
    create_lot,
    gate_lot_body,
    not_limited,
    occupancy,
    redis_occupancy,
    space_lot_body,
    truth,
)
from tests.stack import Client, wait_for

CLIENTS = 4
SPACE_LOTS, GATE_LOTS = 2, 2
SPACES = ["A-000", "A-001", "A-002", "A-003"]  # A-003 is an ev space
GATE_TYPES = ["standard", "ev"]

# (lot index, kind, space or type index, occupied / count values, observed second)
event_spec = st.one_of(
    st.tuples(
        st.integers(0, SPACE_LOTS - 1),
        st.just("space"),
        st.integers(0, len(SPACES) - 1),
        st.booleans(),
        st.integers(0, 20),
    ),
    st.tuples(
        st.integers(SPACE_LOTS, SPACE_LOTS + GATE_LOTS - 1),
        st.sampled_from(["entry", "entry", "exit"]),
        st.integers(0, 1),
        st.none(),
        st.integers(0, 20),
    ),
    st.tuples(
        st.integers(SPACE_LOTS, SPACE_LOTS + GATE_LOTS - 1),
        st.just("count"),
        st.integers(0, 2),  # standard, ev or both
        st.tuples(st.integers(0, 5), st.integers(0, 3)),
        st.integers(0, 20),
    ),
)


def build(specs: list[tuple[Any, ...]], lots: list[dict[str, Any]], tag: str) -> list[dict]:
    events = []
    for i, (lot_index, kind, which, value, second) in enumerate(specs):
        event: dict[str, Any] = {
            "id": f"{tag}-{i}",
            "lot_id": lots[lot_index]["id"],
            "type": kind,
            "observed_at": at(second),
        }
        if kind == "space":
            event["space_id"] = SPACES[which]
            event["occupied"] = value
        elif kind == "count":
            standard, ev = value
            event["occupied"] = [
                {"standard": standard},
                {"ev": ev},
                {"standard": standard, "ev": ev},
            ][which]
        else:
            event["space_type"] = GATE_TYPES[which]
        events.append(event)
    return events


def deliver(clients: list[Client], batches: list[list[dict]]) -> list[tuple[int, dict]]:
    """Send ``batches`` from the clients concurrently; (batch size, answer) per batch."""
    answers: list[tuple[int, dict]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def run(client: Client, mine: list[list[dict]]) -> None:
        for batch in mine:
            resp = not_limited(lambda b=batch: client.post("/v1/events", json={"events": b}))
            with lock:
                if resp.status_code != 200:
                    failures.append(resp.text)
                else:
                    answers.append((len(batch), resp.json()))

    threads = [
        threading.Thread(target=run, args=(client, batches[i :: len(clients)]))
        for i, client in enumerate(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not failures, failures[:3]
    return answers


def check(
    lots: list[dict[str, Any]],
    events: list[dict],
    answers: list[tuple[int, dict]],
    conn: psycopg.Connection[Any],
    redis_client: redis.Redis,
) -> None:
    for size, answer in answers:
        counted = answer["accepted"] + answer["duplicate"] + answer["stale"]
        assert counted + len(answer["rejected"]) == size, answer
        assert answer["rejected"] == []
    unique = {e["id"] for e in events}
    assert sum(a["accepted"] + a["stale"] for _, a in answers) == len(unique)
    for lot in lots:
        expected = truth(lot, events)
        assert occupancy(conn, lot["id"]) == expected, lot["id"]
        wait_for(
            lambda lot=lot, expected=expected: redis_occupancy(redis_client, lot["id"]) == expected,
            timeout=10,
            what=f"Redis to hold the truth for {lot['id']}",
        )
    logged = conn.execute(
        "SELECT count(*) FROM events WHERE lot_id = ANY(%s::uuid[])", ([lot["id"] for lot in lots],)
    ).fetchone()
    assert logged == (len(unique),)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=st.lists(event_spec, min_size=1, max_size=60),
    duplicates=st.lists(st.integers(0, 59), max_size=20),
    seed=st.integers(0, 2**32 - 1),
    batch_size=st.integers(1, 12),
)
def test_counts_equal_the_truth_whatever_the_delivery(
    new_operator: Any,
    conn: psycopg.Connection[Any],
    redis_client: redis.Redis,
    specs: list[tuple[Any, ...]],
    duplicates: list[int],
    seed: int,
    batch_size: int,
) -> None:
    _, operator = new_operator()
    lots = [create_lot(operator, space_lot_body(4)) for _ in range(SPACE_LOTS)]
    lots += [
        create_lot(operator, gate_lot_body({"standard": 3, "ev": 1})) for _ in range(GATE_LOTS)
    ]
    events = build(specs, lots, f"h{seed}")
    delivered = events + [dict(events[i % len(events)]) for i in duplicates]
    rng = random.Random(seed)
    rng.shuffle(delivered)
    batches = [delivered[i : i + batch_size] for i in range(0, len(delivered), batch_size)]
    clients = [
        Client(operator.base, operator.session.headers["Authorization"][7:]) for _ in range(CLIENTS)
    ]
    answers = deliver(clients, batches)
    check(lots, events, answers, conn, redis_client)


def test_a_large_concurrent_load_keeps_the_invariant(
    new_operator: Any, conn: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    _, operator = new_operator()
    lots = [create_lot(operator, space_lot_body(8)) for _ in range(3)]
    lots += [create_lot(operator, gate_lot_body({"standard": 20, "ev": 3})) for _ in range(3)]
    rng = random.Random(7)
    specs = [
        (
            rng.randrange(3),
            "space",
            rng.randrange(len(SPACES)),
            rng.random() < 0.5,
            rng.randrange(200),
        )
        if rng.random() < 0.5
        else (
            3 + rng.randrange(3),
            rng.choice(["entry", "entry", "exit"]),
            rng.randrange(2),
            None,
            rng.randrange(200),
        )
        if rng.random() < 0.9
        else (
            3 + rng.randrange(3),
            "count",
            rng.randrange(3),
            (rng.randrange(25), rng.randrange(4)),
            rng.randrange(200),
        )
        for _ in range(3000)
    ]
    events = build(specs, lots, "big")
    delivered = events + rng.sample(events, 600)
    rng.shuffle(delivered)
    batches = [delivered[i : i + 150] for i in range(0, len(delivered), 150)]
    clients = [
        Client(operator.base, operator.session.headers["Authorization"][7:]) for _ in range(8)
    ]
    answers = deliver(clients, batches)
    check(lots, events, answers, conn, redis_client)
