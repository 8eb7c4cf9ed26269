"""Operator routes for the lot registry: create, read, update, delete and list their own lots."""

from __future__ import annotations

from typing import Any

import psycopg
from flask import Response
from flask_openapi3 import APIBlueprint, Tag

from services.common.app import get_db, json_response, parse
from services.common.auth import current_principal, require
from services.common.errors import Problem, not_found
from services.common.lots import LotIn
from services.ingestion import registry
from services.ingestion.livesync import live_sync
from services.ingestion.schemas import LotList, LotOut, LotPatch, LotPath, MineQuery

bp = APIBlueprint(
    "lots",
    __name__,
    url_prefix="/v1/lots",
    abp_tags=[Tag(name="lots")],
    abp_security=[{"operatorKey": []}],
)


@bp.get("", responses={200: LotList})
@require("operator")
def list_mine(query: MineQuery) -> Response:
    """The calling operator's lots (``?mine=1``), by id, a page at a time."""
    after = query.cursor if query.cursor and registry.is_uuid(query.cursor) else None
    with get_db().connection() as conn:
        items = registry.list_lots(
            conn, operator_id=current_principal().id, limit=query.limit + 1, after=after
        )
    more = len(items) > query.limit
    items = items[: query.limit]
    return json_response({"items": items, "next_cursor": items[-1]["id"] if more else None})


@bp.post("", responses={201: LotOut})
@require("operator")
def create_lot(body: LotIn) -> Response:
    """Register a lot, counted by ``spaces`` (one sensor each) or by ``capacity`` (gates)."""
    with get_db().connection() as conn:
        lot = registry.create_lot(conn, operator_id=current_principal().id, lot=body)
    live_sync().lots_changed([lot["id"]])
    return json_response(lot, 201)


@bp.get("/<lot_id>", responses={200: LotOut})
@require("operator")
def get_mine(path: LotPath) -> Response:
    """The owner's full view of a lot (``?mine=1``): registry, spaces and live state."""
    with get_db().connection() as conn:
        lot = _owned(conn, path.lot_id)
    return json_response(lot)


@bp.patch("/<lot_id>", responses={200: LotOut})
@require("operator")
def patch_lot(path: LotPath, body: LotPatch) -> Response:
    """Change a lot's fields; the result must be a valid lot. Its counting cannot change."""
    changes = body.model_dump(mode="json", exclude_unset=True)
    operator_id = current_principal().id
    with get_db().connection() as conn:
        current = _owned(conn, path.lot_id)
        counted_by_space = "spaces" in current
        if ("spaces" in changes and not counted_by_space) or (
            "capacity" in changes and counted_by_space
        ):
            raise Problem(
                422,
                "a lot's counting (spaces or capacity) cannot change; register a new lot",
                code="validation",
                errors=[
                    {
                        "loc": ["body", "spaces" if "spaces" in changes else "capacity"],
                        "msg": "the lot is counted the other way",
                    }
                ],
            )
        lot: LotIn = parse(LotIn, registry.lot_in_of(current) | changes)
        if not registry.update_lot(conn, lot_id=path.lot_id, operator_id=operator_id, lot=lot):
            raise not_found("lot")
        updated = _owned(conn, path.lot_id)
    live_sync().lots_changed([updated["id"]])
    return json_response(updated)


@bp.delete("/<lot_id>", responses={204: None})
@require("operator")
def delete_lot(path: LotPath) -> Response:
    """Retire a lot: it disappears from the API; its events and history are kept."""
    with get_db().connection() as conn:
        if not registry.delete_lot(conn, lot_id=path.lot_id, operator_id=current_principal().id):
            raise not_found("lot")
    live_sync().lots_changed([path.lot_id.lower()])
    return Response(status=204)


def _owned(conn: psycopg.Connection[Any], lot_id: str) -> dict[str, Any]:
    lot = registry.get_lot(
        conn,
        lot_id=lot_id,
        operator_id=current_principal().id,
        with_state=True,
    )
    if lot is None:
        raise not_found("lot")
    return lot
