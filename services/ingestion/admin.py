"""Admin routes: operators and city clients, with their API keys."""

from __future__ import annotations

from flask import Response
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from services.common import principals
from services.common.app import get_db, json_response
from services.common.auth import require

bp = APIBlueprint(
    "admin",
    __name__,
    url_prefix="/v1/admin",
    abp_tags=[Tag(name="admin")],
    abp_security=[{"adminKey": []}],
)


class NameBody(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"\S")


class OperatorOut(BaseModel):
    id: str
    name: str
    api_key: str


class CityKeyOut(BaseModel):
    id: str
    name: str
    api_key: str


@bp.post("/operators", responses={201: OperatorOut})
@require("admin")
def create_operator(body: NameBody) -> Response:
    """Create an operator and its API key (the key is shown once)."""
    with get_db().connection() as conn:
        return json_response(principals.create_operator(conn, name=body.name), 201)


@bp.post("/city-keys", responses={201: CityKeyOut})
@require("admin")
def create_city_key(body: NameBody) -> Response:
    """Create a city client and its API key (the key is shown once)."""
    with get_db().connection() as conn:
        return json_response(principals.create_city_client(conn, name=body.name), 201)
