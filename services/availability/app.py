"""The availability service's app factory: ``gunicorn "services.availability.app:create_app()"``."""

from __future__ import annotations

from flask_openapi3 import OpenAPI

from services.common.app import create_service_app
from services.common.config import AvailabilitySettings, load


def create_app(settings: AvailabilitySettings | None = None) -> OpenAPI:
    settings = settings or load(AvailabilitySettings)
    app = create_service_app(__name__, settings, title="Availability")
    from services.availability import readpath, stream, views
    from services.availability.domain import Thresholds
    from services.availability.settings import ReadPathSettings

    lookups = readpath.ReadPath(
        app.extensions["parking_db"],
        settings.redis_url,
        settings.redis_timeout_s,
        Thresholds(settings.unknown_after_s, settings.almost_full_ratio),
        load(ReadPathSettings),
    )
    app.extensions["availability"] = lookups
    app.extensions["availability_hub"] = stream.Hub(lookups)
    views.init_app(app)
    from services.availability import city

    app.register_api(city.bp)
    from services.availability.fastpath import FastLots

    app.wsgi_app = FastLots(app, app.wsgi_app)  # type: ignore[method-assign]
    return app
