#!/usr/bin/env bash
# End-to-end tests: real `taipan serve` processes driven by the official ai21 and openai Python
# SDKs and raw HTTP. Installs the pinned SDKs into .venv-e2e on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-e2e
if [ ! -x "$VENV/bin/pytest" ]; then
    python3 -m venv "$VENV"
fi
# Reinstall whenever the pinned list changed since the last install.
if ! cmp -s tests/e2e/requirements.txt "$VENV/requirements.installed"; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -r tests/e2e/requirements.txt
    cp tests/e2e/requirements.txt "$VENV/requirements.installed"
fi
# The multi-replica test puts HAProxy (Debian's package) in front of three servers.
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq haproxy >/dev/null
    else
        echo "e2e: the multi-replica test needs haproxy; install Debian's package (apt-get install haproxy)" >&2
    fi
fi
# The playground test drives Debian's Chromium through its chromedriver (no browser download).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && timeout 900 apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    else
        echo "e2e: the playground test needs chromium and chromium-driver (apt-get install chromium chromium-driver)" >&2
    fi
fi
cargo build --release --locked -p taipan
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/e2e "$@"
