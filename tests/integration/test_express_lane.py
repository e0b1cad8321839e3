"""The express lane (lmgw.pipeline.express): plain non-streamed requests on merged HTTP workers.

What the client and the metrics see must not depend on the lane: every test here runs with
``upstream.express_lane`` on and off and expects the same answers; with it on, the lane must
actually have been taken (``lmgw_express_requests_total``), including when it hands an unusual
answer (an error, a chunked or split body, HTTP/1.0) or a failure to the general path.
"""

from __future__ import annotations

import json
import random
from functools import partial
from typing import Any

import pytest
import trio
from gateway_support import MODEL, GatewayFactory, GatewayHandle, metric_value

pytestmark = pytest.mark.usefixtures("hard_deadline")

EXPRESS = "lmgw_express_requests_total"


def _chat(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        **extra,
    }


def _comparable(body: bytes) -> Any:
    """An answer without what differs between two runs of the same request (ids, clocks)."""
    doc = json.loads(body)
    for key in ("id", "created", "system_fingerprint"):
        doc.pop(key, None)
    return doc


async def _express_count(gw: GatewayHandle) -> float:
    return metric_value(await gw.metrics(), EXPRESS)


@pytest.mark.parametrize("express", [True, False])
async def test_same_answers_and_metrics_either_way(gateway: GatewayFactory, express: bool) -> None:
    gw = await gateway(2, upstream={"express_lane": express})
    requests: list[tuple[str, dict[str, Any], dict[str, str] | None]] = [
        ("/v1/chat/completions", _chat(), None),
        ("/v1/chat/completions", _chat("with an id", n=2), {"X-Request-Id": "client-id-1"}),
        ("/v1/chat/completions", _chat("unknown fields pass", some_vendor_field={"a": 1}), None),
        ("/v1/completions", {"model": MODEL, "prompt": "once upon", "max_tokens": 5}, None),
    ]
    answers = []
    for path, body, headers in requests:
        r = await gw.request("POST", path, body, headers)
        assert r.status == 200, r.body
        assert r.headers["content-type"].startswith("application/json")
        if headers:
            assert r.headers["x-request-id"] == "client-id-1"
        else:
            assert r.headers["x-request-id"]
        answers.append(_comparable(r.body))
    # the simulator's text is a function of the prompt: the lane must not change a byte of it
    assert answers[0]["choices"][0]["message"]["content"]
    assert len(answers[1]["choices"]) == 2
    text = await gw.metrics()
    assert metric_value(text, EXPRESS) == (4 if express else 0)
    chat_ok = f'lmgw_requests_total{{endpoint="chat",model="{MODEL}",flow="pd",status="200"}}'
    assert metric_value(text, chat_ok) == 3
    workers = sum(
        metric_value(text, f'lmgw_worker_requests_total{{role="pd",worker="w{i}"}}')
        for i in range(2)
    )
    assert workers == 4
    assert metric_value(text, 'lmgw_stage_duration_seconds_count{role="pd",worker="w0"}') == 2
    # and the same answer as the other way, byte for byte where it is deterministic
    again = await gw.request("POST", "/v1/chat/completions", _chat())
    assert _comparable(again.body) == answers[0]


async def test_lane_and_general_path_agree(gateway: GatewayFactory) -> None:
    on = await gateway(1, upstream={"express_lane": True})
    off = await gateway(1, upstream={"express_lane": False})
    for body in (_chat("a"), _chat("b", n=3, temperature=0.0), _chat("c", max_tokens=1)):
        a = await on.request("POST", "/v1/chat/completions", body)
        b = await off.request("POST", "/v1/chat/completions", body)
        assert (a.status, _comparable(a.body)) == (b.status, _comparable(b.body))
        assert sorted(k for k in a.headers if k != "date") == sorted(
            k for k in b.headers if k != "date"
        )
    assert await _express_count(on) == 3
    assert await _express_count(off) == 0


def _random_bodies(seed: int, count: int) -> list[tuple[str, dict[str, Any]]]:
    """Varied valid chat and completion bodies (sampling fields, n, stops, logprobs, unknown
    fields), from a seeded generator: the same list every run."""
    rng = random.Random(seed)
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(count):
        extra: dict[str, Any] = {}
        if rng.random() < 0.5:
            extra["temperature"] = rng.choice([0.0, 0.7, 1.3])
        if rng.random() < 0.3:
            extra["n"] = rng.randint(1, 3)
        if rng.random() < 0.3:
            extra["stop"] = rng.choice(["\n", ["x", "yz"]])
        if rng.random() < 0.3:
            extra["seed"] = rng.randint(0, 99)
        if rng.random() < 0.2:
            extra["vendor_extension"] = {"k": [1, 2, {"z": None}]}
        text = f"question {i}: " + " ".join(
            rng.choice(["alpha", "beta", "gamma"]) for _ in range(5)
        )
        if rng.random() < 0.7:
            if rng.random() < 0.3:
                extra["logprobs"] = True
                extra["top_logprobs"] = rng.randint(0, 3)
            out.append(
                ("/v1/chat/completions", _chat(text, max_tokens=rng.randint(1, 12), **extra))
            )
        else:
            body = {"model": MODEL, "prompt": text, "max_tokens": rng.randint(1, 12), **extra}
            if rng.random() < 0.3:
                body["logprobs"] = rng.randint(0, 2)
            out.append(("/v1/completions", body))
    return out


async def test_varied_requests_answer_the_same_on_the_lane(gateway: GatewayFactory) -> None:
    """Thirty varied requests, each sent to a gateway with the lane and to one without (each
    in front of its own identical simulated worker): the same status and answer."""
    on = await gateway(1, upstream={"express_lane": True})
    off = await gateway(1, upstream={"express_lane": False})
    bodies = _random_bodies(11, 30)
    for path, body in bodies:
        a = await on.request("POST", path, body)
        b = await off.request("POST", path, body)
        assert a.status == 200, (body, a.body)
        assert (a.status, _comparable(a.body)) == (b.status, _comparable(b.body)), body
    assert await _express_count(on) == len(bodies)


@pytest.mark.parametrize("express", [True, False])
async def test_not_plain_requests_take_the_general_path(
    gateway: GatewayFactory, express: bool
) -> None:
    gw = await gateway(1, models=[MODEL], aliases=["alias-model"],
                       upstream={"express_lane": express})  # fmt: skip
    r = await gw.request("POST", "/v1/chat/completions", _chat(stream=True))
    assert r.status == 200 and r.events()[-1] == "[DONE]"
    r = await gw.request("POST", "/v1/chat/completions", {**_chat(), "model": "alias-model"})
    assert r.status == 200, r.body
    assert r.json()["model"] == MODEL  # renamed on the way: the general path's job, or the
    lane = express and gw.server == "lane"  # compiled lane's
    assert await _express_count(gw) == (1 if lane else 0)
    r = await gw.request("POST", "/v1/chat/completions", _chat())
    assert r.status == 200
    assert await _express_count(gw) == (1 if express else 0) + (1 if lane else 0)


@pytest.mark.parametrize("express", [True, False])
@pytest.mark.parametrize("policy", ["consistent_hash", "session_affinity", "prefix_hash"])
async def test_policies_that_route_on_the_request_see_its_keys(
    gateway: GatewayFactory, express: bool, policy: str
) -> None:
    """Session and prompt keys reach the policy on the lane too: one session (or one prompt)
    stays on one worker, different ones spread."""
    gw = await gateway(3, routing=policy, upstream={"express_lane": express})
    for user in ("alice", "bob", "carol", "dave"):
        for _ in range(3):
            body = _chat(f"the same prompt for {user}", user=user)
            r = await gw.request("POST", "/v1/chat/completions", body, {"X-Session-Id": user})
            assert r.status == 200, r.body
    text = await gw.metrics()
    per_worker = [
        metric_value(text, f'lmgw_worker_requests_total{{role="pd",worker="w{i}"}}')
        for i in range(3)
    ]
    assert sum(per_worker) == 12
    assert all(n % 3 == 0 for n in per_worker), per_worker  # each key's 3 on one worker
    assert metric_value(text, EXPRESS) == (12 if express else 0)


@pytest.mark.parametrize("express", [True, False])
async def test_worker_failure_retried_on_another(gateway: GatewayFactory, express: bool) -> None:
    gw = await gateway(
        per_worker=[{"faults": {"error_rate": 1.0}}, {}], upstream={"express_lane": express}
    )
    for _ in range(4):  # round robin: half of them meet the failing worker first
        r = await gw.request("POST", "/v1/chat/completions", _chat())
        assert r.status == 200, r.body
    text = await gw.metrics()
    retries = metric_value(text, 'lmgw_retries_total{role="pd"}')
    # every attempt on the failing worker was retried on the other one
    assert retries >= 1
    assert retries == metric_value(text, 'lmgw_worker_requests_total{role="pd",worker="w0"}')
    assert metric_value(text, EXPRESS) == (4 if express else 0)


@pytest.mark.parametrize("express", [True, False])
async def test_every_worker_failing_is_a_502(gateway: GatewayFactory, express: bool) -> None:
    gw = await gateway(1, faults={"error_rate": 1.0}, upstream={"express_lane": express})
    r = await gw.request("POST", "/v1/chat/completions", _chat())
    assert r.status == 502
    err = r.json()["error"]
    assert "Simulated engine failure" in err["message"]


@pytest.mark.parametrize("express", [True, False])
async def test_hung_worker_is_a_504(gateway: GatewayFactory, express: bool) -> None:
    gw = await gateway(
        1, faults={"hang": True},
        upstream={"express_lane": express, "response_timeout_s": 0.3},
    )  # fmt: skip
    r = await gw.request("POST", "/v1/chat/completions", _chat())
    assert r.status == 504
    assert "within 0.3 s" in r.json()["error"]["message"]


# -- answers the lane does not take whole: a scripted worker ----------------------------------

_OK_BODY = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "scripted"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
).encode()
_ERR_BODY = json.dumps(
    {
        "error": {
            "message": "bad temperature",
            "type": "BadRequestError",
            "param": "temperature",
            "code": 400,
        }
    }
).encode()


def _answer(scenario: str) -> list[bytes]:
    """The bytes a scripted worker writes for ``scenario``, one element per write."""
    ok_head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    if scenario == "ok":
        return [ok_head + b"content-length: %d\r\n\r\n" % len(_OK_BODY) + _OK_BODY]
    if scenario == "error400":
        return [
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(_ERR_BODY) + _ERR_BODY
        ]
    if scenario == "chunked":
        half = len(_OK_BODY) // 2
        return [
            ok_head
            + b"transfer-encoding: chunked\r\n\r\n"
            + b"%x\r\n%b\r\n" % (half, _OK_BODY[:half])
            + b"%x\r\n%b\r\n0\r\n\r\n" % (len(_OK_BODY) - half, _OK_BODY[half:])
        ]
    if scenario == "split":  # the head, then (after a pause) the body
        return [ok_head + b"content-length: %d\r\n\r\n" % len(_OK_BODY), _OK_BODY]
    if scenario == "http10":
        return [
            b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(_OK_BODY) + _OK_BODY
        ]
    if scenario in ("charset", "charset-split"):  # the worker's own content type, kept
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json; charset=utf-8\r\n"
        head += b"content-length: %d\r\n\r\n" % len(_OK_BODY)
        return [head + _OK_BODY] if scenario == "charset" else [head, _OK_BODY]
    if scenario == "close":
        return [
            ok_head + b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(_OK_BODY) + _OK_BODY
        ]
    raise AssertionError(scenario)


async def _scripted_worker(stream: trio.SocketStream) -> None:
    """A worker that answers POSTs as their body's ``scenario`` says, GETs with a model list."""
    buf = b""
    async with stream:
        while True:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(rest) < length:
                rest += await stream.receive_some(65536)
            body, buf = rest[:length], rest[length:]
            if head.startswith(b"GET"):
                doc = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                out = doc.encode()
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%b" % (len(out), out)
                )
                continue
            scenario = json.loads(body)["scenario"]
            writes = _answer(scenario)
            for i, chunk in enumerate(writes):
                if i:
                    await trio.sleep(0.05)
                await stream.send_all(chunk)
            if scenario in ("http10", "close"):
                return


@pytest.mark.parametrize("express", [True, False])
@pytest.mark.parametrize(
    "scenario",
    ["ok", "error400", "chunked", "split", "http10", "close", "charset", "charset-split"],
)
async def test_unusual_answers_go_on_the_general_way(
    gateway: GatewayFactory, nursery: trio.Nursery, scenario: str, express: bool
) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, _scripted_worker, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    gw = await gateway(0, extra_urls=[f"http://127.0.0.1:{port}"],
                       upstream={"express_lane": express})  # fmt: skip
    for _ in range(2):  # twice: the pooled connection (or a new one) serves the next
        r = await gw.request("POST", "/v1/chat/completions", _chat(scenario=scenario))
        if scenario == "error400":
            assert r.status == 400
            assert r.json()["error"]["message"] == "bad temperature"
            assert r.json()["error"]["param"] == "temperature"
        else:
            assert r.status == 200, r.body
            assert r.json()["choices"][0]["message"]["content"] == "scripted"
            assert int(r.headers["content-length"]) == len(r.body)
            charset = scenario.startswith("charset")
            assert r.headers["content-type"] == (
                "application/json; charset=utf-8" if charset else "application/json"
            )
    assert await _express_count(gw) == (2 if express else 0)
