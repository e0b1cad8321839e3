"""Getting a media item's bytes: ``data:`` URLs, ``file://`` below a root, ``http(s)://``.

Remote fetches are a server-side request forgery risk: the gateway sits inside the cluster, and
a client URL could point it at a worker's admin API, a database, or the cloud metadata service.
The policy (see docs/multimodal.md):

* only ``http``/``https``, no credentials in the URL, no proxies (the environment is not read);
* the host is resolved once with trio's ``getaddrinfo``; if ANY address is not public
  (loopback, private, link-local, CGNAT, multicast, reserved, unspecified, IPv4 embedded in
  IPv6 pointing at one of those, a cloud metadata address), the URL is refused unless that
  address is inside ``allowed_networks``; metadata addresses need an exact /32 or /128 entry;
* the connection goes to a vetted address itself, so a second DNS answer cannot swap in an
  internal one (DNS rebinding), and the address it actually reached (the socket's peer) is
  vetted again before a byte is sent; https checks the certificate against the host name (SNI);
* every redirect hop is parsed and vetted again; at most ``max_redirects`` hops;
* the body stops being read as soon as it passes ``max_item_bytes`` (a declared
  Content-Length above it is refused before reading); one deadline covers the whole fetch.

The HTTP/1.1 response is parsed by the same sans-IO reader the worker client uses.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from typing import NamedTuple
from urllib.parse import quote, unquote, unquote_to_bytes, urljoin, urlsplit

import trio

from ..transport.h1client import ResponseReader, UpstreamProtocolError
from .limits import MediaError, MediaLimits

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: (family, sockaddr) pairs, as getaddrinfo gives them
Resolved = list[tuple[int, tuple]]
#: ``async (host, port) -> [(family, sockaddr), ...]``: injectable for tests
Resolver = Callable[[str, int], Awaitable[Resolved]]

#: Cloud instance metadata services: credentials live there. AWS/GCP/Azure/OpenStack
#: (169.254.169.254), AWS IPv6 (fd00:ec2::254), AWS ECS task metadata (169.254.170.2),
#: Alibaba (100.100.100.200), Azure's wire server (168.63.129.16, a *public* address).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "fd00:ec2::254",
        "169.254.170.2",
        "100.100.100.200",
        "168.63.129.16",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: IPv6 forms that carry an IPv4 address but are never a route to the public Internet:
#: IPv4-compatible (deprecated, ::a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d, SIIT) and
#: local-use NAT64 (64:ff9b:1::/48, RFC 8215, a site's own translator). Python's is_global
#: calls some of them public; a translator on the path could reach internal IPv4 through them.
_EMBEDDING_NOT_PUBLIC = tuple(
    ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48")
)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_HEAD = 64 * 1024
_READ = 65536
_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9._-]*[a-z0-9])?")
#: characters kept as they are in a request target; everything else is percent-encoded
_PATH_SAFE = "/:@!$&'()*+,;=-._~?%[]"


class Loaded(NamedTuple):
    """An item's encoded bytes and where they came from."""

    data: bytes
    #: "data", "file", "http", "https" or "input_audio"
    source: str
    #: the declared media type (data URL header, Content-Type), if any; never trusted
    media_type: str | None


def _err(message: str, reason: str) -> MediaError:
    return MediaError(message, reason=reason)


# -- data: URLs and base64 ---------------------------------------------------------------------


def decode_base64(payload: str, max_bytes: int) -> bytes:
    """Strict base64 (no whitespace, no URL-safe alphabet), refused before decoding when the
    result would be larger than ``max_bytes``."""
    if (len(payload) * 3) // 4 - 2 > max_bytes:
        raise _err(f"media is larger than {max_bytes} bytes (max_item_bytes)", "item_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _err("media is not valid base64", "bad_base64") from None
    if len(data) > max_bytes:
        raise _err(f"media is larger than {max_bytes} bytes (max_item_bytes)", "item_too_large")
    return data


def decode_data_url(url: str, max_bytes: int) -> tuple[bytes, str | None]:
    """``data:[<media type>][;base64],<data>`` (RFC 2397) -> (bytes, media type)."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise _err("data URL has no ',' before its data", "bad_url")
    params = header.split(";")
    media_type = params[0].strip().lower() or None
    if any(p.strip().lower() == "base64" for p in params[1:]):
        return decode_base64(payload, max_bytes), media_type
    if len(payload) > 3 * max_bytes:  # each byte is at most 3 characters (%XX)
        raise _err(f"media is larger than {max_bytes} bytes (max_item_bytes)", "item_too_large")
    data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise _err(f"media is larger than {max_bytes} bytes (max_item_bytes)", "item_too_large")
    return data, media_type


# -- file:// -----------------------------------------------------------------------------------


def _read_below_root(path: str, root: str, max_bytes: int) -> bytes:
    """Read ``path`` if, symlinks resolved, it is a regular file below ``root`` (thread)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and os.path.commonpath([real, real_root]) != real_root:
        raise _err("file is outside the allowed local media root", "file_outside_root")
    try:
        # O_NONBLOCK: a FIFO planted below the root must not hang the open
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise _err("file not found", "file_not_found") from None
    except OSError as exc:
        raise _err(f"cannot open file: {exc.strerror}", "file_unreadable") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _err("not a regular file", "file_unreadable")
        if st.st_size > max_bytes:
            raise _err(f"media is larger than {max_bytes} bytes (max_item_bytes)", "item_too_large")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # the file grew while we read it
            raise _err(f"media is larger than {max_bytes} bytes (max_item_bytes)", "item_too_large")
        return b"".join(chunks)
    except OSError as exc:
        raise _err(f"cannot read file: {exc.strerror}", "file_unreadable") from None
    finally:
        os.close(fd)


async def read_local_file(url: str, limits: MediaLimits) -> bytes:
    """A ``file://`` URL's bytes, only below ``limits.allowed_local_root``."""
    if limits.allowed_local_root is None:
        raise _err("file:// URLs are disabled (allowed_local_root is not set)", "file_disabled")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query:
        raise _err("file:// URL must be file:///absolute/path", "bad_url")
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise _err("file:// URL must be file:///absolute/path", "bad_url")
    return await trio.to_thread.run_sync(
        _read_below_root, path, limits.allowed_local_root, limits.max_item_bytes
    )


# -- the address policy ------------------------------------------------------------------------


class AddressPolicy:
    """Which resolved addresses may be connected to. Pure; built once per limits object."""

    __slots__ = ("allowed", "exact")

    def __init__(self, allowed_networks: tuple[str, ...] = ()) -> None:
        nets = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
        self.allowed = tuple(nets)
        #: single-address entries: the only way to allow a metadata address
        self.exact = frozenset(n.network_address for n in nets if n.num_addresses == 1)

    def refusal(self, ip: IPAddress) -> str | None:
        """Why ``ip`` must not be fetched from (a phrase), or None when it may."""
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip in METADATA_ADDRESSES:
            return None if ip in self.exact else "a cloud metadata address"
        if any(ip.version == net.version and ip in net for net in self.allowed):
            return None
        if ip.is_multicast or ip.is_unspecified or not ip.is_global:
            return "a non-public address"
        if ip.version == 6:
            if ip.is_site_local or any(ip in net for net in _EMBEDDING_NOT_PUBLIC):
                return "a non-public address"
            embedded = _embedded_ipv4(ip)
            if embedded is not None:
                return self.refusal(embedded)
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a 6to4 or NAT64 address forwards to."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


@functools.lru_cache(maxsize=64)
def address_policy(limits: MediaLimits) -> AddressPolicy:
    return AddressPolicy(limits.allowed_networks)


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """The system trust store, loaded once (it costs milliseconds)."""
    return ssl.create_default_context()


async def system_resolver(host: str, port: int) -> Resolved:
    """trio's ``getaddrinfo`` (runs the system resolver in a thread, never on the loop)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


# -- http(s):// --------------------------------------------------------------------------------


class _Target(NamedTuple):
    scheme: str
    host: str  # lowercase, IDNA-encoded, no brackets
    port: int
    target: str  # request target: path and query
    host_header: str
    ip: IPAddress | None  # the host when it is an address literal


def _parse_http_url(url: str, limits: MediaLimits) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _err("URL is malformed", "bad_url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or (scheme == "http" and not limits.allow_plain_http):
        allowed = "https" if not limits.allow_plain_http else "http(s)"
        raise _err(f"only {allowed} URLs can be fetched", "unsupported_scheme")
    if parts.username is not None or parts.password is not None:
        raise _err("URLs with credentials are not fetched", "bad_url")
    host = parts.hostname or ""
    ip: IPAddress | None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise _err("URL host is not a valid host name", "bad_url") from None
        if not _HOST_RE.fullmatch(host):
            raise _err("URL host is not a valid host name", "bad_url")
    if ip is not None and ip.version == 6 and ip.scope_id:
        raise _err("URL host is not a valid host name", "bad_url")
    default = 443 if scheme == "https" else 80
    port = default if port is None else port
    if not 0 < port < 65536:
        raise _err("URL port is out of range", "bad_url")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    target = quote(target, safe=_PATH_SAFE)
    shown = f"[{host}]" if ip is not None and ip.version == 6 else host
    host_header = shown if port == default else f"{shown}:{port}"
    return _Target(scheme, host, port, target, host_header, ip)


def _domain_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    for entry in allowed:
        entry = entry.lower()
        if entry.startswith("."):
            if host == entry[1:] or host.endswith(entry):
                return True
        elif host == entry:
            return True
    return False


async def _vetted_addresses(t: _Target, limits: MediaLimits, resolver: Resolver) -> Resolved:
    if limits.allowed_domains and not _domain_allowed(t.host, limits.allowed_domains):
        raise _err(f"host {t.host!r} is not in allowed_domains", "domain_not_allowed")
    if t.ip is not None:
        family = socket.AF_INET6 if t.ip.version == 6 else socket.AF_INET
        sockaddr = (str(t.ip), t.port, 0, 0) if t.ip.version == 6 else (str(t.ip), t.port)
        addrs: Resolved = [(family, sockaddr)]
    else:
        try:
            addrs = await resolver(t.host, t.port)
        except OSError:
            raise _err(f"cannot resolve host {t.host!r}", "fetch_failed") from None
        if not addrs:
            raise _err(f"cannot resolve host {t.host!r}", "fetch_failed")
    policy = address_policy(limits)
    for _family, sockaddr in addrs:
        try:
            ip = ipaddress.ip_address(sockaddr[0])
        except ValueError:
            raise _err(f"host {t.host!r} resolves to an unusable address", "blocked_address")
        why = policy.refusal(ip)
        if why is not None:
            # The address itself is not echoed: it would map internal DNS for the client.
            raise _err(
                f"refusing to fetch from {t.host!r}: it resolves to {why}", "blocked_address"
            )
    return addrs


def check_peer(sock: socket.socket | trio.socket.SocketType, policy: AddressPolicy) -> None:
    """Vet the address the socket is actually connected to (its peer), not the name or the
    answer it was resolved to: the last word against DNS rebinding, and against anything
    between the resolver and the connect (a stale answer, a changed route)."""
    try:
        ip = ipaddress.ip_address(sock.getpeername()[0])
    except (OSError, ValueError):
        raise _err("cannot tell which address the connection reached", "fetch_failed") from None
    why = policy.refusal(ip)
    if why is not None:
        raise _err(f"refusing to fetch: the connection reached {why}", "blocked_address")


async def _connect(t: _Target, addrs: Resolved, policy: AddressPolicy) -> trio.SocketStream:
    last: OSError | None = None
    for family, sockaddr in addrs:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect(sockaddr)
            check_peer(sock, policy)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    why = (last.strerror or str(last)) if last is not None else "no address"
    raise _err(f"cannot connect to {t.host!r}: {why}", "fetch_failed")


def _request_head(t: _Target) -> bytes:
    return (
        f"GET {t.target} HTTP/1.1\r\nHost: {t.host_header}\r\nUser-Agent: lmgw-media\r\n"
        "Accept: */*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


class _Response(NamedTuple):
    status: int
    location: str | None
    content_type: str | None
    body: bytes


async def _exchange(stream: trio.abc.Stream, t: _Target, max_bytes: int) -> _Response:
    """Send one GET and read the response; the body only for a 200, and only up to the cap."""
    await stream.send_all(_request_head(t))
    reader = ResponseReader()
    head = 0
    try:
        while not reader.headers_complete:
            data = await stream.receive_some(_READ)
            if not data:
                raise _err(f"{t.host!r} closed the connection without a response", "fetch_failed")
            head += len(data)
            reader.feed(data)
            if not reader.headers_complete and head > _MAX_HEAD:
                raise _err(f"{t.host!r} sent an oversized response head", "fetch_failed")
        headers = dict(reader.headers)
        status = reader.status
        location = headers.get(b"location")
        ctype = headers.get(b"content-type")
        loc = location.decode("latin-1") if location is not None else None
        ct = ctype.decode("latin-1") if ctype is not None else None
        if status != 200:
            return _Response(status, loc, ct, b"")
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"identity", b""):
            raise _err(
                f"{t.host!r} sent a compressed body ({encoding.decode('latin-1')})", "fetch_failed"
            )
        length = headers.get(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > max_bytes:
            raise _err(f"media is larger than {max_bytes} bytes (max_item_bytes)", "item_too_large")
        chunks = [reader.take_body()]
        total = len(chunks[0])
        while not reader.complete:
            if total > max_bytes:
                break
            data = await stream.receive_some(_READ)
            if not data:
                reader.feed_eof()
                if not reader.complete:
                    raise _err(f"{t.host!r} closed the connection mid-body", "fetch_failed")
                break
            reader.feed(data)
            chunk = reader.take_body()
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise _err(f"media is larger than {max_bytes} bytes (max_item_bytes)", "item_too_large")
        return _Response(status, loc, ct, b"".join(chunks))
    except UpstreamProtocolError:
        raise _err(f"{t.host!r} sent an invalid HTTP response", "fetch_failed") from None


async def _fetch(
    url: str, limits: MediaLimits, ssl_context: ssl.SSLContext | None, resolver: Resolver
) -> Loaded:
    for _hop in range(limits.max_redirects + 1):
        t = _parse_http_url(url, limits)
        addrs = await _vetted_addresses(t, limits, resolver)
        stream: trio.abc.Stream = await _connect(t, addrs, address_policy(limits))
        try:
            if t.scheme == "https":
                ctx = ssl_context or default_ssl_context()
                stream = trio.SSLStream(stream, ctx, server_hostname=t.host)
                try:
                    await stream.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError) as exc:
                    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
                    why = getattr(cause, "reason", None) or type(cause).__name__
                    raise _err(f"TLS with {t.host!r} failed: {why}", "fetch_failed") from None
            try:
                resp = await _exchange(stream, t, limits.max_item_bytes)
            except (trio.BrokenResourceError, OSError):
                raise _err(f"connection to {t.host!r} broke", "fetch_failed") from None
        finally:
            await trio.aclose_forcefully(stream)
        if resp.status in _REDIRECTS and resp.location:
            url = urljoin(url, resp.location)
            continue
        if resp.status != 200:
            raise _err(f"fetching from {t.host!r} failed: HTTP {resp.status}", "fetch_failed")
        media_type = resp.content_type.split(";")[0].strip().lower() if resp.content_type else None
        return Loaded(resp.body, t.scheme, media_type or None)
    raise _err(f"more than {limits.max_redirects} redirects (max_redirects)", "too_many_redirects")


async def fetch_url(
    url: str,
    limits: MediaLimits,
    *,
    ssl_context: ssl.SSLContext | None = None,
    resolver: Resolver | None = None,
) -> Loaded:
    """Fetch an ``http(s)://`` URL under the SSRF policy and the size, redirect and time limits.

    Args:
        ssl_context: trust for https; None uses the system store.
        resolver: name resolution; None uses trio's ``getaddrinfo``.

    Raises:
        MediaError: refused, unreachable, too large, timed out, or not a 200.
    """
    if not limits.allow_remote:
        raise _err("remote media URLs are disabled (allow_remote = false)", "unsupported_scheme")
    with trio.move_on_after(limits.fetch_timeout_s):
        return await _fetch(url, limits, ssl_context, resolver or system_resolver)
    raise _err(
        f"fetching media took longer than {limits.fetch_timeout_s:g}s (fetch_timeout_s)",
        "fetch_timeout",
    )


def url_scheme(url: str) -> str:
    """The lowercased scheme of a URL ("" when it has none)."""
    head, sep, _ = url.partition(":")
    return head.lower() if sep and head.isascii() and head.isalpha() else ""
