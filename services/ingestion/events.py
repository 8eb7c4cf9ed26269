"""``POST /v1/events``: the operators' occupancy intake, the platform's hot path.

The body is validated as typed dicts straight from its bytes (the OpenAPI document still
describes it with :class:`EventBatch`); the batch is applied in one transaction, by one call of
a set-based PostgreSQL function, and the live state goes to Redis after the commit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Flask, Response, current_app, request
from flask_openapi3 import APIBlueprint, Tag

from services.common.app import json_response, request_json, settings_of
from services.common.auth import current_principal, require
from services.common.config import IngestionSettings
from services.common.errors import Problem
from services.ingestion import intake
from services.ingestion.livesync import LiveSync
from services.ingestion.schemas import EventBatchResult, validate_batch_json, validate_events
from services.reservations.lifecycle import forget_reserved

bp = APIBlueprint(
    "events",
    __name__,
    url_prefix="/v1/events",
    abp_tags=[Tag(name="events")],
    abp_security=[{"operatorKey": []}],
)


@bp.post("", responses={200: EventBatchResult})
@require("operator")
def post_events() -> Response:
    """Push 1 to 1000 space, entry, exit and count events; durable before the answer.

    Idempotent by (operator, event id). Each event is counted in exactly one of ``accepted``,
    ``duplicate``, ``stale`` or ``rejected`` (by index, with a code). More than 1000 events
    or 1 MiB is a 413 problem, a malformed body a 400 or 422 problem, and changes nothing.
    """
    settings: IngestionSettings = settings_of()
    events = None
    index: list[int] | None = None  # the batch index of each of ``events``; None: its position
    if request.mimetype == "application/json":
        events = validate_batch_json(request.get_data(cache=True), settings.max_events_per_batch)
    rejected: list[dict[str, Any]] = []
    if events is None:
        raw = _events_of(request_json(), settings.max_events_per_batch)
        valid, rejected = validate_events(raw)
        index = [i for i, _ in valid]
        events = [e for _, e in valid]
    body = apply_batch(
        current_app,
        operator_id=current_principal().id,
        events=events,
        index=index,
        rejected=rejected,
    )
    return json_response(body)


def apply_batch(
    app: Flask,
    *,
    operator_id: str,
    events: list[dict[str, Any]],
    index: list[int] | None,
    rejected: list[dict[str, Any]],
) -> dict[str, Any]:
    """Apply valid ``events`` (at ``index`` in the batch; None: every event, in order), write
    the live state after the commit, and answer the batch's outcome (``rejected`` so far
    included). Shared by the Flask route and the lean path (fastpath.py)."""
    settings: IngestionSettings = app.config["PARKING_SETTINGS"]
    outcome = intake.Outcome(rejected=rejected)
    if events:
        with app.extensions["parking_db"].connection() as conn:
            intake.ingest(
                conn,
                operator_id=operator_id,
                events=events,
                index=index,
                plate_key=settings.plate_hash_key.get_secret_value(),
                horizon=datetime.now(UTC) + timedelta(seconds=settings.clock_skew_s),
                future=f"observed_at is more than {settings.clock_skew_s:g} s in the future",
                outcome=outcome,
            )
        sync: LiveSync = app.extensions["parking_livesync"]
        sync.publish(outcome.states)
        if outcome.reservations_moved:
            forget_reserved(app.extensions["parking_redis"].client, outcome.reservations_moved)
    return outcome.body()


def _events_of(body: Any, limit: int) -> list[Any]:
    """The ``events`` list of a well-formed batch, or a 413/422 problem."""
    if not isinstance(body, dict) or set(body) != {"events"}:
        raise _invalid([], 'send an object with one key, "events"')
    raw = body["events"]
    if not isinstance(raw, list):
        raise _invalid(["events"], "Input should be a valid list")
    if not raw:
        raise _invalid(["events"], "List should have at least 1 item")
    if len(raw) > limit:
        raise Problem(413, f"at most {limit} events per batch", code="payload-too-large")
    return raw


def _invalid(loc: list[str], msg: str) -> Problem:
    return Problem(
        422,
        "the request is not valid",
        code="validation",
        errors=[{"loc": ["body", *loc], "msg": msg}],
    )
