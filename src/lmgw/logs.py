"""Log output: plain text or JSON lines, request ids in every record about a request, and the
sampled access log.

Records about a request carry its id as ``extra={"request_id": ...}`` (the pipeline's warnings,
the access log); the JSON formatter writes every such extra field as a key of its own, so a log
shipper can join the gateway's lines with the workers' (they get the same id as
``X-Request-Id``). Nothing here runs per request unless the access log is on.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from typing import Any

import msgspec

#: LogRecord attributes that are not "extra" fields
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)
_encode = msgspec.json.Encoder().encode


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (RFC 3339, UTC, ms), ``level``, ``logger``, ``msg``,
    every extra field (``request_id``, ``worker``, ...), and ``exc`` for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encode(out).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message [request_id=...]``: the request id appended when known."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request_id={rid}]" if rid and rid not in line else line


def setup_logging(level: str = "info", json_lines: bool = False) -> None:
    """Configure the root logger once for a process (``lmgw serve``, ``lmgw simulate``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


access_log = logging.getLogger("lmgw.access")


class AccessLog:
    """One record per finished generation request on ``lmgw.access`` (INFO): every error
    (status >= 400) and a ``sample`` share of the rest. Built only when ``logging.access_log``
    is on; the API holds None otherwise, so the hot path pays one ``is None`` test."""

    __slots__ = ("_random", "sample")

    def __init__(self, sample: float = 1.0) -> None:
        self.sample = sample
        self._random = random.random

    def record(
        self,
        client: str,
        method: str,
        path: str,
        status: int,
        request_id: str,
        model: str,
        flow: str,
        duration_s: float,
    ) -> None:
        if status < 400 and (self.sample <= 0.0 or self._random() >= self.sample):
            return
        access_log.info(
            '%s "%s %s" %d %.1fms model=%s',
            client,
            method,
            path,
            status,
            duration_s * 1000.0,
            model,
            extra={
                "request_id": request_id,
                "client": client,
                "method": method,
                "path": path,
                "status": status,
                "model": model,
                "flow": flow,
                "duration_ms": round(duration_s * 1000.0, 3),
            },
        )
