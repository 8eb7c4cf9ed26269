"""Every kustomization builds, every file is used, and the offline loader agrees with kubectl."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.k8s import kustomize
from tests.k8s.manifests import (
    K8S,
    KUSTOMIZATIONS,
    SECRET_TEMPLATE,
    Obj,
    kubectl,
    render,
    secret_data,
)

needs_kubectl = pytest.mark.skipif(
    kubectl() is None,
    reason="kubectl is not on PATH: overlays are rendered by tests/k8s/kustomize.py",
)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_builds(path: str) -> None:
    objects = render(path)
    assert objects
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "duplicate objects"


def test_every_yaml_file_parses_and_is_used() -> None:
    """A manifest nobody references would look deployed and never be."""
    used = {SECRET_TEMPLATE.resolve()}
    for path in KUSTOMIZATIONS:
        directory = K8S / path
        spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used.add((directory / "kustomization.yaml").resolve())
        for entry in spec.get("resources", []) + [p["path"] for p in spec.get("patches", [])]:
            used.add((directory / entry).resolve())
    for path in K8S.rglob("*.yaml"):
        list(yaml.safe_load_all(path.read_text()))
        assert path.resolve() in used, f"{path.relative_to(K8S)} is in no kustomization"


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_loader_renders_what_kubectl_renders(path: str) -> None:
    """So that the tests mean the same on a machine without kubectl."""
    ours = _normalize(render(path, with_kubectl=False), generated=None)
    generated = {o["metadata"]["name"] for o in render(path, with_kubectl=False)} & {
        re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])
        for o in render(path, with_kubectl=True)
        if o["kind"] in ("ConfigMap", "Secret")
    }
    theirs = _normalize(render(path, with_kubectl=True), generated=generated)
    assert sorted(theirs) == sorted(ours)
    for key in ours:
        assert theirs[key] == ours[key], key


def _normalize(objects: tuple[Obj, ...], generated: set[str] | None) -> dict[str, Obj]:
    """Objects by kind/namespace/name, with kustomize's name hashes removed."""
    text = json.dumps(list(objects))
    for name in generated or ():
        text = re.sub(rf'"{re.escape(name)}-[a-z0-9]{{10}}"', f'"{name}"', text)
    normalized = {}
    for obj in json.loads(text):
        if obj["kind"] == "Secret":
            # kustomize wraps long base64 values; compare what they decode to
            obj["data"] = secret_data(obj)
        normalized[
            f"{obj['kind']}/{obj['metadata'].get('namespace')}/{obj['metadata']['name']}"
        ] = obj
    return normalized


def test_loader_refuses_what_it_does_not_implement(tmp_path) -> None:
    (tmp_path / "kustomization.yaml").write_text("namePrefix: x-\nresources: []\n")
    with pytest.raises(kustomize.Unsupported):
        kustomize.build(tmp_path)
