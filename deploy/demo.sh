#!/usr/bin/env bash
# One command for a fresh machine: install into .venv from uv.lock, make sure RabbitMQ is up,
# run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9 # the same uv as .ci/run
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 rabbitmq-server -detached
    for _ in $(seq 1 60); do rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break; sleep 1; done
    rabbitmq-diagnostics -q ping >/dev/null 2>&1 || { echo "demo: RabbitMQ did not start" >&2; exit 1; }
    rabbitmqctl await_startup >/dev/null
fi
command -v uv >/dev/null && [ "$(uv --version | cut -d' ' -f2)" = "$UV_VERSION" ] \
    || python3 -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
uv sync --locked --inexact --quiet # keeps dev tools a test run installed
echo "installed: .venv/bin/sidecar (or run 'source .venv/bin/activate' to type plain 'sidecar')"
exec .venv/bin/sidecar demo "$@"
