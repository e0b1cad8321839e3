"""The sans-IO pieces of the pass-through endpoints: the bounded multipart field finder, the
Responses API affinity map (LRU, TTL, owners), reading a response id from an answer, and the
replica sync of stored-response records."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmgw.api import multipart
from lmgw.config import ReplicasConfig
from lmgw.routing.responses import IdReader, ResponseAffinity, created_id_of, response_id_of
from lmgw.workers.registry import Registry
from lmgw.workers.replicas import ReplicaSync

CT = b"multipart/form-data; boundary=B0und"


def form(parts: list[tuple[str, bytes]], boundary: bytes = b"B0und") -> bytes:
    out = b""
    for name, value in parts:
        out += b"--" + boundary + b"\r\n"
        out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


# -- multipart ---------------------------------------------------------------------------------

names = st.sampled_from(["model", "stream", "file", "language", "x"])
values = st.binary(max_size=300).filter(lambda v: b"\r\n--B0und" not in v)


@given(st.lists(st.tuples(names, values), max_size=6))
def test_form_fields_find_the_first_of_each(parts: list[tuple[str, bytes]]) -> None:
    body = form(parts)
    spans = multipart.form_spans(body, CT, frozenset({"model", "file", "stream"}))
    for name in ("model", "file", "stream"):
        first = next((v for n, v in parts if n == name), None)
        if first is None:
            assert name not in spans
        else:
            assert body[spans[name]] == first


def test_form_fields_values_and_replace() -> None:
    body = b"preamble\r\n" + form([("file", b"\x00\xff" * 600), ("model", b"alias")])
    fields = multipart.form_fields(body, CT, frozenset({"model"}))
    assert fields["model"].value == "alias"
    out = multipart.replace_value(body, fields["model"], "the-model-name")
    assert multipart.form_fields(out, CT, frozenset({"model"}))["model"].value == "the-model-name"
    assert multipart.form_spans(out, CT, frozenset({"file"}))["file"] == slice(
        body.index(b"\x00"), body.index(b"\x00") + 1200
    )
    # quoted boundary, other parameters
    ct = b'multipart/form-data; charset=utf-8; boundary="B0und"'
    assert multipart.form_fields(body, ct, frozenset({"model"}))["model"].value == "alias"


@pytest.mark.parametrize(
    ("body", "ctype", "needle"),
    [
        (form([("model", b"m")]), b"application/json", "multipart/form-data"),
        (form([("model", b"m")]), None, "no content-type"),
        (form([("model", b"m")]), b"multipart/form-data", "boundary"),
        (b"nothing here", CT, "no part"),
        (b"--B0und\r\nContent-Disposition: form-data; name=model\r\n\r\nm", CT, "ends inside"),
        (b"--B0undXX", CT, "line break"),
        (b"--B0und\r\n" + b"h" * 9000, CT, "headers"),
        (form([("model", b"m" * 2000)]), CT, "longer than"),
        (form([("model", b"\xff")]), CT, "UTF-8"),
        (form([("x", b"")] * 300), CT, "more than"),
    ],
)
def test_form_errors(body: bytes, ctype: bytes | None, needle: str) -> None:
    with pytest.raises(multipart.FormError, match=needle):
        multipart.form_fields(body, ctype, frozenset({"model"}))


# -- the affinity map --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_affinity_lru_bound_and_ttl() -> None:
    clock = Clock()
    aff = ResponseAffinity(max_entries=3, ttl_s=10.0, clock=clock)
    for i in range(3):
        aff.record(f"r{i}", f"w{i}", "m", None)
    assert aff.lookup("r0").worker_id == "w0"  # r0 now most recently used
    aff.record("r3", "w3", "m", "alpha")
    assert len(aff) == 3 and aff.lookup("r1") is None  # the least recently used went
    assert aff.lookup("r3").owner == "alpha"
    clock.now += 10.0
    assert aff.lookup("r3") is None and len(aff) == 2  # expired, forgotten
    aff.record("r4", "w", "m", None, ttl_s=1.0)
    assert aff.remaining_s(aff.lookup("r4")) == pytest.approx(1.0)
    assert aff.counts["recorded"] == 5


def test_affinity_off_and_listener() -> None:
    off = ResponseAffinity(max_entries=0, ttl_s=10.0)
    off.record("r", "w", "m")
    assert len(off) == 0
    seen = []
    aff = ResponseAffinity(max_entries=10, ttl_s=10.0)
    aff.listener = lambda rid, stored: seen.append((rid, stored.worker_id))
    aff.record("a", "w1", "m")
    aff.record("b", "w2", "m", share=False)  # learnt from another replica: not echoed
    assert seen == [("a", "w1")]


def test_response_ids_read_from_answers() -> None:
    body = msgspec.json.encode({"id": "resp_1", "object": "response", "output": []})
    assert response_id_of(body) == "resp_1"
    assert response_id_of(b'{"id": "chatcmpl-1", "object": "chat.completion"}') is None
    assert response_id_of(b"not json") is None
    created = msgspec.json.encode(
        {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_2"}}
    )
    events = b"event: response.created\ndata: " + created + b"\n\nevent: x\ndata: {}\n\n"
    assert created_id_of(events) == "resp_2"
    assert created_id_of(b"event: response.created\ndata: {broken\n\n") is None
    assert created_id_of(b"data: {}\n\n") is None
    found = []
    reader = IdReader(found.append)
    assert reader.events(b"event: x\ndata: {}\n\n") == b"event: x\ndata: {}\n\n"
    reader.events(events)
    reader.events(events)  # once only
    assert found == ["resp_2"]


# -- replicas ----------------------------------------------------------------------------------


def test_replicas_share_response_records() -> None:
    cfg = ReplicasConfig(redis_url="redis://127.0.0.1:1", id="a")
    mine = ReplicaSync(cfg, Registry(), {})
    aff = ResponseAffinity(max_entries=10, ttl_s=60.0)
    mine.share_responses(aff)
    aff.record("resp_x", "w1", "m", "alpha")
    kind, payload = mine._out[-1]
    assert kind == "response"
    other = ReplicaSync(msgspec.structs.replace(cfg, id="b"), Registry(), {})
    theirs = ResponseAffinity(max_entries=10, ttl_s=60.0)
    other.share_responses(theirs)
    assert other.apply(payload)
    stored = theirs.lookup("resp_x")
    assert (stored.worker_id, stored.model, stored.owner) == ("w1", "m", "alpha")
    assert not other._out  # applied entries are not published again
    assert not mine.apply(payload)  # its own
    entry = msgspec.msgpack.decode(payload)
    entry[0], entry[-1] = "c", 0.0  # nothing left of its time to live
    assert not other.apply(msgspec.msgpack.encode(entry))
