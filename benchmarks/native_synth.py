"""What the native path spends building OpenAI answers, per SSE event and per whole answer, in
process: the reference builders beside the ones the gateway uses, in one run.

Why (issue 4): an HTTP worker's answer is relayed as bytes; a native worker's Delta/Finish
events are turned into vLLM's JSON by the gateway (``lmgw.transport.openai_synth``), and each
Delta crosses the channel's reader, the request's queue and the relay loop. Rows:

* ``event``: one streamed content event of a 64-token chat answer, ns per event:
  ``dict+encode`` (the event's dict, encoded: the obvious builder), ``general`` (the synth's
  general builder, what logprobs take), ``template`` (``OpenAISynth.delta`` for plain
  content: the request's prefix + the JSON-encoded text + the suffix), ``burst``
  (``OpenAISynth.deltas`` on the 64 at once);
* ``answer``: a non-streamed 16-token chat body, µs: its dict encoded vs the byte template;
* ``relay``: ``NativeRunner._relay`` on a real ``RpcStream`` holding 64 Deltas and the Finish
  (a fast worker's burst), written to a stand-in client, µs per request: one ``__anext__``
  per event (``per event``: the loop before bursts) vs ``RpcStream.deltas`` (``burst``);
* ``dispatch``: the channel's reader on one ``Batch`` of 64 Deltas (decode included), µs:
  ``_dispatch`` per message vs the batch loop queueing Deltas itself.

Every pair is checked to give the same bytes (or the same queues) before it is timed.

    .venv/bin/python benchmarks/native_synth.py [--quick]

Prints medians of 5 interleaved runs and writes benchmarks/results/native_synth.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import trio

from lmgw.metrics import Metrics
from lmgw.pipeline.native import NativeRunner
from lmgw.pipeline.request import GatewayRequest
from lmgw.protocol.messages import Batch, Delta, Finish, Generate, Usage, encode_frames
from lmgw.protocol.messages import decode_frames as decode
from lmgw.transport.openai_synth import OpenAISynth, usage_dict
from lmgw.transport.zmq.channel import RpcChannel, RpcStream, _Route

REPEATS = 5
TOKENS = 64
RESULTS = Path(__file__).parent / "results" / "native_synth.json"
_enc = msgspec.json.encode
WORDS = [" the", " quick", ' "brown"', " fox", " jumps", " over", " the", " lazy", " dog\n", " é"]
PIECES = [WORDS[i % len(WORDS)] for i in range(TOKENS)]
DELTAS = [Delta("bench-1", i, p, [i]) for i, p in enumerate(PIECES)]
FINISH = Finish("bench-1", TOKENS, "length", usage=Usage(12, TOKENS))
RID, MODEL, CREATED = "bench-1", "bench-model", 1_700_000_000


def best_of(fn: Callable[[], Any], n: int) -> float:
    """Seconds per call of ``fn``: the best of 3 loops of ``n`` calls."""
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


# -- per event ---------------------------------------------------------------------------------
def dict_events() -> bytes:
    out = []
    for d in DELTAS:
        event = {
            "id": "chatcmpl-" + RID, "object": "chat.completion.chunk", "created": CREATED,
            "model": MODEL, "choices": [{"index": 0, "delta": {"content": d.text},
                                         "logprobs": None, "finish_reason": None}],
        }  # fmt: skip
        out.append(b"data: " + _enc(event) + b"\n\n")
    return b"".join(out)


def _opened(**kw: Any) -> OpenAISynth:
    s = OpenAISynth("chat", RID, MODEL, CREATED, **kw)
    s.open()
    return s


def general_events() -> bytes:  # logprobs asked, none sent: the general builder, same bytes
    s = _opened(logprobs=True)
    return b"".join([s.delta(d.text, d.token_ids, d.logprobs) for d in DELTAS])


def template_events() -> bytes:
    s = _opened()
    return b"".join([s.delta(d.text, d.token_ids, d.logprobs) for d in DELTAS])


def burst_events() -> bytes:
    return _opened().deltas(DELTAS)


# -- whole answers -----------------------------------------------------------------------------
ANSWER = "".join(PIECES[:16])


def dict_answer() -> bytes:
    return _enc({
        "id": "chatcmpl-" + RID, "object": "chat.completion", "created": CREATED, "model": MODEL,
        "choices": [{"index": 0, "message": {
            "role": "assistant", "content": ANSWER, "refusal": None, "annotations": None,
            "audio": None, "function_call": None, "tool_calls": [], "reasoning_content": None},
            "logprobs": None, "finish_reason": "length", "stop_reason": None}],
        "service_tier": None, "system_fingerprint": None, "usage": usage_dict(12, 16, 0),
        "prompt_logprobs": None, "kv_transfer_params": None,
    })  # fmt: skip


_WHOLE = OpenAISynth("chat", RID, MODEL, CREATED)  # built per request either way: not timed


def template_answer() -> bytes:
    return _WHOLE.response(ANSWER, "length", None, 12, 16, 0)


# -- the relay ---------------------------------------------------------------------------------
class _PerEvent(RpcStream):
    """The stream as the relay used it before bursts: one ``__anext__`` per event."""

    __slots__ = ()

    def deltas(self, limit: int) -> list[Delta]:
        return []


class _Client:
    def __init__(self) -> None:
        self.started = False
        self.data: list[bytes] = []

    async def start(self, status: int, headers: list) -> None:
        self.started = True

    async def send(self, data: bytes) -> None:
        self.data.append(data)

    async def end(self, data: bytes = b"") -> None:
        self.data.append(data)


def relay_once(stream_cls: type[RpcStream]) -> Callable[[], Any]:
    runner = object.__new__(NativeRunner)
    runner.p = SimpleNamespace(metrics=Metrics(), first_token_roles=(), policies={})
    runner.stall_s = math.inf
    chan = RpcChannel("tcp://127.0.0.1:1")  # never run: the route is filled by hand
    msg = Generate(RID, MODEL, prompt_token_ids=[1])
    greq = GatewayRequest("chat", "/v1/chat/completions", MODEL, True, b"{}", RID, [], 0.0)
    worker = SimpleNamespace(id="w1")

    async def one() -> bytes:
        route = _Route(RID, 1024)
        route.items.extend([*DELTAS, FINISH])
        route.ended = True
        stream = stream_cls(chan, msg, (), 5.0)
        stream._route = route
        client = _Client()
        synth = OpenAISynth("chat", RID, MODEL, CREATED)
        await runner._relay(greq, client, stream, synth, worker, "pd", 0.0, False, 0)
        return b"".join(client.data)

    return one


def time_relay(stream_cls: type[RpcStream], n: int) -> tuple[float, bytes]:
    one = relay_once(stream_cls)

    async def run() -> tuple[float, bytes]:
        out = await one()
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                await one()
            best = min(best, (time.perf_counter() - t0) / n)
        return best, out

    return trio.run(run)


# -- the reader's dispatch ---------------------------------------------------------------------
FRAMES = encode_frames(Batch(list(DELTAS)))


def dispatch_each(chan: RpcChannel) -> _Route:
    route = chan._routes[RID] = _Route(RID, 1024)
    msgs = decode(FRAMES).msg.messages  # type: ignore[attr-defined]
    for m in msgs:
        chan._dispatch(m, m)
    return route


def dispatch_batch(chan: RpcChannel) -> _Route:
    route = chan._routes[RID] = _Route(RID, 1024)
    chan._on_frames(FRAMES)
    return route


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls per run")
    args = ap.parse_args()
    n = 300 if args.quick else 2000

    events = {"dict+encode": dict_events, "general": general_events,
              "template": template_events, "burst": burst_events}  # fmt: skip
    answers = {"dict+encode": dict_answer, "template": template_answer}
    relays = {"per event": _PerEvent, "burst": RpcStream}
    chan = RpcChannel("tcp://127.0.0.1:1")
    dispatches = {"per message": dispatch_each, "batch loop": dispatch_batch}
    # the same bytes (and queues) from every builder of a row
    assert len({f() for f in events.values()}) == 1
    assert len({f() for f in answers.values()}) == 1
    assert len({time_relay(cls, 1)[1] for cls in relays.values()}) == 1
    assert len({msgspec.msgpack.encode(list(f(chan).items)) for f in dispatches.values()}) == 1

    runs: dict[tuple[str, str], list[float]] = {}
    for _ in range(REPEATS):  # interleaved, so drift hits every row alike
        for name, f in events.items():
            runs.setdefault(("event", name), []).append(best_of(f, n) / TOKENS * 1e9)
        for name, f in answers.items():
            runs.setdefault(("answer", name), []).append(best_of(f, n * 4) * 1e6)
        for name, cls in relays.items():
            runs.setdefault(("relay", name), []).append(time_relay(cls, n // 2)[0] * 1e6)
        for name, g in dispatches.items():
            runs.setdefault(("dispatch", name), []).append(best_of(lambda g=g: g(chan), n) * 1e6)
    med = {k: statistics.median(v) for k, v in runs.items()}

    units = {"event": "ns/event", "answer": "µs/answer", "relay": "µs/request (65 events)",
             "dispatch": "µs/batch of 64"}  # fmt: skip
    print(f"native answer building, in process, median of {REPEATS} runs, "
          f"python {platform.python_version()}")  # fmt: skip
    rows = []
    for row, unit in units.items():
        names = [name for (r, name) in med if r == row]
        base = med[(row, names[0])]
        cells = "  ".join(f"{name} {med[(row, name)]:,.2f} ({med[(row, name)] / base:.2f}x)"
                          for name in names)  # fmt: skip
        print(f"{row:<9} {unit:<24} {cells}")
        rows.append({"row": row, "unit": unit, "median": {nm: med[(row, nm)] for nm in names},
                     "ratio_to_first": {nm: med[(row, nm)] / base for nm in names}})  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "native_synth", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(), "repeats": REPEATS, "tokens": TOKENS,
        "rows": rows, "runs": {f"{r}/{nm}": v for (r, nm), v in runs.items()},
    }, indent=2))  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
