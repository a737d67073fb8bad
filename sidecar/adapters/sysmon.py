"""Memory and CPU readings: the agent's process (pid from its handshake), the container's
cgroup when it sets a limit, the sidecar itself and the machine.

A reading runs every pressure interval, so it is kept cheap: the sidecar's own RSS comes
from one read of ``/proc/self/statm`` (no parsing of psutil's several files), its CPU time from
``os.times()``, the machine's total memory is read once, and psutil (which parses several
files per call) is left for the agents' processes and the machine's available memory when
the system is the source."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
STATM = "/proc/self/statm"


@dataclass(frozen=True, slots=True)
class MemorySample:
    used: int
    limit: int
    source: str  # "cgroup", "agent" or "system"
    agent_rss: int
    sidecar_rss: int
    cpu_ratio: float  # the sidecar's own CPU time per second of wall time (1.0 = one core)


log = logging.getLogger("sidecar.sysmon")


def cgroup_memory(root: Path = CGROUP_ROOT) -> tuple[int, int] | None:
    """(usage, limit) from cgroup v2 or v1, or None when no limit is set."""
    for current, limit in (
        (root / "memory.current", root / "memory.max"),
        (root / "memory" / "memory.usage_in_bytes", root / "memory" / "memory.limit_in_bytes"),
    ):
        try:
            raw_limit = limit.read_text().strip()
        except OSError:
            continue
        if raw_limit == "max" or not raw_limit.isdigit():
            return None
        value = int(raw_limit)
        # cgroup v1 reports "no limit" as a huge number near 2**63.
        if value >= 1 << 60:
            return None
        try:
            # Read only when a limit is set: without one the usage is not needed.
            used = int(current.read_text().strip())
        except (OSError, ValueError):
            continue
        return used, value
    return None


class SystemMonitor:
    def __init__(self, *, source: str = "auto", agent_limit_bytes: int = 0) -> None:
        self.source = source
        self.agent_limit_bytes = agent_limit_bytes
        self._me = psutil.Process(os.getpid())
        self._agents: dict[int, psutil.Process] = {}
        self._last: MemorySample | None = None
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        self._statm = os.path.exists(STATM)
        self._total_memory = psutil.virtual_memory().total
        self._cpu_before = (time.monotonic(), _cpu_seconds())

    def _agent_rss(self, pids: list[int]) -> int:
        total = 0
        for pid in pids:
            proc = self._agents.get(pid)
            try:
                if proc is None:
                    proc = self._agents[pid] = psutil.Process(pid)
                total += proc.memory_info().rss
            except (psutil.Error, OSError, ValueError, OverflowError):
                # A pid from an agent's hello is only a claim: gone, foreign or nonsense.
                self._agents.pop(pid, None)
        return total

    def sample(self, agent_pids: list[int]) -> MemorySample:
        """A reading; while the system refuses one (out of descriptors: EMFILE opening
        /proc), the previous reading stands in rather than stopping the monitor."""
        try:
            self._last = self._sample(agent_pids)
        except (psutil.Error, OSError) as exc:
            if self._last is None:
                raise
            log.warning("memory reading failed (%s); using the previous one", exc)
        return self._last

    def _sample(self, agent_pids: list[int]) -> MemorySample:
        agent_rss = self._agent_rss(agent_pids)
        sidecar_rss = self._own_rss()
        cpu = self._cpu_ratio()
        cgroup = cgroup_memory() if self.source in ("auto", "cgroup") else None
        if cgroup is not None:
            used, limit, source = cgroup[0], cgroup[1], "cgroup"
        elif self.source in ("auto", "agent") and agent_pids:
            used, limit, source = agent_rss, self.agent_limit_bytes or self._total_memory, "agent"
        else:
            vm = psutil.virtual_memory()
            used, limit, source = vm.total - vm.available, vm.total, "system"
        return MemorySample(used, limit, source, agent_rss, sidecar_rss, cpu)

    def _own_rss(self) -> int:
        if self._statm:
            try:
                fd = os.open(STATM, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    # statm: size resident shared ..., in pages
                    return int(os.read(fd, 128).split()[1]) * self._page_size
                finally:
                    os.close(fd)
            except (ValueError, IndexError):
                self._statm = False  # not the format this reads: psutil from now on
        return int(self._me.memory_info().rss)

    def _cpu_ratio(self) -> float:
        """The sidecar's CPU seconds per wall second since the previous reading."""
        now, cpu = time.monotonic(), _cpu_seconds()
        before_wall, before_cpu = self._cpu_before
        self._cpu_before = (now, cpu)
        elapsed = now - before_wall
        return max(0.0, (cpu - before_cpu) / elapsed) if elapsed > 0 else 0.0


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system
