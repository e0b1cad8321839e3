"""Test doubles shared by the unit tests."""

from __future__ import annotations

from typing import Any


class RecordingResponder:
    """A streaming responder that keeps every write (``end``'s data too, even empty)."""

    def __init__(self) -> None:
        self.started = False
        self.writes: list[bytes] = []

    async def start(self, status: int, headers: Any) -> None:
        self.started = True

    async def send(self, data: bytes) -> None:
        self.writes.append(data)

    async def end(self, data: bytes = b"") -> None:
        self.writes.append(data)
