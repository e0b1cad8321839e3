"""API keys, sans-IO: the key table's answers (401/403/429 with OpenAI's codes), its buckets
under a fake clock, reloads, the key list formats and the config side (hashed at rest,
redacted, never echoed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import pytest

from lmgw.auth import (
    AuthError,
    KeySpec,
    KeyTable,
    hash_key,
    parse_key_lines,
    rate_limit_headers,
    read_keys_file,
)
from lmgw.config import (
    ApiKeyConfig,
    AuthConfig,
    ConfigError,
    GatewayConfig,
    ServerConfig,
    dump_config,
    load_config,
    loads_config,
)

KEY = "sk-test-0123456789abcdef"
OTHER = "sk-other-0123456789abcdef"


def spec(key: str = KEY, **kw) -> KeySpec:
    return KeySpec(digest=hash_key(key), name=kw.pop("name", "k1"), **kw)


def bearer(key: str) -> bytes:
    return b"Bearer " + key.encode()


def refused(fn, *args) -> AuthError:
    with pytest.raises(AuthError) as info:
        fn(*args)
    return info.value


# -- authenticate --------------------------------------------------------------------------------


def test_missing_wrong_and_right_keys() -> None:
    table = KeyTable([spec()])
    for header, reason in (
        (None, "missing_key"),
        (b"", "missing_key"),
        (b"Basic " + KEY.encode(), "invalid_key"),
        (bearer(OTHER), "invalid_key"),
        (bearer(KEY[:-1]), "invalid_key"),
        (b"Bearer", "invalid_key"),
    ):
        err = refused(table.authenticate, header)
        assert (err.status, err.code, err.reason) == (401, "invalid_api_key", reason)
        body = msgspec.json.decode(err.body())["error"]
        assert body["code"] == "invalid_api_key" and body["type"] == "invalid_request_error"
        assert KEY not in err.message and (b"www-authenticate", b'Bearer realm="lmgw"') in (
            err.headers()
        )
    assert table.authenticate(bearer(KEY)).name == "k1"
    assert table.authenticate(b"bearer  " + KEY.encode() + b" ").name == "k1"  # any case, spaces


def test_the_table_holds_digests_only() -> None:
    table = KeyTable([spec()])
    (entry,) = list(table)
    assert entry.digest == hashlib.sha256(KEY.encode()).digest()
    assert KEY.encode() not in repr(vars(table)).encode()


def test_model_allow_list() -> None:
    table = KeyTable([spec(models=frozenset({"llama", "short"}))])
    entry = table.authenticate(bearer(KEY))
    KeyTable.check_model(entry, "llama")
    KeyTable.check_model(entry, "llama-3.1-8b", "short")  # the alias the client sent is listed
    err = refused(KeyTable.check_model, entry, "qwen", "qwen")
    assert (err.status, err.code, err.param) == (403, "model_not_allowed", "model")
    open_key = KeyTable([spec()]).authenticate(bearer(KEY))
    KeyTable.check_model(open_key, "anything")


# -- limits ------------------------------------------------------------------------------------


def test_requests_per_second_bucket_with_burst() -> None:
    table = KeyTable([spec(requests_per_s=2.0, burst=3)], now=0.0)
    entry = table.authenticate(bearer(KEY))
    for _ in range(3):
        table.admit(entry, 0.0)
        KeyTable.release(entry)
    err = refused(table.admit, entry, 0.0)
    assert (err.status, err.code, err.type, err.reason) == (
        429,
        "rate_limit_exceeded",
        "requests",
        "rate",
    )
    assert (b"retry-after", b"1") in err.headers()
    assert entry.in_flight == 0  # a refusal counts nothing in
    table.admit(entry, 0.5)  # half a second refills one request
    KeyTable.release(entry)
    refused(table.admit, entry, 0.5)
    table.admit(entry, 100.0)  # never more than the burst after a long pause
    table.admit(entry, 100.0)
    table.admit(entry, 100.0)
    refused(table.admit, entry, 100.0)


def test_a_refund_undoes_an_admit_and_a_refusal_spends_nothing() -> None:
    """The compiled lane admits a key, then may hand the request to the server, which admits
    it again: the lane's refund leaves the key as if it had never seen it. A refused admit,
    repeated by the server, refuses the same way."""
    table = KeyTable([spec(requests_per_s=1.0, burst=2)], now=0.0)
    entry = table.authenticate(bearer(KEY))
    table.admit(entry, 0.0)
    KeyTable.refund(entry)
    assert (entry.in_flight, entry.requests, entry.rate_level) == (0, 0, 2.0)
    for _ in range(2):
        table.admit(entry, 0.0)
    for _ in range(2):  # the lane's refusal, then the server's
        assert refused(table.admit, entry, 0.0).reason == "rate"
    assert (entry.in_flight, entry.requests) == (2, 2)


def test_concurrency_cap() -> None:
    table = KeyTable([spec(max_concurrent=2)])
    entry = table.authenticate(bearer(KEY))
    table.admit(entry, 0.0)
    table.admit(entry, 0.0)
    err = refused(table.admit, entry, 0.0)
    assert (err.status, err.reason) == (429, "concurrency")
    KeyTable.release(entry)
    table.admit(entry, 0.0)
    assert entry.in_flight == 2 and entry.requests == 3


def test_tokens_per_minute_are_charged_at_the_end_and_refuse_the_next() -> None:
    table = KeyTable([spec(tokens_per_min=600)], now=0.0)
    entry = table.authenticate(bearer(KEY))
    table.admit(entry, 0.0)
    KeyTable.charge(entry, 1000, 0.0)  # the request that overspends is not cut short
    KeyTable.release(entry)
    err = refused(table.admit, entry, 1.0)
    assert (err.status, err.code, err.type, err.reason) == (
        429,
        "rate_limit_exceeded",
        "tokens",
        "tokens",
    )
    # 400 tokens short at 10 tokens/s: about 40 s
    assert 35 <= err.retry_after <= 41
    table.admit(entry, 41.0)
    assert entry.tokens == 1000


def test_rate_limit_headers_say_what_is_left_and_when_it_is_full_again() -> None:
    """OpenAI's x-ratelimit-* headers, read from the buckets without spending them."""
    table = KeyTable([spec(requests_per_s=2.0, burst=10, tokens_per_min=6000)], now=0.0)
    entry = table.authenticate(bearer(KEY))
    for _ in range(4):
        table.admit(entry, 0.0)
    KeyTable.charge(entry, 1500, 0.0)
    got = dict(rate_limit_headers(entry, 0.5))
    assert got == {
        b"x-ratelimit-limit-requests": b"10",
        b"x-ratelimit-remaining-requests": b"7",  # 6 left, +1 refilled in 0.5 s
        b"x-ratelimit-reset-requests": b"1.5s",  # 3 short at 2/s
        b"x-ratelimit-limit-tokens": b"6000",
        b"x-ratelimit-remaining-tokens": b"4550",  # 4500 + 50 refilled (100/s)
        b"x-ratelimit-reset-tokens": b"14.5s",
    }
    assert rate_limit_headers(entry, 0.5) == rate_limit_headers(entry, 0.5)  # nothing spent
    KeyTable.charge(entry, 60000, 0.5)  # far over: remaining 0, reset in minutes
    got = dict(rate_limit_headers(entry, 0.5))
    assert got[b"x-ratelimit-remaining-tokens"] == b"0"
    assert got[b"x-ratelimit-reset-tokens"] == b"10m14s"  # 61450 short at 100/s
    full = dict(rate_limit_headers(entry, 1000.0))
    assert full[b"x-ratelimit-reset-requests"] == b"0ms"
    assert dict(rate_limit_headers(KeyTable([spec()]).authenticate(bearer(KEY)), 0.0)) == {}
    # a 429 of a rate or token limit carries them too
    err = refused(table.admit, entry, 0.5)
    assert (b"x-ratelimit-remaining-tokens", b"0") in err.headers()


def test_reload_keeps_buckets_and_drops_removed_keys() -> None:
    table = KeyTable([spec(requests_per_s=1.0), spec(OTHER, name="k2")], now=0.0)
    entry = table.authenticate(bearer(KEY))
    table.admit(entry, 0.0)
    table.replace([spec(requests_per_s=1.0, name="renamed")], now=0.0)
    assert table.authenticate(bearer(KEY)) is entry and entry.name == "renamed"
    refused(table.admit, entry, 0.0)  # the reload did not refill the bucket
    assert entry.in_flight == 1
    refused(table.authenticate, bearer(OTHER))
    with pytest.raises(ValueError):
        table.replace([spec(), spec(name="again")], now=0.0)


# -- key formats ---------------------------------------------------------------------------------


def test_hash_key_accepts_keys_and_digests_and_never_echoes() -> None:
    digest = hash_key(KEY)
    assert digest == "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()
    assert hash_key(digest) == digest
    for bad in ("short", "has space in it!!!!", "x" * 513, "sha256:abc", "a,b" * 10):
        with pytest.raises(ValueError) as info:
            hash_key(bad)
        assert bad not in str(info.value)


def test_plain_key_lines() -> None:
    text = f"# keys\n{KEY}\n\n{OTHER} llama,qwen  # two models\n"
    assert parse_key_lines(text) == [{"key": KEY}, {"key": OTHER, "models": ["llama", "qwen"]}]
    assert parse_key_lines(f"{KEY}; {OTHER} m", separators="\n;") == [
        {"key": KEY},
        {"key": OTHER, "models": ["m"]},
    ]
    for bad in (f"{KEY} a b", f"{KEY},{OTHER}"):
        with pytest.raises(ValueError) as info:
            parse_key_lines(bad)
        assert KEY not in str(info.value)


def test_keys_files(tmp_path: Path) -> None:
    plain = tmp_path / "keys.txt"
    plain.write_text(f"{KEY} llama\n")
    assert read_keys_file(str(plain)) == [{"key": KEY, "models": ["llama"]}]
    toml = tmp_path / "keys.toml"
    toml.write_text(f'[[keys]]\nkey = "{KEY}"\nname = "team-a"\nrequests_per_s = 5\n')
    assert read_keys_file(str(toml)) == [{"key": KEY, "name": "team-a", "requests_per_s": 5}]
    toml.write_text(f'[[keys]]\nkey = "{KEY}\n')  # a syntax error on the key's own line
    with pytest.raises(ValueError) as info:
        read_keys_file(str(toml))
    assert KEY not in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        read_keys_file(str(tmp_path / "missing"))


# -- config ------------------------------------------------------------------------------------


def test_config_keeps_only_digests_and_dumps_redacted() -> None:
    cfg = loads_config(f'[auth]\n[[auth.keys]]\nkey = "{KEY}"\nmodels = ["llama"]\n')
    assert cfg.auth.keys[0].key == hash_key(KEY)
    plain_dump = dump_config(cfg)
    assert KEY not in plain_dump and hash_key(KEY) in plain_dump
    assert loads_config(plain_dump) == cfg  # the digest form loads back
    redacted = dump_config(cfg, redact=True)
    assert hash_key(KEY) not in redacted and "<redacted>" in redacted


def test_api_keys_from_the_environment() -> None:
    cfg = load_config(
        env={"LMGW_API_KEYS": f"{KEY} llama; {OTHER}", "LMGW_AUTH_TOKENS_PER_MIN": "9"}
    )
    assert [k.key for k in cfg.auth.keys] == [hash_key(KEY), hash_key(OTHER)]
    assert cfg.auth.keys[0].models == ["llama"] and cfg.auth.tokens_per_min == 9
    with pytest.raises(ConfigError) as info:
        load_config(env={"LMGW_API_KEYS": "tooshort"})
    assert "LMGW_API_KEYS" in str(info.value) and "tooshort" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(env={"LMGW_API_KEYS": f"{KEY}; {KEY}"})
    assert KEY not in str(info.value)


def test_auth_config_checks() -> None:
    with pytest.raises(ConfigError, match="open"):
        AuthConfig(open=True, keys_file="/etc/keys")
    with pytest.raises(ConfigError, match="open_paths"):
        AuthConfig(open_paths=["health"])
    with pytest.raises(ConfigError, match="requests_per_s"):
        ApiKeyConfig(key=KEY, requests_per_s=-1)
    with pytest.raises(ConfigError, match="name"):
        ApiKeyConfig(key=KEY, name="has space")


def test_gateway_without_keys_needs_loopback_or_open() -> None:
    from lmgw.gateway import Gateway

    assert Gateway(GatewayConfig()).keys is None  # 127.0.0.1: open to local clients
    with pytest.raises(ConfigError, match=r"auth\.open"):
        Gateway(GatewayConfig(server=ServerConfig(host="0.0.0.0")))
    Gateway(GatewayConfig(server=ServerConfig(host="0.0.0.0"), auth=AuthConfig(open=True)))
    gw = Gateway(
        GatewayConfig(
            server=ServerConfig(host="0.0.0.0"), auth=AuthConfig(keys=[ApiKeyConfig(key=KEY)])
        )
    )
    assert gw.keys is not None and len(gw.keys) == 1
    assert KEY not in repr(msgspec.structs.asdict(gw.config.auth))
