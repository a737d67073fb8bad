"""The agent-facing socket: WebSocket frames over a Unix socket (and optionally loopback TCP).

trio-websocket has no Unix-socket server of its own, so the listener is a bound AF_UNIX trio
socket wrapped in ``trio.SocketListener`` and each stream goes through
``wrap_server_stream``. Connection ids are our own: ``.remote`` raises on AF_UNIX.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import resource
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

# One write per burst to an agent: shared with the clients, kept importable from here.
from sidecar.wsburst import coalesces_writes as coalesces_writes
from sidecar.wsburst import send_messages as send_messages

log = logging.getLogger("sidecar.agents")

ConnectionHandler = Callable[[WebSocketConnection, int, bool], Awaitable[None]]
"""Serves one accepted connection: (websocket, connection id, came over TCP)."""

RefusalCounter = Callable[[str], None]
"""Counts a connection refused or cut, by why (for the metrics)."""

# accept() failing for lack of a resource: wait and try again, never give up serving.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# A client going away, in any of the ways the transport reports it.
_CLOSED = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_MIN_SHARE = 1024 * 1024  # a connection holding less than this is never cut by the budget


def raise_fd_limit(target: int = 1 << 20) -> tuple[int, int]:
    """Raise the soft open-files limit toward the hard one (systemd's default soft limit is
    1024, and each agent session holds a descriptor). Returns (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(target, hard) if hard != resource.RLIM_INFINITY else target
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, wanted, exc)
    return soft, hard


class FrameBudget:
    """Bytes held in partial WebSocket frames across all connections. Each connection may
    hold up to the per-frame limit, but together they may not exceed ``limit``: past it,
    a connection holding more than its share is cut. Thirty clients each stalling inside
    a 15 MiB frame otherwise held 420 MiB."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.connections = 0


class _BudgetedStream(trio.abc.Stream):
    """A stream that charges what it reads to the shared FrameBudget until the WebSocket
    layer has assembled it into a complete message."""

    # Writes are the inner stream's, untouched: the session may write to its socket directly
    # (sidecar.wsburst.write_now).
    passes_writes_through = True

    def __init__(self, inner: trio.abc.Stream, budget: FrameBudget) -> None:
        self.inner = inner
        self.budget = budget
        self.ws: WebSocketConnection | None = None
        self.held = 0
        self.cut = False

    def _hold(self, held: int) -> None:
        self.budget.total += held - self.held
        self.held = held

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        # trio-websocket keeps the size of the message being assembled; what it holds now
        # plus this chunk is what this connection will hold once the chunk is fed in.
        partial = getattr(self.ws, "_message_size", 0) if self.ws is not None else 0
        self._hold(partial + len(data))
        budget = self.budget
        if budget.total > budget.limit:
            share = max(_MIN_SHARE, budget.limit // max(1, budget.connections))
            if self.held > share:
                self._hold(0)
                self.cut = True
                raise trio.BrokenResourceError("partial frames over the global byte budget")
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._hold(0)
        await self.inner.aclose()


class SocketPathError(RuntimeError):
    """The socket path is unsafe to use (a symlink, or a directory owned by someone else)."""


def prepare_socket_path(path: Path, socket_mode: int = 0o600) -> None:
    """Create the socket's directory (owned by us, not writable by anyone else) and remove a
    stale socket. Refuses a directory that someone else could have made or can still
    change: a symlink anywhere on the path, a directory not owned by this user, or one whose
    parents another user may write to (they could rename ours away and put their own in its
    place, then read every agent's hello and token).

    A directory the sidecar creates lets in (read and traverse, never write) the classes
    ``socket_mode`` lets connect: with 0660, an agent running as another user of the same
    group (a pod's fsGroup) can reach the socket."""
    directory = path.parent
    _make_private_dirs(directory, _directory_mode(socket_mode))
    _check_chain(directory)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise SocketPathError(f"socket path {path} is a symlink; refusing to use it")
    if info.st_uid != os.geteuid():
        raise SocketPathError(
            f"socket path {path} is owned by uid {info.st_uid}, not by this process "
            f"(uid {os.geteuid()}); refusing to use it"
        )
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathError(f"socket path {path} exists and is not a socket")
    path.unlink()


def _directory_mode(socket_mode: int) -> int:
    group = 0o050 if socket_mode & 0o060 else 0
    others = 0o005 if socket_mode & 0o006 else 0
    return 0o700 | group | others


def _make_private_dirs(directory: Path, mode: int = 0o700) -> None:
    """Create what is missing of ``directory``, each level ``mode`` (never writable by
    others than us) whatever the umask."""
    missing: list[Path] = []
    current = directory
    while not os.path.lexists(current):
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for level in reversed(missing):
        try:
            os.mkdir(level, mode)
        except FileExistsError:
            pass  # made meanwhile: the ownership checks below decide whether it is usable
        except OSError as exc:
            raise SocketPathError(
                f"cannot create the socket directory {level}: {exc.strerror or exc}; set "
                "agent.socket (or XDG_RUNTIME_DIR) to a directory this user owns"
            ) from None
        else:
            os.chmod(level, mode)


def _check_chain(directory: Path) -> None:
    """The socket directory is ours and closed to writes by others; no parent is a symlink
    or owned by another (non-root) user, who could rename the socket directory away."""
    me = os.geteuid()
    for level, is_socket_dir in [(directory, True)] + [(p, False) for p in directory.parents]:
        what = "socket directory" if is_socket_dir else "parent directory"
        try:
            info = os.lstat(level)
        except OSError as exc:
            raise SocketPathError(f"{what} {level}: {exc.strerror or exc}") from None
        if stat.S_ISLNK(info.st_mode):
            raise SocketPathError(f"{what} {level} is a symlink; refusing to use it")
        if not stat.S_ISDIR(info.st_mode):
            raise SocketPathError(f"{what} {level} is not a directory")
        mode = stat.S_IMODE(info.st_mode)
        if is_socket_dir:
            if info.st_uid != me:
                raise SocketPathError(
                    f"socket directory {level} is owned by uid {info.st_uid}, not by this "
                    f"process (uid {me}); refusing to use it (someone else may have made it)"
                )
            if mode & 0o022:
                raise SocketPathError(
                    f"socket directory {level} has mode {mode:04o}: others may write to it; "
                    "expected at most 0755 (the sidecar creates it 0700, or 0750 for a "
                    "group socket)"
                )
            continue
        if info.st_uid not in (me, 0):
            raise SocketPathError(
                f"parent directory {level} is owned by uid {info.st_uid}, who could replace "
                "the socket directory; refusing to use it"
            )
        # A root-owned shared parent (a pod's emptyDir) is trusted like root itself; one we
        # own must not let others rename inside it unless it is sticky.
        if info.st_uid == me != 0 and mode & 0o022 and not mode & stat.S_ISVTX:
            raise SocketPathError(
                f"parent directory {level} has mode {mode:04o}: others may rename the socket "
                "directory inside it; refusing to use it"
            )


async def open_unix_listener(path: Path, mode: int) -> trio.SocketListener:
    prepare_socket_path(path, mode)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(256)
    return trio.SocketListener(sock)


class AgentServer:
    """Accepts agent connections and hands each to ``handler`` in its own task.

    Limits across connections, not only per frame: at most ``max_sessions`` connections
    at once (more are closed at once and counted), ``handshake_timeout`` seconds for the
    WebSocket upgrade, ``max_buffered_bytes`` held in partial frames by all connections
    together, and an accept loop that waits out EMFILE instead of exiting."""

    def __init__(
        self,
        handler: ConnectionHandler,
        *,
        socket_path: str,
        socket_mode: int = 0o660,
        tcp: tuple[str, int] | None = None,
        max_frame_bytes: int = 16 * 1024 * 1024,
        max_sessions: int = 256,
        handshake_timeout: float = 10.0,
        max_buffered_bytes: int = 64 * 1024 * 1024,
        on_refused: RefusalCounter = lambda why: None,
    ) -> None:
        self.handler = handler
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.tcp = tcp
        self.max_frame_bytes = max_frame_bytes
        self.max_sessions = max_sessions
        self.handshake_timeout = handshake_timeout
        self.budget = FrameBudget(max_buffered_bytes)
        self.on_refused = on_refused
        self.tcp_port: int | None = None
        self.active = 0
        self.refused: dict[str, int] = {}
        self._ids = itertools.count(1)

    def _refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1
        self.on_refused(why)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners: list[tuple[trio.SocketListener, bool]] = [
            (await open_unix_listener(self.socket_path, self.socket_mode), False)
        ]
        if self.tcp is not None:
            for listener in await trio.open_tcp_listeners(self.tcp[1], host=self.tcp[0]):
                listeners.append((listener, True))
                self.tcp_port = listener.socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                for listener, over_tcp in listeners:
                    nursery.start_soon(self._accept_loop, listener, over_tcp)
                log.info("agents: listening on %s", self.socket_path)
                task_status.started()
        finally:
            self.socket_path.unlink(missing_ok=True)

    async def _accept_loop(self, listener: trio.SocketListener, over_tcp: bool) -> None:
        async with listener, trio.open_nursery() as nursery:
            pause = 0.05
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of descriptors or memory: the connections we hold are fine, and
                    # some will close. Back off and keep serving; never let this end us.
                    if exc.errno not in _CAPACITY_ERRNOS:
                        log.warning("agents: accept failed: %s", exc)
                    elif pause >= 0.8:
                        log.warning("agents: accept: %s; backing off %.1fs", exc, pause)
                    self._refuse("accept_" + (errno.errorcode.get(exc.errno or 0) or "error"))
                    await trio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                pause = 0.05
                if self.active >= self.max_sessions:
                    self._refuse("too_many_sessions")
                    await stream.aclose()
                    continue
                self.active += 1
                nursery.start_soon(self._serve, stream, over_tcp)

    async def _serve(self, stream: trio.abc.Stream, over_tcp: bool) -> None:
        conn_id = next(self._ids)
        budgeted = _BudgetedStream(stream, self.budget)
        self.budget.connections += 1
        try:
            async with budgeted, trio.open_nursery() as ws_nursery:
                with trio.move_on_after(self.handshake_timeout) as upgrade:
                    request = await wrap_server_stream(
                        ws_nursery,
                        budgeted,
                        message_queue_size=64,
                        max_message_size=self.max_frame_bytes,
                        receive_buffer_size=256 * 1024,
                    )
                    ws = await request.accept()
                if upgrade.cancelled_caught:
                    self._refuse("handshake_timeout")
                    ws_nursery.cancel_scope.cancel()
                    return
                budgeted.ws = ws
                try:
                    await self.handler(ws, conn_id, over_tcp)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await ws.aclose()
                ws_nursery.cancel_scope.cancel()
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("agent connection %d closed: %s", conn_id, exc)
        except OSError as exc:
            log.info("agent connection %d failed: %s", conn_id, exc)
        except Exception as exc:
            # The error boundary of one connection: whatever a client's bytes caused ends
            # that connection, never the accept loop and the daemon with it.
            if isinstance(exc, BaseExceptionGroup) and exc.split(_CLOSED)[1] is None:
                log.debug("agent connection %d closed: %s", conn_id, exc)
            else:
                log.exception("agent connection %d ended by an unexpected error", conn_id)
        finally:
            self.active -= 1
            self.budget.connections -= 1
            if budgeted.cut:
                self._refuse("frame_budget")
                log.warning("agent connection %d cut: partial frames over the budget", conn_id)
