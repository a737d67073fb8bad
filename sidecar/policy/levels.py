"""The four levels the seed uses for both memory pressure and queue depth."""

from __future__ import annotations

import enum


class Level(enum.IntEnum):
    NORMAL = 0
    WARNING = 1
    CRITICAL = 2
    EMERGENCY = 3

    @property
    def label(self) -> str:
        """The name ("WARNING"); ``str()`` of an IntEnum gives the number."""
        return self.name
