"""The environment the manifests give each process against what the code reads.

Both directions: every variable the manifests set for a platform container is read by a settings
class, gunicorn's config, the CLI or the Procfile's commands; every required setting of a
process's settings classes is set for it. The names are computed from the classes at test time.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from tests.k8s.manifests import (
    OVERLAYS,
    SECRET_NAME,
    container_env,
    field_env_names,
    named,
    of_kind,
    overlay,
    parking_containers,
    process_env_names,
    required_env_names,
    secret_data,
    secret_env_names,
    secret_template,
    settings_classes,
    settings_for,
)

# The processes whose settings class has another component's prefix
SETTINGS_OF = {"beat": "worker"}
# Read by the CLI command the container runs, not by a settings class (services/cli.py)
CLI_REQUIRED = {"migrate": {"DATABASE_URL"}}


def test_the_names_are_found() -> None:
    """Guards the discovery below: it must see the settings every process needs."""
    names = {cls.__name__ for cls in settings_classes()}
    assert {"CommonSettings", "GatewaySettings", "WorkerSettings"} <= names
    assert {"WEB_CONCURRENCY", "PARKING_METRICS_DIR"} <= process_env_names()
    assert "PARKING_JWT_SECRET" in secret_env_names()


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_variable_set_is_read(name: str) -> None:
    objects = overlay(name)
    known = {n for cls in settings_classes() for n in _names(cls)} | process_env_names()
    for workload, container in parking_containers(objects):
        unread = set(container_env(objects, container)) - known
        assert not unread, (
            f"{name}: {workload['metadata']['name']}/{container['name']} sets {sorted(unread)}, "
            "which nothing reads (a typo, or a setting that was renamed?)"
        )


def _names(cls: type[BaseSettings]) -> set[str]:
    return {n for names in field_env_names(cls).values() for n in names}


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_required_setting_is_set(name: str) -> None:
    objects = overlay(name)
    seen = set()
    for workload, container in parking_containers(objects):
        component = workload["metadata"]["name"]
        seen.add(component)
        env = container_env(objects, container)
        required = set(CLI_REQUIRED.get(component, set()))
        if component not in CLI_REQUIRED:
            classes = settings_for(SETTINGS_OF.get(component, component))
            assert classes, f"no settings class has the prefix of {component}"
            for cls in classes:
                required |= required_env_names(cls)
        missing = required - set(env)
        assert not missing, f"{name}: {component} lacks required {sorted(missing)}"
    assert {"gateway", "ingestion", "availability", "reservations", "worker", "beat"} <= seen


@pytest.mark.parametrize("name", OVERLAYS)
def test_settings_load_from_the_environment_given(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each process's settings classes accept its environment: types, bounds, key lengths.

    prod's Secret is created out of band: its keys stand in as long enough placeholders.
    """
    objects = overlay(name)
    for workload, container in parking_containers(objects):
        component = workload["metadata"]["name"]
        if component in CLI_REQUIRED:
            continue
        env = container_env(objects, container)
        if name == "prod":
            env.update({key: "x" * 64 for key in secret_data(secret_template())})
        for key in list(os.environ):
            if key.startswith("PARKING_") or key in ("DATABASE_URL", "REDIS_URL"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        for cls in settings_for(SETTINGS_OF.get(component, component)):
            try:
                cls()
            except ValidationError as exc:
                pytest.fail(f"{name}: {component}: {cls.__name__}: {exc}")


@pytest.mark.parametrize("name", OVERLAYS)
def test_keys_come_from_the_secret_only(name: str) -> None:
    """A SecretStr setting is never in the ConfigMap or a literal value in a manifest."""
    objects = overlay(name)
    secrets = secret_env_names() | {"DATABASE_URL", "REDIS_URL"}
    for config_map in of_kind(objects, "ConfigMap"):
        assert not secrets & set(config_map.get("data", {})), config_map["metadata"]["name"]
    for workload, container in parking_containers(objects):
        literal = {v["name"] for v in container.get("env", []) if "value" in v}
        assert not secrets & literal, f"{workload['metadata']['name']}: {secrets & literal}"


def test_secret_template_has_every_secret_setting() -> None:
    template = secret_template()
    assert template["metadata"]["name"] == SECRET_NAME
    keys = set(secret_data(template))
    assert secret_env_names() | {"DATABASE_URL", "REDIS_URL"} <= keys
    assert all(v == "REPLACE_ME" for v in secret_data(template).values()), "no real keys in git"


def test_dev_secret_matches_the_template_and_the_servers() -> None:
    objects = overlay("dev")
    secrets = {
        re.sub(r"-[a-z0-9]{10}$", "", s["metadata"]["name"]): s for s in of_kind(objects, "Secret")
    }
    dev = secret_data(secrets[SECRET_NAME])
    assert set(dev) == set(secret_data(secret_template()))
    postgres = secret_data(secrets["postgres"])
    url = urlsplit(dev["DATABASE_URL"])
    assert (url.username, url.password, url.path.lstrip("/")) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )
    for key, service in (("DATABASE_URL", "postgres"), ("REDIS_URL", "redis")):
        url = urlsplit(dev[key])
        port = named(objects, "Service", service)["spec"]["ports"][0]["port"]
        assert (url.hostname, url.port) == (service, port), key


def _first_name(cls: type[BaseSettings], field_name: str) -> str:
    return field_env_names(cls)[field_name][0]


@pytest.mark.parametrize("name", OVERLAYS)
def test_gateway_reaches_the_services_by_their_service_names(name: str) -> None:
    objects = overlay(name)
    gateway = named(objects, "Deployment", "gateway")
    env = container_env(objects, gateway["spec"]["template"]["spec"]["containers"][0])
    from services.common.config import GatewaySettings

    urls = [f for f in GatewaySettings.model_fields if f.endswith("_url") and f != "database_url"]
    urls.remove("redis_url")
    assert urls
    for field_name in urls:
        env_name = _first_name(GatewaySettings, field_name)
        url = urlsplit(env[env_name])
        service = named(objects, "Service", url.hostname or "")
        assert url.port in [p["port"] for p in service["spec"]["ports"]], env_name
