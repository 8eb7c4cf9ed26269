"""The ingestion service's app factory: ``gunicorn "services.ingestion.app:create_app()"``."""

from __future__ import annotations

import psycopg
from flask import Response
from flask_openapi3 import OpenAPI
from flask_openapi3.models import RequestBody
from flask_openapi3.utils import parse_body

from services.common.config import IngestionSettings, load
from services.common.errors import Problem

MAX_BODY_BYTES = 1024 * 1024


def create_app(settings: IngestionSettings | None = None) -> OpenAPI:
    settings = settings or load(IngestionSettings)
    from services.common.app import create_service_app

    app = create_service_app(__name__, settings, title="Ingestion")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    from services.ingestion import admin, events, lots
    from services.ingestion.livesync import LiveSync

    app.extensions["parking_livesync"] = LiveSync(
        app.extensions["parking_db"], app.extensions["parking_redis"]
    )
    app.register_api(admin.bp)
    app.register_api(lots.bp)
    app.register_api(events.bp)
    _document_event_body(app)
    from services.ingestion.fastpath import FastEvents

    app.wsgi_app = FastEvents(app, app.wsgi_app, max_body=MAX_BODY_BYTES)  # type: ignore[method-assign]

    @app.errorhandler(psycopg.DataError)
    def _unstorable(exc: psycopg.DataError) -> Response:
        # e.g. a NUL character in a name: bad input, not a server error
        return Problem(
            422,
            "the request holds a value that cannot be stored",
            code="validation",
            errors=[{"loc": ["body"], "msg": "a value cannot be stored (control characters?)"}],
        ).response()

    return app


def _document_event_body(app: OpenAPI) -> None:
    """The events view parses its body itself (for speed); describe it in the document."""
    from services.ingestion.schemas import EventBatch

    content, schemas = parse_body(EventBatch)
    operation = app.paths["/v1/events"].post
    assert operation is not None
    operation.requestBody = RequestBody(content=content, required=True)
    app.components_schemas.update(schemas)
