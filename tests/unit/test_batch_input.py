"""The Batch API's sans-IO parts: a batch input file's checks (lmgw.batch.jobs.parse_input)
and the file store's bounds, ownership and expiry (lmgw.batch.files)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmgw.batch import FileStore, parse_input
from lmgw.batch.files import FileError

URL = "/v1/chat/completions"


def line(cid: str, body: object = None, url: str = URL, method: str = "POST") -> bytes:
    body = {"model": "m", "messages": []} if body is None else body
    return json.dumps({"custom_id": cid, "method": method, "url": url, "body": body}).encode()


def test_good_lines_become_requests_with_their_bodies() -> None:
    data = b"\n".join([line("a"), b"", line("b", {"model": "m", "max_tokens": 3}), b"  "])
    lines, errors = parse_input(data, URL, 100)
    assert errors == []
    assert [(x.custom_id, x.number) for x in lines] == [("a", 1), ("b", 3)]
    assert json.loads(lines[1].body) == {"model": "m", "max_tokens": 3}


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        (json.dumps({"method": "POST", "url": URL, "body": {}}).encode(), "missing_custom_id"),
        (line("x", method="GET"), "invalid_method"),
        (line("x", url="/v1/embeddings"), "invalid_url"),
        (line("x", body=[1]), "invalid_body"),
        (line("x", body={"stream": True}), "invalid_body"),
    ],
)
def test_each_bad_line_is_named(raw: bytes, code: str) -> None:
    _, errors = parse_input(line("ok") + b"\n" + raw, URL, 100)
    assert [(e["code"], e["line"]) for e in errors] == [(code, 2)]


def test_duplicates_limits_and_empty_files() -> None:
    _, errors = parse_input(line("a") + b"\n" + line("a"), URL, 100)
    assert errors[0]["code"] == "duplicate_custom_id"
    _, errors = parse_input(b"\n".join(line(str(i)) for i in range(5)), URL, 3)
    assert errors[0]["code"] == "too_many_requests" and errors[0]["line"] == 4
    assert parse_input(b"\n\n", URL, 3)[1][0]["code"] == "empty_file"
    _, errors = parse_input(b"\n".join(b"bad" for _ in range(500)), URL, 1000)
    assert len(errors) == 100  # the first ones, not a 500-line error list


@given(st.binary(max_size=2000))
def test_any_bytes_give_requests_or_errors_never_an_exception(data: bytes) -> None:
    lines, errors = parse_input(data, URL, 50)
    assert lines or errors


def test_the_store_bounds_owns_and_expires_files() -> None:
    store = FileStore(max_file_bytes=10, max_total_bytes=25, retention_s=100.0)
    a = store.add("k1", "a.jsonl", "batch", b"x" * 10, now=0.0)
    store.add("k2", "b.jsonl", "batch", b"y" * 10, now=1.0)
    with pytest.raises(FileError) as big:
        store.add("k1", "c", "batch", b"z" * 11, now=2.0)
    assert big.value.status == 413
    with pytest.raises(FileError) as full:
        store.add("k1", "c", "batch", b"z" * 10, now=2.0)
    assert full.value.status == 507
    assert store.get(a.id, "k2") is None and store.get(a.id, "k1") is a
    assert [f.filename for f in store.owned("k1")] == ["a.jsonl"]
    assert not store.delete(a.id, "k2") and store.delete(a.id, "k1")
    assert store.total_bytes == 10
    store.add("k1", "c", "batch", b"z" * 10, now=2.0)  # room again
    store.expire(101.5)  # b (made at 1.0) and c (2.0): b expired
    assert [f.filename for f in store] == ["c"] and store.total_bytes == 10
    assert a.describe()["object"] == "file" and a.describe()["bytes"] == 10
