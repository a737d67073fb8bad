"""Dead letters for the dashboard: browse (filter by reason, queue and pattern; open a
record) and, when the operator sets ``http.admin_token``, retry or move one.

Reads go through the DLQ writer's store thread like every other store call of the daemon.
Retry and move reuse the operator tools' exactly-once path (broker lock, ledger, marking) in
a worker thread with their own broker connection and store handle, so the dashboard and
``sidecar dlq retry`` can never send the same record twice.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec
import trio

from sidecar.adapters.http import ApiError
from sidecar.config import Config
from sidecar.store.base import StoreUnavailable
from sidecar.store.records import DeadLetterRecord, RecordFilter

if TYPE_CHECKING:
    from sidecar.runtime.dlq import DeadLetterWriter
    from sidecar.store.spool import SpoolingStore

PAGE_MAX = 200
FILTER_MAX_CHARS = 200
ID_MAX_CHARS = 512
QUEUE_MAX_CHARS = 255
BODY_TEXT_MAX = 64 * 1024
BODY_HEX_MAX = 4096


def _one(query: dict[str, list[str]], name: str, limit: int = FILTER_MAX_CHARS) -> str | None:
    values = query.get(name)
    if not values or not values[0].strip():
        return None
    value = values[0].strip()
    if len(value) > limit:
        raise ApiError(400, f"{name}: at most {limit} characters")
    return value


def _int(query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    raw = _one(query, name, 12)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: not an integer") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name}: must be between {low} and {high}")
    return value


def parse_query(raw: bytes) -> dict[str, list[str]]:
    try:
        return parse_qs(raw.decode("utf-8"), max_num_fields=20, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"bad query string: {exc}") from None


def body_view(record: DeadLetterRecord) -> dict[str, Any]:
    """The body as the dashboard shows it: JSON indented, text as text, else hex."""
    raw = bytes(record.rawBody)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return {
            "kind": "binary",
            "bytes": len(raw),
            "text": raw[:BODY_HEX_MAX].hex(" ", 1),
            "truncated": len(raw) > BODY_HEX_MAX,
        }
    kind = "text"
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        kind = "json"
    except (ValueError, RecursionError):
        pass
    return {
        "kind": kind,
        "bytes": len(raw),
        "text": text[:BODY_TEXT_MAX],
        "truncated": len(text) > BODY_TEXT_MAX,
    }


def summary(record: DeadLetterRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "originalQueue": record.originalQueue,
        "failureReason": record.failureReason,
        "errorMessage": record.errorMessage[:300],
        "attemptCount": record.attemptCount,
        "lastFailureAt": record.lastFailureAt.isoformat().replace("+00:00", "Z"),
        "reprocessed": record.reprocessed,
    }


class DlqBrowser:
    def __init__(self, config: Config, store: SpoolingStore, writer: DeadLetterWriter) -> None:
        self.config = config
        self.store = store
        self.writer = writer
        # One action at a time from this daemon; the broker lock covers other processes.
        self._acting = trio.Lock()

    @property
    def actions_enabled(self) -> bool:
        return bool(self.config.http.admin_token)

    def authorize(self, header: str | None) -> None:
        token = self.config.http.admin_token
        if not token:
            raise ApiError(403, "retry and move are disabled: set http.admin_token to enable them")
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            given.strip().encode(), token.encode()
        ):
            raise ApiError(401, "a valid admin token is required")

    async def list(self, raw_query: bytes) -> dict[str, Any]:
        from sidecar.tools.common import match_case

        query = parse_query(raw_query)
        flt = RecordFilter(
            reason=_one(query, "reason"),
            queue=_one(query, "queue", QUEUE_MAX_CHARS),
            pattern=_one(query, "pattern"),
        )
        limit = _int(query, "limit", 50, 1, PAGE_MAX)
        offset = _int(query, "offset", 0, 0, 10_000_000)
        primary = self.store.primary

        def read() -> tuple[int, list[DeadLetterRecord], list[str]]:
            matched = match_case(primary, flt)
            reasons = [row.key for row in primary.failure_patterns()]
            return (
                primary.count(matched),
                primary.find(matched, limit=limit, offset=offset),
                reasons,
            )

        try:
            result = await self.writer.call(read)
        except StoreUnavailable as exc:
            raise ApiError(503, f"dead-letter store unavailable: {exc}") from None
        total, records, reasons = result
        return {
            "total": total,
            "offset": offset,
            "limit": limit,
            "reasons": reasons,
            "actions_enabled": self.actions_enabled,
            "records": [summary(r) for r in records],
        }

    async def get(self, raw_query: bytes) -> dict[str, Any]:
        record_id = _one(parse_query(raw_query), "id", ID_MAX_CHARS)
        if record_id is None:
            raise ApiError(400, "id is required")
        try:
            record = await self.writer.call(self.store.primary.get, record_id)
        except StoreUnavailable as exc:
            raise ApiError(503, f"dead-letter store unavailable: {exc}") from None
        if not isinstance(record, DeadLetterRecord):
            raise ApiError(404, f"no dead letter with id {record_id!r}")
        data = msgspec.to_builtins(record)
        data.pop("rawBody", None)
        data.pop("payload", None)  # the body view below shows it, once
        data["body"] = body_view(record)
        data["actions_enabled"] = self.actions_enabled
        return dict(data)

    async def act(self, action: str, body: bytes) -> dict[str, Any]:
        from sidecar.core.port import BrokerUnavailable
        from sidecar.tools.amqp import BROKER_LOST
        from sidecar.tools.common import ToolError
        from sidecar.tools.dlq import RecordNotFound, send_one

        try:
            request = json.loads(body or b"{}")
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body must be JSON") from None
        if not isinstance(request, dict):
            raise ApiError(400, "the request body must be a JSON object")
        record_id = request.get("id")
        if not isinstance(record_id, str) or not 0 < len(record_id) <= ID_MAX_CHARS:
            raise ApiError(400, "id: a non-empty string is required")
        force = request.get("force", False) is True
        target: str | None = None
        if action == "move":
            target = request.get("target_queue")
            if (
                not isinstance(target, str)
                or not 0 < len(target.encode()) <= QUEUE_MAX_CHARS
                or target.startswith("amq.")
                or any(ord(c) < 0x20 for c in target)
            ):
                raise ApiError(400, "target_queue: a queue name is required")
        tool = f"dashboard {action}"
        async with self._acting:
            try:
                return await trio.to_thread.run_sync(
                    lambda: send_one(
                        self.config.broker.url,
                        self.config.store.url,
                        record_id,
                        target,
                        force=force,
                        tool=tool,
                    )
                )
            except RecordNotFound as exc:
                raise ApiError(404, str(exc)) from None
            except ToolError as exc:
                raise ApiError(409, str(exc)) from None
            except (StoreUnavailable, BrokerUnavailable) as exc:
                raise ApiError(503, str(exc)) from None
            except BROKER_LOST as exc:
                raise ApiError(
                    503, f"broker connection lost: {exc or type(exc).__name__}"
                ) from None
