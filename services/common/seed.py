"""Demo data: operators, a city key and about 50 lots around Xihu district and Yunqi Town."""

from __future__ import annotations

import random
from typing import Any

import psycopg

from services.common import principals
from services.common.lots import LotIn

DEMO_OPERATORS = ("West Lake Parking Co.", "Yunqi Town Parking")
DEMO_CITY = "Hangzhou City Brain"
# (district, centre lat, centre lon, spread in degrees, how many lots)
AREAS = (
    ("xihu", 30.2590, 120.1300, 0.030, 30),
    ("yunqi", 30.1352, 120.0876, 0.015, 20),
)
STREETS = (
    "Wensan Rd",
    "Tianmushan Rd",
    "Yunqi Rd",
    "Longjing Rd",
    "Hubin Rd",
    "Zhijiang Rd",
    "Beishan St",
    "Shuguang Rd",
    "Xixi Rd",
    "Zhuantang Ave",
)


def demo_lots(count_scale: float = 1.0, seed: int = 2026) -> list[tuple[int, LotIn]]:
    """(operator index, lot) pairs, the same every time for the same seed."""
    rng = random.Random(seed)
    lots: list[tuple[int, LotIn]] = []
    for area_index, (district, lat, lon, spread, count) in enumerate(AREAS):
        for i in range(max(1, round(count * count_scale))):
            by_space = i % 3 == 0
            street = rng.choice(STREETS)
            body: dict[str, Any] = {
                "name": f"{district.title()} {street} P{i + 1}",
                "location": {
                    "lat": round(lat + rng.uniform(-spread, spread), 6),
                    "lon": round(lon + rng.uniform(-spread, spread), 6),
                },
                "district": district,
                "address": f"{rng.randint(1, 999)} {street}, Hangzhou",
                "opening_hours": "24/7" if i % 4 else "07:00-23:00",
                "tariff": {
                    "currency": "CNY",
                    "per_hour": f"{rng.choice([3, 4, 5, 6, 8])}.00",
                    "free_minutes": rng.choice([0, 15, 30]),
                    "daily_max": f"{rng.choice([30, 40, 50, 60])}.00",
                },
            }
            if by_space:
                n = rng.randint(20, 60)
                body["spaces"] = [
                    {
                        "id": f"A-{k + 1:03d}",
                        "type": "ev"
                        if k % 10 == 0
                        else "accessible"
                        if k % 17 == 0
                        else "standard",
                    }
                    for k in range(n)
                ]
                body["reservable"] = {"standard": n // 5}
            else:
                standard = rng.randint(80, 400)
                body["capacity"] = {
                    "standard": standard,
                    "ev": rng.randint(0, 30),
                    "accessible": rng.randint(2, 10),
                }
                body["reservable"] = {"standard": standard // 10}
            lots.append((area_index % len(DEMO_OPERATORS), LotIn.model_validate(body)))
    return lots


def seed_demo(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Create the demo principals (with fresh keys) and their lots if they have none yet."""
    from services.ingestion.registry import create_lot

    operators = []
    for name in DEMO_OPERATORS:
        row = conn.execute("SELECT id FROM operators WHERE name = %s", (name,)).fetchone()
        if row is None:
            operators.append(principals.create_operator(conn, name=name))
        else:
            key = principals.add_key(conn, role="operator", principal_id=str(row[0]))
            operators.append({"id": str(row[0]), "name": name, "api_key": key})
    row = conn.execute("SELECT id FROM city_clients WHERE name = %s", (DEMO_CITY,)).fetchone()
    if row is None:
        city = principals.create_city_client(conn, name=DEMO_CITY)
    else:
        city = {
            "id": str(row[0]),
            "name": DEMO_CITY,
            "api_key": principals.add_key(conn, role="city", principal_id=str(row[0])),
        }
    created = 0
    existing = conn.execute(
        "SELECT count(*) FROM lots WHERE operator_id = ANY(%s::uuid[]) AND deleted_at IS NULL",
        ([o["id"] for o in operators],),
    ).fetchone()
    if existing is not None and existing[0] == 0:
        for operator_index, lot in demo_lots():
            create_lot(conn, operator_id=operators[operator_index]["id"], lot=lot)
            created += 1
    return {"operators": operators, "city": city, "lots_created": created}
