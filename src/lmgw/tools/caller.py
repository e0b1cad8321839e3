"""The gateway's tool caller: native tools and MCP servers behind one ``call(name, arguments)``.

Every outcome is a :class:`ToolResult` (text for the model's ``role: tool`` message): a tool
that raises, times out, is unknown, or gets arguments that are not a JSON object or do not fit
its schema gives an error result the model reads, never an exception for the request.
Cancellation (the client left, the request deadline) still cancels the call.

Resource handling: :meth:`ToolCaller.run` owns the MCP sessions (one task per server, in a
nursery that lives as long as the gateway). Synchronous native tools run in
``trio.to_thread.run_sync`` under one ``CapacityLimiter`` (``tools.threads``); a thread cannot
be interrupted, so a call that times out or is cancelled is abandoned and its thread keeps its
limiter slot until the function returns (a stuck tool can exhaust the pool; async tools can
be cancelled for real).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import msgspec
import trio

from ..config import ConfigError, ToolsConfig
from ..errors import DECODE_ERRORS
from ..metrics import Counter, Histogram, Metrics
from .mcp import MCPServer, MCPTool
from .registry import Tool

log = logging.getLogger("lmgw.tools")
_now = time.perf_counter
_TOOL_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 120.0)


class ToolResult(NamedTuple):
    content: str
    error: bool = False


class ToolCaller:
    """The tools a gateway can execute (see the module doc)."""

    def __init__(
        self, cfg: ToolsConfig, native: Mapping[str, Tool], metrics: Metrics | None = None
    ) -> None:
        self.native = dict(native)
        if cfg.mcp:
            try:
                import mcp  # noqa: F401 - imported by the sessions; checked here, at start
            except ImportError:
                raise ConfigError(
                    "MCP servers need the `mcp` package: pip install 'lmgw[mcp]'", path="tools.mcp"
                ) from None
        self.servers = [MCPServer(c, self._on_server_change) for c in cfg.mcp]
        self.limiter = trio.CapacityLimiter(cfg.threads)
        self._index: dict[str, Tool | tuple[MCPServer, MCPTool]] = dict(self.native)
        self._started = False
        self._clashes: list[str] = []
        self.calls = Counter(
            "lmgw_tool_calls_total",
            "Tool calls the gateway executed, by tool and outcome (ok, error, timeout, unknown;"
            " unknown names are counted as <unknown>).",
            ("tool", "outcome"),
        )
        self.duration = Histogram(
            "lmgw_tool_call_duration_seconds",
            "Time a tool call took in the gateway, by tool.",
            ("tool",),
            _TOOL_BUCKETS,
        )
        self.servers_up = None
        if metrics is not None:
            metrics.add(self.calls)
            metrics.add(self.duration)
            if self.servers:
                from ..metrics import Gauge

                self.servers_up = Gauge(
                    "lmgw_mcp_server_up",
                    "Whether the gateway holds a session with the MCP server (1) or not (0).",
                    ("server",),
                )
                for s in self.servers:
                    self.servers_up.set((s.name,), 0.0)
                metrics.add(self.servers_up)

    # -- what there is ---------------------------------------------------------------------------
    def _on_server_change(self, server: MCPServer) -> None:
        """Rebuild the name index: native tools first, then the servers in config order. A
        name taken twice fails the start (see :meth:`run`); later (a reconnect that brings a
        new name), the second one is left out and logged."""
        index: dict[str, Tool | tuple[MCPServer, MCPTool]] = dict(self.native)
        for s in self.servers:
            for name, t in s.tools.items():
                other = index.get(name)
                if other is not None:
                    where = "a native tool" if isinstance(other, Tool) else f"MCP {other[0].name!r}"
                    msg = f"MCP server {s.name!r}: tool {name!r} is also {where}"
                    if not self._started:
                        self._clashes.append(msg)
                    log.error("%s; left out", msg)
                    continue
                index[name] = (s, t)
        self._index = index
        if self.servers_up is not None:
            self.servers_up.set((server.name,), 1.0 if server.connected else 0.0)

    def names(self) -> set[str]:
        """Every tool that can be called now."""
        return set(self._index)

    def specs(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """OpenAI ``tools`` entries of ``names`` (None: all) that can be called now."""
        index = self._index
        wanted = index if names is None else names
        return [index[n].spec() if isinstance(index[n], Tool) else index[n][1].spec()
                for n in wanted if n in index]  # fmt: skip

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the MCP sessions until cancelled. Reports started once every server had its
        first try (concurrently; each bounded by its ``timeout_s``). Raises ConfigError when
        two servers (or a server and a native tool) offer one name at the start."""
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as starting:
                for server in self.servers:
                    starting.start_soon(nursery.start, server.run)
            self._started = True
            if self._clashes:
                nursery.cancel_scope.cancel()
            else:
                task_status.started()
        if self._clashes:
            raise ConfigError(
                "; ".join(self._clashes) + " (give a server a `prefix` to keep names apart)",
                path="tools.mcp",
            )

    def check_names(self, wanted: Iterable[str], where: str) -> None:
        """Raise ConfigError for a name in ``wanted`` that no tool has, unless an MCP server is
        down (its tools are unknown until it connects: then a warning)."""
        missing = sorted(set(wanted) - set(self._index))
        if not missing:
            return
        down = [s.name for s in self.servers if not s.connected]
        msg = f"{where}: no tool named {', '.join(map(repr, missing))}"
        if down:
            log.warning("%s (yet: MCP server %s not connected)", msg, ", ".join(down))
            return
        raise ConfigError(msg + f"; known: {', '.join(sorted(self._index)) or 'none'}")

    # -- calling --------------------------------------------------------------------------------
    async def call(
        self, name: str, arguments: str | Mapping[str, Any], timeout_s: float
    ) -> ToolResult:
        """Run one call within ``timeout_s``: always a result (see the module doc)."""
        entry = self._index.get(name)
        if entry is None:
            self.calls.inc(("<unknown>", "unknown"))  # names from a model: not a label
            known = ", ".join(sorted(self._index)) or "none"
            return ToolResult(f"Error: there is no tool named {name!r} (tools: {known})", True)
        if isinstance(arguments, str):
            try:
                args = msgspec.json.decode(arguments) if arguments.strip() else {}
            except DECODE_ERRORS as exc:
                self.calls.inc((name, "error"))
                return ToolResult(f"Error: the arguments are not valid JSON: {exc}", True)
        else:
            args = dict(arguments)
        if not isinstance(args, dict):
            self.calls.inc((name, "error"))
            return ToolResult("Error: the arguments must be a JSON object", True)
        t0 = _now()
        result: ToolResult | None = None
        with trio.move_on_after(timeout_s):
            if isinstance(entry, Tool):
                result = await self._native(entry, args)
            else:
                server, tool = entry
                text, failed = await server.call(tool, args)
                result = ToolResult(text, failed)
        self.duration.observe((name,), _now() - t0)
        if result is None:
            self.calls.inc((name, "timeout"))
            return ToolResult(f"Error: tool {name!r} timed out after {timeout_s:g} s", True)
        self.calls.inc((name, "error" if result.error else "ok"))
        return result

    async def _native(self, tool: Tool, args: dict[str, Any]) -> ToolResult:
        try:
            kwargs = tool.bind(args)
        except ValueError as exc:
            return ToolResult(f"Error: {exc}", True)
        try:
            if tool.is_async:
                value = await tool.fn(**kwargs)
            else:
                value = await trio.to_thread.run_sync(
                    partial(tool.fn, **kwargs), limiter=self.limiter, abandon_on_cancel=True
                )
        except Exception as exc:
            log.info("tool %s raised %s: %s", tool.name, type(exc).__name__, exc)
            return ToolResult(f"Error: {type(exc).__name__}: {exc}", True)
        return ToolResult(as_text(value))


def as_text(value: Any) -> str:
    """A tool's return value as message text: strings as they are, anything else as JSON
    (objects msgspec cannot encode as their ``str``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    try:
        return msgspec.json.encode(value, enc_hook=str).decode()
    except (TypeError, ValueError):
        return str(value)


def build_caller(
    cfg: ToolsConfig,
    extra: Sequence[Any] = (),
    metrics: Metrics | None = None,
) -> ToolCaller | None:
    """The gateway's tool caller, or None when it has no tools at all (no registered or
    entry-point tools, none given, no MCP server): then nothing of this runs per request."""
    from .registry import collect_tools

    native = collect_tools(extra, use_entry_points=cfg.entry_points)
    if not native and not cfg.mcp:
        return None
    return ToolCaller(cfg, native, metrics)
