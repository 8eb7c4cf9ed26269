"""A small, offline kustomize for machines without kubectl.

It implements only what k8s/ uses (resources, namespace, labels, images, generators and
strategic-merge patches by path) and refuses anything else, so a new feature in a
kustomization cannot be silently ignored. Generated names carry no content hash. When kubectl is
present, ``test_render.py`` checks that this renders what ``kubectl kustomize`` renders.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "configMapGenerator",
    "secretGenerator",
    "patches",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass"}
WITH_POD_TEMPLATE = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# patchMergeKey of the lists a patch here may touch; any other list is replaced, as kustomize
# does for lists without a merge key (Ingress rules, tolerations...)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "envFrom": None,
    "volumes": "name",
    "volumeMounts": "mountPath",
}
UNSUPPORTED_IN_PATCHES = {"ports"}


class Unsupported(Exception):
    """The kustomization uses a feature this loader does not implement."""


def build(directory: Path) -> list[Obj]:
    """Render the kustomization in ``directory`` (resources recursively) to a list of objects."""
    directory = directory.resolve()
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    unknown = set(spec) - SUPPORTED_FIELDS
    if unknown:
        raise Unsupported(f"{directory}: kustomization fields {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(build(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for generator in spec.get("configMapGenerator", []):
        _generate(objects, generator, "ConfigMap", directory)
    for generator in spec.get("secretGenerator", []):
        _generate(objects, generator, "Secret", directory)
    for patch in spec.get("patches", []):
        _patch(objects, patch, directory)
    for group in spec.get("labels", []):
        _label(objects, group)
    for image in spec.get("images", []):
        _set_image(objects, image)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def _generate(objects: list[Obj], generator: Obj, kind: str, directory: Path) -> None:
    unknown = set(generator) - {"name", "behavior", "envs", "literals"}
    if unknown:
        raise Unsupported(f"{kind} generator fields {sorted(unknown)}")
    data: dict[str, str] = {}
    for env_file in generator.get("envs", []):
        data.update(parse_env_file((directory / env_file).read_text()))
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    if kind == "Secret":
        data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    behavior = generator.get("behavior", "create")
    existing = [
        o for o in objects if o["kind"] == kind and o["metadata"]["name"] == generator["name"]
    ]
    if behavior == "create":
        if existing:
            raise Unsupported(f"{kind} {generator['name']} generated twice")
        obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]}}
        if kind == "Secret":
            obj["type"] = "Opaque"
        obj["data"] = data
        objects.append(obj)
    elif behavior in ("merge", "replace") and len(existing) == 1:
        if behavior == "merge":
            existing[0].setdefault("data", {}).update(data)
        else:
            existing[0]["data"] = data
    else:
        raise Unsupported(f"{kind} generator behavior {behavior!r} for {generator['name']}")


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and lines starting with # are skipped, as kustomize does."""
    data = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise Unsupported(f"env file line without '=': {line!r}")
            data[key] = value
    return data


def _patch(objects: list[Obj], patch: Obj, directory: Path) -> None:
    if set(patch) != {"path"}:
        raise Unsupported(f"patch fields {sorted(patch)}: only strategic-merge patches by path")
    for doc in yaml.safe_load_all((directory / patch["path"]).read_text()):
        targets = [
            o
            for o in objects
            if o["kind"] == doc["kind"] and o["metadata"]["name"] == doc["metadata"]["name"]
        ]
        if len(targets) != 1:
            raise Unsupported(f"patch {patch['path']} matches {len(targets)} objects")
        strategic_merge(targets[0], doc)


def strategic_merge(base: Obj, patch: Obj) -> None:
    for key, value in patch.items():
        if key in UNSUPPORTED_IN_PATCHES:
            raise Unsupported(f"patching {key!r}")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            strategic_merge(base[key], value)
        elif isinstance(value, list) and MERGE_KEYS.get(key) and isinstance(base.get(key), list):
            merge_key = MERGE_KEYS[key]
            by_key = {item[merge_key]: item for item in base[key]}
            for item in value:
                if item[merge_key] in by_key:
                    strategic_merge(by_key[item[merge_key]], item)
                else:
                    base[key].append(copy.deepcopy(item))
        else:
            base[key] = copy.deepcopy(value)


def _label(objects: list[Obj], group: Obj) -> None:
    unknown = set(group) - {"pairs", "includeTemplates", "includeSelectors"}
    if unknown or group.get("includeSelectors"):
        raise Unsupported(f"labels fields {sorted(group)}")
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(group["pairs"])
        if group.get("includeTemplates") and obj["kind"] in WITH_POD_TEMPLATE:
            template = obj["spec"]["template"].setdefault("metadata", {})
            template.setdefault("labels", {}).update(group["pairs"])


def _set_image(objects: list[Obj], image: Obj) -> None:
    unknown = set(image) - {"name", "newName", "newTag"}
    if unknown:
        raise Unsupported(f"images fields {sorted(unknown)}")
    for obj in objects:
        if obj["kind"] not in WITH_POD_TEMPLATE:
            continue
        pod = obj["spec"]["template"]["spec"]
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, tag = split_image(container["image"])
            if name == image["name"]:
                name = image.get("newName", name)
                tag = image.get("newTag", tag)
                container["image"] = f"{name}:{tag}" if tag else name


def split_image(image: str) -> tuple[str, str | None]:
    """("registry:5000/parking", "1.0") from "registry:5000/parking:1.0"."""
    head, _, last = image.rpartition("/")
    if ":" in last:
        last, tag = last.split(":", 1)
        return (f"{head}/{last}" if head else last), tag
    return image, None
