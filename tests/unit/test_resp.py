"""The sans-IO RESP2 codec and redis:// URLs of lmgw.workers.discovery.resp, and backoff."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.workers.discovery.resp import (
    NEED_DATA,
    RedisAddress,
    RespErrorReply,
    RespParser,
    RespProtocolError,
    encode_command,
    parse_redis_url,
)
from lmgw.workers.discovery.sink import backoff_delay


def encode_reply(value: Any) -> bytes:
    """What a Redis server would send for ``value`` (the test's reference encoder)."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, RespErrorReply):
        return b"-" + value.message.encode() + b"\r\n"
    if isinstance(value, str):
        return b"+" + value.encode() + b"\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(encode_reply(v) for v in value)


line_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20
)
scalars = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=64),
    line_text,
    line_text.map(RespErrorReply),
)
replies = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6), max_leaves=30)


def parse_all(data: bytes, cuts: list[int]) -> list[Any]:
    """Feed ``data`` in pieces cut at ``cuts`` and collect every reply."""
    parser = RespParser()
    out: list[Any] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        parser.feed(data[start:cut])
        start = cut
        while (value := parser.next()) is not NEED_DATA:
            out.append(value)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(replies, min_size=1, max_size=4), st.data())
def test_replies_round_trip_however_the_bytes_are_split(values: list[Any], data: Any) -> None:
    wire = b"".join(encode_reply(v) for v in values)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(wire)), max_size=8))
    assert parse_all(wire, cuts) == values


@given(st.lists(st.one_of(st.binary(max_size=40), line_text, st.integers()), max_size=8))
def test_a_command_is_an_array_of_bulk_strings(args: list[Any]) -> None:
    (parsed,) = parse_all(encode_command(*args), [])
    expected = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    assert parsed == expected


def test_one_byte_at_a_time_and_nil_array() -> None:
    wire = b"*2\r\n$1\r\n0\r\n*3\r\n$4\r\nk:w1\r\n$-1\r\n:7\r\n*-1\r\n+OK\r\n"
    assert parse_all(wire, list(range(len(wire)))) == [[b"0", [b"k:w1", None, 7]], None, "OK"]


@pytest.mark.parametrize(
    ("wire", "needle"),
    [
        (b"?x\r\n", "unknown reply type"),
        (b":12a\r\n", "integer"),
        (b"$3\r\nabcXY", "CRLF"),
        (b"$-2\r\n", "out of range"),
        (b"$999999999999\r\n", "out of range"),
        (b"*-5\r\n", "out of range"),
        (b"*1\r\n" * 9 + b":1\r\n", "nested"),
        (b"+" + b"x" * (70 << 10), "too long"),
    ],
)
def test_malformed_replies_are_protocol_errors(wire: bytes, needle: str) -> None:
    parser = RespParser()
    parser.feed(wire)
    with pytest.raises(RespProtocolError, match=needle):
        while parser.next() is not NEED_DATA:
            pass


def test_cannot_send_other_types() -> None:
    with pytest.raises(TypeError):
        encode_command("SET", None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://h", RedisAddress("h", 6379, 0)),
        ("redis://10.0.0.1:7000/3", RedisAddress("10.0.0.1", 7000, 3)),
        ("redis://:s%40cret@h:1/", RedisAddress("h", 1, 0, None, "s@cret")),
        ("redis://bob:pw@h", RedisAddress("h", 6379, 0, "bob", "pw")),
        (" REDIS://[::1]:6380/1 ", RedisAddress("::1", 6380, 1)),
    ],
)
def test_redis_urls(url: str, address: RedisAddress) -> None:
    assert parse_redis_url(url) == address


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://h", "expected redis://"),
        ("rediss://:topsecret@h", "TLS"),
        ("redis://:topsecret@h:0", "port 0"),
        ("redis://:topsecret@h:99999", "not a redis"),
        ("redis://:topsecret@/1", "no host"),
        ("redis://:topsecret@h/db1", "must be a number"),
        ("redis://:topsecret@h/1?x=1", "no query"),
    ],
)
def test_bad_redis_urls_never_show_the_password(url: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        parse_redis_url(url)
    assert "topsecret" not in str(info.value)


def test_address_str_hides_the_password() -> None:
    assert str(parse_redis_url("redis://:topsecret@h:1/2")) == "redis://h:1/2"


def test_backoff_grows_is_capped_and_jittered() -> None:
    assert backoff_delay(1, 0.5, 30, rand=lambda: 0.0) == 0.25
    assert backoff_delay(1, 0.5, 30, rand=lambda: 1.0) == 0.5
    assert backoff_delay(4, 0.5, 30, rand=lambda: 1.0) == 4.0
    assert backoff_delay(50, 0.5, 30, rand=lambda: 1.0) == 30.0
    delays = {backoff_delay(3, 1.0, 30) for _ in range(50)}
    assert len(delays) > 1 and all(2.0 <= d <= 4.0 for d in delays)
