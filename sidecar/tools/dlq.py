"""``sidecar dlq``: list, show, analyze, retry, move and purge dead letters."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
from typing import Any

import msgspec

from sidecar.commands import (
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_REFUSED,
    EXIT_USAGE,
    nonnegative_int,
    positive_float,
    positive_int,
)
from sidecar.store.base import DeadLetterStore, PatternKey
from sidecar.store.records import DeadLetterRecord, PatternRow
from sidecar.tools.amqp import Amqp, QueueMissing
from sidecar.tools.common import (
    WHEN_HELP,
    Progress,
    ToolError,
    add_common,
    add_filter_flags,
    emit_json,
    filter_from,
    iso,
    load,
    match_case,
    parse_when,
    store_from,
    table,
    to_json,
    tool,
)
from sidecar.tools.republish import (
    RateLimiter,
    Recovery,
    Republisher,
    new_token,
    preview,
)


def _summary(record: DeadLetterRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "originalQueue": record.originalQueue,
        "failureReason": record.failureReason,
        "errorMessage": record.errorMessage,
        "attemptCount": record.attemptCount,
        "lastFailureAt": iso(record.lastFailureAt),
        "processingHost": record.processingHost,
        "reprocessed": record.reprocessed,
        "traceId": record.traceId,
    }


def _short(text: str, n: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# --- list / show


@tool
def cmd_list(args: argparse.Namespace) -> int:
    config = load(args)
    with store_from(config) as store:
        flt = match_case(store, filter_from(args))
        total = store.count(flt)
        records = store.find(flt, limit=args.limit, offset=args.offset)
    if args.json:
        emit_json(
            {
                "total": total,
                "offset": args.offset,
                "limit": args.limit,
                "records": [_summary(r) for r in records],
            }
        )
        return EXIT_OK
    if not records:
        if total:
            print(
                f"no dead letters on this page: {total} match, --offset {args.offset} is past them"
            )
        else:
            print("no dead letters match")
        return EXIT_OK
    rows = [
        [
            r.id,
            r.originalQueue,
            r.failureReason,
            r.attemptCount,
            iso(r.lastFailureAt),
            r.processingHost,
            "yes" if r.reprocessed else "no",
            _short(r.errorMessage),
        ]
        for r in records
    ]
    print(
        table(
            rows, ["ID", "QUEUE", "REASON", "ATTEMPTS", "LAST FAILURE", "HOST", "REPROC", "ERROR"]
        )
    )
    end = args.offset + len(records)
    print(f"\n{args.offset + 1}-{end} of {total} (newest first)")
    return EXIT_OK


MIN_PREFIX = 4  # shorter prefixes match too much to be worth a lookup
HEX_PREVIEW_BYTES = 4096


def find_record(store: DeadLetterStore, id_or_prefix: str) -> DeadLetterRecord:
    """A record by id, or by an unambiguous prefix of one."""
    record = store.get(id_or_prefix)
    if record is not None:
        return record
    lookup = getattr(store, "ids_with_prefix", None)
    if lookup is None or len(id_or_prefix) < MIN_PREFIX:
        raise ToolError(f"no dead letter with id {id_or_prefix!r}", EXIT_REFUSED)
    ids: list[str] = lookup(id_or_prefix, 6)
    if not ids:
        raise ToolError(f"no dead letter with id {id_or_prefix!r}", EXIT_REFUSED)
    if len(ids) > 1:
        more = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise ToolError(
            f"id prefix {id_or_prefix!r} is ambiguous: {more}; give more characters",
            EXIT_REFUSED,
        )
    record = store.get(ids[0])
    if record is None:  # deleted between the two reads
        raise ToolError(f"no dead letter with id {id_or_prefix!r}", EXIT_REFUSED)
    return record


def render_body(record: DeadLetterRecord) -> str:
    """JSON bodies as indented JSON, text as text, anything else as hex."""
    body = bytes(record.rawBody)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        shown = body[:HEX_PREVIEW_BYTES].hex(" ", 1)
        more = (
            f"\n  ... {len(body) - HEX_PREVIEW_BYTES} more bytes"
            if len(body) > HEX_PREVIEW_BYTES
            else ""
        )
        return f"(binary, {len(body)} bytes, hex)\n  {shown}{more}"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    try:
        return json.dumps(value, indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return text


@tool
def cmd_show(args: argparse.Namespace) -> int:
    config = load(args)
    with store_from(config) as store:
        record = find_record(store, args.id)
    if record.id != args.id:
        print(f"(id prefix {args.id!r} matched {record.id})", file=sys.stderr)
    if args.json:
        emit_json(record)
        return EXIT_OK
    data = to_json(record)
    for key in ("rawBody", "payload", "failures", "history", "headers", "properties"):
        data.pop(key, None)
    width = max(len(k) for k in data)
    for key, value in data.items():
        shown = (
            "-"
            if value is None
            else ("yes" if value else "no")
            if isinstance(value, bool)
            else value
        )
        print(f"{key.ljust(width)}  {shown}")
    print("\nheaders")
    print(textwrap.indent(json.dumps(record.headers, indent=2, default=str), "  "))
    print("properties")
    print(textwrap.indent(json.dumps(record.properties, indent=2, default=str), "  "))
    print(f"\nfailures ({len(record.failures)})")
    rows = [
        [
            f.get("attempt"),
            f.get("at"),
            f.get("reason"),
            f.get("host"),
            f.get("agentVersion"),
            _short(str(f.get("error") or ""), 60),
        ]
        for f in record.failures
    ]
    print(
        textwrap.indent(table(rows, ["#", "AT", "REASON", "HOST", "AGENT", "ERROR"]), "  ")
        if rows
        else "  (not recorded)"
    )
    print(f"\nreprocess history ({len(record.history)})")
    rows = [
        [h.get("at"), h.get("tool"), h.get("targetQueue"), h.get("token")] for h in record.history
    ]
    print(
        textwrap.indent(table(rows, ["AT", "TOOL", "TARGET", "TOKEN"]), "  ")
        if rows
        else "  (never reprocessed)"
    )
    print(f"\nbody ({len(record.rawBody)} bytes)")
    print(textwrap.indent(render_body(record), "  "))
    return EXIT_OK


# --- analyze

_SECTIONS: tuple[tuple[str, PatternKey, str], ...] = (
    ("failure_patterns", "failureReason", "Failure patterns (by failure reason)"),
    ("by_signature", "signature", "By error signature"),
    ("by_host", "processingHost", "By processing host"),
    ("by_queue", "originalQueue", "By original queue"),
)


def _rows(rows: list[PatternRow], key_name: str) -> list[dict[str, Any]]:
    return [
        {
            key_name: r.key,
            "count": r.count,
            "firstOccurrence": iso(r.firstOccurrence),
            "lastOccurrence": iso(r.lastOccurrence),
        }
        for r in rows
    ]


@tool
def cmd_analyze(args: argparse.Namespace) -> int:
    config = load(args)
    with store_from(config) as store:
        flt = match_case(store, filter_from(args))
        total = store.count(flt)
        report = {name: _rows(store.failure_patterns(flt, by=by), by) for name, by, _ in _SECTIONS}
    if args.json:
        emit_json({"report": args.report, "total": total, **report})
        return EXIT_OK
    print(f"Dead letters: {total}")
    for name, by, title in _SECTIONS:
        print(f"\n{title}")
        rows = [
            [_short(r[by] or "(none)", 60), r["count"], r["firstOccurrence"], r["lastOccurrence"]]
            for r in report[name]
        ]
        print(table(rows, [by, "COUNT", "FIRST", "LAST"]) if rows else "  (none)")
    return EXIT_OK


# --- retry / move


def _print_recovery(recovery: Recovery, as_json: bool) -> None:
    if as_json or not (recovery.marked or recovery.cancelled):
        return
    print(
        f"recovered an interrupted run: {len(recovery.marked)} marked reprocessed "
        f"(published before the crash), {len(recovery.cancelled)} released for retry",
        file=sys.stderr,
    )


@tool
def cmd_retry(args: argparse.Namespace) -> int:
    config = load(args)
    flt = filter_from(args)
    if flt == filter_from(argparse.Namespace()):
        raise ToolError("give --pattern (or another filter) to select what to retry", EXIT_USAGE)
    with store_from(config) as store:
        flt = match_case(store, flt)
        args.left_out = 0
        if not args.force:
            # Already reprocessed means it was sent once; a second send is a deliberate act.
            again = store.count(msgspec.structs.replace(flt, reprocessed=True))
            flt = msgspec.structs.replace(flt, reprocessed=False)
            args.left_out = again
            if again and not args.json:
                print(
                    f"{again} matching dead letter(s) were already reprocessed and are left out "
                    "(--force sends them again)",
                    file=sys.stderr,
                )
        if args.dry_run:
            return _retry_dry_run(store, flt, args)
        return asyncio.run(_retry(config.broker.url, store, flt, args))


def _retry_dry_run(store: DeadLetterStore, flt: Any, args: argparse.Namespace) -> int:
    records = store.find(flt, limit=args.limit)
    plan = [preview(r, r.originalQueue) for r in records]
    in_flight = len(store.in_flight_retries())
    if args.json:
        emit_json(
            {
                "dry_run": True,
                "would_retry": plan,
                "in_flight_to_recover": in_flight,
                "already_reprocessed_left_out": args.left_out,
            }
        )
        return EXIT_OK
    rows = [[p["id"], p["targetQueue"], p["failureReason"], p["bytes"]] for p in plan]
    print(table(rows, ["ID", "TARGET QUEUE", "REASON", "BYTES"]) if rows else "nothing matches")
    print(f"\ndry run: would republish {len(plan)} message(s); nothing was changed")
    if in_flight:
        print(f"({in_flight} interrupted retr(y/ies) would be recovered first)")
    return EXIT_OK


async def _retry(url: str, store: DeadLetterStore, flt: Any, args: argparse.Namespace) -> int:
    token = new_token("retry")
    async with Amqp(url) as amqp, Republisher(amqp, store, tool="dlq retry", token=token) as rp:
        recovery = await rp.recover()
        _print_recovery(recovery, args.json)
        ids = [r.id for r in store.find(flt, limit=args.limit)]  # the snapshot
        limiter = RateLimiter(args.rate)
        progress = Progress("retrying", len(ids))
        done: list[dict[str, str]] = []
        skipped: list[dict[str, str]] = []
        failed: list[dict[str, str]] = []
        try:
            for n, record_id in enumerate(ids, 1):
                record = store.get(record_id)
                if record is None:
                    skipped.append({"id": record_id, "why": "deleted meanwhile"})
                    continue
                if record.reprocessed and not args.force:
                    skipped.append({"id": record_id, "why": "already reprocessed (--force)"})
                    continue
                await limiter.wait()
                try:
                    why = await rp.republish(record, record.originalQueue)
                except QueueMissing as exc:
                    failed.append({"id": record_id, "error": str(exc)})
                    continue
                if why is None:
                    done.append({"id": record_id, "targetQueue": record.originalQueue})
                else:
                    skipped.append({"id": record_id, "why": why})
                progress.update(n)
        finally:
            progress.close()
    result = {
        "token": token,
        "recovered": recovery.as_dict(),
        "selected": len(ids),
        "republished": done,
        "skipped": skipped,
        "failed": failed,
        "already_reprocessed_left_out": args.left_out,
    }
    if args.json:
        emit_json(result)
    else:
        print(
            f"republished {len(done)} of {len(ids)} selected; "
            f"{len(skipped)} skipped, {len(failed)} failed (token {token})"
        )
        for f in failed:
            print(f"  failed {f['id']}: {f['error']}")
        for s in skipped:
            print(f"  skipped {s['id']}: {s['why']}")
    return EXIT_PARTIAL if failed else EXIT_OK


@tool
def cmd_move(args: argparse.Namespace) -> int:
    config = load(args)
    with store_from(config) as store:
        return asyncio.run(_move(config.broker.url, store, args))


async def _move(url: str, store: DeadLetterStore, args: argparse.Namespace) -> int:
    token = new_token("move")
    async with Amqp(url) as amqp, Republisher(amqp, store, tool="dlq move", token=token) as rp:
        recovery = await rp.recover()
        _print_recovery(recovery, args.json)
        # An exact id: a prefix that happens to be unique is fine to read, not to send.
        record = store.get(args.message_id)
        if record is None:
            raise ToolError(f"no dead letter with id {args.message_id!r}", EXIT_REFUSED)
        refuse_reprocessed(record, args.force)
        try:
            why = await rp.republish(record, args.target_queue)
        except QueueMissing as exc:
            raise ToolError(
                f"target queue {args.target_queue!r} does not exist; refusing to move "
                f"{record.id!r}",
                EXIT_REFUSED,
            ) from exc
    if why is not None:
        raise ToolError(f"cannot move {record.id!r}: {why}", EXIT_REFUSED)
    result = {"id": record.id, "targetQueue": args.target_queue, "token": token}
    if args.json:
        emit_json({**result, "recovered": recovery.as_dict()})
    else:
        print(f"moved {record.id} to {args.target_queue} (token {token})")
    return EXIT_OK


class RecordNotFound(ToolError):
    def __init__(self, record_id: str) -> None:
        super().__init__(f"no dead letter with id {record_id!r}", EXIT_REFUSED)


def refuse_reprocessed(record: DeadLetterRecord, force: bool, how: str = "add --force") -> None:
    if record.reprocessed and not force:
        raise ToolError(
            f"{record.id!r} was already reprocessed ({record.reprocessCount}x, last to "
            f"{record.reprocessTarget!r} at {iso(record.reprocessedAt)}); sending it again "
            f"makes another copy: {how} if that is what you want",
            EXIT_REFUSED,
        )


def send_one(
    broker_url: str,
    store_url: str,
    record_id: str,
    target_queue: str | None,
    *,
    force: bool,
    tool: str,
) -> dict[str, Any]:
    """Retry one record to its original queue (``target_queue`` None) or move it, with the
    same lock, ledger and exactly-once marking as ``dlq retry``/``dlq move``. Blocking: it
    runs its own asyncio loop and store connection (the dashboard calls it in a thread).
    Raises ToolError (refused or not found), StoreUnavailable or BrokerUnavailable."""
    from sidecar.store.opening import open_store

    store = open_store(store_url)
    try:
        return asyncio.run(_send_one(broker_url, store, record_id, target_queue, force, tool))
    finally:
        store.close()


async def _send_one(
    url: str,
    store: DeadLetterStore,
    record_id: str,
    target_queue: str | None,
    force: bool,
    tool: str,
) -> dict[str, Any]:
    token = new_token("retry" if target_queue is None else "move")
    async with Amqp(url) as amqp, Republisher(amqp, store, tool=tool, token=token) as rp:
        await rp.recover()
        record = store.get(record_id)
        if record is None:
            raise RecordNotFound(record_id)
        refuse_reprocessed(record, force, how="confirm with force")
        target = target_queue or record.originalQueue
        try:
            why = await rp.republish(record, target)
        except QueueMissing as exc:
            raise ToolError(f"target queue {target!r} does not exist", EXIT_REFUSED) from exc
    if why is not None:
        raise ToolError(f"cannot send {record.id!r}: {why}", EXIT_REFUSED)
    return {"id": record.id, "targetQueue": target, "token": token}


# --- purge


def confirm(prompt: str) -> bool:
    """A 'yes' on stdin; no input (EOF) or anything else refuses."""
    print(prompt, end=" ", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except (OSError, ValueError):
        return False
    return answer.strip().lower() in ("y", "yes")


@tool
def cmd_purge(args: argparse.Namespace) -> int:
    config = load(args)
    extra: dict[str, Any] = {}
    if args.older_than is not None:
        cutoff = args.older_than
        until = getattr(args, "f_until", None)
        extra["until"] = min(cutoff, until) if until else cutoff
    with store_from(config) as store:
        flt = match_case(store, filter_from(args, **extra))
        matches = store.count(flt)
        if matches == 0:
            if args.json:
                emit_json({"matched": 0, "deleted": 0})
            else:
                print("no dead letters match; nothing deleted")
            return EXIT_OK
        if not args.yes and not confirm(f"delete {matches} dead letter(s)? type 'yes' to confirm:"):
            raise ToolError(
                f"not confirmed: {matches} dead letter(s) kept (use --yes in scripts)",
                EXIT_REFUSED,
            )
        deleted = store.delete(flt)
    if args.json:
        emit_json({"matched": matches, "deleted": deleted})
    else:
        print(f"deleted {deleted} dead letter(s)")
    return EXIT_OK


# --- registration


def register(sub: Any) -> None:
    dlq = sub.add_parser("dlq", help="inspect and recover dead letters")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")

    p = dsub.add_parser("list", help="dead letters, newest first, paged")
    add_common(p)
    add_filter_flags(p)
    p.add_argument("--limit", type=positive_int, default=50, help="records per page (>= 1)")
    p.add_argument("--offset", type=nonnegative_int, default=0, help="records to skip")
    p.set_defaults(func=cmd_list)

    p = dsub.add_parser("show", help="one dead letter in full (id or a unique prefix)")
    add_common(p)
    p.add_argument("id", help=f"record id, or an unambiguous prefix of >= {MIN_PREFIX} characters")
    p.set_defaults(func=cmd_show)

    p = dsub.add_parser("analyze", help="failure-pattern report")
    add_common(p)
    add_filter_flags(p)
    p.add_argument(
        "--report", choices=["failure-patterns"], default="failure-patterns", help="report kind"
    )
    p.set_defaults(func=cmd_analyze)

    p = dsub.add_parser("retry", help="republish matching dead letters to their original queue")
    add_common(p)
    add_filter_flags(p)
    p.add_argument("--limit", type=positive_int, default=100, help="republish at most N (>= 1)")
    p.add_argument(
        "--rate",
        type=positive_float,
        default=50.0,
        help="messages per second, so a retry does not flood the workers",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be sent; change nothing"
    )
    p.add_argument(
        "--force", action="store_true", help="also send records that were already reprocessed"
    )
    p.set_defaults(func=cmd_retry)

    p = dsub.add_parser("move", help="republish one dead letter to a chosen queue")
    add_common(p)
    p.add_argument("--message-id", required=True, metavar="ID", help="the record's full id")
    p.add_argument("--target-queue", required=True, metavar="Q", help="existing queue")
    p.add_argument("--force", action="store_true", help="move even if it was already reprocessed")
    p.set_defaults(func=cmd_move)

    p = dsub.add_parser("purge", help="delete dead letters (asks unless --yes)")
    add_common(p)
    add_filter_flags(p)
    p.add_argument(
        "--older-than",
        type=parse_when,
        metavar="WHEN",
        help=f"last failure before: {WHEN_HELP}",
    )
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_purge)
