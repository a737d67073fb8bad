"""One agent connection: handshake, then frames dispatched to the engine and publish gate.

Bad input never takes the daemon down: each refused frame is answered with an ``error``
frame naming the problem, and the session keeps serving. Only a broken handshake, a wrong
token, or an agent that stops reading its socket ends the connection.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import secrets
from collections.abc import Callable
from typing import Any

import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from sidecar import limits
from sidecar import protocol as p
from sidecar.adapters.broker import MessageProps
from sidecar.backpressure import PublishGate
from sidecar.config import Config
from sidecar.engine import Engine
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.session")

HANDSHAKE_TIMEOUT = 10.0
OUTBOX_LIMIT = 4096  # frames queued for an agent that is not reading: then we drop it
_QUEUE_NAME = re.compile(r"^(?!amq\.)[^\x00-\x1f]{1,255}$")


class Session:
    """Serves one connected agent."""

    _ids = itertools.count(1)

    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        config: Config,
        engine: Engine,
        gate: PublishGate,
        metrics: Metrics,
        codec: p.Codec,
        over_tcp: bool,
        consume: Callable[[str], Any],
    ) -> None:
        self.ws = ws
        self.config = config
        self.engine = engine
        self.gate = gate
        self.metrics = metrics
        self.codec = codec
        self.over_tcp = over_tcp
        self.consume = consume
        self.id = next(self._ids)
        self.binary = False
        self.hello: p.Hello | None = None
        self.pulling = False
        self._out_send, self._out_recv = trio.open_memory_channel[p.Frame](OUTBOX_LIMIT)
        self.crashed = True
        self._nursery: trio.Nursery | None = None

    # --- sending -----------------------------------------------------------------------

    def send(self, frame: p.Frame) -> None:
        try:
            self._out_send.send_nowait(frame)
        except trio.WouldBlock:
            # The agent stopped reading; buffering without bound would eat our memory, and a
            # polite close would block on the same full socket. Cut the connection.
            log.warning("agent session %d is not reading its socket; dropping it", self.id)
            self.metrics.protocol_errors.labels("not_reading").inc()
            self.crashed = False
            self._out_send.close()
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # The connection is closing (its writer is gone): a late notice, such as a
            # deadline that expired meanwhile, has nobody to go to.
            pass

    def refuse(self, error: p.ProtocolError, *, fatal: bool = False) -> None:
        self.metrics.protocol_errors.labels(error.code).inc()
        log.info("agent session %d: %s: %s", self.id, error.code, error.message)
        self.send(error.to_frame(fatal=fatal))

    async def _writer(self) -> None:
        try:
            async with self._out_recv:
                async for frame in self._out_recv:
                    try:
                        data = self.codec.encode(frame, binary=self.binary)
                    except (TypeError, ValueError, OverflowError) as exc:
                        # One frame that cannot be encoded must not end the session.
                        log.error("agent session %d: frame not sent: %s", self.id, exc)
                        self.metrics.protocol_errors.labels("unencodable").inc()
                        continue
                    await self.ws.send_message(data)
        except ConnectionClosed:
            pass

    # --- serving -----------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            if not await self._handshake():
                await self._flush_and_close()
                return
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                await self._read_frames()
                nursery.cancel_scope.cancel()
        except ConnectionClosed:
            pass
        finally:
            if self.hello is not None:
                self.engine.close_session(self.id, crashed=self.crashed)

    async def _read_frames(self) -> None:
        try:
            while True:
                self._dispatch(await self.ws.get_message())
        except ConnectionClosed as closed:
            reason = closed.reason
            # A clean close (1000/1001) is a goodbye: what the agent held is requeued, not
            # charged. Anything else is a crash.
            self.crashed = reason is None or reason.code not in (1000, 1001)

    async def _flush_and_close(self) -> None:
        self._out_send.close()
        async for frame in self._out_recv:
            await self.ws.send_message(self.codec.encode(frame, binary=self.binary))
        await self.ws.aclose(code=1008, reason="handshake refused")

    async def _handshake(self) -> bool:
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            data = await self.ws.get_message()
            self.binary = isinstance(data, bytes)
            try:
                frame = self.codec.decode_agent(data)
            except p.ProtocolError as exc:
                self.refuse(exc, fatal=True)
                return False
            if not isinstance(frame, p.Hello):
                self.refuse(
                    p.ProtocolError("handshake_required", "first frame must be hello"), fatal=True
                )
                return False
            problem = self._check_hello(frame)
            if problem is not None:
                self.refuse(problem, fatal=True)
                return False
            for queue in frame.queues:
                try:
                    await self.consume(queue)
                except Exception as exc:
                    self.refuse(p.ProtocolError("unknown_queue", str(exc)), fatal=True)
                    return False
            self.hello = frame
            self.engine.open_session(self.id, frame.agent, frame.version, frame.pid)
            self.send(self._welcome())
            return True
        self.refuse(p.ProtocolError("handshake_timeout", "no hello within 10s"), fatal=True)
        return False

    def _check_hello(self, hello: p.Hello) -> p.ProtocolError | None:
        token = self.config.agent.token
        if (self.over_tcp or token) and not (
            token and hello.token and secrets.compare_digest(hello.token, token)
        ):
            return p.ProtocolError("unauthorized", "a valid token is required")
        if hello.protocol != p.PROTOCOL_VERSION:
            return p.ProtocolError(
                "unsupported_protocol",
                f"protocol {hello.protocol} unsupported; this sidecar speaks 1",
            )
        bad = [q for q in hello.queues if not _QUEUE_NAME.match(q)]
        if bad:
            return p.ProtocolError("invalid_queue", f"invalid queue name {bad[0]!r}")
        if not hello.agent:
            return p.ProtocolError("invalid_hello", "hello.agent must name the agent")
        return None

    def _welcome(self) -> p.Welcome:
        a = self.config.agent
        return p.Welcome(
            session=f"{self.config.identity.host}/{self.id}",
            protocol=p.PROTOCOL_VERSION,
            limits=p.Limits(
                max_batch=a.batch_size,
                max_frame_bytes=a.max_frame_bytes,
                max_body_bytes=a.max_body_bytes,
                max_in_flight=a.max_in_flight,
                deadline=a.deadline,
                heartbeat=a.heartbeat,
            ),
            pressure=self.engine.pressure.name,
            batch_size=self.engine.batch_size,
        )

    def _dispatch(self, data: bytes | str) -> None:
        try:
            frame = self.codec.decode_agent(data)
            handler = self._handlers[type(frame)]
            handler(self, frame)
        except p.ProtocolError as exc:
            self.refuse(exc)
        except (ValueError, TypeError, OverflowError) as exc:
            # Whatever slipped past validation is still the agent's input, not our crash.
            log.exception("agent session %d: frame refused", self.id)
            self.refuse(p.ProtocolError("malformed", f"frame refused: {exc}"))

    # --- frame handlers ----------------------------------------------------------------

    def _on_pull(self, frame: p.Pull) -> None:
        if frame.max < 1:
            raise p.ProtocolError("invalid_pull", "pull.max must be at least 1")
        if not math.isfinite(frame.wait) or frame.wait < 0:
            raise p.ProtocolError("invalid_pull", "pull.wait must be a finite number >= 0")
        if self.pulling:
            raise p.ProtocolError("pull_in_progress", "wait for the batch before pulling again")
        self.pulling = True
        assert self._nursery is not None, "frames are handled only while the session runs"
        self._nursery.start_soon(
            self._pull, min(frame.max, self.config.agent.batch_size), frame.wait
        )

    async def _pull(self, want: int, wait: float) -> None:
        try:
            messages = await self.engine.pull(self.id, want, min(wait, 30.0))
        finally:
            self.pulling = False
        self.send(p.Batch(messages=messages))

    def _on_ack(self, frame: p.Ack) -> None:
        unknown = self.engine.ack(self.id, frame.ids)
        if unknown:
            raise p.ProtocolError("unknown_delivery", f"not held by this session: {unknown[:20]}")

    def _on_fail(self, frame: p.Fail) -> None:
        reason = frame.reason.upper()
        if reason not in p.FAILURE_REASONS:
            raise p.ProtocolError(
                "unknown_reason",
                f"unknown failure reason {frame.reason!r}; expected one of {', '.join(p.FAILURE_REASONS)}",
                ref=frame.id,
            )
        if frame.retry_after is not None and not (
            math.isfinite(frame.retry_after) and frame.retry_after >= 0
        ):
            raise p.ProtocolError(
                "invalid_fail", "retry_after must be a finite number >= 0", ref=frame.id
            )
        # Cut at the edge: nothing downstream (signatures, headers, the store) sees more.
        error, dropped = limits.truncate(frame.error)
        if dropped:
            self.metrics.protocol_errors.labels("error_truncated").inc()
        if not self.engine.fail(self.id, frame.id, reason, error, frame.retry_after):
            raise p.ProtocolError(
                "unknown_delivery", f"not held by this session: {frame.id}", ref=frame.id
            )

    def _on_extend(self, frame: p.Extend) -> None:
        if not math.isfinite(frame.seconds) or frame.seconds <= 0:
            raise p.ProtocolError("invalid_extend", "extend.seconds must be a finite number > 0")
        unknown = self.engine.extend(self.id, frame.ids, frame.seconds)
        if unknown:
            raise p.ProtocolError("unknown_delivery", f"not held by this session: {unknown[:20]}")

    def _on_publish(self, frame: p.Publish) -> None:
        problem = self._check_publish(frame)
        if problem is not None:
            self.metrics.published.labels("refused").inc()
            raise p.ProtocolError("invalid_publish", problem, ref=frame.ref)
        exchange = "" if frame.queue else frame.exchange
        routing_key = frame.queue or frame.routing_key
        target = routing_key if exchange == "" else f"{exchange}/{routing_key}"
        if not self.engine.broker.is_connected:
            wait, why = 1.0, "broker_unavailable"
        else:
            wait, why = self.gate.check(target)
        if wait > 0:
            self.metrics.throttled.labels(why).inc()
            self.metrics.published.labels("throttled").inc()
            self.send(
                p.Published(
                    ref=frame.ref, ok=False, throttled=True, retry_after=round(wait, 3), error=why
                )
            )
            return
        props = MessageProps(
            headers=dict(frame.headers),
            message_id=frame.message_id,
            content_type=frame.content_type,
            priority=frame.priority,
            delivery_mode=2 if frame.persistent else 1,
        )

        def on_done(error: str | None) -> None:
            self.metrics.published.labels("ok" if error is None else "error").inc()
            self.send(p.Published(ref=frame.ref, ok=error is None, error=error))

        self.engine.broker.publish_nowait(
            frame.body, exchange=exchange, routing_key=routing_key, props=props, on_done=on_done
        )

    def _check_publish(self, frame: p.Publish) -> str | None:
        a = self.config.agent
        if len(frame.body) > a.max_body_bytes:
            return f"body of {len(frame.body)} bytes exceeds max_body_bytes {a.max_body_bytes}"
        if frame.queue is not None and not _QUEUE_NAME.match(frame.queue):
            return f"invalid queue name {frame.queue!r}"
        if frame.queue is None and not frame.exchange and not frame.routing_key:
            return "give queue, or exchange and routing_key"
        if len(frame.routing_key.encode()) > 255 or len(frame.exchange.encode()) > 255:
            return "exchange and routing_key are at most 255 bytes"
        if len(frame.headers) > a.max_headers:
            return f"{len(frame.headers)} headers exceed max_headers {a.max_headers}"
        # Checked first, iteratively: the size check below encodes, which recurses.
        if (problem := limits.amqp_header_problem(frame.headers)) is not None:
            return problem
        if len(msgspec.msgpack.encode(frame.headers)) > a.max_header_bytes:
            return f"headers exceed max_header_bytes {a.max_header_bytes}"
        if frame.priority is not None and not 0 <= frame.priority <= 255:
            return "priority must be 0..255"
        return None

    def _on_heartbeat(self, frame: p.Heartbeat) -> None:
        self.send(p.Heartbeat(ts=frame.ts if math.isfinite(frame.ts) else 0.0))

    def _on_hello(self, frame: p.Hello) -> None:
        raise p.ProtocolError("duplicate_hello", "hello was already received")

    _handlers: dict[type, Callable[[Session, Any], None]] = {
        p.Pull: _on_pull,
        p.Ack: _on_ack,
        p.Fail: _on_fail,
        p.Extend: _on_extend,
        p.Publish: _on_publish,
        p.Heartbeat: _on_heartbeat,
        p.Hello: _on_hello,
    }
