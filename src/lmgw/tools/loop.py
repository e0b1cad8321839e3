"""The gateway-side tool loop: the model calls the gateway's tools, the gateway runs them and
generates again, up to ``max_rounds`` times, and the client gets the final answer.

When it runs (:meth:`ToolLoop.plan`, once per chat request, and only on a gateway that has
tools): a model's ``models[].tool_loop`` turns it on for every request; a request turns it on or
off with ``"lmgw_tool_loop": true | false | {"max_rounds": N, "tools": [...], "timeout_s": S}``
(stripped from the body; limits may be lowered, never raised). The gateway's tools are then
added to the request's ``tools``; the client's own tools keep their names and their calls go
back to the client as usual.

A round (:meth:`ToolLoop.run`): the request runs through the pipeline with a capturing
responder; the model's tool calls come out of the usual parsing (``models[].tool_parser``, or
a worker that parses itself). A round whose calls are all the gateway's: the calls run
concurrently, each within ``timeout_s``; the assistant message and one ``role: tool`` message
per call are appended and the model is asked again. A round with no call, or with a call of a
client tool, is the answer (the gateway's calls in a mixed round are left out of it, not run).
After ``max_rounds`` rounds of tools the model is asked once more without the gateway's tools.

What the client sees (docs/tools.md, "The tool loop"):

- not streamed: the last round's answer, ``usage`` summed over the rounds, and
  ``lmgw_tool_messages``: the messages the gateway appended, in order;
- streamed: one stream; each round's content deltas as they come (the gateway's tool calls are
  not sent as ``tool_calls`` deltas: the client must not run them), a chunk carrying
  ``lmgw_tool_messages: [assistant message]`` when a round's calls start and one with the tool
  messages when they are done, ``: keep-alive`` SSE comments every ``tools.keepalive_s`` while
  they run, then the final round's finish chunk, the summed usage (``include_usage``) and
  ``[DONE]``.

The per-round event filter (:class:`RoundStream`) is sans-IO.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from ..config import GatewayConfig, ToolLoopConfig
from ..errors import DECODE_ERRORS, GatewayError, parse_error_body, sse_error_event
from ..http.types import Headers, Responder
from ..pipeline.request import GatewayRequest
from ..transport.sse import KEEPALIVE
from .caller import ToolCaller, ToolResult
from .ids import tool_call_id

log = logging.getLogger("lmgw.tools")

#: the request field that turns the loop on or off
LOOP_FIELD = "lmgw_tool_loop"
#: the answer field (and stream chunk field) with the messages the gateway appended
MESSAGES_FIELD = "lmgw_tool_messages"
_DONE = b"data: [DONE]\n\n"
_decode = msgspec.json.decode
_encode = msgspec.json.encode

NextRound = Callable[[dict[str, Any]], Awaitable[GatewayRequest]]


class LoopPlan:
    """One request's loop: its limits, the names of the client's own tools, and the request
    object (with the gateway's tools added) that later rounds extend."""

    __slots__ = ("base", "client_tools", "gateway_tools", "include_usage", "max_rounds",
                 "timeout_s")  # fmt: skip

    def __init__(
        self,
        base: dict[str, Any],
        max_rounds: int,
        timeout_s: float,
        client_tools: frozenset[str],
        gateway_tools: frozenset[str],
        include_usage: bool,
    ) -> None:
        self.base = base
        self.max_rounds = max_rounds
        self.timeout_s = timeout_s
        self.client_tools = client_tools
        self.gateway_tools = gateway_tools
        self.include_usage = include_usage

    def round_body(self, appended: list[dict[str, Any]], last: bool) -> dict[str, Any]:
        """The next round's request: the messages so far; the last one without the gateway's
        tools (only the client's stay, if any)."""
        obj = dict(self.base)
        obj["messages"] = [*self.base["messages"], *appended]
        if last:
            mine = self.gateway_tools
            kept = [t for t in obj.get("tools") or () if _tool_name(t) not in mine]
            choice = obj.get("tool_choice")
            if not kept:
                obj.pop("tools", None)
                obj.pop("tool_choice", None)
                obj.pop("parallel_tool_calls", None)
            else:
                obj["tools"] = kept
                if isinstance(choice, dict) and _tool_name(choice) in mine:
                    obj.pop("tool_choice", None)
        return obj


def _tool_name(entry: Any) -> str | None:
    fn = entry.get("function") if isinstance(entry, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else None


def add_usage(total: dict[str, Any] | None, usage: Any) -> dict[str, Any] | None:
    """Two ``usage`` objects summed field by field (nested details too)."""
    if not isinstance(usage, dict):
        return total
    if total is None:
        return msgspec.json.decode(_encode(usage))  # a deep copy
    out = dict(total)
    for k, v in usage.items():
        have = out.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool):
            if isinstance(have, int | float) and not isinstance(have, bool):
                out[k] = have + v
            elif have is None:
                out[k] = v
        elif isinstance(v, dict):
            out[k] = add_usage(have if isinstance(have, dict) else None, v)
        elif k not in out:
            out[k] = v
    return out


# -- streamed rounds -------------------------------------------------------------------------------


class RoundStream:
    """One round's SSE events on their way to the client (sans-IO): :meth:`feed` returns what
    to send now. Content passes; tool-call deltas of client tools pass (re-indexed from 0);
    those of the gateway's tools are assembled into :attr:`calls` instead. The finish chunk
    passes only when the round turns out to be the answer; usage is kept aside (summed by the
    loop) and ``[DONE]`` held back (the loop ends the stream)."""

    def __init__(
        self, client_tools: frozenset[str] | None, head: dict[str, Any] | None, first: bool
    ) -> None:
        #: None: every call is the client's (the last round)
        self.client_tools = client_tools
        #: id/object/created/model of the client's stream (its first chunk)
        self.head = head
        self.first = first
        self._buf = b""
        self._owner: dict[int, int | None] = {}  # upstream index -> client index, None: ours
        self._calls: dict[int, dict[str, Any]] = {}
        self.content: list[str] = []
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.error = False

    @property
    def client_calls(self) -> int:
        return sum(1 for v in self._owner.values() if v is not None)

    @property
    def calls(self) -> list[dict[str, Any]]:
        """The gateway's calls, assembled, in the model's order."""
        return [self._calls[i] for i in sorted(self._calls)]

    @property
    def final(self) -> bool:
        """Whether this round is the answer (decided once its calls are known)."""
        return self.error or self.client_tools is None or bool(self.client_calls) or not self._calls

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._buf = buf
            return b""
        self._buf = buf[cut + 2 :]
        out: list[bytes] = []
        for block in buf[:cut].split(b"\n\n"):
            if block.strip():
                out.extend(self._event(block))
        return b"".join(e + b"\n\n" for e in out)

    def flush(self) -> bytes:
        """What is left at the end of the round (an unterminated event: passed as it is)."""
        rest, self._buf = self._buf, b""
        if not rest.strip():
            return b""
        return b"".join(e + b"\n\n" for e in self._event(rest.strip()))

    def _event(self, block: bytes) -> list[bytes]:
        if not block.startswith(b"data:"):
            return [block]  # comments, other fields
        payload = block[5:].strip()
        if payload == b"[DONE]":
            return []
        try:
            ev = _decode(payload)
        except DECODE_ERRORS:
            return [block]
        if not isinstance(ev, dict):
            return [block]
        if "error" in ev and not ev.get("choices"):
            self.error = True
            return [block]
        if self.head is None:
            self.head = {
                k: ev[k] for k in ("id", "object", "created", "model", "system_fingerprint")
                if k in ev
            }  # fmt: skip
        usage = ev.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = ev.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return []  # the usage chunk: the loop sends the sum
        choice = choices[0]
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        out: dict[str, Any] = {}
        for k, v in delta.items():
            if k == "role":
                if self.first:
                    out[k] = v
            elif k == "content":
                if isinstance(v, str) and v:
                    self.content.append(v)
                    out[k] = v
                elif self.first and "role" in delta:
                    out[k] = v
            elif k == "tool_calls":
                passed = self._tool_deltas(v)
                if passed:
                    out[k] = passed
            elif v is not None:
                out[k] = v
        reason = choice.get("finish_reason")
        if reason is not None:
            self.finish = reason
            if not self.final:
                reason = None
        if not out and reason is None:
            return []
        c = {k: v for k, v in choice.items() if k not in ("delta", "finish_reason")}
        c["delta"] = out
        c["finish_reason"] = reason
        chunk = {k: v for k, v in ev.items() if k not in ("choices", "usage")}
        if not self.first and self.head:
            for k in ("id", "created"):
                if k in self.head:
                    chunk[k] = self.head[k]
        chunk["choices"] = [c]
        return [b"data: " + _encode(chunk)]

    def _tool_deltas(self, deltas: Any) -> list[dict[str, Any]]:
        if not isinstance(deltas, list):
            return []
        passed: list[dict[str, Any]] = []
        for tc in deltas:
            if not isinstance(tc, dict):
                continue
            index = tc.get("index", 0)
            if type(index) is not int:
                continue  # not a delta any call can be assembled from
            fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
            if index not in self._owner:
                name = fn.get("name")
                name = name if isinstance(name, str) else ""
                if self.client_tools is None or name in self.client_tools:
                    self._owner[index] = self.client_calls
                else:
                    self._owner[index] = None
                    self._calls[index] = {
                        "id": tc.get("id") or tool_call_id(),
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
            mine = self._owner[index]
            if mine is None:
                args = fn.get("arguments")
                if isinstance(args, str):
                    self._calls[index]["function"]["arguments"] += args
            else:
                passed.append({**tc, "index": mine})
        return passed

    def tail(self, usage: dict[str, Any] | None, include_usage: bool) -> bytes:
        """The end of the client's stream: the summed usage chunk (when asked for) and
        ``[DONE]``."""
        if self.error or not include_usage or usage is None:
            return _DONE
        chunk = dict(self.head or {"object": "chat.completion.chunk"})
        chunk["choices"] = []
        chunk["usage"] = usage
        return b"data: " + _encode(chunk) + b"\n\n" + _DONE


class _StreamCapture:
    """The responder a streamed round runs against: events go through the round's
    :class:`RoundStream` to the client's responder, whose head only round 1 sends."""

    __slots__ = ("client", "ended", "rs", "started")

    def __init__(self, client: Responder, rs: RoundStream) -> None:
        self.client = client
        self.rs = rs
        self.started = False
        self.ended = False  # the client's response is complete (a non-SSE answer passed)

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        self.ended = True
        if not self.client.started:
            await self.client.send_full(status, headers, body)
            return
        message = parse_error_body(body)[0] if status >= 400 else "expected an event stream"
        await self.client.end(sse_error_event(status if status >= 400 else 502, message))

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        if not self.client.started:
            await self.client.start(status, headers)

    async def send(self, data: bytes) -> None:
        out = self.rs.feed(data)
        if out:
            await self.client.send(out)

    async def end(self, data: bytes = b"") -> None:
        out = self.rs.feed(data) + self.rs.flush() if data else self.rs.flush()
        if out:
            await self.client.send(out)


class _JsonCapture:
    """The responder a non-streamed round runs against: keeps the answer. An event stream
    (a worker that streamed anyway) goes straight to the client, ending the loop."""

    __slots__ = ("body", "client", "headers", "passed", "started", "status")

    def __init__(self, client: Responder) -> None:
        self.client = client
        self.started = False
        self.passed = False
        self.status = 0
        self.headers: Headers = []
        self.body = b""

    async def send_full(self, status: int, headers: Headers, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def start(self, status: int, headers: Headers) -> None:
        self.started = self.passed = True
        await self.client.start(status, headers)

    async def send(self, data: bytes) -> None:
        await self.client.send(data)

    async def end(self, data: bytes = b"") -> None:
        await self.client.end(data)


# -- the loop ------------------------------------------------------------------------------------


def _progress(head: dict[str, Any] | None, messages: list[dict[str, Any]]) -> bytes:
    chunk = dict(head or {"object": "chat.completion.chunk"})
    chunk["choices"] = [{"index": 0, "delta": {}, "finish_reason": None}]
    chunk[MESSAGES_FIELD] = messages
    return b"data: " + _encode(chunk) + b"\n\n"


class ToolLoop:
    """The loop for a gateway (see the module doc). ``run`` drives the pipeline round by
    round; ``plan`` decides per request whether it runs."""

    def __init__(self, caller: ToolCaller, cfg: GatewayConfig, pipeline: Any) -> None:
        self.caller = caller
        self.pipeline = pipeline
        self.models = {m.name: m.tool_loop for m in cfg.models if m.tool_loop is not None}
        self._where = {m.name: f"models[{i}].tool_loop.tools" for i, m in enumerate(cfg.models)}
        self.per_request = cfg.tools.per_request
        self.keepalive_s = cfg.tools.keepalive_s
        self.default = ToolLoopConfig(enabled=False)

    def check(self) -> None:
        """At start, once the MCP servers had their first try: every tool a model names
        exists (ConfigError otherwise; a warning while an MCP server is down)."""
        for model, loop in self.models.items():
            if loop.tools is not None:
                self.caller.check_names(loop.tools, self._where[model])

    # -- per request --------------------------------------------------------------------------
    def plan(self, model: str, body: Any, view: Any) -> LoopPlan | None:
        """Whether the loop runs for this chat request (``body``: the API's editable body,
        ``view``: its decoded view, which carries ``lmgw_tool_loop``):
        None when it does not; else the gateway's tools are added to the request. Raises
        GatewayError (400) for a bad ``lmgw_tool_loop`` or a request the loop cannot serve."""
        cfg = self.models.get(model)
        asked = view.lmgw_tool_loop  # decoded with the view: no search of the body
        if asked is not msgspec.UNSET:
            body.obj.pop(LOOP_FIELD, None)  # never forwarded to a worker
            body.changed = True
        if asked is msgspec.UNSET or asked is None:
            if cfg is None or not cfg.enabled:
                return None
            asked = True
        if asked is False or asked is None:
            return None
        if not isinstance(asked, bool | dict):
            raise GatewayError(
                400, f"{LOOP_FIELD} must be true, false or an object", param=LOOP_FIELD
            )
        limits = cfg or self.default
        if not limits.enabled and not self.per_request:
            raise GatewayError(
                400,
                f"the tool loop is not available for model {model!r} (tools.per_request is off)",
                param=LOOP_FIELD,
            )
        allowed = self.caller.names() if limits.tools is None else set(limits.tools)
        max_rounds, timeout_s, names = limits.max_rounds, limits.timeout_s, None
        if isinstance(asked, dict):
            max_rounds, timeout_s, names = _options(asked, max_rounds, timeout_s)
            unknown = sorted(set(names or ()) - allowed)
            if unknown:
                raise GatewayError(
                    400,
                    f"{LOOP_FIELD}.tools: no gateway tool named {', '.join(map(repr, unknown))}"
                    f" for model {model!r}",
                    param=LOOP_FIELD,
                )
        if (view.n or 1) != 1:
            raise GatewayError(400, "the tool loop needs n = 1", param="n")
        obj = body.obj
        if obj.get("tool_choice") == "none":
            return None
        tools = obj.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise GatewayError(400, "tools must be a list", param="tools")
        client = frozenset(n for n in map(_tool_name, tools or ()) if n is not None)
        wanted = sorted(allowed) if names is None else names
        specs = self.caller.specs(n for n in wanted if n not in client)
        if not specs:
            return None  # nothing to offer (e.g. its MCP server is down): a plain request
        obj["tools"] = [*(tools or ()), *specs]
        body.changed = True
        so = view.stream_options
        return LoopPlan(
            dict(obj),  # later rounds start from here, before the steps that edit one round
            max_rounds,
            timeout_s,
            client,
            frozenset(s["function"]["name"] for s in specs),
            bool(so is not None and so.include_usage),
        )

    # -- the rounds -----------------------------------------------------------------------------
    async def run(
        self, plan: LoopPlan, greq: GatewayRequest, responder: Responder, next_round: NextRound
    ) -> None:
        """Run the rounds of one request and answer the client (see the module doc)."""
        appended: list[dict[str, Any]] = []
        usage: dict[str, Any] | None = None
        head: dict[str, Any] | None = None
        rounds = 0
        while True:
            last = rounds >= plan.max_rounds
            if greq.stream:
                rs = RoundStream(None if last else plan.client_tools, head, rounds == 0)
                cap = _StreamCapture(responder, rs)
                await self.pipeline.run(greq, cap)
                if cap.ended:
                    return
                head = rs.head
                usage = add_usage(usage, rs.usage)
                if rs.final:
                    await responder.end(rs.tail(usage, plan.include_usage))
                    return
                calls = rs.calls
                content = "".join(rs.content) or None
            else:
                jc = _JsonCapture(responder)
                await self.pipeline.run(greq, jc)
                if jc.passed:
                    return
                found = await self._json_round(jc, plan, last, appended, usage, responder)
                if found is None:
                    return
                calls, content, usage = found
            assistant = {"role": "assistant", "content": content, "tool_calls": calls}
            if greq.stream:
                await responder.send(_progress(head, [assistant]))
            results = await self._execute(calls, plan.timeout_s, responder if greq.stream else None)
            tool_messages = [
                {"role": "tool", "tool_call_id": c["id"], "content": r.content}
                for c, r in zip(calls, results, strict=True)
            ]
            if greq.stream:
                await responder.send(_progress(head, tool_messages))
            appended += [assistant, *tool_messages]
            rounds += 1
            greq = await next_round(plan.round_body(appended, rounds >= plan.max_rounds))

    async def _json_round(
        self,
        jc: _JsonCapture,
        plan: LoopPlan,
        last: bool,
        appended: list[dict[str, Any]],
        usage: dict[str, Any] | None,
        responder: Responder,
    ) -> tuple[list[dict[str, Any]], str | None, dict[str, Any] | None] | None:
        """A non-streamed round's answer: the gateway's calls to run (with the content and the
        usage so far), or None once the final answer went to the client."""
        obj: Any = None
        if jc.status < 300:
            try:
                obj = _decode(jc.body)
            except DECODE_ERRORS:
                obj = None
        choices = obj.get("choices") if isinstance(obj, dict) else None
        message = (
            choices[0].get("message")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict)
            else None
        )
        if not isinstance(message, dict):  # an error or a shape we do not know: as it is
            await responder.send_full(jc.status, jc.headers, jc.body)
            return None
        usage = add_usage(usage, obj.get("usage"))
        calls = message.get("tool_calls") or []
        calls = calls if isinstance(calls, list) else []
        client = plan.client_tools
        theirs = [c for c in calls if last or _tool_name(c) in client]
        ours = [c for c in calls if not (last or _tool_name(c) in client) and isinstance(c, dict)]
        if theirs or not ours:
            if ours:  # a mixed round: the client's calls are the answer
                message["tool_calls"] = theirs
            if usage is not None:
                obj["usage"] = usage
            if appended:
                obj[MESSAGES_FIELD] = appended
            await responder.send_full(jc.status, jc.headers, _encode(obj))
            return None
        for c in ours:
            c.setdefault("id", tool_call_id())
            c.setdefault("type", "function")
        content = message.get("content")
        return ours, content if isinstance(content, str) and content else None, usage

    async def _execute(
        self, calls: list[dict[str, Any]], timeout_s: float, responder: Responder | None
    ) -> list[ToolResult]:
        """Run a round's calls concurrently, each within ``timeout_s``; a streamed answer gets
        keep-alive comments meanwhile. Cancelled with the request (a client that leaves)."""
        results: list[ToolResult] = [ToolResult("Error: not run", True)] * len(calls)
        caller = self.caller

        async def one(i: int, call: dict[str, Any]) -> None:
            fn = call.get("function") if isinstance(call.get("function"), dict) else {}
            name = fn.get("name") if isinstance(fn.get("name"), str) else ""
            arguments = fn.get("arguments")
            if not isinstance(arguments, str | dict):
                arguments = ""
            results[i] = await caller.call(name, arguments, timeout_s)

        async with trio.open_nursery() as nursery:
            if responder is not None:
                nursery.start_soon(self._keepalive, responder)
            async with trio.open_nursery() as running:
                for i, call in enumerate(calls):
                    running.start_soon(one, i, call)
            nursery.cancel_scope.cancel()
        return results

    async def _keepalive(self, responder: Responder) -> None:
        while True:
            await trio.sleep(self.keepalive_s)
            await responder.send(KEEPALIVE)


def _options(asked: dict[str, Any], max_rounds: int, timeout_s: float) -> tuple[
    int, float, list[str] | None
]:  # fmt: skip
    """A request's loop options, within the configured limits (400 on a bad value)."""
    names = None
    for key, value in asked.items():
        if key == "max_rounds":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GatewayError(400, f"{LOOP_FIELD}.max_rounds must be an integer >= 1",
                                   param=LOOP_FIELD)  # fmt: skip
            max_rounds = min(max_rounds, value)
        elif key == "timeout_s":
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise GatewayError(400, f"{LOOP_FIELD}.timeout_s must be a positive number",
                                   param=LOOP_FIELD)  # fmt: skip
            timeout_s = min(timeout_s, float(value))
        elif key == "tools":
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise GatewayError(400, f"{LOOP_FIELD}.tools must be a list of tool names",
                                   param=LOOP_FIELD)  # fmt: skip
            names = list(dict.fromkeys(value))
        else:
            raise GatewayError(
                400,
                f"{LOOP_FIELD}: unknown option {key!r} (max_rounds, tools, timeout_s)",
                param=LOOP_FIELD,
            )
    return max_rounds, timeout_s, names
