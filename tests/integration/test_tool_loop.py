"""The gateway-side tool loop end to end: a simulated worker writes hermes calls, the gateway
parses them, runs its tools (native Python functions and real MCP server processes, stdio and
streamable HTTP) and generates again; the simulated model's answer after tool results quotes
them, so a result in the final answer proves it reached the model. Driven with the official
``openai`` client, streamed and not."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from gateway_support import MODEL, http_request, open_stream, request_bytes

import lmgw
from lmgw.config import (
    GatewayConfig,
    HealthConfig,
    MCPServerConfig,
    ModelConfig,
    RoutingConfig,
    ServerConfig,
    ToolLoopConfig,
    ToolsConfig,
    WorkerConfig,
)
from lmgw.gateway import Gateway
from lmgw.tools.loop import MESSAGES_FIELD

pytestmark = pytest.mark.usefixtures("hard_deadline")

MCP_SERVER = Path(__file__).with_name("mcp_tools_server.py")
ASK_WEATHER = [{"role": "user", "content": "What is the weather? use get_weather"}]


def get_weather(city: str, days: int = 1) -> dict[str, Any]:
    """The forecast of a city.

    Args:
        city: the city's name
        days: how many days ahead
    """
    return {"city": city, "forecast": f"sunny-in-{city}", "days": days}


async def start(
    nursery: trio.Nursery,
    sim_worker,
    *,
    tools: list = (),  # type: ignore[assignment]
    loop: ToolLoopConfig | None = ToolLoopConfig(),  # noqa: B008 - frozen
    server: str = "native",
    model: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    **tools_cfg: Any,
) -> tuple[str, Gateway, Any]:
    sim = await sim_worker(model=MODEL, speed=math.inf)
    cfg = GatewayConfig(
        server=ServerConfig(port=0, graceful_shutdown_s=1.0, server=server),  # type: ignore[arg-type]
        health=HealthConfig(interval_s=30),
        models=[ModelConfig(name=MODEL, tool_parser="hermes", tool_loop=loop, **(model or {}))],
        routing=RoutingConfig(**(routing or {})),
        workers=[WorkerConfig(url=sim.url, role="pd")],
        tools=ToolsConfig(entry_points=False, **tools_cfg),
    )
    gw = Gateway(cfg, tools=tools)
    with trio.fail_after(15):
        port = await nursery.start(gw.run)
    return f"http://127.0.0.1:{port}", gw, sim


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)


def ask(url: str, messages: list, **extra: Any) -> Any:
    return client_for(url).chat.completions.create(model=MODEL, messages=messages, **extra)


def ask_stream(url: str, messages: list, **extra: Any) -> dict[str, Any]:
    """A streamed answer, gathered: content, tool-call deltas, progress messages, the finish
    reason and the usage chunk."""
    out: dict[str, Any] = {"content": "", "tool_calls": [], "progress": [], "finish": None,
                           "usage": None, "ids": set()}  # fmt: skip
    stream = client_for(url).chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True},
        **extra,
    )  # fmt: skip
    for chunk in stream:
        out["ids"].add(chunk.id)
        extra_fields = chunk.model_extra or {}
        out["progress"] += extra_fields.get(MESSAGES_FIELD) or []
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for ch in chunk.choices:
            out["content"] += ch.delta.content or ""
            out["tool_calls"] += ch.delta.tool_calls or []
            out["finish"] = ch.finish_reason or out["finish"]
    return out


async def post(url: str, **body: Any) -> Any:
    """A raw chat request (the weather question unless ``messages`` is given)."""
    body = {"model": MODEL, "messages": ASK_WEATHER, **body}
    return await http_request(url, "POST", "/v1/chat/completions", body)


async def test_a_native_tool_runs_in_the_loop(nursery: trio.Nursery, sim_worker) -> None:
    seen: list[dict[str, Any]] = []

    def weather(city: str, days: int = 1) -> dict[str, Any]:
        seen.append({"city": city, "days": days})
        return get_weather(city, days)

    weather.__name__ = "get_weather"
    url, gw, sim = await start(nursery, sim_worker, tools=[weather])
    stats = sim.sim.engine.stats

    before = (stats.prompt_tokens, stats.generation_tokens, stats.requests_total)
    r = await trio.to_thread.run_sync(ask, url, ASK_WEATHER)
    (call,) = seen
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and not msg.tool_calls
    assert msg.content.startswith("Tool results: ")
    assert f"sunny-in-{call['city']}" in msg.content  # the result reached the model
    assistant, result = r.model_extra[MESSAGES_FIELD]
    assert assistant["tool_calls"][0]["function"]["name"] == "get_weather"
    assert result["role"] == "tool" and result["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert f"sunny-in-{call['city']}" in result["content"]
    # usage sums the two rounds the worker ran
    assert stats.requests_total - before[2] == 2
    assert r.usage.prompt_tokens == stats.prompt_tokens - before[0]
    assert r.usage.completion_tokens == stats.generation_tokens - before[1]

    before = (stats.prompt_tokens, stats.generation_tokens)
    s = await trio.to_thread.run_sync(ask_stream, url, ASK_WEATHER)
    assert len(seen) == 2 and s["finish"] == "stop"
    assert s["tool_calls"] == []  # the gateway's calls are not the client's to run
    assert f"sunny-in-{seen[1]['city']}" in s["content"] and s["content"].startswith("Tool")
    assert [m["role"] for m in s["progress"]] == ["assistant", "tool"]
    assert len(s["ids"]) == 1  # one stream id across the rounds
    assert s["usage"].prompt_tokens == stats.prompt_tokens - before[0]
    assert s["usage"].completion_tokens == stats.generation_tokens - before[1]
    metrics = gw.metrics.render().decode()
    assert 'lmgw_tool_calls_total{tool="get_weather",outcome="ok"} 2' in metrics


async def test_rounds_get_the_context_check_and_routing_keys(
    nursery: trio.Nursery, sim_worker
) -> None:
    """With a gateway tokenizer each round is checked against the context (max_tokens filled
    in per round) and routed on its own prompt tokens."""
    from lmgw.simulators.model_files import default_model_dir

    url, gw, sim = await start(
        nursery, sim_worker, tools=[get_weather],
        model={"tokenizer": str(default_model_dir())}, routing={"policy": "cache_aware"},
    )  # fmt: skip
    assert gw.pipeline.route_keys
    stats = sim.sim.engine.stats
    before = (stats.prompt_tokens, stats.requests_total)
    r = await trio.to_thread.run_sync(ask, url, ASK_WEATHER)
    assert "sunny-in-" in r.choices[0].message.content
    assert stats.requests_total - before[1] == 2
    assert r.usage.prompt_tokens == stats.prompt_tokens - before[0]
    s = await trio.to_thread.run_sync(ask_stream, url, ASK_WEATHER)
    assert "sunny-in-" in s["content"] and s["finish"] == "stop"
    long = [{"role": "user", "content": "use get_weather " + "word " * 40000}]
    r = await post(url, messages=long)
    assert r.status == 400 and "context" in r.json()["error"]["message"]


async def test_tool_errors_and_timeouts_are_results_the_model_reads(
    nursery: trio.Nursery, sim_worker
) -> None:
    def broken() -> str:
        raise RuntimeError("disk on fire")

    async def slow() -> str:
        await trio.sleep_forever()
        return "never"

    url, _, _ = await start(
        nursery, sim_worker, tools=[broken, slow], loop=ToolLoopConfig(timeout_s=0.2)
    )
    r = await trio.to_thread.run_sync(ask, url, [{"role": "user", "content": "try broken"}])
    assert "Error: RuntimeError: disk on fire" in r.choices[0].message.content
    s = await trio.to_thread.run_sync(ask_stream, url, [{"role": "user", "content": "try slow"}])
    assert "Error: tool 'slow' timed out after 0.2 s" in s["content"]
    assert s["progress"][1]["content"].startswith("Error: tool 'slow' timed out")


async def test_max_rounds_bounds_the_loop(nursery: trio.Nursery, sim_worker) -> None:
    count = 0

    def tick() -> int:
        nonlocal count
        count += 1
        return count

    url, _, _ = await start(nursery, sim_worker, tools=[tick], loop=ToolLoopConfig(max_rounds=3))
    hi = [{"role": "user", "content": "hi"}]
    # "required": the model calls a tool every time it may; the limit ends the loop
    r = await trio.to_thread.run_sync(lambda: ask(url, hi, tool_choice="required"))
    assert count == 3 and r.choices[0].message.content == "Tool results: 3"
    assert len(r.model_extra[MESSAGES_FIELD]) == 6
    # a request may lower the limit, never raise it
    r = await trio.to_thread.run_sync(
        lambda: ask(
            url, hi, tool_choice="required", extra_body={"lmgw_tool_loop": {"max_rounds": 1}}
        )
    )
    assert count == 4 and r.choices[0].message.content == "Tool results: 4"
    s = await trio.to_thread.run_sync(
        lambda: ask_stream(url, hi, tool_choice="required",
                           extra_body={"lmgw_tool_loop": {"max_rounds": 9}})
    )  # fmt: skip
    assert count == 7 and s["content"] == "Tool results: 7" and len(s["progress"]) == 6


async def test_the_loop_per_request(nursery: trio.Nursery, sim_worker) -> None:
    url, _, _ = await start(nursery, sim_worker, tools=[get_weather], loop=None)
    plain = await trio.to_thread.run_sync(ask, url, ASK_WEATHER)
    assert not plain.choices[0].message.content.startswith("Tool results")  # no tools offered
    on = await trio.to_thread.run_sync(
        lambda: ask(url, ASK_WEATHER, extra_body={"lmgw_tool_loop": True})
    )
    assert "sunny-in-" in on.choices[0].message.content
    restricted = await trio.to_thread.run_sync(
        lambda: ask(url, ASK_WEATHER, extra_body={"lmgw_tool_loop": {"tools": []}})
    )
    assert not restricted.choices[0].message.content.startswith("Tool results")
    for bad in ("yes", {"max_rounds": 0}, {"tools": ["nope"]}, {"rounds": 2}, {"timeout_s": -1}):
        r = await post(url, lmgw_tool_loop=bad)
        assert r.status == 400 and r.json()["error"]["param"] == "lmgw_tool_loop", (bad, r.body)
    r = await post(url, n=2, lmgw_tool_loop=True)
    assert r.status == 400 and "n = 1" in r.json()["error"]["message"]


async def test_a_model_loop_can_be_turned_off_or_kept_from_requests(
    nursery: trio.Nursery, sim_worker
) -> None:
    url, _, _ = await start(nursery, sim_worker, tools=[get_weather], per_request=False,
                            loop=ToolLoopConfig(enabled=False))  # fmt: skip
    r = await post(url, lmgw_tool_loop=True)
    assert r.status == 400 and "per_request" in r.json()["error"]["message"]
    off = await post(url, lmgw_tool_loop=False)
    assert off.status == 200 and "sunny" not in off.body.decode()


async def test_client_tools_go_back_to_the_client(nursery: trio.Nursery, sim_worker) -> None:
    ran: list[str] = []

    def get_weather_logged(city: str) -> str:
        ran.append(city)
        return "sunny"

    get_weather_logged.__name__ = "get_weather"
    url, _, _ = await start(nursery, sim_worker, tools=[get_weather_logged])
    mine = [
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "parameters": {
                    "type": "object",
                    "properties": {"zone": {"type": "string"}},
                    "required": ["zone"],
                },
            },
        }
    ]
    messages = [{"role": "user", "content": "use get_time please"}]
    r = await trio.to_thread.run_sync(lambda: ask(url, messages, tools=mine))
    assert r.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]
    assert MESSAGES_FIELD not in (r.model_extra or {})
    s = await trio.to_thread.run_sync(lambda: ask_stream(url, messages, tools=mine))
    assert s["finish"] == "tool_calls" and s["progress"] == []
    assert {tc.index for tc in s["tool_calls"]} == {0}
    assert s["tool_calls"][0].function.name == "get_time"
    assert ran == []


@pytest.mark.parametrize("server", ["native", "hypercorn"])
async def test_keep_alive_comments_while_tools_run(
    nursery: trio.Nursery, sim_worker, server: str
) -> None:
    async def slow_lookup() -> str:
        await trio.sleep(0.35)
        return "found it"

    url, _, _ = await start(
        nursery, sim_worker, tools=[slow_lookup], keepalive_s=0.1, server=server
    )
    body = {"model": MODEL, "stream": True,
            "messages": [{"role": "user", "content": "do slow_lookup"}]}  # fmt: skip
    r = await http_request(url, "POST", "/v1/chat/completions", body)
    assert r.status == 200 and r.body.endswith(b"data: [DONE]\n\n")
    blocks = r.body[:-2].split(b"\n\n")
    assert blocks.count(b": keep-alive") >= 2
    assert all(b.startswith((b"data: ", b": keep-alive")) for b in blocks)
    assert b"found it" in r.body


async def test_a_client_that_leaves_cancels_running_tools(
    nursery: trio.Nursery, sim_worker
) -> None:
    started, cancelled = trio.Event(), trio.Event()

    async def wait_forever() -> str:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        return ""

    url, _, _ = await start(nursery, sim_worker, tools=[wait_forever])
    body = {"model": MODEL, "stream": True,
            "messages": [{"role": "user", "content": "call wait_forever"}]}  # fmt: skip
    stream = await open_stream(url)
    await stream.send_all(request_bytes(url, "POST", "/v1/chat/completions", body))
    with trio.fail_after(5):
        await started.wait()
    await stream.aclose()
    with trio.fail_after(5):
        await cancelled.wait()


async def test_mcp_servers_stdio_and_http(nursery: trio.Nursery, sim_worker) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(MCP_SERVER), "--http"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert line.startswith("PORT "), line
        http_url = f"http://127.0.0.1:{int(line.split()[1])}/mcp"
        mcp = [
            MCPServerConfig(name="local", command=[sys.executable, str(MCP_SERVER)], prefix="s_"),
            MCPServerConfig(name="remote", url=http_url, prefix="h_"),
            MCPServerConfig(name="gone", url="http://127.0.0.1:9/mcp", timeout_s=2),
        ]
        url, gw, _ = await start(nursery, sim_worker, mcp=mcp, loop=ToolLoopConfig(timeout_s=5))
        assert {"s_lookup", "h_lookup", "s_explode", "h_stall"} <= gw.tools.names()
        r = await trio.to_thread.run_sync(
            ask, url, [{"role": "user", "content": "please s_lookup it"}]
        )
        assistant, result = r.model_extra[MESSAGES_FIELD]
        key = __import__("json").loads(assistant["tool_calls"][0]["function"]["arguments"])["key"]
        assert result["content"] == f"value-of-{key}"
        assert r.choices[0].message.content == f"Tool results: value-of-{key}"
        s = await trio.to_thread.run_sync(
            ask_stream, url, [{"role": "user", "content": "please h_lookup it"}]
        )
        assert s["content"].startswith("Tool results: value-of-") and s["finish"] == "stop"
        # an MCP tool that fails: the model reads the server's error
        r = await trio.to_thread.run_sync(ask, url, [{"role": "user", "content": "now h_explode"}])
        assert r.model_extra[MESSAGES_FIELD][1]["content"].startswith("Error")
        assert r.choices[0].message.content.startswith("Tool results: Error")
        metrics = gw.metrics.render().decode()
        assert 'lmgw_mcp_server_up{server="local"} 1' in metrics
        assert 'lmgw_mcp_server_up{server="gone"} 0' in metrics
        assert 'lmgw_tool_calls_total{tool="h_explode",outcome="error"} 1' in metrics
    finally:
        proc.kill()
        proc.wait()


async def test_the_in_process_sdk_gateway_takes_tools(sim_worker) -> None:
    """``lmgw.Gateway(tools=[...])`` with a decorated async tool; no HTTP hop."""
    sim = await sim_worker(model=MODEL, speed=math.inf)

    @lmgw.tool(name="get_weather")
    async def weather(city: str) -> str:
        """Today's weather."""
        await trio.sleep(0)
        return f"rain-in-{city}"

    models = [{"name": MODEL, "tool_parser": "hermes", "tool_loop": {"max_rounds": 1}}]
    async with lmgw.Gateway(
        workers=[sim.url], models=models, tools=[weather], health={"interval_s": 30}
    ) as gw:
        assert gw.core.tools.names() == {"get_weather"}
        r = await gw.chat(model=MODEL, messages=ASK_WEATHER)
        assert r.text.startswith("Tool results: rain-in-")
        events = [e async for e in gw.chat_stream(model=MODEL, messages=ASK_WEATHER)]
        text = "".join(getattr(e, "text", "") or "" for e in events)
        assert text.startswith("Tool results: rain-in-")
    with pytest.raises(lmgw.ConfigError, match="keepalive_s"):
        lmgw.Gateway(workers=[sim.url], tools={"keepalive_s": 0})
