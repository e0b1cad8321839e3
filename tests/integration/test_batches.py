"""OpenAI's Files and Batch APIs through the official client against a gateway in front of
simulated workers: a JSONL file of requests uploaded, run on the fleet, the answers (the same
texts as the requests sent one by one) in the output file, failed ones in the error file;
bad input files fail the batch with the lines' errors; cancelling; keys see only their own."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest
import trio
from gateway_support import MODEL, GatewayFactory, http_request, metric_value

from lmgw.config import ApiKeyConfig, AuthConfig

pytestmark = [
    pytest.mark.parametrize("server", ["native"]),
    pytest.mark.usefixtures("hard_deadline"),
]

DONE = ("completed", "failed", "cancelled", "expired")


def chat(i: int, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"question number {i}"}],
        "max_tokens": 6,
        **extra,
    }


def line(i: int, body: dict[str, Any], url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)


def run_batch(c: openai.OpenAI, lines: list[str], endpoint: str = "/v1/chat/completions") -> Any:
    f = c.files.create(file=("input.jsonl", "\n".join(lines).encode()), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while b.status not in DONE and time.monotonic() < deadline:
        time.sleep(0.02)
        b = c.batches.retrieve(b.id)
    return b


def records(c: openai.OpenAI, file_id: str | None) -> dict[str, Any]:
    if file_id is None:
        return {}
    text = c.files.content(file_id).text
    return {r["custom_id"]: r for r in map(json.loads, text.splitlines())}


async def test_a_batch_runs_on_the_fleet_and_answers_as_single_requests(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(2)
    expected = {}
    for i in range(6):
        r = await http_request(gw.url, "POST", "/v1/chat/completions", chat(i))
        expected[f"req-{i}"] = r.json()["choices"][0]["message"]["content"]
    lines = [line(i, chat(i)) for i in range(6)]
    lines.append(line(6, chat(6, model="no-such-model")))  # fails on its own: error file

    def go() -> tuple[Any, dict[str, Any], dict[str, Any], Any]:
        c = client(gw.url)
        b = run_batch(c, lines)
        return b, records(c, b.output_file_id), records(c, b.error_file_id), c.files.list()

    b, out, err, listed = await trio.to_thread.run_sync(go)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (
        7, 6, 1,
    )  # fmt: skip
    assert {
        k: v["response"]["body"]["choices"][0]["message"]["content"] for k, v in out.items()
    } == expected
    assert all(v["response"]["status_code"] == 200 and v["error"] is None for v in out.values())
    assert err["req-6"]["response"]["status_code"] == 404
    assert {f.purpose for f in listed.data} == {"batch", "batch_output"}
    assert "input.jsonl" in {f.filename for f in listed.data}  # as the client named it
    assert b.in_progress_at and b.completed_at and b.finalizing_at
    text = await gw.metrics()
    assert metric_value(text, 'lmgw_batch_requests_total{outcome="ok"}') == 6
    assert metric_value(text, 'lmgw_batch_requests_total{outcome="error"}') == 1
    assert metric_value(text, 'lmgw_batches{status="completed"}') == 1
    assert metric_value(text, "lmgw_batch_file_bytes") > 0
    # each request reached a worker as the line's body, under the batch's request id
    ids = [rid for s in gw.sims for rid in (await s.stats())["request_ids"]]
    assert sum(rid.startswith(b.id) for rid in ids) == 6


async def test_a_bad_input_file_fails_the_batch_with_each_lines_error(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(1)
    lines = [
        line(0, chat(0)),
        "not json",
        line(0, chat(1)),  # the same custom_id
        line(3, chat(3), url="/v1/completions"),
        line(4, chat(4, stream=True)),
    ]

    def go() -> Any:
        return run_batch(client(gw.url), lines)

    b = await trio.to_thread.run_sync(go)
    assert b.status == "failed"
    codes = [(e.code, e.line) for e in b.errors.data]
    assert codes == [
        ("invalid_json", 2),
        ("duplicate_custom_id", 3),
        ("invalid_url", 4),
        ("invalid_body", 5),
    ]
    assert b.output_file_id is None
    assert (await gw.sims[0].stats())["requests_total"] == 0


async def test_cancelling_stops_the_requests_and_keeps_the_answers_so_far(
    gateway: GatewayFactory,
) -> None:
    gw = await gateway(1, speed=1.0)  # ~8 ms per token: 40 tokens ~ 0.3 s each
    lines = [line(i, chat(i, max_tokens=40, ignore_eos=True)) for i in range(40)]

    def go() -> Any:
        c = client(gw.url)
        f = c.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
        b = c.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while c.batches.retrieve(b.id).request_counts.completed < 2:
            time.sleep(0.02)
        b = c.batches.cancel(b.id)
        assert b.status in ("cancelling", "cancelled")
        while b.status not in DONE:
            time.sleep(0.02)
            b = c.batches.retrieve(b.id)
        return b, records(c, b.output_file_id)

    b, out = await trio.to_thread.run_sync(go)
    assert b.status == "cancelled" and b.cancelled_at
    assert 2 <= len(out) < 40
    with trio.fail_after(5):  # the requests in flight were aborted on the worker too
        while (stats := await gw.sims[0].stats())["in_flight"]:
            await trio.sleep(0.02)
    assert stats["aborted_total"] >= 1
    assert stats["requests_total"] < 40


async def test_keys_see_only_their_own_files_and_batches(gateway: GatewayFactory) -> None:
    keys = AuthConfig(
        keys=[
            ApiKeyConfig(key="sk-one-0123456789abcdef", name="one"),
            ApiKeyConfig(key="sk-two-0123456789abcdef", name="two", models=["other"]),
        ]
    )
    gw = await gateway(1, auth=keys)

    def go() -> Any:
        one, two = (
            client(gw.url, "sk-one-0123456789abcdef"),
            client(gw.url, "sk-two-0123456789abcdef"),
        )
        b = run_batch(one, [line(0, chat(0))])
        assert b.status == "completed" and b.request_counts.completed == 1
        assert [x.id for x in one.batches.list().data] == [b.id]
        assert two.batches.list().data == [] and two.files.list().data == []
        with pytest.raises(openai.NotFoundError):
            two.batches.retrieve(b.id)
        with pytest.raises(openai.NotFoundError):
            two.files.content(b.output_file_id)
        # the batch's requests run as its key: two may not use MODEL
        b2 = run_batch(two, [line(0, chat(0))])
        err = records(two, b2.error_file_id)
        assert err["req-0"]["response"]["status_code"] == 403
        deleted = one.files.delete(b.output_file_id)
        assert deleted.deleted
        with pytest.raises(openai.NotFoundError):
            one.files.retrieve(b.output_file_id)

    await trio.to_thread.run_sync(go)


async def test_the_api_answers_bad_requests_in_openais_shape(gateway: GatewayFactory) -> None:
    gw = await gateway(1)
    missing = {"input_file_id": "file-x", "endpoint": "/v1/chat/completions"}
    r = await http_request(gw.url, "POST", "/v1/batches", missing)
    assert r.status == 404 and r.json()["error"]["param"] == "input_file_id"
    r = await http_request(gw.url, "POST", "/v1/batches", {"endpoint": 3})
    assert r.status == 400
    r = await http_request(gw.url, "POST", "/v1/files", b"not a form")
    assert r.status == 400
    r = await http_request(gw.url, "DELETE", "/v1/batches/batch_x")
    assert r.status == 405
    r = await http_request(gw.url, "GET", "/v1/files/file-x/other")
    assert r.status == 404

    def go() -> None:
        c = client(gw.url)
        f = c.files.create(file=("in.jsonl", line(0, chat(0)).encode()), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="endpoint must be"):
            c.batches.create(input_file_id=f.id, endpoint="/v1/moderations",  # type: ignore[arg-type]
                             completion_window="24h")  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="purpose"):
            c.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")

    await trio.to_thread.run_sync(go)
