"""The rate limiter's leases against the real Redis: exact limits across workers."""

from __future__ import annotations

import threading
import time
import uuid

import redis

from gateway.ratelimit import RateLimiter


def _admitted(limiters: list[RateLimiter], client: redis.Redis, subject: str, n: int) -> int:
    allowed = 0
    for i in range(n):
        decision = limiters[i % len(limiters)].check(client, "lookups", subject)
        assert decision is not None
        allowed += decision.allowed
    return allowed


def test_leases_never_admit_more_than_the_limit_across_workers(redis_client: redis.Redis) -> None:
    # an hour's window: a token comes back every 18 s, so none refills while the test runs
    limits = {"lookups": (200, 3600.0), "default": (10, 1.0)}
    workers = [RateLimiter(limits) for _ in range(3)]  # three gateway workers, one bucket
    subject = f"ip:{uuid.uuid4()}"
    assert _admitted(workers, redis_client, subject, 500) == 200
    refused = workers[0].check(redis_client, "lookups", subject)
    assert refused is not None and not refused.allowed
    assert 1 <= int(refused.headers()["Retry-After"]) <= 18


def test_a_busy_subject_costs_few_round_trips(redis_client: redis.Redis) -> None:
    limiter = RateLimiter({"lookups": (100_000, 1.0), "default": (10, 1.0)})
    subject = f"ip:{uuid.uuid4()}"
    before = int(redis_client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    assert _admitted([limiter], redis_client, subject, 2000) == 2000
    after = int(redis_client.info("commandstats")["cmdstat_evalsha"]["calls"])
    assert after - before < 50  # leases double: 1, 2, 4, ... tokens per round trip


def test_unspent_tokens_are_given_back(redis_client: redis.Redis) -> None:
    limits = {"lookups": (100, 3600.0), "default": (10, 1.0)}  # no refill during the test
    busy, other = RateLimiter(limits), RateLimiter(limits)
    subject = f"ip:{uuid.uuid4()}"
    assert _admitted([busy], redis_client, subject, 16) == 16  # leases 1+2+4+8, then 10
    held = busy._leases[next(iter(busy._leases))]
    assert held.tokens > 0
    held.until = 0.01  # the lease lapses
    assert busy.check(redis_client, "lookups", subject) is not None  # gives them back
    assert held.tokens < held.size
    # the other worker sees the bucket with the returned tokens: 100 minus what was spent
    first = other.check(redis_client, "lookups", subject)
    assert first is not None and first.allowed and first.remaining >= 100 - 16 - 2 - held.size


def test_remaining_counts_down_exactly(redis_client: redis.Redis) -> None:
    limiter = RateLimiter({"lookups": (5, 60.0), "default": (10, 1.0)})
    subject = f"ip:{uuid.uuid4()}"
    seen = []
    for _ in range(6):
        decision = limiter.check(redis_client, "lookups", subject)
        assert decision is not None
        seen.append((decision.allowed, decision.remaining))
    assert seen == [(True, 4), (True, 3), (True, 2), (True, 1), (True, 0), (False, 0)]


def test_concurrent_callers_share_leases_exactly(redis_client: redis.Redis) -> None:
    limits = {"lookups": (300, 3600.0), "default": (10, 1.0)}  # no refill during the test
    workers = [RateLimiter(limits) for _ in range(2)]
    subject = f"ip:{uuid.uuid4()}"
    counts: list[int] = []

    def caller(k: int) -> None:
        counts.append(_admitted([workers[k % 2]], redis_client, subject, 125))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(counts) == 8 and sum(counts) == 300  # 1000 tries, exactly the limit admitted


def test_callers_that_find_the_lease_refilling_wait_for_that_refill(
    redis_client: redis.Redis,
) -> None:
    """A busy subject's lease runs out with 16 requests in flight: one asks Redis for the next
    lease while the 15 others wait for it, then spend it; one round trip, not 16."""
    limiter = RateLimiter({"lookups": (100_000, 1.0), "default": (10, 1.0)})
    subject = f"ip:{uuid.uuid4()}"
    assert _admitted([limiter], redis_client, subject, 1) == 1
    lease = next(iter(limiter._leases.values()))
    lease.size, lease.tokens = 32, 0  # a busy subject's lease, just spent
    assert limiter._script is not None
    script = limiter._script[1]
    calls = []

    def held_until_the_others_wait(**kwargs: object) -> object:
        calls.append(kwargs)
        if len(calls) == 1:  # the first refill is in flight until the others wait for it
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                refill = lease.refill
                if refill is not None and len(refill._cond._waiters) == 15:  # type: ignore[attr-defined]
                    break
                time.sleep(0.001)
        return script(**kwargs)

    limiter._script = (redis_client, held_until_the_others_wait)
    admitted: list[int] = []
    start = threading.Barrier(16, timeout=30)

    def caller() -> None:
        start.wait()
        admitted.append(_admitted([limiter], redis_client, subject, 1))

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(admitted) == 16
    assert len(calls) == 1, len(calls)
    assert lease.refill is None and lease.pending == 0
