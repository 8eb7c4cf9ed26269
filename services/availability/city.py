"""The city brain's API: the live snapshot, time-bucketed aggregates and webhook subscriptions.

The snapshot is read from Redis' live state, which ingestion updates atomically with every
accepted event (lot, district and city together), so it is as fresh as the last commit. Lots
and totals are read in one MULTI block, and the totals returned are the sums of the lots
returned, so they always agree; a stored district or city total that disagrees is logged for
the reconciliation to repair. When Redis is down or empty, PostgreSQL answers.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
import redis
from flask import Response, request
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.availability.domain import EARLIEST, LATEST
from services.common import livestate
from services.common.app import dumps, get_db, get_redis, json_response, settings_of
from services.common.auth import current_principal, require
from services.common.errors import Problem, not_found
from services.common.lots import is_open
from services.worker import webhooks

log = logging.getLogger("parking.availability.city")

bp = APIBlueprint(
    "city",
    __name__,
    url_prefix="/v1/city",
    abp_tags=[Tag(name="city")],
    abp_security=[{"cityKey": []}],
)

LD_JSON = "application/ld+json"
NGSI_LD_CONTEXT = [
    "https://raw.githubusercontent.com/smart-data-models/dataModel.Parking/master/context.jsonld",
    "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld",
]
# The longest range each interval may ask for (about 1500 to 9000 buckets).
MAX_RANGE = {"1m": timedelta(days=1), "15m": timedelta(days=31), "1h": timedelta(days=366)}
DEFAULT_RANGE = {"1m": timedelta(hours=1), "15m": timedelta(days=1), "1h": timedelta(days=7)}
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:?\d{2})?$"
)
STEP = {"1m": timedelta(minutes=1), "15m": timedelta(minutes=15), "1h": timedelta(hours=1)}


# Models (they document the routes in the merged OpenAPI document) --------------------------


class Totals(BaseModel):
    capacity: int
    occupied: int
    free: int
    occupancy_rate: float | None


class DistrictTotals(Totals):
    district: str
    lots: int


class LotLive(BaseModel):
    id: str
    name: str | None = None
    district: str
    capacity: int
    occupied: int
    free: int
    updated_at: str | None


class SnapshotOut(BaseModel):
    generated_at: datetime
    totals: Totals
    districts: list[DistrictTotals]
    lots: list[LotLive]


class SnapshotQuery(BaseModel):
    options: Literal["keyValues", "normalized"] | None = Field(
        None, description="with Accept: application/ld+json, the NGSI-LD representation"
    )


class AggregatesQuery(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    level: Literal["city", "district", "lot"] = "city"
    key: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$", description="district name or lot id"
    )
    interval: Literal["1m", "15m", "1h"] = "15m"
    from_: datetime | None = Field(None, alias="from")
    to: datetime | None = None

    @field_validator("from_", "to", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        # pydantic would also take a number as Unix seconds; the contract says RFC 3339
        if value is not None and not (isinstance(value, str) and _RFC3339.match(value)):
            raise ValueError("give an RFC 3339 date-time, e.g. 2026-05-01T08:00:00+08:00")
        return value

    @field_validator("from_", "to")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("give the time with its offset (RFC 3339)")
        if value is not None and not EARLIEST <= value <= LATEST:
            raise ValueError("give a time between 2000 and 2100")
        return value


class AggregatePoint(BaseModel):
    bucket: datetime
    occupancy_rate_avg: float | None
    occupied_avg: float
    occupied_max: int
    capacity: int
    entries: int
    exits: int


class AggregatesOut(BaseModel):
    level: str
    key: str
    interval: str
    series: list[AggregatePoint]


WebhookEvent = Literal["lot.full", "lot.available", "district.snapshot"]


class SubscriptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(
        max_length=2000, pattern=r"^https?://[^\s\x00-\x1f\x7f/?#]+(/[^\s\x00-\x1f\x7f]*)?$"
    )
    events: list[WebhookEvent] = Field(min_length=1, max_length=3)
    secret: str | None = Field(
        None,
        min_length=16,
        max_length=256,
        pattern=r"^[\x21-\x7e]+$",
        description="HMAC key (printable ASCII); generated if omitted",
    )


class SubscriptionOut(BaseModel):
    id: str
    url: str
    events: list[str]
    created_at: datetime


class SubscriptionCreated(SubscriptionOut):
    secret: str


class SubscriptionList(BaseModel):
    items: list[SubscriptionOut]


class SubscriptionPath(BaseModel):
    subscription_id: str = Field(max_length=64)


class Delivery(BaseModel):
    id: int
    event: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    items: list[Delivery]


# Snapshot -----------------------------------------------------------------------------------


def _lot_row(lot_id: str, state: dict[str, Any], meta: dict[str, Any] | None) -> dict[str, Any]:
    capacity = sum(state["capacity"].values())
    occupied = sum(state["occupied"].values())
    return {
        "id": lot_id,
        "name": meta.get("name") if meta else None,
        "district": state["district"],
        "capacity": capacity,
        "occupied": occupied,
        "free": max(0, capacity - occupied),
        "updated_at": state["updated_at"],
        "_meta": meta,
    }


def _from_redis(client: redis.Redis) -> tuple[list[dict[str, Any]], list[str]] | None:
    """(lots, ids Redis lacks) read in one MULTI block; None when Redis holds no live state."""
    ids: list[str] = client.zrange(livestate.GEO_KEY, 0, -1)  # type: ignore[assignment]
    districts: list[str] = sorted(client.smembers(livestate.DISTRICTS_KEY))  # type: ignore[arg-type]
    if not ids:
        return None
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(livestate.CITY_KEY)
    for d in districts:
        pipe.hgetall(livestate.district_key(d))
    for lot_id in ids:
        pipe.hgetall(livestate.lot_key(lot_id))
        pipe.get(livestate.meta_key(lot_id))
    raw = pipe.execute()
    city, stored_districts, rest = raw[0], raw[1 : 1 + len(districts)], raw[1 + len(districts) :]
    lots: list[dict[str, Any]] = []
    missing: list[str] = []
    for i, lot_id in enumerate(ids):
        state, meta = rest[2 * i], rest[2 * i + 1]
        if not state or not meta:
            missing.append(lot_id)
            continue
        lots.append(_lot_row(lot_id, livestate.decode_state(state), orjson.loads(meta)))
    if not missing:
        _check_totals(lots, city, dict(zip(districts, stored_districts, strict=True)))
    return lots, missing


def _check_totals(
    lots: list[dict[str, Any]], city: dict[str, str], districts: dict[str, dict[str, str]]
) -> None:
    """Log stored totals that disagree with the lots read at the same instant."""
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for lot in lots:
        sums[lot["district"]][0] += lot["occupied"]
        sums[lot["district"]][1] += lot["capacity"]
    for name, stored in districts.items():
        expected = sums.get(name, [0, 0])
        if [int(stored.get("o", 0)), int(stored.get("c", 0))] != expected:
            log.warning("district total disagrees with its lots", extra={"district": name})
    city_sum = [sum(s[0] for s in sums.values()), sum(s[1] for s in sums.values())]
    if [int(city.get("o", 0)), int(city.get("c", 0))] != city_sum:
        log.warning("city total disagrees with its lots")


def _from_postgres(lot_ids: list[str] | None) -> list[dict[str, Any]]:
    """Live lots (``lot_ids`` only, if given) from PostgreSQL, shaped like the Redis read."""
    with get_db().cursor() as cur:
        cur.execute(
            "SELECT l.id::text AS id, l.name, l.district, l.lat, l.lon, l.opening_hours,"
            " l.timezone, lv.updated_at, sum(o.capacity)::int AS capacity,"
            " sum(o.occupied)::int AS occupied"
            " FROM lots l JOIN lot_occupancy o ON o.lot_id = l.id"
            " LEFT JOIN lot_live lv ON lv.lot_id = l.id WHERE l.deleted_at IS NULL"
            " AND (%s::uuid[] IS NULL OR l.id = ANY(%s::uuid[]))"
            " GROUP BY l.id, lv.updated_at",
            (lot_ids, lot_ids),
        )
        rows = cur.fetchall()
    return [
        {
            "id": r["id"],
            "name": r["name"],
            "district": r["district"],
            "capacity": r["capacity"],
            "occupied": r["occupied"],
            "free": max(0, r["capacity"] - r["occupied"]),
            "updated_at": r["updated_at"].isoformat() if r["updated_at"] else None,
            "_meta": {
                "name": r["name"],
                "location": {"lat": r["lat"], "lon": r["lon"]},
                "opening_hours": r["opening_hours"],
                "timezone": r["timezone"],
            },
        }
        for r in rows
    ]


def read_lots() -> list[dict[str, Any]]:
    """Every live lot's counts: Redis first, PostgreSQL for what Redis lacks or when it is down."""
    try:
        found = _from_redis(get_redis())
    except redis.RedisError as exc:
        log.warning("redis unavailable, snapshot from postgresql: %s", type(exc).__name__)
        found = None
    if found is None:
        return _from_postgres(None)
    lots, missing = found
    if missing:
        lots += _from_postgres(missing)
    return lots


def _rate(occupied: int, capacity: int) -> float | None:
    return round(occupied / capacity, 4) if capacity else None


def snapshot(lots: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    """Per-lot, per-district and city totals, the totals summed from these very lots."""
    lots = sorted(lots, key=lambda lot: (lot["district"], lot["id"]))
    by_district: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for lot in lots:
        by_district[lot["district"]].append(lot)
    districts = []
    for name in sorted(by_district):
        members = by_district[name]
        capacity = sum(m["capacity"] for m in members)
        occupied = sum(m["occupied"] for m in members)
        districts.append(
            {
                "district": name,
                "capacity": capacity,
                "occupied": occupied,
                "free": sum(m["free"] for m in members),
                "occupancy_rate": _rate(occupied, capacity),
                "lots": len(members),
            }
        )
    capacity = sum(d["capacity"] for d in districts)
    occupied = sum(d["occupied"] for d in districts)
    return {
        "generated_at": now,
        "totals": {
            "capacity": capacity,
            "occupied": occupied,
            "free": sum(d["free"] for d in districts),
            "occupancy_rate": _rate(occupied, capacity),
        },
        "districts": districts,
        "lots": [{k: v for k, v in lot.items() if k != "_meta"} for lot in lots],
    }


def ngsi_status(lot: dict[str, Any], now: datetime, almost_full_ratio: float) -> str:
    """The lot's status in the OffStreetParking vocabulary (DATEX II)."""
    meta = lot.get("_meta") or {}
    hours, timezone = meta.get("opening_hours"), meta.get("timezone")
    if hours and timezone and not is_open(hours, timezone, now):
        return "closed"
    if lot["free"] <= 0:
        return "full"
    if lot["capacity"] and lot["occupied"] / lot["capacity"] >= almost_full_ratio:
        return "almostFull"
    return "spacesAvailable"


def ngsi_entity(
    lot: dict[str, Any], now: datetime, *, almost_full_ratio: float, key_values: bool
) -> dict[str, Any]:
    """The lot as a FIWARE Smart Data Models ``OffStreetParking`` NGSI-LD entity."""
    meta = lot.get("_meta") or {}
    location = meta.get("location") or {}
    values: dict[str, Any] = {
        "name": lot.get("name") or lot["id"],
        "location": {"type": "Point", "coordinates": [location.get("lon"), location.get("lat")]},
        "totalSpotNumber": lot["capacity"],
        "availableSpotNumber": lot["free"],
        "occupiedSpotNumber": min(lot["occupied"], lot["capacity"]),
        "occupancy": round(min(lot["occupied"], lot["capacity"]) / lot["capacity"], 4)
        if lot["capacity"]
        else 0.0,
        "status": [ngsi_status(lot, now, almost_full_ratio)],
        "municipalityInfo": {"district": lot["district"]},
    }
    if lot["updated_at"]:
        values["occupancyModified"] = lot["updated_at"]
    entity: dict[str, Any] = {
        "id": f"urn:ngsi-ld:OffStreetParking:{lot['id']}",
        "type": "OffStreetParking",
    }
    if key_values:
        entity.update(values)
    else:
        for name, value in values.items():
            if name == "location":
                entity[name] = {"type": "GeoProperty", "value": value}
            elif name == "occupancyModified":
                entity[name] = {"type": "Property", "value": {"@type": "DateTime", "@value": value}}
            else:
                entity[name] = {"type": "Property", "value": value}
                if lot["updated_at"] and name in ("availableSpotNumber", "occupiedSpotNumber"):
                    entity[name]["observedAt"] = lot["updated_at"]
    entity["@context"] = NGSI_LD_CONTEXT
    return entity


def _wants_ld() -> bool:
    best = request.accept_mimetypes.best_match(["application/json", LD_JSON])
    return best == LD_JSON


@bp.get(
    "/snapshot",
    responses={200: SnapshotOut},
    description="With `Accept: application/ld+json`: a JSON array of NGSI-LD OffStreetParking"
    " entities (normalized, or key-values with `options=keyValues`).",
)
@require("city")
def city_snapshot(query: SnapshotQuery) -> Response:
    """Every lot now, each district and the whole city."""
    now = datetime.now(UTC)
    lots = read_lots()
    if _wants_ld():
        ratio = settings_of().almost_full_ratio
        entities = [
            ngsi_entity(lot, now, almost_full_ratio=ratio, key_values=query.options == "keyValues")
            for lot in sorted(lots, key=lambda lot: lot["id"])
        ]
        return Response(dumps(entities), mimetype=LD_JSON)
    return json_response(snapshot(lots, now))


# Aggregates ---------------------------------------------------------------------------------


def _range_problem(loc: str, msg: str) -> Problem:
    return Problem(
        422,
        msg,
        code="validation",
        errors=[{"loc": ["query", loc], "msg": msg}],
    )


@bp.get("/aggregates", responses={200: AggregatesOut})
@require("city")
def city_aggregates(query: AggregatesQuery) -> Response:
    """Time-bucketed occupancy of the city, a district or a lot."""
    interval = query.interval
    to = query.to or datetime.now(UTC)
    start = query.from_ or to - DEFAULT_RANGE[interval]
    if start >= to:
        raise _range_problem("from", "'from' must be before 'to'")
    if to - start > MAX_RANGE[interval]:
        limit = MAX_RANGE[interval]
        raise _range_problem(
            "to",
            f"the range is too large for interval {interval}: at most {limit.days} day(s);"
            " use a coarser interval or a shorter range",
        )
    key = "city" if query.level == "city" else query.key
    if not key:
        raise _range_problem("key", f"a key is required for level {query.level}")
    with get_db().cursor() as cur:
        if query.level == "lot":
            cur.execute("SELECT 1 FROM lots WHERE id::text = %s AND deleted_at IS NULL", (key,))
            if cur.fetchone() is None:
                raise not_found("lot")
        elif query.level == "district":
            cur.execute("SELECT 1 FROM lots WHERE district = %s LIMIT 1", (key,))
            if cur.fetchone() is None:
                raise not_found("district")
        cur.execute(
            "SELECT bucket, occupied_avg, occupied_max, capacity, entries, exits"
            " FROM occupancy_buckets WHERE level = %s AND key = %s AND interval = %s"
            " AND bucket >= %s AND bucket < %s ORDER BY bucket",
            (query.level, key, interval, start - STEP[interval] + timedelta(microseconds=1), to),
        )
        rows = cur.fetchall()
    series = [
        {
            "bucket": r["bucket"],
            "occupancy_rate_avg": round(r["occupied_avg"] / r["capacity"], 4)
            if r["capacity"]
            else None,
            "occupied_avg": round(r["occupied_avg"], 3),
            "occupied_max": r["occupied_max"],
            "capacity": r["capacity"],
            "entries": r["entries"],
            "exits": r["exits"],
        }
        for r in rows
    ]
    return json_response({"level": query.level, "key": key, "interval": interval, "series": series})


# Subscriptions ------------------------------------------------------------------------------


@bp.post("/subscriptions", responses={201: SubscriptionCreated})
@require("city")
def create_subscription(body: SubscriptionIn) -> Response:
    """Subscribe a URL to signed webhook pushes (the secret is shown once)."""
    with get_db().connection() as conn:
        created = webhooks.create_subscription(
            conn,
            city_client_id=current_principal().id,
            url=body.url,
            events=list(body.events),
            secret=body.secret,
        )
    return json_response(created, 201)


@bp.get("/subscriptions", responses={200: SubscriptionList})
@require("city")
def list_subscriptions() -> Response:
    """The calling city client's subscriptions."""
    with get_db().connection() as conn:
        items = webhooks.list_subscriptions(conn, city_client_id=current_principal().id)
    return json_response({"items": items})


def _subscription_id(raw: str) -> str:
    """The id as a UUID string; anything else cannot name a subscription (404)."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise not_found("subscription") from None


def _own(conn: Any, subscription_id: str) -> dict[str, Any]:
    subscription_id = _subscription_id(subscription_id)
    found = webhooks.get_subscription(
        conn, city_client_id=current_principal().id, subscription_id=subscription_id
    )
    if found is None:
        raise not_found("subscription")
    return found


@bp.get("/subscriptions/<subscription_id>", responses={200: SubscriptionOut})
@require("city")
def get_subscription(path: SubscriptionPath) -> Response:
    """One of the calling city client's subscriptions."""
    with get_db().connection() as conn:
        return json_response(_own(conn, path.subscription_id))


@bp.delete("/subscriptions/<subscription_id>", responses={204: None})
@require("city")
def delete_subscription(path: SubscriptionPath) -> Response:
    """Unsubscribe; pending deliveries are dropped."""
    with get_db().connection() as conn:
        if not webhooks.delete_subscription(
            conn,
            city_client_id=current_principal().id,
            subscription_id=_subscription_id(path.subscription_id),
        ):
            raise not_found("subscription")
    return Response(status=204)


@bp.get("/subscriptions/<subscription_id>/deliveries", responses={200: DeliveryList})
@require("city")
def list_deliveries(path: SubscriptionPath) -> Response:
    """The subscription's delivery log, newest first (attempts, last answer, next attempt)."""
    with get_db().connection() as conn:
        found = _own(conn, path.subscription_id)
        items = webhooks.list_deliveries(conn, subscription_id=found["id"])
    return json_response({"items": items})
