"""Rate limits in Redis: per principal, or per client address for anonymous callers.

Each route group (drivers' lookups, operators' events, city pulls, account calls, the rest) has
its own limit of ``limit`` requests per ``window_s`` seconds, enforced as a GCRA in Redis:
smooth, with a burst of at most ``limit``. If Redis is unreachable the gateway lets requests
through rather than fail the whole platform.

A gateway worker does not ask Redis for every request. It takes a *lease* of tokens off the
subject's bucket in one Lua call and spends them locally: a lease starts at one token and
doubles each time it is spent before it lapses (a busy subject), up to a tenth of the limit,
and a lease that lapses unspent gives its tokens back in the subject's next call and halves.
Tokens are taken from the shared bucket before they are spent, so all the workers together
never admit more than the limit; a subject at a handful of requests a second costs a round trip
per request as before, one at hundreds costs one per lease. Callers that find the lease empty
while another is refilling it wait for that refill (once) instead of each asking Redis: when a
busy subject's lease ran out, every request in flight at that moment made its own round trip
(0.07 a request under 16 concurrent clients).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger("parking.gateway.ratelimit")

# KEYS[1]: the bucket.  ARGV: limit, window in ms, tokens wanted, tokens given back.
# Returns {granted, remaining, reset_ms}: granted 0 means refused, reset_ms is then the wait.
_GCRA = """
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local back = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local emission = period / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or now) - back * emission
if tat < now then tat = now end
local free = math.floor((now + period - tat) / emission)
if free < 1 then
  if back > 0 then
    redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 1)
  end
  return {0, 0, math.ceil(tat + emission - period - now)}
end
local granted = math.min(want, free)
local new_tat = tat + granted * emission
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1)
return {granted, free - granted, math.ceil(new_tat - now)}
"""
MAX_LEASES = 50_000  # subjects remembered per worker before the table is cleared
REFILL_WAIT_S = 1.0  # how long a caller waits for another's refill before asking Redis itself


class _Lease:
    """Tokens of one bucket taken from Redis and not yet spent by this worker."""

    __slots__ = ("pending", "refill", "remaining", "reset_at", "size", "tokens", "until")

    def __init__(self) -> None:
        self.tokens = 0
        self.until = 0.0
        self.size = 1
        self.remaining = 0  # the bucket's tokens left in Redis when the lease was taken
        self.reset_at = 0.0
        self.pending = 0  # refills in flight (greenlets of this worker waiting on Redis)
        self.refill: threading.Event | None = None  # set when the first of them is in


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    window_s: float
    remaining: int
    reset_s: float
    group: str

    def headers(self) -> dict[str, str]:
        reset = max(0, math.ceil(self.reset_s))
        values = {
            "RateLimit-Policy": f'"{self.group}";q={self.limit};w={math.ceil(self.window_s)}',
            "RateLimit": f'"{self.group}";r={max(0, self.remaining)};t={reset}',
        }
        if not self.allowed:
            values["Retry-After"] = str(max(1, reset))
        return values


class RateLimiter:
    def __init__(self, limits: dict[str, tuple[int, float]], enabled: bool = True) -> None:
        self.limits = limits
        self.enabled = enabled
        self._script: tuple[redis.Redis, Any] | None = None  # registered once per client
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()  # the leases' bookkeeping, never held across Redis

    def check(self, client: redis.Redis, group: str, subject: str) -> Decision | None:
        """The decision for one request of ``subject`` in ``group``; None when not limited."""
        if not self.enabled:
            return None
        limit, window_s = self.limits.get(group) or self.limits["default"]
        key = f"rl:{group}:{limit}/{window_s:g}:{subject}"
        waited = False
        while True:  # at most twice: after one wait for another caller's refill, ask Redis
            now = time.monotonic()
            with self._lock:
                lease = self._leases.get(key)
                if lease is None:
                    if len(self._leases) >= MAX_LEASES:
                        self._leases.clear()
                    lease = self._leases[key] = _Lease()
                if lease.tokens > 0 and lease.until > now:
                    lease.tokens -= 1
                    return Decision(
                        True,
                        limit,
                        window_s,
                        lease.remaining + lease.tokens,
                        lease.reset_at - now,
                        group,
                    )
                refilling = None if waited else lease.refill
                if refilling is None:
                    back, lease.tokens = lease.tokens, 0
                    if lease.pending:  # another caller is refilling this lease: no growth on top
                        pass
                    elif back:  # lapsed unspent: give the tokens back, ask for fewer
                        lease.size = max(1, lease.size // 2)
                    elif lease.until:  # spent: a busy subject, ask for more
                        lease.size = min(lease.size * 2, max(1, limit // 10))
                    lease.pending += 1
                    size = lease.size
                    mine = None
                    if lease.refill is None:  # the others wait for this refill
                        mine = lease.refill = threading.Event()
                    break
            refilling.wait(REFILL_WAIT_S)
            waited = True
        try:
            if self._script is None or self._script[0] is not client:
                self._script = (client, client.register_script(_GCRA))
            granted, remaining, reset_ms = self._script[1](
                keys=[key], args=[limit, int(window_s * 1000), size, back]
            )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("rate limiting skipped, redis unavailable: %s", type(exc).__name__)
            granted = None
        except BaseException:
            with self._lock:
                self._settled(lease, mine)
            raise
        reset_s = int(reset_ms) / 1000 if granted is not None else 0.0
        with self._lock:
            self._settled(lease, mine)
            if granted is None:
                return None
            if not granted:
                lease.until = now
                return Decision(False, limit, window_s, 0, reset_s, group)
            # added, not set: other callers may have taken tokens meanwhile, and every token
            # taken from Redis must be spent or given back
            lease.tokens += int(granted) - 1
            lease.until = now + min(1.0, max(0.05, window_s / 10))
            lease.remaining = int(remaining)
            lease.reset_at = now + reset_s
            return Decision(True, limit, window_s, lease.remaining + lease.tokens, reset_s, group)

    @staticmethod
    def _settled(lease: _Lease, mine: threading.Event | None) -> None:
        """Under the lock: a refill is in (or failed); wake the callers waiting for it (they
        run once the lock is let go, so they see what it brought)."""
        lease.pending -= 1
        if mine is not None:
            lease.refill = None
            mine.set()
