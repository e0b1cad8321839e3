"""The SSRF guard of media fetches, bullet by bullet (docs/security.md): every spelling of an
internal address (IPv4 shorthands, IPv4-mapped/compatible/translated IPv6, NAT64, metadata
endpoints), DNS rebinding (one resolution per hop, the connection goes to the vetted answer and
its peer address is vetted again), and redirects re-vetted. "Refused" is checked as "the local
server never saw a connection"."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import trio
from test_media_fetch import LOCAL, PNG, media_server

from lmgw.multimodal import MediaError, MediaLimits
from lmgw.multimodal.fetch import AddressPolicy, address_policy, check_peer, fetch_url

BLOCKED_FORMS = [
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "::a9fe:a9fe",  # IPv4-compatible metadata
    "::ffff:0:7f00:1",  # IPv4-translated 127.0.0.1
    "64:ff9b:1::a00:1",  # local-use NAT64 to 10.0.0.1
    "::ffff:a9fe:a9fe",  # IPv4-mapped 169.254.169.254
    "0:0:0:0:0:ffff:169.254.169.254",
    "::ffff:100.100.100.200",  # Alibaba's metadata, mapped
    "fd00:ec2::254",
    "2002:a9fe:a9fe::",  # 6to4 of the metadata address
]


@pytest.mark.parametrize("addr", BLOCKED_FORMS)
def test_ipv6_forms_of_internal_addresses_are_refused(addr: str) -> None:
    assert AddressPolicy().refusal(ipaddress.ip_address(addr)) is not None


def test_metadata_needs_an_exact_entry_in_every_form() -> None:
    wide = AddressPolicy(("169.254.0.0/16", "fd00::/8"))
    for addr in ("169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"):
        assert wide.refusal(ipaddress.ip_address(addr)) == "a cloud metadata address"


# Literal hosts that the system resolver turns into loopback or "any" (inet_aton's shorthands)
LITERALS = [
    "2130706433",
    "0x7f000001",
    "127.1",
    "0177.0.0.1",
    "017700000001",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:7f00:1]",
    "[::1]",
    "[::]",
    "0.0.0.0",
    "0",
    "localhost",
]


async def test_every_spelling_of_loopback_is_refused_before_connecting() -> None:
    async with media_server() as (port, seen):
        for host in LITERALS:
            with pytest.raises(MediaError) as info:
                await fetch_url(f"http://{host}:{port}/img.png", MediaLimits())
            assert info.value.reason == "blocked_address", (host, info.value)
        assert seen.connections == 0


class Rebinder:
    """A resolver whose answers change from one call to the next (a rebinding DNS server)."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [(socket.AF_INET, (answer, port))]


async def test_dns_rebinding_cannot_swap_the_address() -> None:
    async with media_server() as (port, seen):
        # vetted answer first, internal answer after: the vetted one is what is connected to,
        # and the name is resolved once
        resolver = Rebinder("127.0.0.1", "10.0.0.1")
        loaded = await fetch_url(f"http://rebind.test:{port}/img.png", LOCAL, resolver=resolver)
        assert loaded.data == PNG and resolver.calls == 1 and seen.connections == 1
        # internal answer first: refused at once, nothing connects, no second lookup
        resolver = Rebinder("10.0.0.1", "127.0.0.1")
        with pytest.raises(MediaError) as info:
            await fetch_url(f"http://rebind.test:{port}/img.png", LOCAL, resolver=resolver)
        assert info.value.reason == "blocked_address" and resolver.calls == 1
        assert seen.connections == 1


async def test_a_redirect_hop_is_resolved_and_vetted_again() -> None:
    async with media_server() as (port, seen):
        resolver = Rebinder("169.254.169.254")
        target = f"http:~~rebind.test:{port}~img.png"
        with pytest.raises(MediaError) as info:
            await fetch_url(f"http://127.0.0.1:{port}/redirect/{target}", LOCAL, resolver=resolver)
        assert info.value.reason == "blocked_address" and resolver.calls == 1
        assert seen.connections == 1  # the first hop only


@pytest.mark.parametrize(
    "target",
    [
        "http:~~[::ffff:169.254.169.254]~latest",
        "http:~~[::ffff:a9fe:a9fe]~latest",
        "http:~~[::a9fe:a9fe]~latest",
        "http:~~2852039166~latest",  # 169.254.169.254 as one number
        "https:~~[::ffff:10.0.0.1]~x",
    ],
)
async def test_redirects_to_disguised_metadata_are_refused(target: str) -> None:
    async with media_server() as (port, seen):
        with pytest.raises(MediaError) as info:
            await fetch_url(f"http://127.0.0.1:{port}/redirect/{target}", LOCAL)
        assert info.value.reason == "blocked_address"
        assert seen.connections == 1


async def test_the_connected_peer_is_vetted() -> None:
    async with media_server() as (port, _):
        sock = trio.socket.socket()
        with sock:
            await sock.connect(("127.0.0.1", port))
            check_peer(sock, address_policy(LOCAL))  # allow-listed: passes
            with pytest.raises(MediaError) as info:
                check_peer(sock, address_policy(MediaLimits()))
            assert info.value.reason == "blocked_address"
            assert "127.0.0.1" not in info.value.message
