"""Rate limits in Redis: per principal, or per client address for anonymous callers.

Each route group (drivers' lookups, operators' events, city pulls, account calls, the rest) has
its own limit of ``limit`` requests per ``window_s`` seconds, enforced as a GCRA in one Lua
call: smooth, with a burst of at most ``limit``, and one Redis round trip per request. If Redis
is unreachable the gateway lets requests through rather than fail the whole platform.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger("parking.gateway.ratelimit")

# KEYS[1]: the bucket.  ARGV: limit, window in ms.  Returns {allowed, remaining, reset_ms}.
_GCRA = """
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local emission = period / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission
local allow_at = new_tat - period
if now < allow_at then
  return {0, 0, math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1)
local remaining = math.floor((period - (new_tat - now)) / emission)
return {1, remaining, math.ceil(new_tat - now)}
"""


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

    def check(self, client: redis.Redis, group: str, subject: str) -> Decision | None:
        """The decision for one request of ``subject`` in ``group``; None when not limited."""
        if not self.enabled:
            return None
        limit, window_s = self.limits.get(group) or self.limits["default"]
        try:
            if self._script is None or self._script[0] is not client:
                self._script = (client, client.register_script(_GCRA))
            script = self._script[1]
            allowed, remaining, reset_ms = script(
                keys=[f"rl:{group}:{limit}/{window_s:g}:{subject}"],
                args=[limit, int(window_s * 1000)],
            )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("rate limiting skipped, redis unavailable: %s", type(exc).__name__)
            return None
        return Decision(bool(allowed), limit, window_s, int(remaining), int(reset_ms) / 1000, group)
