"""CURVE on the native protocol: key files, the ZAP allow-list under trio, and the three ways a
link can go wrong.

An encrypted link (data and control endpoints) serves requests; a gateway whose key is not in
the worker's allow-list is refused and nothing it sends reaches the worker, until its key is
added (the allow-list is re-read without a restart); a gateway with the wrong server key
cannot complete the handshake; a plaintext gateway against a CURVE worker fails with a
clear reason. The ZAP decision itself is tested sans-IO; the worker's flags parse and
refuse unusable keys.

Everything binds 127.0.0.1 port 0; every wait is bounded.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import zmq
import zmq.auth

from lmgw.protocol import Delta, FailureCode, Finish, Generate, Heartbeat, SamplingParams
from lmgw.simulators import WorkerOptions
from lmgw.transport.zmq import ChannelState, RpcChannel, RpcError
from lmgw.transport.zmq.curve import (
    CurveClient,
    CurveError,
    CurveServer,
    ZapHandler,
    generate_keys,
    load_allowed_keys,
    load_key_pair,
    load_public_key,
)
from lmgw.worker import WorkerServer
from lmgw.worker.cli import build_parser, curve_from_args, main, server_from_args
from lmgw.worker.sim import SimEngine

BOUND = 20.0
MODEL = "sim-model"


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


class Keys:
    """A worker key pair, two gateway key pairs, and an allow-list admitting only ``gw``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        _, self.worker_secret = generate_keys(root / "worker", "worker")
        self.worker_public = root / "worker" / "worker.key"
        _, self.gw_secret = generate_keys(root / "gateway", "gw")
        _, self.stranger_secret = generate_keys(root / "stranger", "stranger")
        self.allow = root / "allow"
        self.allow.mkdir()
        shutil.copy(root / "gateway" / "gw.key", self.allow / "gw.key")

    def server(self) -> CurveServer:
        return CurveServer.from_files(self.worker_secret, self.allow)

    def client(self, secret: Path | None = None) -> CurveClient:
        return CurveClient.from_files(secret or self.gw_secret, self.worker_public)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


async def start_server(
    nursery: trio.Nursery, ctx: zmq.Context, curve: CurveServer | None
) -> WorkerServer:
    engine = SimEngine(WorkerOptions(role="pd", model=MODEL, speed=math.inf))
    server = WorkerServer(engine, ctx=ctx, bind="tcp://127.0.0.1:0", curve=curve)
    return await nursery.start(server.run)


async def start_channel(
    nursery: trio.Nursery, ctx: zmq.Context, server: WorkerServer, **kw: object
) -> RpcChannel:
    chan = RpcChannel(
        server.endpoint,
        ctx=ctx,
        heartbeat_interval_s=0.05,
        heartbeat_timeout_s=2.0,
        ready_timeout_s=1.0,
        **kw,  # type: ignore[arg-type]
    )
    return await nursery.start(chan.run)


async def generate(chan: RpcChannel, rid: str) -> str:
    text = []
    msg = Generate(rid, MODEL, prompt="hello", params=SamplingParams(max_tokens=4))
    with trio.fail_after(BOUND):
        async with chan.stream(msg) as events:
            async for event in events:
                if isinstance(event, Delta):
                    text.append(event.text)
                else:
                    assert isinstance(event, Finish)
    return "".join(text)


def nothing_reached(server: WorkerServer) -> bool:
    stats = server.statistics()
    return stats["received"] == 0 and stats["peers"] == 0 and stats["heartbeats"] == 0


# == key files ==================================================================================


def test_generated_keys_are_zmq_certificates(tmp_path: Path) -> None:
    public_path, secret_path = generate_keys(tmp_path / "k", "node")
    assert (public_path.name, secret_path.name) == ("node.key", "node.key_secret")
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    public, secret = zmq.auth.load_certificate(str(secret_path))  # zmq's own reader
    assert zmq.curve_public(secret) == public == load_public_key(public_path)
    assert zmq.auth.load_certificate(str(public_path)) == (public, None)
    assert load_key_pair(secret_path) == (public, secret)
    assert load_allowed_keys(tmp_path / "k") == {public}
    with pytest.raises(CurveError, match="exists"):
        generate_keys(tmp_path / "k", "node")  # never replaces a key silently
    assert generate_keys(tmp_path / "k", "node", overwrite=True)[0] == public_path
    assert load_public_key(public_path) != public
    with pytest.raises(CurveError, match="not a secret key file"):
        load_key_pair(public_path)
    with pytest.raises(CurveError, match="cannot read"):
        load_key_pair(tmp_path / "missing.key_secret")
    other, _ = generate_keys(tmp_path / "o", "other")
    mixed = tmp_path / "mixed.key_secret"
    text = secret_path.read_text().replace(
        load_public_key(secret_path).decode(), load_public_key(other).decode()
    )
    mixed.write_text(text)
    with pytest.raises(CurveError, match="does not belong"):
        load_key_pair(mixed)


def test_zap_decisions(keys: Keys) -> None:
    zap = ZapHandler(keys.server(), zmq.Context.instance())
    gw = zmq.utils.z85.decode(load_public_key(keys.gw_secret))
    stranger = zmq.utils.z85.decode(load_public_key(keys.stranger_secret))

    def ask(domain: bytes, mechanism: bytes, *creds: bytes) -> list[bytes] | None:
        frames = [b"peer", b"", b"1.0", b"7", domain, b"127.0.0.1", b"", mechanism, *creds]
        return zap.decide(frames)

    ok = ask(b"lmgw", b"CURVE", gw)
    assert ok is not None and ok[:6] == [b"peer", b"", b"1.0", b"7", b"200", b"OK"]
    assert ask(b"lmgw", b"CURVE", stranger)[4] == b"400"  # type: ignore[index]
    assert ask(b"lmgw", b"NULL")[4] == b"400"  # type: ignore[index]
    assert ask(b"other", b"CURVE", gw)[4] == b"400"  # type: ignore[index]
    assert zap.decide([b"peer", b"", b"0.9"]) is None
    assert zap.statistics() == {"accepted": 1, "refused": 3, "malformed": 1}
    # no allow-list: any CURVE client, still never a plaintext one
    open_zap = ZapHandler(CurveServer(keys.server().keys), zmq.Context.instance())
    assert (
        open_zap.decide([b"p", b"", b"1.0", b"1", b"lmgw", b"a", b"", b"CURVE", stranger])[4]
        == b"200"
    )
    assert open_zap.decide([b"p", b"", b"1.0", b"1", b"lmgw", b"a", b"", b"NULL"])[4] == b"400"  # type: ignore[index]


# == links =======================================================================================


async def test_encrypted_link_serves_data_and_control(
    keys: Keys, ctx: zmq.Context, nursery: trio.Nursery
) -> None:
    server = await start_server(nursery, ctx, keys.server())
    chan = await start_channel(nursery, ctx, server, curve=keys.client(), control_from_ack=True)
    with trio.fail_after(BOUND):
        await chan.wait_ready(BOUND)
    assert chan._sock is not None and chan._sock.socket.getsockopt(zmq.MECHANISM) == zmq.CURVE
    assert len(await generate(chan, "secret-1")) > 0
    with trio.fail_after(BOUND):
        while chan.statistics()["control_acks"] < 2:  # heartbeats over the CURVE control link
            await trio.sleep(0.01)
        metrics = await chan.metrics()
    assert metrics["lmgw_worker_completed_total"] == 1.0
    assert server.zap is not None and server.zap.accepted >= 2 and server.zap.refused == 0


async def test_unknown_client_key_is_refused_until_allowed(
    keys: Keys, ctx: zmq.Context, nursery: trio.Nursery
) -> None:
    server = await start_server(nursery, ctx, keys.server())
    chan = await start_channel(nursery, ctx, server, curve=keys.client(keys.stranger_secret))
    with trio.fail_after(BOUND), pytest.raises(RpcError) as info:
        await chan.wait_ready(0.5)
    assert (info.value.code, info.value.sent) == (FailureCode.UNAVAILABLE, False)
    assert "refused this gateway's CURVE key" in info.value.message
    assert server.zap is not None and server.zap.refused >= 1
    assert nothing_reached(server)
    # the allow-list is re-read: the same channel gets in on its next reconnect
    shutil.copy(keys.root / "stranger" / "stranger.key", keys.allow / "stranger.key")
    with trio.fail_after(BOUND):
        await chan.wait_ready(BOUND)
    assert len(await generate(chan, "now-allowed")) > 0


async def test_wrong_server_key_never_connects(
    keys: Keys, ctx: zmq.Context, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A gateway configured with another key than the worker's cannot complete the handshake:
    it cannot be talking to an impostor, and the worker gets nothing from it."""
    impostor_public, _ = generate_keys(tmp_path / "impostor", "impostor")
    server = await start_server(nursery, ctx, keys.server())
    client = CurveClient.from_files(keys.gw_secret, impostor_public)
    chan = await start_channel(nursery, ctx, server, curve=client)
    with trio.fail_after(BOUND), pytest.raises(RpcError) as info:
        await chan.wait_ready(0.5)
    assert info.value.code is FailureCode.UNAVAILABLE and not info.value.sent
    assert chan.state is ChannelState.CONNECTING
    assert nothing_reached(server)


async def test_plaintext_client_to_a_curve_worker_fails_cleanly(
    keys: Keys, ctx: zmq.Context, nursery: trio.Nursery
) -> None:
    server = await start_server(nursery, ctx, keys.server())
    chan = await start_channel(nursery, ctx, server)
    with trio.fail_after(BOUND), pytest.raises(RpcError) as info:
        await chan.call(Heartbeat("hb-1"))
    assert (info.value.code, info.value.sent) == (FailureCode.UNAVAILABLE, False)
    assert "security mechanism mismatch: the worker requires CURVE" in info.value.message
    assert chan.statistics()["handshake_failures"] >= 1
    assert nothing_reached(server)


async def test_curve_client_to_a_plaintext_worker_fails_cleanly(
    keys: Keys, ctx: zmq.Context, nursery: trio.Nursery
) -> None:
    server = await start_server(nursery, ctx, None)
    chan = await start_channel(nursery, ctx, server, curve=keys.client())
    with trio.fail_after(BOUND), pytest.raises(RpcError) as info:
        await chan.wait_ready(0.5)
    assert "security mechanism mismatch: the worker does not use CURVE" in info.value.message
    assert nothing_reached(server)


# == the worker's flags ==========================================================================


def test_worker_flags(keys: Keys, tmp_path: Path) -> None:
    parser = build_parser()
    ns = parser.parse_args(
        ["--curve-secret-key", str(keys.worker_secret), "--curve-allow", str(keys.allow)]
    )
    curve = curve_from_args(ns)
    assert curve is not None and curve.allow_dir == str(keys.allow)
    assert curve.keys == load_key_pair(keys.worker_secret)
    engine = SimEngine(WorkerOptions(role="pd", model=MODEL, speed=math.inf))
    assert server_from_args(ns, engine).curve == curve
    assert curve_from_args(parser.parse_args([])) is None
    for argv in (
        ["--curve-allow", str(keys.allow)],  # an allow-list without a key pair
        ["--curve-secret-key", str(keys.worker_public)],  # a public key is not a key pair
        ["--curve-secret-key", str(keys.worker_secret), "--curve-allow", str(tmp_path / "no")],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2


# == the gateway's configuration =================================================================


def test_curve_config_keys(keys: Keys) -> None:
    from lmgw.config import ConfigError, GatewayConfig, NativeConfig, WorkerConfig

    worker = WorkerConfig(url="zmq+tcp://127.0.0.1:7000", curve_server_key=str(keys.worker_public))
    cfg = GatewayConfig(
        native=NativeConfig(curve_secret_key_file=str(keys.gw_secret)), workers=[worker]
    )
    client = CurveClient.from_files(
        cfg.native.curve_secret_key_file or "", cfg.workers[0].curve_server_key or ""
    )
    assert client == keys.client()
    with pytest.raises(ConfigError, match=r"native\.curve_secret_key_file") as info:
        GatewayConfig(workers=[worker])  # a CURVE worker without the gateway's key pair
    assert info.value.path == "workers[0].curve_server_key"
    with pytest.raises(ConfigError, match="zmq") as info:
        WorkerConfig(url="http://127.0.0.1:8000", curve_server_key=str(keys.worker_public))
    assert info.value.path == "curve_server_key"
    with pytest.raises(ConfigError):
        NativeConfig(curve_secret_key_file=" ")
