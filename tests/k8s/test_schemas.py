"""Every rendered object is valid for the Kubernetes API (kubernetes-validate's bundled schemas,
offline, strict: an unknown field is an error), and the CRDs' objects (KEDA) have what their
controllers require."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tests.k8s.manifests import (
    KUSTOMIZATIONS,
    SECRET_TEMPLATE,
    Obj,
    celery_default_queue,
    named,
    of_kind,
    render,
)

# The oldest Kubernetes minor these manifests support (k8s/README.md) and the newest one the
# installed kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
CRD_GROUPS = {"keda.sh"}


def _objects() -> list[Any]:
    params = []
    for path in KUSTOMIZATIONS:
        for obj in render(path):
            if obj["apiVersion"].split("/")[0] not in CRD_GROUPS:
                key = f"{path}:{obj['kind']}/{obj['metadata']['name']}"
                params.append(pytest.param(obj, id=key))
    return params


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("obj", _objects())
def test_valid_for_kubernetes(obj: Obj, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")


def test_secret_template_is_valid() -> None:
    import yaml

    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(yaml.safe_load(SECRET_TEMPLATE.read_text()), version, True)


def test_only_known_custom_resources() -> None:
    """A custom resource of a group not checked below would be validated by nobody."""
    for path in KUSTOMIZATIONS:
        for obj in render(path):
            group = obj["apiVersion"].split("/")[0]
            if "." in group and not group.endswith(".k8s.io"):
                assert group in CRD_GROUPS, f"{path}: {obj['kind']} of {group} is not checked"


def test_keda_scaled_object() -> None:
    """What KEDA's ScaledObject CRD (keda.sh/v1alpha1) and its redis scaler require."""
    objects = render("overlays/prod")
    scaled = of_kind(objects, "ScaledObject")
    assert scaled, "prod scales the worker with KEDA"
    for obj in scaled:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "minReplicaCount",
            "maxReplicaCount",
            "idleReplicaCount",
            "pollingInterval",
            "cooldownPeriod",
            "initialCooldownPeriod",
            "advanced",
            "fallback",
            "triggers",
        }, "unknown ScaledObject field"
        target = spec["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment"
        named(objects, "Deployment", target["name"])
        assert 0 <= spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
        for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
            assert isinstance(spec.get(field, 0), int), field
        assert spec["triggers"], "a ScaledObject needs at least one trigger"
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis"
            metadata = trigger["metadata"]
            # KEDA reads every metadata value as a string
            assert all(isinstance(v, str) for v in metadata.values()), metadata
            assert metadata["listName"] == celery_default_queue()
            assert int(metadata["listLength"]) > 0
            auth = named(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            parameters = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
            has_address = "address" in parameters or "address" in metadata
            has_host = {"host", "port"} <= parameters | set(metadata)
            assert has_address or has_host, "the redis scaler needs address or host and port"
            for ref in auth["spec"]["secretTargetRef"]:
                assert ref["name"] and ref["key"], ref


def test_no_hpa_fights_keda() -> None:
    """KEDA makes its own HPA for its target; a second one would fight it."""
    objects = render("overlays/prod")
    keda_targets = {o["spec"]["scaleTargetRef"]["name"] for o in of_kind(objects, "ScaledObject")}
    hpa_targets = {
        o["spec"]["scaleTargetRef"]["name"] for o in of_kind(objects, "HorizontalPodAutoscaler")
    }
    assert not keda_targets & hpa_targets
