"""The routing table: which service answers a path, and which roles may call it at all.

The gateway holds no business rules: it checks only the coarse role of a route (an operator may
not call the city API); ownership and every finer rule are the services' own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ANY_ROLE = frozenset({"admin", "operator", "city", "driver", "anonymous"})
SIGNED_IN = frozenset({"admin", "operator", "city", "driver"})


@dataclass(frozen=True, slots=True)
class Route:
    pattern: re.Pattern[str]
    methods: frozenset[str] | None
    service: str
    roles: frozenset[str]
    mine: bool | None = None  # for GET /v1/lots: route by the ``mine`` query flag
    streaming: bool = False
    group: str = "default"  # the rate-limit group


def _r(
    pattern: str,
    service: str,
    roles: frozenset[str] | set[str],
    methods: set[str] | None = None,
    *,
    mine: bool | None = None,
    streaming: bool = False,
    group: str = "default",
) -> Route:
    return Route(
        re.compile(pattern),
        frozenset(methods) if methods else None,
        service,
        frozenset(roles),
        mine,
        streaming,
        group,
    )


_LOT = r"/v1/lots/[^/]+"
_SUB = r"/v1/city/subscriptions/[^/]+"
_RES = r"/v1/reservations/[^/]+"
ROUTES: tuple[Route, ...] = (
    _r(r"^/v1/admin/(operators|city-keys)$", "ingestion", {"admin"}, {"POST"}),
    _r(r"^/v1/events$", "ingestion", {"operator"}, {"POST"}, group="events"),
    _r(r"^/v1/lots$", "ingestion", {"operator"}, {"GET"}, mine=True),
    _r(r"^/v1/lots$", "availability", ANY_ROLE, {"GET"}, mine=False, group="lookups"),
    _r(r"^/v1/lots$", "ingestion", {"operator"}, {"POST"}),
    _r(rf"^{_LOT}/stream$", "availability", ANY_ROLE, {"GET"}, streaming=True, group="lookups"),
    _r(rf"^{_LOT}/history$", "availability", ANY_ROLE, {"GET"}, group="lookups"),
    _r(rf"^{_LOT}/quote$", "reservations", ANY_ROLE, {"GET"}, group="lookups"),
    _r(rf"^{_LOT}$", "ingestion", {"operator"}, {"GET"}, mine=True),
    _r(rf"^{_LOT}$", "availability", ANY_ROLE, {"GET"}, mine=False, group="lookups"),
    _r(rf"^{_LOT}$", "ingestion", {"operator"}, {"PATCH", "DELETE"}),
    _r(r"^/v1/city/(snapshot|aggregates)$", "availability", {"city"}, {"GET"}, group="city"),
    _r(r"^/v1/city/subscriptions$", "availability", {"city"}, {"GET", "POST"}, group="city"),
    _r(rf"^{_SUB}$", "availability", {"city"}, {"GET", "DELETE"}, group="city"),
    _r(rf"^{_SUB}/deliveries$", "availability", {"city"}, {"GET"}, group="city"),
    _r(r"^/v1/drivers$", "reservations", ANY_ROLE, {"POST"}, group="account"),
    _r(r"^/v1/auth/token$", "reservations", ANY_ROLE, {"POST"}, group="account"),
    _r(r"^/v1/reservations$", "reservations", {"driver"}, {"GET", "POST"}),
    _r(rf"^{_RES}$", "reservations", {"driver"}, {"GET"}),
    _r(rf"^{_RES}/cancel$", "reservations", {"driver"}, {"POST"}),
)


def match(method: str, path: str, mine: bool) -> Route | None:
    """The route for ``method`` and ``path``, or None (see :func:`allowed` for why)."""
    method = "GET" if method == "HEAD" else method
    for route in ROUTES:
        if (
            route.pattern.match(path)
            and route.methods is not None
            and method in route.methods
            and (route.mine is None or route.mine == mine)
        ):
            return route
    return None


def allowed(path: str) -> set[str]:
    """Every method some route accepts on ``path`` (empty: no such path)."""
    methods: set[str] = set()
    for route in ROUTES:
        if route.pattern.match(path) and route.methods is not None:
            methods |= route.methods
    return methods
