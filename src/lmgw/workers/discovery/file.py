"""Workers listed in a watched file: TOML ``[[workers]]`` (or JSON ``{"workers": [...]}``).

The file has the ``[[workers]]`` shape of the main config and is validated by the same code, so
its errors read the same (``config error at `workers[1].role` in file `fleet.toml`: ...``). It
is polled every ``interval_s`` with ``stat`` (mtime, ctime, size, inode); a file modified within
the last two seconds is also re-read and compared byte for byte, because a rewrite within one
timestamp tick can keep every stat field the same (git's "racily clean" problem).

Failure rules: at start-up a missing (unless ``missing_ok``), unreadable or invalid file is a
:class:`ConfigError`, so a wrong path or a typo stops ``lmgw serve`` at once. Afterwards a file
that fails to parse or cannot be read keeps the previous workers (a typo never drops the fleet)
and is logged once per change; a deleted file keeps them too, unless ``missing_ok``, where it
means "no workers". The file is small and local, so it is read synchronously on the trio thread:
a ``stat`` and a few-KiB read cost microseconds, less than a hop to a worker thread.
"""

from __future__ import annotations

import logging
import os
import time
import tomllib
from typing import NamedTuple

import msgspec
import trio

from ...config import ConfigError, WorkerConfig, config_from_mapping, loads_config
from .sink import FleetSink, SourceSync

__all__ = ["WatchedFile", "parse_workers_file", "run_file_discovery"]

log = logging.getLogger("lmgw.workers.discovery")

MAX_FILE_BYTES = 16 << 20
"""A fleet of thousands of workers is well under a megabyte; more is not a worker list."""
RACY_S = 2.0
"""Re-read a file modified this recently even when stat says nothing changed."""


def parse_workers_file(data: bytes, path: str) -> list[WorkerConfig]:
    """The workers a file lists (TOML, or JSON when ``path`` ends in ``.json``).

    Raises:
        ConfigError: syntax, a key other than ``workers``, or a bad worker (same messages as the
            main config's ``[[workers]]``, with the file as the source).
    """
    source = f"in file `{path}`"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: {e}", source=source) from None
    try:
        if path.lower().endswith(".json"):
            try:
                doc = msgspec.json.decode(text)
            except (msgspec.DecodeError, UnicodeDecodeError) as e:  # (RecursionError: below)
                raise ConfigError(f"JSON syntax error: {e}", source=source) from None
            if not isinstance(doc, dict):
                raise ConfigError('expected an object like {"workers": [...]}', source=source)
            _only_workers(doc, source)
            return config_from_mapping({"workers": doc.get("workers", [])}, source=source).workers
        cfg = loads_config(text, source=source)  # TOML syntax and worker errors, as for config
        _only_workers(tomllib.loads(text), source)
        return cfg.workers
    except RecursionError:  # both parsers recurse on nesting; a worker list is two levels deep
        raise ConfigError("nested too deeply to be a worker list", source=source) from None


def _only_workers(doc: dict, source: str) -> None:
    extra = sorted(k for k in doc if k != "workers")
    if extra:
        raise ConfigError(
            f"unknown top-level key `{extra[0]}` (a discovery file holds only `workers`)",
            source=source,
        )


class _Sig(NamedTuple):
    mtime_ns: int
    ctime_ns: int
    size: int
    ino: int
    dev: int


_UNSEEN = _Sig(-1, -1, -1, -1, -1)


class WatchedFile:
    """The file's current worker list, re-read when it changes. Only the file I/O, no trio.

    ``load()`` is the strict first read; ``check()`` is one poll that never raises.
    """

    def __init__(self, path: str, *, missing_ok: bool = False) -> None:
        self.path = path
        self.missing_ok = missing_ok
        #: the last good list (what the gateway has); None before the first good read
        self.workers: list[WorkerConfig] | None = None
        #: why the file's current state is not applied (None: it is)
        self.error: str | None = None
        self._sig: _Sig | None = _UNSEEN  # None: the file was missing
        self._data: bytes | None = None

    def _stat(self) -> _Sig | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return _Sig(st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)

    def _read(self) -> bytes:
        with open(self.path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise OSError(f"larger than {MAX_FILE_BYTES} bytes")
        return data

    def load(self) -> list[WorkerConfig]:
        """The first read. Raises ConfigError for a missing (unless ``missing_ok``), unreadable
        or invalid file."""
        try:
            sig = self._stat()
            data = self._read() if sig is not None else None
        except OSError as e:
            raise ConfigError(
                f"cannot read the discovery file `{self.path}`: {e.strerror or e}",
                path="discovery.file",
            ) from None
        if data is None:
            if not self.missing_ok:
                raise ConfigError(
                    f"the discovery file `{self.path}` does not exist (set"
                    " `discovery.file_missing_ok = true` to start without it)",
                    path="discovery.file",
                )
            workers: list[WorkerConfig] = []
        else:
            workers = parse_workers_file(data, self.path)
        self._sig, self._data, self.workers = sig, data, workers
        return workers

    def check(self, now: float | None = None) -> list[WorkerConfig] | None:
        """One poll: the new list when the applied one should change, else None.

        ``now`` is the wall clock (``time.time()``), compared with the file's mtime.
        """
        now = time.time() if now is None else now
        try:
            sig = self._stat()
            if sig == self._sig and (sig is None or now - sig.mtime_ns / 1e9 > RACY_S):
                return None
            self._sig = sig
            if sig is None:
                return self._missing()
            data = self._read()
        except OSError as e:
            self._sig = _UNSEEN  # try again next time
            return self._fail(f"cannot read the discovery file `{self.path}`: {e.strerror or e}")
        if data == self._data:
            return None
        self._data = data
        try:
            workers = parse_workers_file(data, self.path)
        except ConfigError as e:
            self.error = None  # new contents: report even if worded as before
            return self._fail(str(e))
        self.error = None
        if workers == self.workers:
            return None  # e.g. only a comment changed
        self.workers = workers
        return workers

    def _missing(self) -> list[WorkerConfig] | None:
        self._data = None
        if not self.missing_ok:
            return self._fail(f"the discovery file `{self.path}` is missing")
        self.error = None
        if self.workers == []:
            return None
        log.warning("discovery file `%s` is gone: its workers leave (missing_ok)", self.path)
        self.workers = []
        return []

    def _fail(self, why: str) -> None:
        if why != self.error:
            n = len(self.workers or ())
            log.error("%s; keeping the %d worker(s) it listed before", why, n)
            self.error = why
        return None


async def run_file_discovery(
    sink: FleetSink,
    path: str,
    *,
    interval_s: float = 1.0,
    missing_ok: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep source ``file:<path>`` equal to the file's workers until cancelled; started once
    the first read is applied (a bad file at that point raises ConfigError instead)."""
    watch = WatchedFile(path, missing_ok=missing_ok)
    sync = SourceSync(sink, f"file:{path}")
    sync.update(watch.load())
    log.info(
        "discovery file `%s`: %d worker(s), polled every %g s",
        path,
        len(sync.workers or ()),
        interval_s,
    )
    task_status.started()
    while True:
        await trio.sleep(interval_s)
        sync.update(watch.check())
