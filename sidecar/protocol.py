"""Agent protocol v1: the frames exchanged between an agent and its sidecar.

Defined once, as msgspec structs in one tagged union per direction (the tag field is
``kind``). Frames travel as WebSocket messages over a Unix socket: JSON in text frames,
MessagePack in binary frames. Unknown fields are ignored (so newer agents and sidecars
interoperate); unknown kinds and malformed frames get an ``error`` frame and the
connection keeps serving.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from sidecar import limits
from sidecar.policy.failure import DEFAULT_REASONS

PROTOCOL_VERSION = 1
# Deepest nesting of a frame (the frame object itself is level 1); deeper is ``malformed``.
MAX_DEPTH = limits.MAX_NESTING

# Ids must fit MessagePack's integers (JSON's are unbounded) so any answer can be encoded.
Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]

# The built-in reasons an agent may report (policy/failure.py is their source); a sidecar
# may accept more, declared by its operator, and lists them all in ``welcome.reasons``.
FAILURE_REASONS = tuple(DEFAULT_REASONS.agent_reasons())


class Frame(msgspec.Struct, tag_field="kind", omit_defaults=True):
    """Base of every frame; ``kind`` is the tag."""


# --- agent -> sidecar ------------------------------------------------------------------


class Hello(Frame, tag="hello"):
    """First frame of a session: who the agent is and what it consumes."""

    agent: str
    version: str = ""
    pid: int | None = None
    queues: list[str] = []
    token: str | None = None
    protocol: int = PROTOCOL_VERSION


class Pull(Frame, tag="pull"):
    """Ask for up to ``max`` messages; answered by one ``batch`` (possibly fewer, or empty
    after ``wait`` seconds when nothing arrives)."""

    max: int = 1
    wait: float = 1.0


class Ack(Frame, tag="ack"):
    """These deliveries succeeded."""

    ids: list[Id]


class Fail(Frame, tag="fail"):
    """This delivery failed; the sidecar decides between retry and dead-letter."""

    id: Id
    reason: str
    error: str = ""
    retry_after: float | None = None


class Extend(Frame, tag="extend"):
    """Still working: push these deliveries' deadlines ``seconds`` into the future."""

    ids: list[Id]
    seconds: float


class Publish(Frame, tag="publish"):
    """Publish a message; answered by a ``published`` frame carrying the same ``ref``.

    Give ``queue`` to publish straight to a queue (default exchange), or ``exchange`` and
    ``routing_key``."""

    ref: Id
    body: bytes
    queue: str | None = None
    exchange: str = ""
    routing_key: str = ""
    headers: dict[str, Any] = {}
    priority: int | None = None
    persistent: bool = True
    content_type: str | None = None
    message_id: str | None = None


class Heartbeat(Frame, tag="heartbeat"):
    """Liveness in either direction."""

    ts: float = 0.0


# --- sidecar -> agent ------------------------------------------------------------------


class Limits(msgspec.Struct, omit_defaults=True):
    """What the sidecar accepts from this agent; exceeding one gets an error frame."""

    max_batch: int
    max_frame_bytes: int
    max_body_bytes: int
    max_in_flight: int
    deadline: float
    heartbeat: float


class Welcome(Frame, tag="welcome"):
    session: str
    protocol: int
    limits: Limits
    pressure: str = "NORMAL"
    batch_size: int = 1
    # The failure reasons this sidecar accepts in ``fail`` (built-in and declared).
    reasons: list[str] = []


class Delivery(msgspec.Struct, omit_defaults=True):
    """One message handed to the agent. ``attempt`` counts from 1; ``reduced_scope`` asks
    the agent to do less this time (the seed's retryWithReducedScope after a TIMEOUT)."""

    id: int
    queue: str
    body: bytes
    attempt: int = 1
    deadline: float = 30.0
    routing_key: str = ""
    exchange: str = ""
    headers: dict[str, Any] = {}
    message_id: str | None = None
    content_type: str | None = None
    priority: int | None = None
    redelivered: bool = False
    reduced_scope: bool = False


class Batch(Frame, tag="batch"):
    messages: list[Delivery]


class Published(Frame, tag="published"):
    """Result of a ``publish``: ok once the broker confirmed it, or an error. Publishes wait
    in the sidecar's queue while backpressure holds them; only when that queue is full is
    the answer ``throttled`` (not sent) with ``retry_after`` > 0: send it again then."""

    ref: int
    ok: bool
    error: str | None = None
    throttled: bool = False
    retry_after: float | None = None


class Pressure(Frame, tag="pressure"):
    """The agent's memory pressure level changed; batches are now ``batch_size`` at most."""

    level: str
    batch_size: int
    ratio: float = 0.0


class Error(Frame, tag="error"):
    """Something the agent sent was refused. ``fatal`` errors close the connection."""

    code: str
    message: str
    ref: int | None = None
    fatal: bool = False
    # ``unknown_delivery``: every id of the frame that this session does not hold.
    ids: list[int] | None = None


AgentFrame = Hello | Pull | Ack | Fail | Extend | Publish | Heartbeat
SidecarFrame = Welcome | Batch | Published | Pressure | Heartbeat | Error

AGENT_KINDS = frozenset(str(t.__struct_config__.tag) for t in AgentFrame.__args__)
SIDECAR_KINDS = frozenset(str(t.__struct_config__.tag) for t in SidecarFrame.__args__)


class ProtocolError(Exception):
    """A frame the sidecar cannot accept; ``code`` is stable for clients to match on."""

    def __init__(
        self, code: str, message: str, *, ref: int | None = None, ids: list[int] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        self.ids = ids

    def to_frame(self, *, fatal: bool = False) -> Error:
        return Error(code=self.code, message=self.message, ref=self.ref, fatal=fatal, ids=self.ids)


class _Kind(msgspec.Struct):
    kind: Any = None


class Codec:
    """Encoders and decoders built once and reused (msgspec's fast path)."""

    def __init__(self) -> None:
        self._json_agent = msgspec.json.Decoder(AgentFrame)
        self._mp_agent = msgspec.msgpack.Decoder(AgentFrame)
        self._json_sidecar = msgspec.json.Decoder(SidecarFrame)
        self._mp_sidecar = msgspec.msgpack.Decoder(SidecarFrame)
        self._json_kind = msgspec.json.Decoder(_Kind)
        self._mp_kind = msgspec.msgpack.Decoder(_Kind)
        self._json_enc = msgspec.json.Encoder()
        self._mp_enc = msgspec.msgpack.Encoder()

    def encode(self, frame: Frame, *, binary: bool) -> bytes | str:
        if binary:
            return self._mp_enc.encode(frame)
        return self._json_enc.encode(frame).decode()

    def decode_agent(self, data: bytes | str) -> AgentFrame:
        """Decode one agent frame or raise ProtocolError naming the problem."""
        frame: AgentFrame = self._decode(data, self._json_agent, self._mp_agent, AGENT_KINDS)
        return frame

    def decode_sidecar(self, data: bytes | str) -> SidecarFrame:
        frame: SidecarFrame = self._decode(
            data, self._json_sidecar, self._mp_sidecar, SIDECAR_KINDS
        )
        return frame

    def _decode(self, data: bytes | str, json_dec: Any, mp_dec: Any, kinds: frozenset[str]) -> Any:
        binary = isinstance(data, bytes)
        # Nesting is bounded before decoding: msgspec recurses per level, and a 2 KB frame
        # of brackets would otherwise exhaust the interpreter's stack.
        if not binary and limits.json_nesting_exceeds(data):
            raise ProtocolError("malformed", f"frame nested deeper than {MAX_DEPTH} levels")
        try:
            frame = mp_dec.decode(data) if binary else json_dec.decode(data)
        except RecursionError:
            raise ProtocolError(
                "malformed", f"frame nested deeper than {MAX_DEPTH} levels"
            ) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            kind = self._peek_kind(data, binary)
            if kind is not None and kind not in kinds:
                raise ProtocolError("unknown_kind", f"unknown frame kind {kind!r}") from None
            raise ProtocolError("malformed", f"malformed frame: {exc}") from None
        if (
            isinstance(frame, Publish)
            and frame.headers
            and limits.nesting_exceeds(frame.headers, MAX_DEPTH - 1)
        ):
            # MessagePack frames are not pre-scanned; their free-form values are checked here.
            raise ProtocolError("malformed", f"frame nested deeper than {MAX_DEPTH} levels")
        return frame

    def _peek_kind(self, data: bytes | str, binary: bool) -> str | None:
        try:
            decoder: Any = self._mp_kind if binary else self._json_kind
            kind = decoder.decode(data).kind
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        return kind if isinstance(kind, str) else None
