"""The files of the Files API, in memory (sans-IO: the clock is passed in).

Bounded twice: one file's size and all files' bytes together (an upload that would not fit is
refused, never an older file dropped to make room); files expire ``retention_s`` after they
were made. A file belongs to the API key that made it (``owner``: its name, None without keys):
another key neither lists nor reads it, as if it did not exist.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass


class FileError(ValueError):
    """An upload the store cannot take: ``status`` 413 (too large) or 507 (the store is full)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class StoredFile:
    id: str
    owner: str | None
    filename: str
    purpose: str
    data: bytes
    created_at: float
    expires_at: float

    def describe(self) -> dict[str, object]:
        """The OpenAI file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": int(self.created_at),
            "expires_at": int(self.expires_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


class FileStore:
    """The files, by id."""

    def __init__(self, max_file_bytes: int, max_total_bytes: int, retention_s: float) -> None:
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self.retention_s = retention_s
        self._files: dict[str, StoredFile] = {}
        #: bytes held by all files
        self.total_bytes = 0

    def __iter__(self) -> Iterator[StoredFile]:
        return iter(list(self._files.values()))

    def add(self, owner: str | None, filename: str, purpose: str, data: bytes, now: float,
            *, upload: bool = True) -> StoredFile:  # fmt: skip
        """Keep a new file; FileError when it is too large (an ``upload``: the gateway's own
        output files are bounded by the store's total only) or the store is full."""
        self.expire(now)
        if upload and len(data) > self.max_file_bytes:
            raise FileError(
                413, f"the file has {len(data)} bytes; at most {self.max_file_bytes} are taken"
            )
        if self.total_bytes + len(data) > self.max_total_bytes:
            raise FileError(
                507,
                f"the gateway's file store is full ({self.total_bytes} of"
                f" {self.max_total_bytes} bytes); delete files or wait for them to expire",
            )
        f = StoredFile(
            "file-" + secrets.token_hex(12), owner, filename, purpose, data, now,
            now + self.retention_s,
        )  # fmt: skip
        self._files[f.id] = f
        self.total_bytes += len(data)
        return f

    def get(self, file_id: str, owner: str | None) -> StoredFile | None:
        """The file, if it exists and belongs to ``owner``."""
        f = self._files.get(file_id)
        return f if f is not None and f.owner == owner else None

    def owned(self, owner: str | None, purpose: str | None = None) -> list[StoredFile]:
        """``owner``'s files, newest first (of one ``purpose`` when given)."""
        mine = [f for f in self._files.values() if f.owner == owner]
        if purpose is not None:
            mine = [f for f in mine if f.purpose == purpose]
        return sorted(mine, key=lambda f: f.created_at, reverse=True)

    def delete(self, file_id: str, owner: str | None) -> bool:
        f = self.get(file_id, owner)
        if f is None:
            return False
        del self._files[file_id]
        self.total_bytes -= len(f.data)
        return True

    def expire(self, now: float) -> None:
        for f in [f for f in self._files.values() if f.expires_at <= now]:
            del self._files[f.id]
            self.total_bytes -= len(f.data)
