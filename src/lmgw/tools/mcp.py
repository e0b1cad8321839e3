"""MCP servers whose tools the gateway calls (``[[tools.mcp]]``), through the ``mcp`` package.

One :class:`MCPServer` per configured server: a task owned by the gateway (in the tool caller's
nursery) opens the session, a child process over stdio (``command``) or a streamable-HTTP
connection (``url``), lists the tools and holds the session until the gateway stops. ``mcp`` runs
on anyio, so the session lives in the gateway's trio loop; its own tasks stay inside the owner
task's ``async with``.

Error handling: a server that cannot be reached at start (spawn failure, handshake error, no
answer within ``timeout_s``) does not stop the gateway: it is logged and retried with a doubling
pause (1 s to 60 s), and its tools are simply not offered meanwhile. A session that breaks (the
process died, the connection dropped) is noticed by the call that fails, which becomes an error
result for the model, and the owner reconnects. A tool error the server reports (``isError``)
is a result, not an exception.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any, NamedTuple

import msgspec
import trio

from ..config import MCPServerConfig

log = logging.getLogger("lmgw.tools")

#: pages of tools/list read at most (a server whose cursor never ends cannot hang the start)
_MAX_PAGES = 100
_RETRY_MIN_S = 1.0
_RETRY_MAX_S = 60.0


class MCPTool(NamedTuple):
    """A tool of an MCP server as the gateway offers it."""

    name: str  #: the name the model calls (the server's, after ``prefix``)
    remote: str  #: the server's name for it
    description: str
    parameters: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


def result_text(result: Any) -> tuple[str, bool]:
    """An MCP ``CallToolResult`` as the tool message's text, and whether it is an error: the
    text parts joined by newlines (other parts as ``[image/png]``-style placeholders), or the
    structured content as JSON when there is no text."""
    parts: list[str] = []
    for item in getattr(result, "content", None) or ():
        kind = getattr(item, "type", "")
        if kind == "text":
            parts.append(item.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {getattr(item, 'mime_type', '') or ''}]".replace(" ]", "]"))
        elif kind == "resource":
            resource = getattr(item, "resource", None)
            text = getattr(resource, "text", None)
            parts.append(text if isinstance(text, str) else f"[resource {resource.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource {getattr(item, 'uri', '')}]")
        else:
            parts.append(f"[{kind or 'content'}]")
    structured = getattr(result, "structured_content", None)
    if not parts and structured is not None:
        parts.append(msgspec.json.encode(structured).decode())
    text = "\n".join(parts)
    failed = bool(getattr(result, "is_error", False))
    if failed and not text.lower().startswith("error"):
        text = f"Error: {text}"
    return text, failed


class MCPServer:
    """One configured MCP server: its session (while connected) and its tools."""

    def __init__(
        self, cfg: MCPServerConfig, on_change: Callable[[MCPServer], None] = lambda s: None
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.on_change = on_change
        #: the tools while connected, by the name the model calls
        self.tools: dict[str, MCPTool] = {}
        #: why the server is not connected (None while it is)
        self.error: str | None = "not started"
        self.connects = 0
        self._client: Any = None
        self._lost = trio.Event()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def __repr__(self) -> str:
        state = "connected" if self.connected else f"down ({self.error})"
        return f"<MCPServer {self.name} {state} tools={len(self.tools)}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the session until cancelled, reconnecting when it breaks. Reports started after
        the first attempt, whether it connected or not (the start never waits past
        ``timeout_s``)."""
        reported = False
        delay = _RETRY_MIN_S
        while True:
            try:
                # the deadline bounds connecting and listing; lifted once connected (a scope
                # around the whole session: mcp's task groups must nest inside it)
                with trio.CancelScope(deadline=trio.current_time() + self.cfg.timeout_s) as scope:
                    async with AsyncExitStack() as stack:
                        client = await self._connect(stack)
                        tools = await self._list(client)
                        scope.deadline = math.inf
                        await self._hold(client, tools, task_status if not reported else None)
                        reported = True
                        delay = _RETRY_MIN_S
                        await self._lost.wait()
                        log.warning("MCP server %s: session lost (%s); reconnecting", self.name,
                                    self.error)  # fmt: skip
                if scope.cancelled_caught:
                    self.error = f"no answer within {self.cfg.timeout_s:g} s"
            except Exception as exc:  # spawn, handshake, transport: retried below
                self.error = _describe(exc)
                log.debug("MCP server %s", self.name, exc_info=True)
            except BaseExceptionGroup as group:
                # Cancelled (the gateway stopping) together with a transport error raised by
                # the mcp client's tasks as they were torn down: the cancellation is what
                # happened; the error must not escape and fail the gateway's shutdown.
                cancelled, _ = group.split(trio.Cancelled)
                if cancelled is None:
                    raise
                raise cancelled from None
            finally:
                was = self._client is not None
                self._client = None
                self.tools = {}
                if was:
                    self.on_change(self)
            log.warning("MCP server %s: unavailable (%s); retrying in %g s", self.name,
                        self.error, delay)  # fmt: skip
            if not reported:
                reported = True
                task_status.started()
            await trio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)

    async def _hold(
        self, client: Any, tools: dict[str, MCPTool], task_status: trio.TaskStatus[None] | None
    ) -> None:
        """Publish a new session and its tools."""
        self._client, self.tools, self.error = client, tools, None
        self._lost = trio.Event()
        self.connects += 1
        log.info("MCP server %s: connected, %d tools", self.name, len(tools))
        self.on_change(self)
        if task_status is not None:
            task_status.started()
        await trio.lowlevel.checkpoint()

    async def _connect(self, stack: AsyncExitStack) -> Any:
        from mcp import Client, StdioServerParameters

        cfg = self.cfg
        if cfg.url is not None:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            http = await stack.enter_async_context(
                httpx2.AsyncClient(
                    headers=dict(cfg.headers), timeout=httpx2.Timeout(30.0, read=300.0)
                )
            )
            server: Any = streamable_http_client(cfg.url, http_client=http)
        else:
            server = StdioServerParameters(
                command=cfg.command[0], args=list(cfg.command[1:]), env=dict(cfg.env) or None,
                cwd=cfg.cwd,
            )  # fmt: skip
        return await stack.enter_async_context(Client(server, cache=None))

    async def _list(self, client: Any) -> dict[str, MCPTool]:
        prefix = self.cfg.prefix
        tools: dict[str, MCPTool] = {}
        cursor = None
        for _ in range(_MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            for t in page.tools:
                schema = t.input_schema if isinstance(t.input_schema, dict) else {}
                name = prefix + t.name
                tools[name] = MCPTool(name, t.name, t.description or "", dict(schema))
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    async def call(self, tool: MCPTool, arguments: dict[str, Any]) -> tuple[str, bool]:
        """Call ``tool``: (the result's text, whether it is an error). Never raises but for
        cancellation: a server that is down, a protocol error or a broken session is an error
        result (a broken session also makes the owner reconnect)."""
        client = self._client
        if client is None:
            return f"MCP server {self.name!r} is unavailable: {self.error}", True
        from mcp import MCPError

        try:
            result = await client.call_tool(tool.remote, arguments)
        except MCPError as exc:
            return f"MCP server {self.name!r}: {exc}", True
        except Exception as exc:  # the transport: the session is gone
            if self._client is client:
                self.error = _describe(exc)
                self._lost.set()
            return f"MCP server {self.name!r} failed: {_describe(exc)}", True
        return result_text(result)


def _describe(exc: BaseException) -> str:
    """A short text for an exception, looking inside exception groups (anyio task groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
