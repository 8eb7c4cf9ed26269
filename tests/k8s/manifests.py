"""The rendered manifests and what the code reads, for the k8s tests.

Overlays are rendered by ``kubectl kustomize`` when kubectl is on PATH, else by the in-repo
loader (``kustomize.py``). Environment variable names are computed from the settings classes
and the process configuration at test time, never listed by hand.
"""

from __future__ import annotations

import ast
import base64
import importlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, SecretStr
from pydantic_settings import BaseSettings

from tests.k8s import kustomize

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/prod")
OVERLAYS = ("dev", "prod")
SECRET_TEMPLATE = K8S / "base" / "secret.template.yaml"
SECRET_NAME = "parking-secrets"
IMAGE = "parking"
# The services the gateway forwards to, which nothing else may reach
INTERNAL_SERVICES = ("ingestion", "availability", "reservations")

Obj = dict[str, Any]


def kubectl() -> str | None:
    return shutil.which("kubectl")


@cache
def _render(path: str, with_kubectl: bool) -> tuple[Obj, ...]:
    directory = K8S / path
    if with_kubectl:
        out = subprocess.run(
            ["kubectl", "kustomize", str(directory)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        return tuple(doc for doc in yaml.safe_load_all(out) if doc)
    return tuple(kustomize.build(directory))


def render(path: str, *, with_kubectl: bool | None = None) -> tuple[Obj, ...]:
    """The objects of a kustomization ("base", "overlays/dev"...); do not mutate them."""
    if with_kubectl is None:
        with_kubectl = kubectl() is not None
    return _render(path, with_kubectl)


def overlay(name: str) -> tuple[Obj, ...]:
    return render(f"overlays/{name}")


def of_kind(objects: tuple[Obj, ...], *kinds: str) -> list[Obj]:
    return [o for o in objects if o["kind"] in kinds]


def named(objects: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(objects: tuple[Obj, ...]) -> list[Obj]:
    return of_kind(objects, "Deployment", "StatefulSet", "DaemonSet", "Job")


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def containers(workload: Obj) -> list[Obj]:
    pod = pod_spec(workload)
    return pod.get("initContainers", []) + pod["containers"]


def is_parking(container: Obj) -> bool:
    """Runs the platform's image (whatever registry and tag an overlay gives it)."""
    name, _ = kustomize.split_image(container["image"])
    return name.rsplit("/", 1)[-1] == IMAGE


def parking_containers(objects: tuple[Obj, ...]) -> Iterator[tuple[Obj, Obj]]:
    for workload in workloads(objects):
        for container in containers(workload):
            if is_parking(container):
                yield workload, container


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels / matchExpressions) matches ``labels``."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        op, key, values = expr["operator"], expr["key"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(workload: Obj) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def secret_data(secret: Obj) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def secret_template() -> Obj:
    return yaml.safe_load(SECRET_TEMPLATE.read_text())


def container_env(objects: tuple[Obj, ...], container: Obj) -> dict[str, str]:
    """Every variable a container gets: envFrom ConfigMaps and Secrets, then env.

    A Secret the overlay does not contain (prod: created out of band) is read from the template.
    """
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            name = source["secretRef"]["name"]
            found = [o for o in of_kind(objects, "Secret") if o["metadata"]["name"] == name]
            if found:
                env.update(secret_data(found[0]))
            else:
                template = secret_template()
                assert name == template["metadata"]["name"], f"no Secret {name} anywhere"
                env.update(secret_data(template))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "<valueFrom>")
    return env


# What the code reads ---------------------------------------------------------------------------


@cache
def settings_classes() -> tuple[type[BaseSettings], ...]:
    """Every pydantic-settings class in services/ and gateway/ (config.py and any other module)."""
    from services.common import config

    found = {
        obj
        for obj in vars(config).values()
        if isinstance(obj, type) and issubclass(obj, BaseSettings) and obj is not BaseSettings
    }
    known = {"BaseSettings"} | {cls.__name__ for cls in found}
    for path in sorted(
        [*ROOT.joinpath("services").rglob("*.py"), *ROOT.joinpath("gateway").rglob("*.py")]
    ):
        tree = ast.parse(path.read_text())
        defines = any(
            isinstance(node, ast.ClassDef) and any(_base_name(base) in known for base in node.bases)
            for node in ast.walk(tree)
        )
        if defines:
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for obj in vars(importlib.import_module(module)).values():
                if (
                    isinstance(obj, type)
                    and issubclass(obj, BaseSettings)
                    and obj is not BaseSettings
                ):
                    found.add(obj)
    return tuple(sorted(found, key=lambda c: (c.__module__, c.__name__)))


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def field_env_names(cls: type[BaseSettings]) -> dict[str, tuple[str, ...]]:
    """field name -> the environment variable names pydantic-settings reads it from."""
    prefix = str(cls.model_config.get("env_prefix") or "")
    names = {}
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            choices = tuple(c for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, str):
            choices = (alias,)
        elif field.alias:
            choices = (field.alias,)
        else:
            choices = (prefix + field_name,)
        names[field_name] = tuple(c.upper() for c in choices)
    return names


def settings_env_names() -> set[str]:
    return {n for cls in settings_classes() for ns in field_env_names(cls).values() for n in ns}


def required_env_names(cls: type[BaseSettings]) -> set[str]:
    """One name per required field (the first alias), as ``config.load`` reports it."""
    names = field_env_names(cls)
    return {names[f][0] for f, field in cls.model_fields.items() if field.is_required()}


def secret_env_names() -> set[str]:
    """The names of every SecretStr setting: they belong in a Secret, never in a ConfigMap."""
    return {
        n
        for cls in settings_classes()
        for f, field in cls.model_fields.items()
        if field.annotation is SecretStr
        for n in field_env_names(cls)[f]
    }


def settings_for(component: str) -> list[type[BaseSettings]]:
    """The settings classes of one process, by their env prefix (PARKING_<COMPONENT>_)."""
    prefix = f"PARKING_{component.upper()}_"
    return [
        c for c in settings_classes() if str(c.model_config.get("env_prefix", "")).upper() == prefix
    ]


def process_env_names() -> set[str]:
    """What gunicorn's config, the CLI and the Procfile read besides the settings classes."""
    names: set[str] = set()
    for path in (ROOT / "services/common/gunicorn_conf.py", ROOT / "services/cli.py"):
        names |= environ_reads(path.read_text())
    names |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", (ROOT / "Procfile").read_text()))
    return names


def environ_reads(source: str) -> set[str]:
    """Names read by os.environ.get("X"), os.environ["X"] and os.getenv("X")."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        key = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            if (node.func.attr == "get" and _is_os_environ(node.func.value)) or (
                node.func.attr == "getenv" and isinstance(node.func.value, ast.Name)
            ):
                key = node.args[0]
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)
            and _is_os_environ(node.value)
        ):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


def _is_os_environ(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


@cache
def procfile() -> dict[str, list[str]]:
    import shlex

    processes = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            processes[name.strip()] = shlex.split(command)
    return processes


@cache
def celery_conf() -> Any:
    """The configuration Celery's app factory gives the worker and beat (no broker is asked)."""
    from services.common.celery_app import make_celery
    from services.common.config import CommonSettings

    settings = CommonSettings.model_construct(
        redis_url="redis://localhost:6379/0",
        database_url="postgresql://localhost/x",
        internal_secret=SecretStr("x" * 16),
        jwt_secret=SecretStr("x" * 32),
    )
    return make_celery("parking", settings).conf


def celery_default_queue() -> str:
    """The Redis list Celery's workers consume, from the app factory itself."""
    return str(celery_conf().task_default_queue)
