"""Discovery from a watched file (lmgw.workers.discovery.file): parsing, the change rules, and a
running gateway that follows the file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio

from lmgw.config import ConfigError, DiscoveryConfig, GatewayConfig, HealthConfig, ServerConfig
from lmgw.gateway import Gateway
from lmgw.workers.discovery import configured, run_discovery
from lmgw.workers.discovery.file import WatchedFile, _Sig, parse_workers_file
from lmgw.workers.discovery.sink import SourceSync
from lmgw.workers.registry import Registry

FLEET = """
[[workers]]
url = "http://127.0.0.1:9001"
id = "a"

[[workers]]
url = "http://127.0.0.1:9002/"
role = "prefill"
id = "b"
models = ["m"]
"""


def write(path: Path, text: str, *, atomic: bool = True) -> None:
    """Replace the file the way config tools do (atomic: new inode) or rewrite it in place."""
    if atomic:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    else:
        path.write_text(text, encoding="utf-8")


def ids(gw: Gateway) -> dict[str, str]:
    return {w.id: w.state.value for w in gw.registry}


def test_toml_and_json_files_give_the_same_workers() -> None:
    toml = parse_workers_file(FLEET.encode(), "fleet.toml")
    json = parse_workers_file(
        b'{"workers": [{"url": "http://127.0.0.1:9001", "id": "a"},'
        b' {"url": "http://127.0.0.1:9002/", "role": "prefill", "id": "b", "models": ["m"]}]}',
        "fleet.JSON",
    )
    assert toml == json
    assert [(w.worker_id, w.role, w.url) for w in toml] == [
        ("a", "pd", "http://127.0.0.1:9001"),
        ("b", "p", "http://127.0.0.1:9002"),
    ]
    assert parse_workers_file(b"", "empty.toml") == []
    assert parse_workers_file(b"{}", "empty.json") == []


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        (
            "f.toml",
            FLEET.replace('"prefill"', '"x"'),
            "config error at `workers[1].role` in file `f.toml`: 'x' is not a role",
        ),
        (
            "f.json",
            '{"workers": [{"url": "ftp://h"}]}',
            "config error at `workers[0].url` in file `f.json`",
        ),
        ("f.toml", FLEET.replace("id = ", "idd = ", 1), "unknown key `idd` (did you mean `id`?)"),
        ("f.toml", FLEET.replace('"b"', '"a"'), "duplicate worker 'a'"),
        ("f.toml", "[server]\nport = 1\n", "unknown top-level key `server`"),
        ("f.toml", "[[workers]]\nurl = \n", "TOML syntax error at line 2"),
        ("f.json", '{"workers": [', "JSON syntax error"),
        ("f.json", '[{"url": "http://h"}]', "expected an object"),
        ("f.toml", "\xff", "not UTF-8"),
        ("f.json", "[" * 100_000, "nested too deeply"),
        ("f.toml", "a = " + "[" * 100_000, "nested too deeply"),
    ],
)
def test_bad_files_are_config_errors_worded_like_the_main_config(
    name: str, text: str, needle: str
) -> None:
    data = text.encode("latin-1") if text == "\xff" else text.encode()
    with pytest.raises(ConfigError) as info:
        parse_workers_file(data, name)
    assert needle in str(info.value)


def test_edits_apply_and_a_typo_keeps_the_fleet_logging_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "fleet.toml"
    write(path, FLEET)
    gw = Gateway(GatewayConfig())
    watch = WatchedFile(str(path))
    sync = SourceSync(gw, f"file:{path}")
    sync.update(watch.load())
    assert ids(gw) == {"a": "starting", "b": "starting"}
    assert gw.source_of("a") == f"file:{path}"

    busy = gw.registry.get("b")
    Registry.acquire(busy)  # a request in flight on b
    write(path, FLEET.split("[[workers]]")[1].join(["[[workers]]", ""]))  # only a
    sync.update(watch.check())
    assert ids(gw) == {"a": "starting", "b": "draining"}
    sync.update(watch.check())  # unchanged: b stays while busy
    assert ids(gw)["b"] == "draining"
    Registry.release(busy)
    sync.update(watch.check())  # the next poll removes it, now idle
    assert ids(gw) == {"a": "starting"}

    caplog.set_level(logging.ERROR, "lmgw.workers.discovery")
    write(path, FLEET.replace('"prefill"', '"x"'))
    for _ in range(3):
        sync.update(watch.check())
    assert ids(gw) == {"a": "starting"}
    errors = [r for r in caplog.records if "is not a role" in r.getMessage()]
    assert len(errors) == 1, caplog.text
    assert "keeping the 1 worker(s)" in errors[0].getMessage()
    assert watch.error is not None

    write(path, FLEET, atomic=False)
    sync.update(watch.check())
    assert set(ids(gw)) == {"a", "b"} and watch.error is None


def test_a_deleted_file_keeps_its_workers_unless_missing_ok(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "lmgw.workers.discovery")
    for missing_ok, left in ((False, {"a", "b"}), (True, set())):
        path = tmp_path / f"fleet-{missing_ok}.toml"
        write(path, FLEET)
        gw = Gateway(GatewayConfig())
        watch = WatchedFile(str(path), missing_ok=missing_ok)
        sync = SourceSync(gw, "file")
        sync.update(watch.load())
        path.unlink()
        caplog.clear()
        for _ in range(3):
            sync.update(watch.check())
        assert set(ids(gw)) == left
        assert len(caplog.records) == 1, caplog.text  # logged once, not every poll
        write(path, FLEET)  # it comes back
        sync.update(watch.check())
        assert set(ids(gw)) == {"a", "b"}


def test_missing_or_bad_file_at_start_up(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        WatchedFile(str(path)).load()
    assert info.value.path == "discovery.file"
    assert WatchedFile(str(path), missing_ok=True).load() == []
    write(path, "[[workers]]\nrole = 'pd'\n")
    with pytest.raises(ConfigError, match="missing required key `url`"):
        WatchedFile(str(path), missing_ok=True).load()


def test_a_file_rewritten_within_one_timestamp_tick_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stat cannot see a same-size rewrite in the same tick; recent files are compared."""
    path = tmp_path / "fleet.toml"
    write(path, FLEET)
    watch = WatchedFile(str(path))
    watch.load()
    frozen = _Sig(10**18, 10**18, len(FLEET), 1, 1)  # mtime 1e9 s; stat says: never changes
    monkeypatch.setattr(watch, "_stat", lambda: frozen)
    assert watch.check(now=0) is None  # first sight of the signature: same bytes
    write(path, FLEET.replace('"b"', '"c"'), atomic=False)
    changed = watch.check(now=1e9 + 0.5)  # modified half a second ago: compare the bytes
    assert changed is not None and changed[1].worker_id == "c"
    write(path, FLEET, atomic=False)
    assert watch.check(now=1e9 + 60) is None  # a minute old and stat unchanged: trusted


async def test_gateway_starts_with_the_file_fleet_and_follows_it(
    nursery: trio.Nursery, sim_worker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await sim_worker(), await sim_worker()
    path = tmp_path / "fleet.toml"
    write(path, f'[[workers]]\nurl = "{a.url}"\nid = "a"\n')
    cfg = GatewayConfig(
        server=ServerConfig(port=0),
        health=HealthConfig(interval_s=30),
        discovery=DiscoveryConfig(file=str(path), file_interval_s=0.02),
    )
    assert configured(cfg.discovery)
    gw = Gateway(cfg)
    with trio.fail_after(10):
        await nursery.start(gw.run)
    assert ids(gw) == {"a": "healthy"}  # probed in the first health round

    write(path, f'[[workers]]\nurl = "{b.url}"\nid = "b"\n')
    with trio.fail_after(10):  # a drains and, idle, leaves; b joins and is probed at once
        while ids(gw) != {"b": "healthy"}:
            await trio.sleep(0.01)

    caplog.set_level(logging.ERROR, "lmgw.workers.discovery")
    write(path, f'[[workers]]\nurl = "{b.url}"\nid = "b"\nrole = "nope"\n')
    with trio.fail_after(10):  # the watcher reads the broken file ...
        while "'nope' is not a role" not in caplog.text:
            await trio.sleep(0.01)
    assert ids(gw) == {"b": "healthy"}  # ... and keeps the fleet


async def test_a_missing_file_stops_the_gateway_start(tmp_path: Path) -> None:
    missing = DiscoveryConfig(file=str(tmp_path / "none.toml"))
    gw = Gateway(GatewayConfig(server=ServerConfig(port=0), discovery=missing))
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.run)
    assert info.group_contains(ConfigError, match="does not exist", depth=None)
    assert gw.port is None  # it never listened


async def test_run_discovery_without_backends_starts_at_once(nursery: trio.Nursery) -> None:
    gw = Gateway(GatewayConfig())
    assert not configured(DiscoveryConfig())
    with trio.fail_after(5):
        await nursery.start(run_discovery, gw, DiscoveryConfig())
