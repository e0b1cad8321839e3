"""Tests for lmgw.config: schema defaults, validation messages, layering, flags, TOML dump, docs."""

from __future__ import annotations

import argparse
import re
import typing
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgw.config import (
    FLOW_ROLES,
    FLOWS,
    ROLE_NAMES,
    ROLES,
    ConfigError,
    GatewayConfig,
    HealthConfig,
    LimitsConfig,
    LoggingConfig,
    ModelConfig,
    RoutingConfig,
    ServerConfig,
    UpstreamConfig,
    WorkerConfig,
    add_serve_arguments,
    config_from_args,
    config_from_mapping,
    dump_config,
    infer_flow,
    load_config,
    loads_config,
    normalize_role,
    parse_worker_flag,
)

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "docs" / "lmgw.example.toml"


def write(tmp_path: Path, text: str, name: str = "lmgw.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads_config(text)
    return info.value


# --------------------------------------------------------------------------------------------------
# Defaults and vocabulary


def test_defaults_without_file_or_env() -> None:
    cfg = load_config(env={})
    assert cfg == GatewayConfig()
    assert cfg.server == ServerConfig(host="127.0.0.1", port=8000, server="native")
    assert cfg.server.backlog == 1024 and cfg.server.graceful_shutdown_s == 30.0
    assert cfg.server.certfile is None and cfg.server.keyfile is None and not cfg.server.tls
    assert cfg.limits == LimitsConfig(
        max_header_bytes=65536,
        max_body_bytes=33554432,
        header_timeout_s=10.0,
        body_timeout_s=60.0,
        keepalive_timeout_s=75.0,
        request_timeout_s=600.0,
        max_connections=4096,
    )
    assert cfg.upstream == UpstreamConfig(
        connect_timeout_s=5.0,
        response_timeout_s=600.0,
        idle_timeout_s=4.0,
        max_idle_per_worker=256,
        max_attempts=2,
        api_key=None,
    )
    assert cfg.routing == RoutingConfig(policy="round_robin", policies={})
    assert cfg.health == HealthConfig(
        interval_s=5.0, timeout_s=2.0, failure_threshold=2, success_threshold=1, path="/health"
    )
    assert cfg.logging == LoggingConfig(level="info", json=False, access_log=False)
    assert cfg.models == [] and cfg.workers == []


def test_structs_are_frozen_and_strict() -> None:
    cfg = GatewayConfig()
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # type: ignore[misc]
    for cls in _all_structs(GatewayConfig):
        assert cls.__struct_config__.forbid_unknown_fields, cls
        assert cls.__struct_config__.frozen, cls
        with pytest.raises(TypeError):  # kw_only: no positional arguments
            cls("x")


def _all_structs(cls: type) -> list[type]:
    out = [cls]
    for f in msgspec.structs.fields(cls):
        for tp in (f.type, *typing.get_args(f.type)):
            if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
                out += _all_structs(tp)
    return out


def test_role_vocabulary() -> None:
    assert ROLES == ("e", "p", "d", "pd")
    assert ROLE_NAMES == {"e": "encode", "p": "prefill", "d": "decode", "pd": "merged"}
    assert FLOWS == ("pd", "p/d", "e+pd", "e+p+d")
    assert set(FLOW_ROLES) == set(FLOWS)


@pytest.mark.parametrize(
    ("text", "role"),
    [
        ("pd", "pd"),
        ("merged", "pd"),
        ("MERGED", "pd"),
        ("e", "e"),
        ("Encode", "e"),
        ("p", "p"),
        ("prefill", "p"),
        ("PREFILL", "p"),
        ("d", "d"),
        ("decode", "d"),
        (" D ", "d"),
        ("PD", "pd"),
    ],
)
def test_normalize_role(text: str, role: str) -> None:
    assert normalize_role(text) == role


@pytest.mark.parametrize("text", ["", "x", "dp", "prefil", "p+d", "encoder"])
def test_normalize_role_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a role") as info:
        normalize_role(text)
    assert "pd/merged, e/encode, p/prefill, d/decode" in str(info.value)


def test_normalize_role_rejects_non_strings() -> None:
    with pytest.raises(ConfigError):
        normalize_role(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Loading a file


def test_full_file_with_long_role_forms(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
host = "0.0.0.0"
port = 9000

[routing]
policy = "least_load"
policies = { PREFILL = "cache_aware", decode = "least_load" }

[logging]
level = "DEBUG"

[[models]]
name = "llama"
flow = "p/d"
aliases = ["meta-llama/Llama-3.1-8B-Instruct"]

[[workers]]
url = "http://10.0.0.1:8000/"
role = "Prefill"

[[workers]]
url = "https://10.0.0.2"
role = "decode"
models = ["llama"]
id = "dec-0"
""",
    )
    cfg = load_config(path, env={})
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 9000
    assert cfg.routing.policies == {"p": "cache_aware", "d": "least_load"}
    assert cfg.routing.policy_for("prefill") == "cache_aware"
    assert cfg.routing.policy_for("pd") == "least_load"
    assert cfg.logging.level == "debug"
    assert [w.role for w in cfg.workers] == ["p", "d"]
    assert cfg.workers[0].url == "http://10.0.0.1:8000"  # trailing slash dropped
    assert cfg.workers[0].worker_id == "http://10.0.0.1:8000"
    assert cfg.workers[1].worker_id == "dec-0"
    assert cfg.model("llama") is cfg.models[0]
    assert cfg.model("meta-llama/Llama-3.1-8B-Instruct") is cfg.models[0]
    assert cfg.model("other") is None
    assert cfg.models[0].names == ("llama", "meta-llama/Llama-3.1-8B-Instruct")


def test_direct_construction_normalizes() -> None:
    w = WorkerConfig(url="http://h:1///", role="MERGED")
    assert (w.role, w.url) == ("pd", "http://h:1")
    assert RoutingConfig(policies={"encode": "x"}).policies == {"e": "x"}
    assert LoggingConfig(level="Warning").level == "warning"
    assert msgspec.structs.replace(w, role="decode").role == "d"


def test_lmgw_config_env_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1234\n")
    assert load_config(env={"LMGW_CONFIG": str(path)}).server.port == 1234
    # an explicit path wins over LMGW_CONFIG
    other = write(tmp_path, "[server]\nport = 4321\n", "other.toml")
    assert load_config(other, env={"LMGW_CONFIG": str(path)}).server.port == 4321
    assert load_config(env={"LMGW_CONFIG": ""}) == GatewayConfig()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file") as info:
        load_config(tmp_path / "nope.toml", env={})
    assert "nope.toml" in str(info.value)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhost = "a"\nport = = 3\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    msg = str(info.value)
    assert str(path) in msg and "line 3" in msg and "TOML syntax error" in msg


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[server]\nhost = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path, env={})


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 99999\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == (
        f"config error at `server.port` in file `{path}`: 99999 is out of range 0..65535"
    )


def test_example_file_loads() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert len(cfg.models) == 2
    assert len(cfg.workers) == 4
    assert cfg != GatewayConfig()
    assert loads_config(dump_config(cfg)) == cfg


# --------------------------------------------------------------------------------------------------
# Validation: every error path names the key


W = '[[workers]]\nurl = "http://h:1"\n'

BAD = [
    # (TOML, path in message, fragment of the reason)
    ("zzz = 1", None, "unknown top-level key `zzz`"),
    ("[server]\nprot = 1", "server", "unknown key `prot` (did you mean `port`?)"),
    ("[limits]\nxyzzy = 1", "limits", "known keys: max_header_bytes"),
    ("server = 5", "server", "expected a table, got an integer"),
    ("[server]\nport = 'x'", "server.port", "expected an integer, got a string 'x'"),
    ("[server]\nport = 1.5", "server.port", "expected an integer, got a float"),
    ("[server]\nport = -1", "server.port", "out of range 0..65535"),
    ("[server]\nport = 65536", "server.port", "out of range 0..65535"),
    ("[server]\nhost = ''", "server.host", "must not be empty"),
    ("[server]\nserver = 'uvicorn'", "server.server", "'uvicorn' is not one of: native, hypercorn"),
    ("[server]\nbacklog = 0", "server.backlog", ">= 1"),
    ("[server]\ngraceful_shutdown_s = -1.0", "server.graceful_shutdown_s", "zero or a positive"),
    ("[server]\nserver = 'hypercorn'\ncertfile = 'c.pem'", "server.keyfile", "both"),
    ("[server]\nserver = 'hypercorn'\nkeyfile = 'k.pem'", "server.certfile", "both"),
    ("[server]\ncertfile = 'c'\nkeyfile = 'k'", "server.certfile", "hypercorn only"),
    ("[limits]\nmax_header_bytes = 0", "limits.max_header_bytes", ">= 1"),
    ("[limits]\nmax_body_bytes = -5", "limits.max_body_bytes", ">= 1"),
    ("[limits]\nheader_timeout_s = 0", "limits.header_timeout_s", "positive"),
    ("[limits]\nbody_timeout_s = -1", "limits.body_timeout_s", "positive"),
    ("[limits]\nkeepalive_timeout_s = nan", "limits.keepalive_timeout_s", "positive"),
    ("[limits]\nrequest_timeout_s = -1", "limits.request_timeout_s", "zero or a positive"),
    ("[limits]\nrequest_timeout_s = inf", "limits.request_timeout_s", "finite"),
    ("[limits]\nmax_connections = 0", "limits.max_connections", ">= 1"),
    ("[upstream]\nconnect_timeout_s = 0", "upstream.connect_timeout_s", "positive"),
    ("[upstream]\nresponse_timeout_s = 0", "upstream.response_timeout_s", "positive"),
    ("[upstream]\nidle_timeout_s = -2", "upstream.idle_timeout_s", "positive"),
    ("[upstream]\nmax_idle_per_worker = -1", "upstream.max_idle_per_worker", ">= 0"),
    ("[upstream]\nmax_attempts = 0", "upstream.max_attempts", ">= 1"),
    ("[upstream]\napi_key = ''", "upstream.api_key", "must not be empty"),
    ("[upstream]\napi_key = 5", "upstream.api_key", "expected a string"),
    ("[routing]\npolicy = ''", "routing.policy", "not a policy name"),
    ("[routing]\npolicy = '9lives'", "routing.policy", "not a policy name"),
    ("[routing]\npolicy = 'a b'", "routing.policy", "not a policy name"),
    ("[routing.policies]\nx = 'a'", "routing.policies.x", "'x' is not a role"),
    ("[routing.policies]\np = 'a'\nprefill = 'b'", "routing.policies.prefill", "given twice"),
    ("[routing.policies]\np = ''", "routing.policies.p", "not a policy name"),
    ("[routing.policies]\np = 1", "routing.policies", "expected a string"),
    ("[health]\ninterval_s = 0", "health.interval_s", "positive"),
    ("[health]\ntimeout_s = 0", "health.timeout_s", "positive"),
    ("[health]\nfailure_threshold = 0", "health.failure_threshold", ">= 1"),
    ("[health]\nsuccess_threshold = 0", "health.success_threshold", ">= 1"),
    ("[health]\npath = 'health'", "health.path", "must start with '/'"),
    ("[logging]\nlevel = 'loud'", "logging.level", "'loud' is not one of: debug, info"),
    ("[logging]\njson = 'yes'", "logging.json", "expected a boolean"),
    ("[[models]]\nflow = 'pd'", "models[0]", "missing required key `name`"),
    ("[[models]]\nname = ''", "models[0].name", "must not be empty"),
    ("[[models]]\nname = 'a'\nflow = 'p+d'", "models[0].flow", "'p+d' is not one of: pd, p/d"),
    ("[[models]]\nname = 'a'\ndialect = ''", "models[0].dialect", "must not be empty"),
    ("[[models]]\nname = 'a'\naliases = ['']", "models[0].aliases[0]", "must not be empty"),
    ("[[models]]\nname = 'a'\naliases = ['a']", "models[0].aliases[0]", "already a name"),
    ("[[models]]\nname = 'a'\naliases = ['b', 'b']", "models[0].aliases[1]", "already a name"),
    ("[[models]]\nname = 'a'\n[[models]]\nname = 'a'", "models[1].name", "duplicate model name"),
    (
        "[[models]]\nname = 'a'\n[[models]]\nname = 'b'\naliases = ['a']",
        "models[1].aliases[0]",
        "collides with `models[0].name`",
    ),
    (
        "[[models]]\nname = 'a'\naliases = ['x']\n[[models]]\nname = 'b'\naliases = ['x']",
        "models[1].aliases[0]",
        "collides with `models[0].aliases[0]`",
    ),
    ("[[models]]\nname = 'a'\nextra = 1", "models[0]", "unknown key `extra`"),
    (
        "[[models]]\nname = 'a'\ntokenizer_cache_chars = -1",
        "models[0].tokenizer_cache_chars",
        ">= 0",
    ),
    ("models = 'a'", "models", "expected an array"),
    ("[[workers]]\nrole = 'pd'", "workers[0]", "missing required key `url`"),
    (W + "[[workers]]\nurl = 'http://h:2'\nrole = 'x'", "workers[1].role", "'x' is not a role"),
    ("[[workers]]\nurl = 'h:1'", "workers[0].url", "not a worker URL"),
    ("[[workers]]\nurl = 'ftp://h:1'", "workers[0].url", "not a worker URL"),
    ("[[workers]]\nurl = 'http://:1'", "workers[0].url", "no host"),
    ("[[workers]]\nurl = 'http://h:99999'", "workers[0].url", "not a worker URL"),
    ("[[workers]]\nurl = 'http://h:x'", "workers[0].url", "not a worker URL"),
    ("[[workers]]\nurl = 'http://h:0'", "workers[0].url", "port 0"),
    ("[[workers]]\nurl = 'http://u:pw@h:1'", "workers[0].url", "credentials"),
    ("[[workers]]\nurl = 'http://h:1/?a=b'", "workers[0].url", "query"),
    ("[[workers]]\nurl = 'http://h:1#x'", "workers[0].url", "fragment"),
    ("[[workers]]\nurl = 'http://h:1'\nmodels = ['']", "workers[0].models[0]", "must not be empty"),
    ("[[workers]]\nurl = 'http://h:1'\nid = ''", "workers[0].id", "must not be empty"),
    ("[[workers]]\nurl = 'http://h:1'\nport = 1", "workers[0]", "unknown key `port`"),
    (W + W, "workers[1].url", "duplicate worker 'http://h:1'"),
    (
        W + "id = 'a'\n[[workers]]\nurl = 'http://h:2'\nid = 'a'",
        "workers[1].id",
        "duplicate worker 'a'",
    ),
]


@pytest.mark.parametrize(("text", "path", "fragment"), BAD)
def test_validation_errors_name_the_key(text: str, path: str | None, fragment: str) -> None:
    err = error_of(text)
    msg = str(err)
    assert err.path == path, msg
    if path is None:
        assert msg.startswith("config error"), msg
    else:
        assert msg.startswith(f"config error at `{path}`"), msg
    assert fragment in msg, msg


def test_role_error_message_exact() -> None:
    err = error_of(W + "[[workers]]\nurl = 'http://h:2'\nrole = 'x'")
    assert str(err) == (
        "config error at `workers[1].role`: 'x' is not a role"
        " (expected pd/merged, e/encode, p/prefill, d/decode)"
    )


def test_unknown_key_message_exact() -> None:
    assert str(error_of("[server]\nprot = 1")).startswith(
        "config error at `server`: unknown key `prot`"
    )


def test_url_credentials_are_not_echoed() -> None:
    msg = str(error_of("[[workers]]\nurl = 'http://user:hunter2@h:1'"))
    assert "hunter2" not in msg and "'http://...@h:1'" in msg


def test_config_error_pickles() -> None:
    import pickle

    err = error_of("[server]\nport = -1")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.path, back.source, str(back)) == (
        err.reason,
        err.path,
        err.source,
        str(err),
    )


def test_infer_flow_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError):
        infer_flow("pd")


def test_config_from_mapping() -> None:
    cfg = config_from_mapping({"server": {"port": 0}, "workers": [{"url": "http://h:1"}]})
    assert cfg.server.port == 0 and cfg.workers[0].role == "pd"
    with pytest.raises(ConfigError, match=r"expected a table at the top level"):
        config_from_mapping([])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"at `workers\[0\].role`"):
        config_from_mapping({"workers": [{"url": "http://h:1", "role": "z"}]})


def test_direct_construction_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        ServerConfig(port=70000)
    with pytest.raises(ConfigError, match="is not one of"):
        ModelConfig(name="m", flow="zz")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="is not a role"):
        WorkerConfig(url="http://h:1", role="q")


# The property: whatever data the TOML parser can produce, the loader raises only ConfigError.
_KEYS = sorted(
    {
        f.name
        for cls in (GatewayConfig, ServerConfig, LimitsConfig, UpstreamConfig)
        for f in msgspec.structs.fields(cls)
    }
    | {
        f.name
        for cls in (RoutingConfig, HealthConfig, LoggingConfig, ModelConfig, WorkerConfig)
        for f in msgspec.structs.fields(cls)
    }
    | {"p", "prefill", "x"}
)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["http://h:1", "pd", "decode", "hypercorn", "p/d", "info"])
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=5))
def test_any_input_gives_config_or_config_error(data: dict) -> None:
    try:
        cfg = config_from_mapping(data)
    except ConfigError as e:
        assert str(e).startswith("config error")
    else:
        assert isinstance(cfg, GatewayConfig)


# --------------------------------------------------------------------------------------------------
# Environment


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1000\nhost = '0.0.0.0'\n")
    env = {
        "LMGW_SERVER_PORT": "9000",
        "LMGW_LIMITS_REQUEST_TIMEOUT_S": "30",
        "LMGW_UPSTREAM_API_KEY": "sk-123",
        "LMGW_LOGGING_JSON": "true",
        "LMGW_LOGGING_ACCESS_LOG": "1",
        "LMGW_LOGGING_LEVEL": "WARNING",
        "LMGW_HEALTH_PATH": "/ping",
        "LMGW_SERVER_SERVER": "hypercorn",
        "LMGW_ROUTING_POLICY": "least_load",
        "LMGW_ROUTING_POLICIES": "prefill=cache_aware, d=least_load",
        "HOME": "/root",  # unrelated variables are ignored
        "LMGW_SIMULATOR_SPEED": "10",  # LMGW_ variables of other tools are ignored
    }
    cfg = load_config(path, env=env)
    assert cfg.server.port == 9000 and cfg.server.host == "0.0.0.0"
    assert cfg.limits.request_timeout_s == 30.0
    assert cfg.upstream.api_key == "sk-123"
    assert cfg.logging == LoggingConfig(level="warning", json=True, access_log=True)
    assert cfg.health.path == "/ping"
    assert cfg.server.server == "hypercorn"
    assert cfg.routing == RoutingConfig(
        policy="least_load", policies={"p": "cache_aware", "d": "least_load"}
    )


def test_env_without_file() -> None:
    cfg = load_config(env={"LMGW_SERVER_PORT": "0", "LMGW_UPSTREAM_MAX_ATTEMPTS": "3"})
    assert cfg.server.port == 0 and cfg.upstream.max_attempts == 3


def test_env_reaches_every_section() -> None:
    """Every section of the root table takes LMGW_<SECTION>_<KEY> (streams and media once
    ignored such variables without a word)."""
    cfg = load_config(
        env={
            "LMGW_STREAMS_RESUMABLE": "true",
            "LMGW_HEDGING_ENABLED": "1",
            "LMGW_HEDGING_DELAY_S": "0.25",
            "LMGW_MEDIA_MAX_ITEMS": "3",
        }
    )
    assert cfg.streams.resumable and cfg.hedging.enabled and cfg.hedging.delay_s == 0.25
    assert cfg.media.max_items == 3
    arrays = {"models", "workers", "model_routes"}  # arrays of tables: not from variables
    roots = {f.name for f in msgspec.structs.fields(GatewayConfig)} - arrays
    for section in roots:
        with pytest.raises(ConfigError, match="has no key"):
            load_config(env={f"LMGW_{section.upper()}_NO_SUCH_KEY": "1"})


def test_env_empty_optional_means_none(tmp_path: Path) -> None:
    path = write(tmp_path, "[upstream]\napi_key = 'k'\n")
    assert load_config(path, env={"LMGW_UPSTREAM_API_KEY": ""}).upstream.api_key is None


def test_env_bool_spellings() -> None:
    for text, value in [("on", True), ("No", False), ("0", False), ("YES", True)]:
        assert load_config(env={"LMGW_LOGGING_JSON": text}).logging.json is value


@pytest.mark.parametrize(
    ("name", "value", "path", "fragment"),
    [
        ("LMGW_SERVER_PORT", "abc", "server.port", "expected an integer, got 'abc'"),
        ("LMGW_SERVER_PORT", "1.5", "server.port", "expected an integer"),
        ("LMGW_SERVER_PORT", "70000", "server.port", "out of range"),
        ("LMGW_LIMITS_REQUEST_TIMEOUT_S", "soon", "limits.request_timeout_s", "expected a number"),
        ("LMGW_LIMITS_REQUEST_TIMEOUT_S", "-1", "limits.request_timeout_s", "zero or a positive"),
        ("LMGW_LOGGING_JSON", "maybe", "logging.json", "expected a boolean"),
        ("LMGW_LOGGING_LEVEL", "loud", "logging.level", "is not one of"),
        ("LMGW_SERVER_SERVER", "uvicorn", "server.server", "is not one of: native, hypercorn"),
        ("LMGW_ROUTING_POLICIES", "p", "routing.policies", "KEY=VALUE"),
        ("LMGW_ROUTING_POLICIES", "q=x", "routing.policies.q", "is not a role"),
        ("LMGW_UPSTREAM_MAX_ATTEMPTS", "0", "upstream.max_attempts", ">= 1"),
    ],
)
def test_env_bad_values_name_the_variable(name: str, value: str, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={name: value})
    msg = str(info.value)
    assert info.value.path == path, msg
    assert f"environment variable `{name}`" in msg and fragment in msg, msg


@pytest.mark.parametrize("name", ["LMGW_SERVER_PROT", "LMGW_SERVER_", "LMGW_LIMITS_MODELS"])
def test_env_unknown_variable_of_a_section(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={name: "1"})
    assert name in str(info.value) and "has no key" in str(info.value)


def test_env_unknown_variable_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean `LMGW_SERVER_PORT`"):
        load_config(env={"LMGW_SERVER_PROT": "1"})


def test_env_error_in_file_still_blames_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nbacklog = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"LMGW_SERVER_PORT": "1"})
    assert f"in file `{path}`" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Flags


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_default_to_none() -> None:
    ns = parse_args()
    assert all(v is None for v in vars(ns).values()), vars(ns)
    assert config_from_args(ns, env={}) == GatewayConfig()


def test_flags_override_file_and_env(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
port = 1000
host = "0.0.0.0"
[upstream]
api_key = "file-key"
[[workers]]
url = "http://file:1"
""",
    )
    ns = parse_args(
        "--config", str(path),
        "--port", "2000",
        "--policy", "least_load",
        "--server", "hypercorn",
        "--certfile", "c.pem",
        "--keyfile", "k.pem",
        "--request-timeout", "12.5",
        "--log-level", "DEBUG",
        "--api-key", "flag-key",
        "--worker", "pd=http://127.0.0.1:9001/",
        "--worker", "merged=http://127.0.0.1:9002",
    )  # fmt: skip
    cfg = config_from_args(ns, env={"LMGW_SERVER_PORT": "1500", "LMGW_SERVER_HOST": "::1"})
    assert cfg.server.port == 2000  # flag over env over file
    assert cfg.server.host == "::1"  # env over file
    assert cfg.server.server == "hypercorn" and cfg.server.tls
    assert cfg.routing.policy == "least_load"
    assert cfg.limits.request_timeout_s == 12.5
    assert cfg.logging.level == "debug"
    assert cfg.upstream.api_key == "flag-key"
    assert [w.url for w in cfg.workers] == [
        "http://file:1",
        "http://127.0.0.1:9001",
        "http://127.0.0.1:9002",
    ]
    assert all(w.role == "pd" and w.models == [] for w in cfg.workers)


def test_worker_flag_options_survive_config_from_args() -> None:
    ns = parse_args(
        "--worker", "p=http://h:1,kv_address=h:21001,bootstrap_port=8998,id=p0,zone=rack-1",
        "--worker", "d=http://h:2,kv_address=h:22001",
    )  # fmt: skip
    cfg = config_from_args(ns, env={})
    got = [(w.id, w.role, w.kv_address, w.bootstrap_port, w.zone) for w in cfg.workers]
    assert got == [("p0", "p", "h:21001", 8998, "rack-1"), (None, "d", "h:22001", None, None)]


def test_config_from_args_accepts_partial_namespace() -> None:
    cfg = config_from_args(argparse.Namespace(port=0), env={})
    assert cfg.server.port == 0


def test_flag_models_infer_flow() -> None:
    ns = parse_args(
        "--worker", "prefill=http://h:1", "--worker", "d=http://h:2",
        "--model", "llama", "--model", "qwen", "--model", "llama",
    )  # fmt: skip
    cfg = config_from_args(ns, env={})
    assert [(m.name, m.flow, m.dialect) for m in cfg.models] == [
        ("llama", "p/d", "openai"),
        ("qwen", "p/d", "openai"),
    ]


def test_flag_model_without_workers_gets_default_flow() -> None:
    cfg = config_from_args(parse_args("--model", "m"), env={})
    assert cfg.models == [ModelConfig(name="m")]


def test_flag_model_flow_only_from_workers_serving_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[workers]]
url = "http://h:1"
role = "e"
models = ["other"]
[[workers]]
url = "http://h:2"
role = "pd"
""",
    )
    cfg = config_from_args(parse_args("--config", str(path), "--model", "m"), env={})
    assert cfg.models[0].flow == "pd"  # the encoder serves only "other"


def test_flag_flow_and_dialect() -> None:
    ns = parse_args(
        "--worker", "pd=http://h:1", "--model", "m", "--flow", "e+pd", "--dialect", "vllm-nixl"
    )
    cfg = config_from_args(ns, env={})
    assert cfg.models == [ModelConfig(name="m", flow="e+pd", dialect="vllm-nixl")]


def test_flag_flow_overrides_configured_model(tmp_path: Path) -> None:
    path = write(tmp_path, "[[models]]\nname = 'm'\naliases = ['mm']\n[[models]]\nname = 'n'\n")
    cfg = config_from_args(
        parse_args("--config", str(path), "--model", "mm", "--flow", "p/d"), env={}
    )
    assert [(m.name, m.flow) for m in cfg.models] == [("m", "p/d"), ("n", "pd")]
    cfg = config_from_args(parse_args("--config", str(path), "--model", "m"), env={})
    assert cfg.models == load_config(path, env={}).models


def test_flag_flow_and_dialect_without_model_set_the_routing_defaults() -> None:
    ns = parse_args(
        "--worker", "p=http://h:1", "--worker", "d=http://h:2", "--dialect", "vllm-nixl"
    )  # fmt: skip
    cfg = config_from_args(ns, env={})
    assert cfg.models == [] and cfg.routing.dialect == "vllm-nixl" and cfg.routing.flow is None
    cfg = config_from_args(parse_args("--flow", "p/d"), env={})
    assert cfg.routing.flow == "p/d"


def test_flag_flow_inference_failure() -> None:
    ns = parse_args("--worker", "e=http://h:1", "--model", "m")
    with pytest.raises(ConfigError) as info:
        config_from_args(ns, env={})
    assert "--model m" in str(info.value) and "--flow" in str(info.value)


def test_flag_model_colliding_with_alias_of_another(tmp_path: Path) -> None:
    path = write(tmp_path, "[[models]]\nname = 'm'\naliases = ['x']\n")
    # "x" names the configured model, so it is not added again
    cfg = config_from_args(parse_args("--config", str(path), "--model", "x"), env={})
    assert len(cfg.models) == 1


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_args(parse_args("--port", "70000"), env={})
    assert info.value.path == "server.port" and "flag `--port 70000`" in str(info.value)
    with pytest.raises(ConfigError, match="flag `--worker x=http://h:1`"):
        config_from_args(parse_args("--worker", "x=http://h:1"), env={})
    with pytest.raises(ConfigError, match="hypercorn only"):
        config_from_args(parse_args("--certfile", "c", "--keyfile", "k"), env={})
    with pytest.raises(ConfigError, match="duplicate worker"):
        config_from_args(parse_args("--worker", "pd=http://h:1", "--worker", "d=http://h:1"))


def test_argparse_rejects_bad_choices() -> None:
    for argv in (["--server", "uvicorn"], ["--flow", "x"], ["--log-level", "loud"]):
        with pytest.raises(SystemExit):
            parse_args(*argv)


@pytest.mark.parametrize(
    ("text", "role", "url"),
    [
        ("pd=http://127.0.0.1:9001", "pd", "http://127.0.0.1:9001"),
        ("prefill=http://h:1", "p", "http://h:1"),
        ("Decode=https://h", "d", "https://h"),
        (" e = http://h:2/ ", "e", "http://h:2"),
    ],
)
def test_parse_worker_flag(text: str, role: str, url: str) -> None:
    w = parse_worker_flag(text)
    assert (w.role, w.url, w.models, w.id) == (role, url, [], None)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("http://h:1", "expected ROLE=URL"),
        ("pd=", "expected ROLE=URL"),
        ("=http://h:1", "expected ROLE=URL"),
        ("x=http://h:1", "is not a role"),
        ("pd=h:1", "not a worker URL"),
    ],
)
def test_parse_worker_flag_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_worker_flag(text)
    assert fragment in str(info.value) and text in str(info.value)


# --------------------------------------------------------------------------------------------------
# Flow inference


@pytest.mark.parametrize(
    ("roles", "flow"),
    [
        (["pd"], "pd"),
        (["merged", "pd"], "pd"),
        (["p", "d"], "p/d"),
        (["prefill", "decode"], "p/d"),
        (["e", "pd"], "e+pd"),
        (["encode", "merged"], "e+pd"),
        (["e", "p", "d"], "e+p+d"),
        (["pd", "d"], "p/d"),  # merged workers stand in for the prefill half
        (["pd", "p"], "p/d"),
        (["pd", "p", "d"], "p/d"),
        (["e", "pd", "d"], "e+p+d"),
    ],
)
def test_infer_flow(roles: list[str], flow: str) -> None:
    assert infer_flow(roles) == flow
    assert infer_flow(iter(roles)) == flow


@pytest.mark.parametrize(
    ("roles", "fragment"),
    [
        ([], "no worker roles"),
        (["e"], "encode workers alone"),
        (["p"], "prefill workers need decode"),
        (["d"], "decode workers need prefill"),
        (["e", "p"], "prefill workers need decode"),
        (["e", "d"], "decode workers need prefill"),
        (["x"], "is not a role"),
    ],
)
def test_infer_flow_impossible(roles: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        infer_flow(roles)


def test_infer_flow_agrees_with_flow_roles() -> None:
    for flow, roles in FLOW_ROLES.items():
        assert infer_flow(roles) == flow


# --------------------------------------------------------------------------------------------------
# dump_config


def test_dump_round_trip_defaults() -> None:
    text = dump_config(GatewayConfig())
    assert "[server]" in text and "api_key" not in text  # None is left out
    assert loads_config(text) == GatewayConfig()


def test_dump_round_trip_rich_config() -> None:
    cfg = GatewayConfig(
        server=ServerConfig(
            host="::", port=0, server="hypercorn", certfile="/c p.pem", keyfile='k"\\.pem'
        ),
        routing=RoutingConfig(policy="cache_aware", policies={"p": "x", "decode": "y"}),
        upstream=UpstreamConfig(api_key="tab\there\nnewline\u0001\u007fé🙂", idle_timeout_s=1e-05),
        limits=LimitsConfig(request_timeout_s=0.0, body_timeout_s=1e16),
        models=[
            ModelConfig(name="a", flow="p/d", aliases=["b", "c d"]),
            ModelConfig(name="z", dialect="vllm-nixl"),
        ],
        workers=[
            WorkerConfig(url="http://h:1", role="p", models=["a"], id="p-0"),
            WorkerConfig(url="https://h:2/x", role="decode"),
        ],
    )
    text = dump_config(cfg)
    assert "[[workers]]" in text and "[[models]]" in text
    assert loads_config(text) == cfg


def test_dump_redacts_secrets() -> None:
    cfg = GatewayConfig(upstream=UpstreamConfig(api_key="sk-secret"))
    assert "sk-secret" in dump_config(cfg)
    text = dump_config(cfg, redact=True)
    assert "sk-secret" not in text and 'api_key = "<redacted>"' in text


def test_secret_flag_is_not_echoed() -> None:
    # an api key that fails validation must not be printed back
    with pytest.raises(ConfigError) as info:
        config_from_args(parse_args("--api-key", " "), env={})
    assert "flag `--api-key ...`" in str(info.value)


_names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12
).filter(str.strip)


@st.composite
def configs(draw: st.DrawFn) -> GatewayConfig:
    n_models = draw(st.integers(0, 3))
    names = draw(st.lists(_names, min_size=n_models, max_size=n_models, unique=True))
    models = [
        ModelConfig(name=n, flow=draw(st.sampled_from(FLOWS)), dialect=draw(_names)) for n in names
    ]
    ports = draw(st.lists(st.integers(1, 65535), max_size=4, unique=True))
    workers = [
        WorkerConfig(
            url=f"http://127.0.0.1:{port}",
            role=draw(st.sampled_from(ROLES)),
            models=draw(st.lists(st.sampled_from(names), max_size=2)) if names else [],
            id=draw(st.none() | _names.map(lambda s, port=port: f"{s}-{port}")),
        )
        for port in ports
    ]
    return GatewayConfig(
        server=ServerConfig(host=draw(_names), port=draw(st.integers(0, 65535))),
        limits=LimitsConfig(
            request_timeout_s=draw(st.floats(0, 1e9)),
            header_timeout_s=draw(st.floats(1e-9, 1e9)),
        ),
        upstream=UpstreamConfig(api_key=draw(st.none() | _names)),
        routing=RoutingConfig(
            policies=draw(
                st.dictionaries(
                    st.sampled_from(ROLES), st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
                )
            )
        ),
        logging=LoggingConfig(json=draw(st.booleans())),
        models=models,
        workers=workers,
    )


@settings(max_examples=100, deadline=None)
@given(configs())
def test_dump_round_trip_property(cfg: GatewayConfig) -> None:
    assert loads_config(dump_config(cfg)) == cfg


# --------------------------------------------------------------------------------------------------
# The docs cannot drift


def _doc_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    for f in msgspec.structs.fields(cls):
        path = f"{prefix}{f.name}"
        tp = f.type
        args = typing.get_args(tp)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            keys += _doc_keys(tp, f"{path}.")
        elif args and isinstance(args[0], type) and issubclass(args[0], msgspec.Struct):
            # `X | None` is an optional table, `list[X]` an array of tables
            optional = type(None) in args
            keys += _doc_keys(args[0], f"{path}." if optional else f"{path}[].")
        else:
            keys.append(path)
    return keys


def test_every_key_is_documented() -> None:
    text = DOCS.read_text(encoding="utf-8")
    keys = _doc_keys(GatewayConfig, "")
    assert "limits.max_body_bytes" in keys and "workers[].role" in keys
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"docs/configuration.md does not mention: {missing}"


def test_every_flag_and_env_example_is_documented() -> None:
    text = DOCS.read_text(encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    missing = [f for f in flags if f"`{f}" not in text and f != "--help"]
    assert not missing, f"docs/configuration.md does not mention flags: {missing}"
    assert "LMGW_CONFIG" in text and "LMGW_SERVER_PORT" in text


def test_example_mentions_every_section() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for section in ("server", "limits", "upstream", "routing", "health", "logging"):
        assert re.search(rf"^\[{section}\]", text, re.M), section
    assert text.count("[[models]]") == 2 and text.count("[[workers]]") == 4


def test_worker_flag_options_reach_the_worker_config() -> None:
    wc = parse_worker_flag(
        "p=http://10.0.0.1:8100,kv_address=10.0.0.1:21001,bootstrap_port=8998,id=p0"
    )
    assert (wc.role, wc.url, wc.kv_address, wc.bootstrap_port, wc.id) == (
        "p",
        "http://10.0.0.1:8100",
        "10.0.0.1:21001",
        8998,
        "p0",
    )


@pytest.mark.parametrize(
    ("flag", "needle"),
    [
        ("p=http://h:1,kv=1", "bad option"),
        ("p=http://h:1,bootstrap_port=x", "integer"),
        ("p=http://h:1,kv_address=nohost", "host:port"),
        ("p=http://h:1,kv_address=h_x:12", "host:port"),
        ("p=http://h:1,kv_address=h:70000", "not a port"),
    ],
)
def test_worker_flag_bad_options_are_config_errors(flag: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_worker_flag(flag)
    assert needle in str(info.value) and flag in str(info.value)


def test_a_data_parallel_server_is_one_worker_per_rank() -> None:
    """``dp=N`` (``data_parallel_size``): N workers of one URL, ids ``<id>#dp<r>``, each rank's
    KV events where vLLM publishes them (tcp port + rank, ipc path + ``_dp<r>``)."""
    wc = parse_worker_flag("pd=http://h:8000,dp=3,kv_events=tcp://h:5557")
    ranks = wc.ranks()
    assert [r.worker_id for r in ranks] == [f"http://h:8000#dp{r}" for r in range(3)]
    assert [r.data_parallel_rank for r in ranks] == [0, 1, 2]
    assert [r.kv_events for r in ranks] == ["tcp://h:5557", "tcp://h:5558", "tcp://h:5559"]
    assert {r.url for r in ranks} == {"http://h:8000"}
    named = WorkerConfig(url="http://h:1", id="big", data_parallel_size=2, kv_events="ipc:///e")
    assert [(r.worker_id, r.kv_events) for r in named.ranks()] == [
        ("big#dp0", "ipc:///e"),
        ("big#dp1", "ipc:///e_dp1"),
    ]
    one = WorkerConfig(url="http://h:1", data_parallel_rank=5)  # a rank listed on its own
    assert one.ranks() == [one] and one.worker_id == "http://h:1#dp5"
    assert WorkerConfig(url="http://h:1").ranks()[0].data_parallel_rank is None
    cfg = msgspec.convert(
        {"workers": [{"url": "http://h:1", "data_parallel_size": 2}, {"url": "http://h:2"}]},
        GatewayConfig,
    )
    assert [r.worker_id for w in cfg.workers for r in w.ranks()] == [
        "http://h:1#dp0", "http://h:1#dp1", "http://h:2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"data_parallel_size": 0}, "data_parallel_size"),
        ({"data_parallel_size": 2000}, "data_parallel_size"),
        ({"data_parallel_size": 2, "data_parallel_rank": 2}, "data_parallel_rank"),
        ({"data_parallel_rank": -1}, "data_parallel_rank"),
        ({"data_parallel_size": 4, "kv_events": "tcp://h:65534"}, "port 65537"),
        ({"data_parallel_size": 2, "url": "zmq+tcp://h:5000"}, "native"),
        ({"data_parallel_size": "auto", "url": "zmq+tcp://h:5000"}, "native"),
        ({"data_parallel_size": "auto", "data_parallel_rank": 1}, "data_parallel_rank"),
        ({"data_parallel_size": "some"}, "data_parallel_size"),
    ],
)
def test_data_parallel_mistakes_are_config_errors(table: dict, needle: str) -> None:
    with pytest.raises((ConfigError, msgspec.ValidationError)) as info:
        msgspec.convert({"url": "http://h:1", **table}, WorkerConfig)
    assert needle in str(info.value)


def test_auto_ranks_are_sized_when_counted() -> None:
    """``dp=auto`` (``data_parallel_size = "auto"``): one worker until a size is given, then
    its ranks; a size whose KV event ports would pass 65535 is refused then."""
    wc = parse_worker_flag("pd=http://h:8000,dp=auto,id=s,kv_events=tcp://h:65533")
    assert wc.auto_ranks and wc.ranks() == [wc] and wc.ranks(1) == [wc]
    ranks = wc.ranks(3)
    assert [(r.worker_id, r.data_parallel_rank, r.data_parallel_size) for r in ranks] == [
        ("s#dp0", 0, 3), ("s#dp1", 1, 3), ("s#dp2", 2, 3),
    ]  # fmt: skip
    assert [r.kv_events for r in ranks] == [f"tcp://h:{p}" for p in (65533, 65534, 65535)]
    with pytest.raises(ConfigError, match="port 65536"):
        wc.ranks(4)
    toml = msgspec.convert({"url": "http://h:1", "data_parallel_size": "auto"}, WorkerConfig)
    assert toml.auto_ranks
    with pytest.raises(ConfigError, match="integer"):
        parse_worker_flag("pd=http://h:8000,dp=many")


def test_a_rank_id_taken_by_another_worker_is_refused() -> None:
    with pytest.raises((ConfigError, msgspec.ValidationError)) as info:
        workers = [
            {"url": "http://h:1", "id": "a", "data_parallel_size": 2},
            {"url": "http://h:2", "id": "a#dp1"},
        ]
        msgspec.convert({"workers": workers}, GatewayConfig)
    assert "duplicate worker 'a#dp1'" in str(info.value)


def test_media_profile_is_an_optional_table_per_model() -> None:
    data = {
        "models": [
            {"name": "vl", "media_profile": {"image": {"max_pixels": 1024, "multiple_of": 28}}},
            {"name": "text"},
        ]
    }
    cfg = msgspec.convert(data, GatewayConfig)
    vl, text = cfg.models
    assert vl.media_profile.image.max_pixels == 1024 and vl.media_profile.image.multiple_of == 28
    assert text.media_profile is None
