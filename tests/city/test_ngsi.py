"""The OffStreetParking mapping itself: status vocabulary and both NGSI-LD representations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from services.availability.city import ngsi_entity, ngsi_status

NOON_SHANGHAI = datetime(2026, 5, 1, 4, 0, tzinfo=UTC)
NIGHT_SHANGHAI = datetime(2026, 5, 1, 15, 0, tzinfo=UTC)


def _lot(occupied: int, capacity: int = 10, hours: str = "08:00-20:00") -> dict[str, Any]:
    return {
        "id": "3f1c9d0e-0000-4000-8000-000000000001",
        "name": "Yunqi P1",
        "district": "xihu",
        "capacity": capacity,
        "occupied": occupied,
        "free": max(0, capacity - occupied),
        "updated_at": "2026-05-01T04:00:00+00:00",
        "_meta": {
            "location": {"lat": 30.1352, "lon": 120.0876},
            "opening_hours": hours,
            "timezone": "Asia/Shanghai",
        },
    }


def test_status_follows_the_datex_vocabulary() -> None:
    assert ngsi_status(_lot(3), NOON_SHANGHAI, 0.9) == "spacesAvailable"
    assert ngsi_status(_lot(9), NOON_SHANGHAI, 0.9) == "almostFull"
    assert ngsi_status(_lot(10), NOON_SHANGHAI, 0.9) == "full"
    assert ngsi_status(_lot(3), NIGHT_SHANGHAI, 0.9) == "closed"
    assert ngsi_status(_lot(3, hours="24/7"), NIGHT_SHANGHAI, 0.9) == "spacesAvailable"


def test_normalized_and_key_values_carry_the_same_values() -> None:
    lot = _lot(4)
    flat = ngsi_entity(lot, NOON_SHANGHAI, almost_full_ratio=0.9, key_values=True)
    full = ngsi_entity(lot, NOON_SHANGHAI, almost_full_ratio=0.9, key_values=False)
    assert flat["id"] == full["id"] == "urn:ngsi-ld:OffStreetParking:" + lot["id"]
    assert flat["location"] == {"type": "Point", "coordinates": [120.0876, 30.1352]}
    assert full["location"] == {"type": "GeoProperty", "value": flat["location"]}
    for name in ("totalSpotNumber", "availableSpotNumber", "occupiedSpotNumber", "occupancy"):
        assert full[name]["type"] == "Property" and full[name]["value"] == flat[name]
    assert (flat["totalSpotNumber"], flat["availableSpotNumber"], flat["occupancy"]) == (10, 6, 0.4)
    assert full["availableSpotNumber"]["observedAt"] == lot["updated_at"]
    assert full["occupancyModified"]["value"] == {"@type": "DateTime", "@value": lot["updated_at"]}
    assert flat["@context"] == full["@context"] and flat["@context"][0].endswith("context.jsonld")
