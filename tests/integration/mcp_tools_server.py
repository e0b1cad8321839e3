"""A real MCP server for the tool-loop tests, written with ``mcp``'s server API.

``python mcp_tools_server.py`` serves over stdio (the gateway starts it as a child process);
``python mcp_tools_server.py --http`` binds 127.0.0.1 on a free port, prints ``PORT <n>`` and
serves streamable HTTP at ``/mcp`` until killed.
"""

from __future__ import annotations

import socket
import sys

import anyio
from mcp.server.mcpserver import MCPServer

server = MCPServer("lmgw-test-tools", log_level="WARNING")


@server.tool()
def lookup(key: str) -> str:
    """Look a key up in the test store."""
    return f"value-of-{key}"


@server.tool()
def explode(reason: str) -> str:
    """Always fails."""
    raise ValueError(f"exploded on {reason}")


@server.tool()
async def stall(seconds: float) -> str:
    """Sleeps (cancellable), then answers."""
    await anyio.sleep(seconds)
    return "woke up"


def serve_http() -> None:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(server.streamable_http_app(), log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    if "--http" in sys.argv:
        serve_http()
    else:
        server.run()
