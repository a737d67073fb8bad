#!/usr/bin/env bash
# One command for a fresh machine: install into .venv, make sure RabbitMQ is up, run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 rabbitmq-server -detached
    for _ in $(seq 1 60); do rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break; sleep 1; done
    rabbitmqctl await_startup >/dev/null
fi
[ -x .venv/bin/sidecar ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'; }
exec .venv/bin/sidecar demo "$@"
