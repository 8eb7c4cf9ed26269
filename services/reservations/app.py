"""The reservations service's app factory: ``gunicorn "services.reservations.app:create_app()"``."""

from __future__ import annotations

from flask_openapi3 import OpenAPI

from services.common.app import create_service_app
from services.common.config import ReservationsSettings, load


def create_app(settings: ReservationsSettings | None = None) -> OpenAPI:
    settings = settings or load(ReservationsSettings)
    app = create_service_app(__name__, settings, title="Reservations")
    from services.reservations import views

    app.register_api(views.accounts_bp)
    app.register_api(views.quotes_bp)
    app.register_api(views.bp)
    from services.reservations.fastpath import FastReserve

    app.wsgi_app = FastReserve(app, app.wsgi_app)  # type: ignore[method-assign]
    return app
