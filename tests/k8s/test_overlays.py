"""What tells the overlays apart: dev brings its own servers, prod scales and survives drains."""

from __future__ import annotations

import re

import pytest

from tests.k8s.manifests import (
    INTERNAL_SERVICES,
    K8S,
    OVERLAYS,
    Obj,
    container_env,
    named,
    of_kind,
    overlay,
    parking_containers,
    pod_labels,
    selects,
    workloads,
)

SERVERS = {"postgres": 5432, "redis": 6379}


@pytest.mark.parametrize("name", OVERLAYS)
def test_namespace_is_restricted(name: str) -> None:
    objects = overlay(name)
    (namespace,) = of_kind(objects, "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"], obj["kind"]


def test_dev_runs_its_own_servers() -> None:
    objects = overlay("dev")
    for server, port in SERVERS.items():
        stateful = named(objects, "StatefulSet", server)
        assert stateful["spec"]["replicas"] == 1
        (claim,) = stateful["spec"]["volumeClaimTemplates"]
        mounts = {
            m["name"]
            for c in stateful["spec"]["template"]["spec"]["containers"]
            for m in c["volumeMounts"]
        }
        assert claim["metadata"]["name"] in mounts
        service = named(objects, "Service", server)
        assert stateful["spec"]["serviceName"] == server
        assert [p["port"] for p in service["spec"]["ports"]] == [port]


def test_dev_servers_accept_the_platform_alone() -> None:
    objects = overlay("dev")
    clients = {w["metadata"]["name"] for w in workloads(objects)} - set(SERVERS)
    for server, port in SERVERS.items():
        (policy,) = [
            p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == server
        ]
        (rule,) = policy["spec"]["ingress"]
        assert [p["port"] for p in rule["ports"]] == [port]
        (peer,) = rule["from"]
        allowed = {
            w["metadata"]["name"]
            for w in workloads(objects)
            if selects(peer["podSelector"], pod_labels(w))
        }
        assert allowed == clients, server


def test_dev_runs_one_replica_of_everything() -> None:
    for deployment in of_kind(overlay("dev"), "Deployment"):
        assert deployment["spec"].get("replicas", 1) == 1
    assert not of_kind(overlay("dev"), "HorizontalPodAutoscaler", "ScaledObject")


def test_prod_uses_external_servers_and_secret() -> None:
    objects = overlay("prod")
    assert not of_kind(objects, "StatefulSet"), "PostgreSQL and Redis are managed outside"
    assert not of_kind(objects, "Secret"), "keys are created out of band, never applied from git"


def _scaled(objects: tuple[Obj, ...]) -> dict[str, Obj]:
    return {
        o["spec"]["scaleTargetRef"]["name"]: o
        for o in of_kind(objects, "HorizontalPodAutoscaler", "ScaledObject")
    }


def test_prod_autoscales_the_gateway_services_and_worker() -> None:
    objects = overlay("prod")
    scaled = _scaled(objects)
    assert {"gateway", *INTERNAL_SERVICES} <= {
        n for n, o in scaled.items() if o["kind"] == "HorizontalPodAutoscaler"
    }
    assert scaled["worker"]["kind"] == "ScaledObject"
    for name, scaler in scaled.items():
        deployment = named(objects, "Deployment", name)
        # `replicas` in the manifest would reset the autoscaler's choice on every apply
        assert "replicas" not in deployment["spec"], name
        spec = scaler["spec"]
        low = spec.get("minReplicas", spec.get("minReplicaCount"))
        high = spec.get("maxReplicas", spec.get("maxReplicaCount"))
        assert 1 <= low < high, name
        if name != "worker":
            assert low >= 2, f"{name}: one replica is a single point of failure"
            for container in deployment["spec"]["template"]["spec"]["containers"]:
                # CPU utilization is relative to the request
                assert container["resources"]["requests"]["cpu"]


def test_prod_disruption_budgets() -> None:
    objects = overlay("prod")
    scaled = _scaled(objects)
    budgets = of_kind(objects, "PodDisruptionBudget")
    covered = set()
    for budget in budgets:
        spec = budget["spec"]
        (target,) = [w for w in workloads(objects) if selects(spec["selector"], pod_labels(w))]
        name = target["metadata"]["name"]
        covered.add(name)
        low = scaled[name]["spec"].get("minReplicas", scaled[name]["spec"].get("minReplicaCount"))
        # a budget that allows no eviction blocks every node drain
        if "maxUnavailable" in spec:
            assert spec["maxUnavailable"] >= 1
        else:
            assert spec["minAvailable"] < low
    assert covered == set(scaled)


def test_prod_ingress_has_a_host_and_tls() -> None:
    (ingress,) = of_kind(overlay("prod"), "Ingress")
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    assert hosts and all(hosts)
    assert hosts <= {h for tls in ingress["spec"]["tls"] for h in tls["hosts"]}


def test_prod_spreads_replicas_over_zones_and_nodes() -> None:
    objects = overlay("prod")
    for name in _scaled(objects):
        deployment = named(objects, "Deployment", name)
        constraints = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        keys = set()
        for constraint in constraints:
            assert selects(constraint["labelSelector"], pod_labels(deployment)), name
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
            keys.add(constraint["topologyKey"])
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, name


def test_readme_connection_budget_matches_prod() -> None:
    """k8s/README.md's PostgreSQL connection budget is the one the prod manifests add up to."""
    objects = overlay("prod")
    scaled = _scaled(objects)
    total = 0
    for workload, container in parking_containers(objects):
        name = workload["metadata"]["name"]
        env = container_env(objects, container)
        processes = env.get("WEB_CONCURRENCY") or env.get("WORKER_CONCURRENCY")
        if workload["kind"] != "Deployment" or not processes:
            continue  # beat holds no pool; the migrations Job one connection, briefly
        spec = scaled[name]["spec"] if name in scaled else {}
        replicas = spec.get("maxReplicas", spec.get("maxReplicaCount", 1))
        total += replicas * int(processes) * int(env["PARKING_DB_POOL_MAX"])
    readme = (K8S / "README.md").read_text()
    budget = re.search(r"\| \| \| \| \| \*\*(\d+)\*\* \|", readme)
    assert budget, "the budget table's total row"
    assert int(budget.group(1)) == total
