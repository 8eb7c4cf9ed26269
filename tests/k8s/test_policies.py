"""The policies of every Deployment, StatefulSet and Job, in every overlay: probes, resources,
a locked-down securityContext, graceful shutdown, one beat, one image, only the gateway exposed."""

from __future__ import annotations

import ast
import re
import shlex
from typing import Any

import pytest

from services.common import gunicorn_conf
from services.common.config import CommonSettings, WorkerSettings
from tests.k8s.kustomize import split_image
from tests.k8s.manifests import (
    INTERNAL_SERVICES,
    KUSTOMIZATIONS,
    ROOT,
    Obj,
    celery_conf,
    container_env,
    containers,
    field_env_names,
    is_parking,
    named,
    of_kind,
    parking_containers,
    pod_labels,
    pod_spec,
    procfile,
    render,
    selects,
    workloads,
)

CELERY = ["celery", "-A", "services.worker.app"]
# After the last task ends, a warm shutdown still closes its connections and exits.
SHUTDOWN_MARGIN_S = 10


def _containers() -> list[Any]:
    params = []
    for path in KUSTOMIZATIONS:
        for workload in workloads(render(path)):
            for container in containers(workload):
                key = (
                    f"{path}:{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
                )
                params.append(pytest.param(workload, container, id=key))
    return params


def _workloads() -> list[Any]:
    return [
        pytest.param(path, w, id=f"{path}:{w['kind']}/{w['metadata']['name']}")
        for path in KUSTOMIZATIONS
        for w in workloads(render(path))
    ]


@pytest.mark.parametrize(("path", "workload"), _workloads())
def test_pod_is_locked_down(path: str, workload: Obj) -> None:
    pod = pod_spec(workload)
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context.get("runAsUser", 0) != 0
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False, "no pod here talks to the API"
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(field), field


@pytest.mark.parametrize(("workload", "container"), _containers())
def test_container_is_locked_down(workload: Obj, container: Obj) -> None:
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert not context["capabilities"].get("add")
    assert not context.get("privileged")
    assert context.get("runAsUser", 1) != 0
    for port in container.get("ports", []):
        assert "hostPort" not in port


@pytest.mark.parametrize(("workload", "container"), _containers())
def test_resources_are_bounded(workload: Obj, container: Obj) -> None:
    resources = container["resources"]
    for resource in ("cpu", "memory"):
        request = _quantity(resources["requests"][resource])
        limit = _quantity(resources["limits"][resource])
        assert 0 < request <= limit, resource


def _quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


@pytest.mark.parametrize(("workload", "container"), _containers())
def test_probes(workload: Obj, container: Obj) -> None:
    if workload["kind"] == "Job":
        # runs to completion and serves nothing; bounded by activeDeadlineSeconds instead
        assert workload["spec"]["activeDeadlineSeconds"] > 0
        return
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    if is_parking(container):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert readiness["httpGet"]["path"] == "/readyz"
        assert liveness["httpGet"]["path"] == "/healthz"
        for probe in (readiness, liveness, container.get("startupProbe")):
            if probe:
                assert probe["httpGet"]["port"] in ports, "probes a port the container has"
    else:
        assert "exec" in readiness and "exec" in liveness
    for probe in (readiness, liveness):
        assert probe.get("timeoutSeconds", 1) < probe.get("periodSeconds", 10)


@pytest.mark.parametrize(("path", "workload"), _workloads())
def test_writable_paths_are_volumes(path: str, workload: Obj) -> None:
    """The root filesystem is read-only: /tmp, the metrics and the beat schedule are emptyDirs."""
    objects = render(path)
    for container in containers(workload):
        if not is_parking(container):
            continue
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        assert "/tmp" in mounts
        env = {v["name"]: v.get("value", "") for v in container.get("env", [])}
        paths = [a for a in _command(container) if a.startswith("/")]
        metrics = named(objects, "ConfigMap", _config_map_name(objects))["data"].get(
            "PARKING_METRICS_DIR"
        )
        paths += [metrics] if metrics else []
        for raw in paths:
            path = re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m.group(1)], raw)
            assert any(path.startswith(mount.rstrip("/") + "/") for mount in mounts), path


def _config_map_name(objects: tuple[Obj, ...]) -> str:
    return next(
        o["metadata"]["name"]
        for o in of_kind(objects, "ConfigMap")
        if o["metadata"]["name"].startswith("parking-config")
    )


def _command(container: Obj) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


@pytest.mark.parametrize(("workload", "container"), _containers())
def test_variables_in_commands_are_defined(workload: Obj, container: Obj) -> None:
    """$(VAR) in a command is expanded by Kubernetes only if the container defines VAR."""
    defined = {v["name"] for v in container.get("env", [])}
    for arg in _command(container):
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in defined, f"$({var}) in {arg!r}"


@pytest.mark.parametrize(("workload", "container"), _containers())
def test_graceful_shutdown_fits_the_grace_period(workload: Obj, container: Obj) -> None:
    if not is_parking(container):
        return
    grace = pod_spec(workload).get("terminationGracePeriodSeconds", 30)
    command = _command(container)
    if command[0] == "gunicorn":
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep", "stop only once the endpoint is out of every proxy"
        needed = int(pre_stop[1]) + gunicorn_conf.graceful_timeout
        assert grace >= needed + 5, f"{grace} s < preStop + graceful_timeout ({needed} s) + 5"
    elif command[:4] == [*CELERY, "worker"]:
        longest = _longest_task_s()
        assert grace >= longest + SHUTDOWN_MARGIN_S, (
            f"{grace} s < the longest a task may run ({longest} s) + {SHUTDOWN_MARGIN_S}"
        )


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_celery_processes_serve_their_probes_on_the_pod_ip(path: str) -> None:
    """The worker and beat bind the port their probes ask, on every address (the kubelet probes
    the pod IP, so a loopback-only endpoint would fail every probe)."""
    objects = render(path)
    names = field_env_names(WorkerSettings)
    seen = set()
    for workload, container in parking_containers(objects):
        if _command(container)[:3] != CELERY:
            continue
        seen.add(workload["metadata"]["name"])
        env = container_env(objects, container)
        fields = WorkerSettings.model_fields
        port = int(env.get(names["metrics_port"][0], fields["metrics_port"].default))
        host = env.get(names["metrics_host"][0], fields["metrics_host"].default)
        assert port, "port 0 serves nothing"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                assert ports[container[probe]["httpGet"]["port"]] == port, probe
        assert host in ("0.0.0.0", "::"), host
    assert seen == {"worker", "beat"}


def _gunicorn_target(command: list[str]) -> tuple[str, str | None, str | None]:
    """(the app, the worker class, the process name) of a gunicorn command line."""
    app = command[-1]
    klass = command[command.index("-k") + 1] if "-k" in command else None
    name = command[command.index("--name") + 1] if "--name" in command else None
    return app, klass, name


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_processes_run_as_in_the_procfile(path: str) -> None:
    """Every Procfile process runs in one Deployment, with the same app and worker class."""
    objects = render(path)
    deployments = {w["metadata"]["name"]: w for w in of_kind(objects, "Deployment")}
    for name, command in procfile().items():
        assert name in deployments, f"no Deployment for the Procfile's {name}"
        container = pod_spec(deployments[name])["containers"][0]
        ours = _command(container)
        if command[0] == "gunicorn":
            assert _gunicorn_target(ours) == _gunicorn_target(command)
            assert ours[ours.index("-c") + 1] == command[command.index("-c") + 1]
            port = ours[ours.index("--bind") + 1].rsplit(":", 1)[1]
            assert [p["containerPort"] for p in container["ports"]] == [int(port)]
        else:
            # celery -A services.worker.app worker|beat
            assert ours[:4] == command[:4], shlex.join(ours)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_one_image_with_an_explicit_tag(path: str) -> None:
    objects = render(path)
    images = {c["image"] for _, c in parking_containers(objects)}
    assert len(images) == 1, images
    if path != "base":
        for workload in workloads(objects):
            for container in containers(workload):
                _, tag = split_image(container["image"])
                assert tag and tag != "latest", container["image"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_exactly_one_beat(path: str) -> None:
    objects = render(path)
    beats = [
        w
        for w, c in parking_containers(objects)
        if _command(c)[:4] == ["celery", "-A", "services.worker.app", "beat"]
    ]
    assert len(beats) == 1
    beat = beats[0]
    assert beat["kind"] == "Deployment"
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    name = beat["metadata"]["name"]
    for scaler in of_kind(objects, "HorizontalPodAutoscaler", "ScaledObject"):
        assert scaler["spec"]["scaleTargetRef"]["name"] != name
    for budget in of_kind(objects, "PodDisruptionBudget"):
        assert not selects(budget["spec"]["selector"], pod_labels(beat))


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_service_accounts(path: str) -> None:
    """One ServiceAccount per component, none with an API token."""
    objects = render(path)
    for workload, _ in parking_containers(objects):
        account = named(objects, "ServiceAccount", pod_spec(workload)["serviceAccountName"])
        assert account["automountServiceAccountToken"] is False


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_services_select_their_deployment(path: str) -> None:
    objects = render(path)
    for service in of_kind(objects, "Service"):
        matching = [
            w
            for w in workloads(objects)
            if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(w))
        ]
        assert len(matching) == 1, service["metadata"]["name"]
        ports = {
            key: p["containerPort"]
            for c in pod_spec(matching[0])["containers"]
            for p in c.get("ports", [])
            for key in (p.get("name"), p["containerPort"])
        }
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_only_the_gateway_is_exposed(path: str) -> None:
    objects = render(path)
    for service in of_kind(objects, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    ingresses = of_kind(objects, "Ingress")
    assert len(ingresses) == 1
    spec = ingresses[0]["spec"]
    backends = [spec["defaultBackend"]] if "defaultBackend" in spec else []
    backends += [p["backend"] for rule in spec["rules"] for p in rule["http"]["paths"]]
    assert {b["service"]["name"] for b in backends} == {"gateway"}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_network_policies(path: str) -> None:
    """Default deny; the services accept connections from the gateway's pods alone."""
    objects = render(path)
    policies = of_kind(objects, "NetworkPolicy")
    assert any(
        p["spec"]["podSelector"] == {}
        and "Ingress" in p["spec"]["policyTypes"]
        and not p["spec"].get("ingress")
        for p in policies
    ), "a default-deny ingress policy"
    gateway = pod_labels(named(objects, "Deployment", "gateway"))
    for name in INTERNAL_SERVICES:
        labels = pod_labels(named(objects, "Deployment", name))
        port = named(objects, "Service", name)["spec"]["ports"][0]["port"]
        rules = [
            rule
            for p in policies
            if selects(p["spec"]["podSelector"], labels) and "Ingress" in p["spec"]["policyTypes"]
            for rule in p["spec"].get("ingress", [])
        ]
        assert rules, f"nothing may reach {name}"
        for rule in rules:
            assert rule.get("from"), f"{name}: a rule without `from` admits everyone"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{name}: {peer} (same namespace, pods only)"
                assert selects(peer["podSelector"], gateway)
                others = [
                    w["metadata"]["name"]
                    for w in workloads(objects)
                    if w["metadata"]["name"] != "gateway"
                    and selects(peer["podSelector"], pod_labels(w))
                ]
                assert not others, f"{name} reachable from {others}"
            assert [p["port"] for p in rule["ports"]] == [port]


CELERY_CALLS = {"shared_task", "task", "apply_async", "send_task", "signature", "set", "update"}


def _task_options(keyword: str) -> list[object]:
    """Values of ``keyword=`` given to Celery under services/ (task decorators, sends, conf)."""
    values: list[object] = []
    for path in ROOT.joinpath("services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in CELERY_CALLS:
                continue
            for kw in node.keywords:
                if kw.arg == keyword:
                    constant = isinstance(kw.value, ast.Constant)
                    values.append(kw.value.value if constant else f"<{path.name}: not constant>")  # type: ignore[attr-defined]
    return values


def _longest_task_s() -> float:
    """The longest a task may run: the app's hard time limit, or a task's own if longer."""
    hard = celery_conf().task_time_limit
    assert hard, "no hard time limit: no grace period can be shown to cover a running task"
    own = _task_options("time_limit")
    assert all(isinstance(v, int | float) for v in own), f"time limits must be constants: {own}"
    return float(max([hard, *own]))  # type: ignore[type-var]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_worker_grace_covers_task_time_limits(path: str) -> None:
    """Warm shutdown waits for running tasks: the hard time limit must end them within the grace,
    the soft one come first, and the broker must not hand a running task to another worker."""
    conf = celery_conf()
    soft, hard = conf.task_soft_time_limit, conf.task_time_limit
    assert soft and hard and soft < hard, (soft, hard)
    assert all(isinstance(v, int | float) for v in _task_options("soft_time_limit"))
    longest = _longest_task_s()
    objects = render(path)
    worker = named(objects, "Deployment", "worker")
    grace = pod_spec(worker)["terminationGracePeriodSeconds"]
    assert grace >= longest + SHUTDOWN_MARGIN_S, (
        f"terminationGracePeriodSeconds {grace} < hard time limit {longest} + {SHUTDOWN_MARGIN_S}"
    )
    env = container_env(objects, pod_spec(worker)["containers"][0])
    name = field_env_names(WorkerSettings)["visibility_timeout_s"][0]
    visibility = int(env.get(name, WorkerSettings.model_fields["visibility_timeout_s"].default))
    assert visibility > longest, f"{name} {visibility} s: a running task would be redelivered"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_worker_statements_end_before_the_soft_time_limit(path: str) -> None:
    """The soft time limit stops a task, not its statement: PostgreSQL ends that by the
    statement timeout (the pool's, or a longer one a task sets), which must be shorter."""
    soft = celery_conf().task_soft_time_limit
    units = {"ms": 0.001, "s": 1.0, "min": 60.0, "": 0.001}
    found = []
    for module in ROOT.joinpath("services/worker").glob("*.py"):
        for value, unit in re.findall(
            r"statement_timeout\s*=\s*'?(\d+)\s*(ms|s|min|)'?", module.read_text()
        ):
            found.append((module.name, float(value) * units[unit]))
    assert found, "the pattern no longer finds the long statements' timeouts"
    objects = render(path)
    env = container_env(objects, pod_spec(named(objects, "Deployment", "worker"))["containers"][0])
    name = field_env_names(CommonSettings)["db_statement_timeout_ms"][0]
    default = CommonSettings.model_fields["db_statement_timeout_ms"].default
    found.append((name, int(env.get(name, default)) / 1000))
    assert all(seconds < soft for _, seconds in found), found


def test_tasks_go_to_the_one_queue_workers_consume() -> None:
    """The worker consumes Celery's default queue only (no -Q), and KEDA watches that list."""
    assert not _task_options("queue"), "a task routed to another queue: add -Q and a KEDA trigger"
    assert not _task_options("task_routes")
    for path in KUSTOMIZATIONS:
        worker = pod_spec(named(render(path), "Deployment", "worker"))["containers"][0]
        assert "-Q" not in _command(worker) and "--queues" not in _command(worker)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_rollouts_keep_serving(path: str) -> None:
    """An HTTP Deployment adds new pods before it removes old ones."""
    for workload, container in parking_containers(render(path)):
        if workload["kind"] == "Deployment" and _command(container)[0] == "gunicorn":
            strategy = workload["spec"]["strategy"]
            assert strategy["type"] == "RollingUpdate"
            assert strategy["rollingUpdate"]["maxUnavailable"] == 0, workload["metadata"]["name"]
