"""Operator tools: ``sidecar dlq ...``, ``sidecar queue purge``, ``sidecar status`` and
``sidecar scale recommend``. Short-lived processes: aiormq on plain asyncio, synchronous
store calls. Exit codes: 0 ok, 1 partial failure, 2 usage, 3 config, 4 not found/refused,
5 store or broker unreachable.
"""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    from sidecar.tools import dlq, queue, scale, status

    dlq.register(sub)
    queue.register(sub)
    status.register(sub)
    scale.register(sub)
