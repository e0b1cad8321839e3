"""Native tools (lmgw.tools.registry), the tool caller's outcomes (lmgw.tools.caller) and the
tool loop's sans-IO parts (lmgw.tools.loop): schema derivation, registration and clashes, entry
points, error/timeout results, the per-round event filter, usage sums."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Any, Literal

import msgspec
import pytest
import trio

import lmgw
from lmgw.config import ConfigError, GatewayConfig, ModelConfig, ToolLoopConfig, ToolsConfig
from lmgw.gateway import Gateway
from lmgw.tools import registry
from lmgw.tools.caller import ToolCaller, as_text
from lmgw.tools.loop import LoopPlan, RoundStream, add_usage
from lmgw.tools.mcp import result_text
from lmgw.tools.registry import Tool, ToolError, collect_tools, make_tool, tool


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


@dataclass
class Place:
    city: str
    country: str = "FR"


def forecast(
    place: Place,
    days: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3,
    unit: Unit = Unit.C,
    mode: Literal["brief", "full"] = "brief",
    tags: list[str] | None = None,
) -> str:
    """Tell the forecast of a place.

    Several sentences
    are joined.

    Args:
        place: where to look
        days: how many days ahead,
            at most ten
        unit: the temperature unit

    Returns:
        text
    """
    return f"{place.city}/{days}/{unit.value}/{mode}/{tags}"


def test_the_schema_comes_from_the_type_hints_and_the_docstring() -> None:
    t = make_tool(forecast)
    assert t.name == "forecast" and not t.is_async
    assert t.description == "Tell the forecast of a place. Several sentences are joined."
    p = t.parameters
    assert p["type"] == "object" and p["required"] == ["place"]
    props = p["properties"]
    assert props["days"] == {"type": "integer", "minimum": 1, "maximum": 10, "default": 3,
                             "description": "how many days ahead, at most ten"}  # fmt: skip
    assert props["mode"]["enum"] == ["brief", "full"]
    assert props["place"]["$ref"] == "#/$defs/Place"
    assert p["$defs"]["Place"]["required"] == ["city"]
    assert props["unit"]["description"] == "the temperature unit"
    assert "description" not in props["tags"]
    assert t.spec() == {"type": "function", "function": {
        "name": "forecast", "description": t.description, "parameters": p}}  # fmt: skip


def test_arguments_are_converted_and_checked() -> None:
    t = make_tool(forecast)
    kwargs = t.bind({"place": {"city": "Oslo"}, "days": "2", "unit": "fahrenheit"})
    assert kwargs["place"] == Place("Oslo") and kwargs["days"] == 2 and kwargs["unit"] is Unit.F
    assert t(**kwargs) == "Oslo/2/fahrenheit/brief/None"
    for bad in ({}, {"place": {"city": "x"}, "days": 11}, {"place": {"city": "x"}, "extra": 1},
                {"place": {"city": "x"}, "mode": "long"}):  # fmt: skip
        with pytest.raises(ValueError, match="invalid arguments"):
            t.bind(bad)


def test_decorator_forms_and_given_schemas() -> None:
    @tool
    async def ping() -> str:
        return "pong"

    @tool(name="renamed", description="custom", parameters={"type": "object", "properties": {}})
    def anything(**kw: Any) -> Any:
        return kw

    assert isinstance(ping, Tool) and ping.is_async and ping.parameters["properties"] == {}
    assert anything.name == "renamed" and anything.description == "custom"
    assert anything.bind({"a": 1}) == {"a": 1} and anything(a=1) == {"a": 1}

    class Callable_:
        async def __call__(self, x: int) -> int:
            return x

    assert make_tool(Callable_(), name="obj").is_async
    assert make_tool(functools.partial(forecast, days=2)).parameters["properties"]["days"][
        "default"] == 2  # fmt: skip
    with pytest.raises(ToolError, match="cannot be passed by keyword"):
        make_tool(lambda *a: a, name="star")
    with pytest.raises(ToolError, match="not a tool name"):
        make_tool(lambda: 1)  # "<lambda>"
    with pytest.raises(ToolError, match="must describe an object"):
        make_tool(ping.fn, name="p", parameters={"type": "string"})
    with pytest.raises(ToolError, match="not callable"):
        make_tool(42)  # type: ignore[arg-type]


def test_register_tool_is_process_wide_and_names_clash() -> None:
    try:

        @lmgw.register_tool
        def shared_clock() -> str:
            """The time."""
            return "noon"

        assert lmgw.sdk.register_tool is registry.register_tool
        assert "shared_clock" in collect_tools(use_entry_points=False)
        with pytest.raises(ToolError, match="already registered"):
            registry.register_tool(lambda: "x", name="shared_clock")
        registry.register_tool(lambda: "late", name="shared_clock", replace=True)

        def other() -> str:
            return ""

        with pytest.raises(ToolError, match=r"one from lmgw.sdk.register_tool, one from Gateway"):
            collect_tools([make_tool(other, name="shared_clock")], use_entry_points=False)
    finally:
        registry.unregister_tool("shared_clock")
    assert "shared_clock" not in collect_tools(use_entry_points=False)


class _EntryPoint:
    def __init__(self, name: str, obj: Any) -> None:
        self.name, self.value, self._obj = name, f"pkg.mod:{name}", obj

    def load(self) -> Any:
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def test_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    def add(a: int, b: int) -> int:
        return a + b

    eps = [_EntryPoint("adder", add), _EntryPoint("bundle", [tool(forecast), add])]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)
    found = collect_tools()
    assert set(found) == {"adder", "forecast", "add"}
    assert "entry point 'bundle'" in found["forecast"].origin
    eps.append(_EntryPoint("broken", ImportError("no module named x")))
    with pytest.raises(ToolError, match=r"entry point 'broken' \(pkg.mod:broken\).*ImportError"):
        collect_tools()
    eps[-1] = _EntryPoint("weird", 42)
    with pytest.raises(ToolError, match=r"entry point 'weird'.*neither"):
        collect_tools()
    eps[-1] = _EntryPoint("again", [tool(forecast, name="adder")])
    with pytest.raises(ToolError, match="two tools are named 'adder'"):
        collect_tools()
    eps.pop()
    # a gateway loads them at start (unless tools.entry_points is off); a bad one stops it
    assert set(Gateway(GatewayConfig()).tools.names()) == {"adder", "forecast", "add"}
    assert Gateway(GatewayConfig(tools=ToolsConfig(entry_points=False))).tools is None
    eps.append(_EntryPoint("broken", RuntimeError("boom")))
    with pytest.raises(ToolError, match="entry point 'broken'"):
        Gateway(GatewayConfig())


def test_a_loop_needs_tools_and_known_names() -> None:
    loop = ToolLoopConfig(tools=["nope"])
    cfg = GatewayConfig(models=[ModelConfig(name="m", tool_loop=loop)],
                        tools=ToolsConfig(entry_points=False))  # fmt: skip
    with pytest.raises(ConfigError, match=r"models\[0\].tool_loop"):
        Gateway(cfg)
    gw = Gateway(cfg, tools=[forecast])
    with pytest.raises(ConfigError, match="no tool named 'nope'; known: forecast"):
        gw.tool_loop.check()
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"max_rounds": 0}, ToolLoopConfig)


async def test_call_outcomes() -> None:
    async def nap(s: float) -> str:
        await trio.sleep(s)
        return "rested"

    def blocking_nap(s: float) -> str:
        import time

        time.sleep(s)
        return "rested"

    def boom() -> None:
        raise KeyError("k")

    def data() -> dict:
        return {"a": [1, 2]}

    caller = ToolCaller(
        ToolsConfig(),
        {t.name: t for t in map(make_tool, (nap, blocking_nap, boom, data, forecast))},
    )
    assert await caller.call("nap", '{"s": 0}', 1) == ("rested", False)
    assert await caller.call("nap", {"s": 10}, 0.05) == (
        "Error: tool 'nap' timed out after 0.05 s", True)  # fmt: skip
    assert (await caller.call("blocking_nap", '{"s": 0.3}', 0.05)).error  # abandoned thread
    assert await caller.call("blocking_nap", '{"s": 0}', 1) == ("rested", False)
    assert await caller.call("boom", "", 1) == ("Error: KeyError: 'k'", True)
    assert await caller.call("data", "{}", 1) == ('{"a":[1,2]}', False)
    assert (await caller.call("nope", "{}", 1)).content.startswith(
        "Error: there is no tool named 'nope'")  # fmt: skip
    assert (await caller.call("nap", "{not json", 1)).content.startswith(
        "Error: the arguments are not valid JSON")  # fmt: skip
    assert await caller.call("nap", "[1]", 1) == ("Error: the arguments must be a JSON object",
                                                  True)  # fmt: skip
    bad = await caller.call("forecast", '{"days": 3}', 1)
    assert bad.error and "invalid arguments" in bad.content and "place" in bad.content
    outcomes = caller.calls.values
    assert outcomes[("nap", "timeout")] == 1 and outcomes[("<unknown>", "unknown")] == 1
    assert outcomes[("boom", "error")] == 1 and outcomes[("nap", "ok")] == 1


def test_values_become_text() -> None:
    assert as_text("x") == "x" and as_text(b"y") == "y" and as_text(None) == "null"
    assert as_text({"when": Place("a")}) == '{"when":{"city":"a","country":"FR"}}'
    assert as_text(object()).startswith('"<object object')  # enc_hook=str
    text = SimpleNamespace(type="text", text="hello")
    image = SimpleNamespace(type="image", mime_type="image/png")
    ok = SimpleNamespace(content=[text, image], structured_content=None, is_error=False)
    assert result_text(ok) == ("hello\n[image image/png]", False)
    failed = SimpleNamespace(content=[SimpleNamespace(type="text", text="bad input")],
                             is_error=True)  # fmt: skip
    assert result_text(failed) == ("Error: bad input", True)
    structured = SimpleNamespace(content=[], structured_content={"n": 1}, is_error=False)
    assert result_text(structured) == ('{"n":1}', False)


# -- the loop's sans-IO parts ---------------------------------------------------------------


def sse(*events: Any) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, bytes) else msgspec.json.encode(e)) + b"\n\n"
        for e in events
    )


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": extra.pop("id", "c1"), "object": "chat.completion.chunk", "created": 5,
            "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra}  # fmt: skip


def events_of(data: bytes) -> list[Any]:
    return [b"[DONE]" if e == b"data: [DONE]" else msgspec.json.decode(e[6:])
            for e in data.split(b"\n\n") if e]  # fmt: skip


def call_delta(index: int, name: str | None, args: str, id: str | None = None) -> dict:
    fn: dict[str, Any] = {"arguments": args}
    if name is not None:
        fn["name"] = name
    d: dict[str, Any] = {"index": index, "function": fn}
    if id is not None:
        d.update(id=id, type="function")
    return {"tool_calls": [d]}


def test_a_round_of_gateway_calls_is_held_back() -> None:
    rs = RoundStream(frozenset({"mine"}), None, first=True)
    data = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me look."}),
        chunk(call_delta(0, "lookup", '{"k":', "call_a")),
        chunk(call_delta(0, None, ' "v"}')),
        chunk(call_delta(1, "lookup", "{}", "call_b"), "tool_calls"),
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
        b"[DONE]",
    )
    out = b"".join(rs.feed(data[i : i + 7]) for i in range(0, len(data), 7)) + rs.flush()
    sent = events_of(out)
    assert [e["choices"][0]["delta"] for e in sent] == [
        {"role": "assistant", "content": ""}, {"content": "Let me look."}]  # fmt: skip
    assert not rs.final and rs.finish == "tool_calls" and rs.client_calls == 0
    calls = rs.calls
    assert [c["function"]["arguments"] for c in calls] == ['{"k": "v"}', "{}"]
    assert [(c["id"], c["type"], c["function"]["name"]) for c in calls] == [
        ("call_a", "function", "lookup"), ("call_b", "function", "lookup")]  # fmt: skip
    assert rs.usage == {"prompt_tokens": 3, "completion_tokens": 4}
    assert "".join(rs.content) == "Let me look."


def test_a_later_round_keeps_the_stream_id_and_passes_client_calls() -> None:
    head = {"id": "first", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    rs = RoundStream(frozenset({"mine"}), head, first=False)
    out = rs.feed(sse(
        chunk({"role": "assistant", "content": ""}, id="second"),
        chunk(call_delta(0, "lookup", "{}", "g1"), id="second"),
        chunk(call_delta(1, "mine", '{"a"', "c1"), id="second"),
        chunk(call_delta(1, None, ": 1}"), "tool_calls", id="second"),
        b"[DONE]",
    ))  # fmt: skip
    sent = events_of(out)
    assert {e["id"] for e in sent} == {"first"} and {e["created"] for e in sent} == {1}
    deltas = [e["choices"][0]["delta"] for e in sent]
    assert deltas == [
        {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                         "function": {"name": "mine", "arguments": '{"a"'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
    ]  # fmt: skip
    assert sent[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert rs.final and rs.client_calls == 1
    usage = {"prompt_tokens": 9}
    assert events_of(rs.tail(usage, True)) == [
        {**head, "choices": [], "usage": usage}, b"[DONE]"]  # fmt: skip
    assert rs.tail(usage, False) == b"data: [DONE]\n\n"


def test_a_round_without_calls_is_the_answer() -> None:
    rs = RoundStream(frozenset(), None, first=False)
    out = rs.feed(sse(chunk({"content": "done"}), chunk({}, "stop"), b"[DONE]"))
    assert [e["choices"][0]["finish_reason"] for e in events_of(out)] == [None, "stop"]
    assert rs.final
    err = RoundStream(frozenset(), None, first=False)
    out = err.feed(b'data: {"error": {"message": "x", "code": 502}}\n\ndata: [DONE]\n\n')
    assert out == b'data: {"error": {"message": "x", "code": 502}}\n\n' and err.final
    assert err.tail({"prompt_tokens": 1}, True) == b"data: [DONE]\n\n"
    last = RoundStream(None, None, first=False)  # the last round: every call is passed on
    out = last.feed(sse(chunk(call_delta(0, "lookup", "{}", "x"), "tool_calls")))
    assert events_of(out)[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == (
        "lookup")  # fmt: skip


def test_usage_sums_and_round_bodies() -> None:
    a = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
         "prompt_tokens_details": {"cached_tokens": 4}}  # fmt: skip
    b = {"prompt_tokens": 15, "completion_tokens": 3, "total_tokens": 18,
         "prompt_tokens_details": {"cached_tokens": 10},
         "completion_tokens_details": None}  # fmt: skip
    total = add_usage(add_usage(None, a), b)
    assert total == {"prompt_tokens": 25, "completion_tokens": 5, "total_tokens": 30,
                     "prompt_tokens_details": {"cached_tokens": 14},
                     "completion_tokens_details": None}  # fmt: skip
    assert a["prompt_tokens"] == 10 and add_usage(total, None) is total
    base = {"messages": [{"role": "user", "content": "q"}], "tool_choice": {
        "type": "function", "function": {"name": "g"}},
        "tools": [{"type": "function", "function": {"name": "c"}},
                  {"type": "function", "function": {"name": "g"}}]}  # fmt: skip
    plan = LoopPlan(base, 2, 1.0, frozenset({"c"}), frozenset({"g"}), False)
    extra = [{"role": "tool", "content": "r", "tool_call_id": "1"}]
    assert plan.round_body(extra, False)["tools"] == base["tools"]
    last = plan.round_body(extra, True)
    assert last["tools"] == [base["tools"][0]] and "tool_choice" not in last
    assert last["messages"][-1] == extra[0] and len(base["messages"]) == 1
    only_ours = LoopPlan({**base, "tools": base["tools"][1:]}, 2, 1.0, frozenset(),
                         frozenset({"g"}), False)  # fmt: skip
    assert "tools" not in only_ours.round_body([], True)


def test_tool_config_dumps_and_loads_back_with_secrets_redacted() -> None:
    from lmgw.config import MCPServerConfig, dump_config, loads_config

    cfg = GatewayConfig(
        models=[ModelConfig(name="m", tool_loop=ToolLoopConfig(max_rounds=2, tools=["a"]))],
        tools=ToolsConfig(mcp=[
            MCPServerConfig(name="web", url="http://127.0.0.1:1/mcp",
                            headers={"Authorization": "Bearer s3cret"}),
            MCPServerConfig(name="fs", command=["srv", "--ro"], env={"KEY": "k3y"}, prefix="fs_"),
        ]),
    )  # fmt: skip
    assert loads_config(dump_config(cfg)) == cfg
    redacted = dump_config(cfg, redact=True)
    assert "s3cret" not in redacted and "k3y" not in redacted
    assert "[models.tool_loop]" in redacted and redacted.count("[[tools.mcp]]") == 2
    for bad, where in (
        ({"name": "x"}, "url"),
        ({"name": "x", "command": ["a"], "url": "http://h/mcp"}, "url"),
        ({"name": "x", "url": "ftp://h"}, "url"),
        ({"name": "x", "url": "http://h/mcp", "prefix": "a b"}, "prefix"),
    ):
        with pytest.raises(ConfigError, match=where):
            loads_config(f"[[tools.mcp]]\n{_toml(bad)}")
    with pytest.raises(ConfigError, match="duplicate MCP server name"):
        loads_config('[[tools.mcp]]\nname = "a"\nurl = "http://h/m"\n'
                     '[[tools.mcp]]\nname = "a"\nurl = "http://h/n"\n')  # fmt: skip


def _toml(table: dict[str, Any]) -> str:
    return "".join(f"{k} = {msgspec.json.encode(v).decode()}\n" for k, v in table.items())


async def test_an_mcp_transport_error_during_shutdown_does_not_escape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway stopping while an MCP client is mid-connect: the client's tasks may raise a
    transport error beside the Cancelled (an exception group of both). Stopping must stay
    clean; before the fix the error escaped and failed the whole gateway (seen in CI)."""
    from lmgw.config import MCPServerConfig
    from lmgw.tools.mcp import MCPServer

    connecting = trio.Event()

    async def connect(self: MCPServer, stack: object) -> object:
        async def transport() -> None:
            try:
                await trio.sleep_forever()
            finally:
                raise ConnectionError("all attempts to connect to 127.0.0.1:9 failed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport)
            connecting.set()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(MCPServer, "_connect", connect)
    server = MCPServer(MCPServerConfig(name="web", url="http://127.0.0.1:9/mcp", timeout_s=30))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            await connecting.wait()
            nursery.cancel_scope.cancel()
    assert not server.connected
