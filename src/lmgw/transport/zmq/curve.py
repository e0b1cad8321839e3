"""CURVE for the native protocol's links: encryption, the worker's identity, and an allow-list
of gateways (docs/native-protocol.md, "Security").

Roles follow the sockets: the worker's ROUTERs are CURVE *servers* (their key pair; every
client must know the server's public key), the gateway's DEALERs are CURVE *clients* (their
own key pair plus the worker's public key). A client with a wrong server key cannot complete
the handshake, so the gateway knows it talks to the worker it was configured for.

Which clients a worker admits is ZAP's job (RFC 27): libzmq asks a handler bound at
``inproc://zeromq.zap.01`` *in the socket's context* about every handshake.
:class:`ZapHandler` is that handler as one trio task owning one ROUTER (pyzmq's
``zmq.auth`` authenticators run on asyncio or on a thread of their own, neither of which
fits a trio program). Two facts shape its use:

* libzmq *fails open*: with no handler bound, every CURVE client is accepted. So the handler
  is bound before the server socket, closed after it, and ``ZAP_ENFORCE_DOMAIN`` is set where
  libzmq has it (then a missing handler refuses instead).
* A context has one ZAP endpoint. A CURVE server therefore gets a context of its own, so no
  other server's handler (or lack of one) can decide for it.

Key files are ZeroMQ's certificate files (``zmq.auth.create_certificates`` writes the same
format): ``NAME.key`` holds the public key, ``NAME.key_secret`` both keys (mode 0600). An
allow-list is a directory of ``*.key`` files; adding or removing one takes effect at the next
handshake, without a restart.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import trio
import zmq
import zmq.auth

from .socket import PeerUnreachable, ZmqSocket

__all__ = [
    "PUBLIC_SUFFIX",
    "SECRET_SUFFIX",
    "ZAP_ENDPOINT",
    "CurveClient",
    "CurveError",
    "CurveServer",
    "KeyPair",
    "ZapHandler",
    "generate_keys",
    "load_allowed_keys",
    "load_key_pair",
    "load_public_key",
]

log = logging.getLogger("lmgw.transport.zmq.curve")

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
"""Where libzmq looks for the context's ZAP handler (RFC 27)."""
_ZAP_VERSION = b"1.0"
_KEY_LEN = 40  # a Z85-encoded 32-byte key


class CurveError(ValueError):
    """A key file that cannot be used, or a ZAP handler that cannot be installed."""


class KeyPair(NamedTuple):
    """Z85-encoded keys (40 ASCII bytes each)."""

    public: bytes
    secret: bytes


def _check_key(key: bytes, what: str, path: object) -> bytes:
    if len(key) != _KEY_LEN:
        raise CurveError(f"{path}: the {what} key is not a 40-character Z85 key")
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError, TypeError):
        raise CurveError(f"{path}: the {what} key is not valid Z85") from None
    return key


def _load(path: str | os.PathLike[str]) -> tuple[bytes | None, bytes | None]:
    try:
        return zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot read CURVE key file {os.fspath(path)}: {exc}") from None


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file."""
    public, _ = _load(path)
    if public is None:
        raise CurveError(f"{os.fspath(path)}: no public-key line")
    return _check_key(public, "public", os.fspath(path))


def load_key_pair(path: str | os.PathLike[str]) -> KeyPair:
    """Both keys from a ``.key_secret`` file."""
    public, secret = _load(path)
    where = os.fspath(path)
    if public is None or secret is None:
        raise CurveError(f"{where}: not a secret key file (needs public-key and secret-key)")
    pair = KeyPair(_check_key(public, "public", where), _check_key(secret, "secret", where))
    if zmq.curve_public(pair.secret) != pair.public:
        raise CurveError(f"{where}: the public key does not belong to the secret key")
    return pair


def load_allowed_keys(directory: str | os.PathLike[str]) -> frozenset[bytes]:
    """The public keys of every ``*.key`` file in ``directory`` (an allow-list)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CurveError(f"{folder} is not a directory of {PUBLIC_SUFFIX} files")
    return frozenset(load_public_key(p) for p in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")))


def generate_keys(
    directory: str | os.PathLike[str], name: str = "lmgw", *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write a new key pair as ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (both
    keys, mode 0600); return the two paths. Refuses to replace existing files unless
    ``overwrite``: a replaced key locks out every peer that knew the old one."""
    if not name or "/" in name or name.startswith("."):
        raise CurveError(f"bad key name {name!r}")
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_path = folder / f"{name}{PUBLIC_SUFFIX}"
    secret_path = folder / f"{name}{SECRET_SUFFIX}"
    if not overwrite and (public_path.exists() or secret_path.exists()):
        raise CurveError(f"{public_path} or {secret_path} exists (pass overwrite=True)")
    public, secret = zmq.curve_keypair()
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    head = (
        "#   ****  Generated on {} by lmgw  ****\n"
        "#   ZeroMQ CURVE {} Certificate\n"
        "#   Exchange securely, or use a secure mechanism to verify the contents\n"
        "#   of this file after exchange. Store public certificates in your home\n"
        "#   directory, in the .curve subdirectory.\n\n"
        "metadata\ncurve\n"
    )
    _write(
        public_path,
        head.format(stamp, "Public") + f'    public-key = "{public.decode()}"\n',
        0o644,
    )
    _write(
        secret_path,
        head.format(stamp, "**Secret**")
        + f'    public-key = "{public.decode()}"\n'
        + f'    secret-key = "{secret.decode()}"\n',
        0o600,
    )
    return public_path, secret_path


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow it
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class CurveClient:
    """A gateway's side of a CURVE link: its own key pair and the worker's public key."""

    keys: KeyPair
    server_key: bytes

    @classmethod
    def from_files(
        cls, secret_key_file: str | os.PathLike[str], server_key_file: str | os.PathLike[str]
    ) -> CurveClient:
        """``[native] curve_secret_key_file`` and ``workers[].curve_server_key``."""
        return cls(load_key_pair(secret_key_file), load_public_key(server_key_file))

    def socket_options(self) -> dict[int, int | bytes]:
        """Options to set before ``connect`` (``ZmqSocket.open(..., options=...)``)."""
        return {
            zmq.CURVE_SERVERKEY: self.server_key,
            zmq.CURVE_PUBLICKEY: self.keys.public,
            zmq.CURVE_SECRETKEY: self.keys.secret,
        }


@dataclasses.dataclass(frozen=True)
class CurveServer:
    """A worker's side: its key pair and which client keys it admits.

    ``allow_dir`` is a directory of ``*.key`` files, re-read when its contents change. None
    admits any client that knows the server's public key: the link is encrypted and the
    worker authenticated, but gateways are not (say so in the deployment's docs)."""

    keys: KeyPair
    allow_dir: str | None = None
    domain: str = "lmgw"

    @classmethod
    def from_files(
        cls, secret_key_file: str | os.PathLike[str], allow_dir: str | os.PathLike[str] | None
    ) -> CurveServer:
        """``--curve-secret-key FILE --curve-allow DIR``. Reads the allow-list once now, so a
        bad directory stops the start."""
        keys = load_key_pair(secret_key_file)
        if allow_dir is None:
            return cls(keys)
        load_allowed_keys(allow_dir)
        return cls(keys, os.fspath(allow_dir))

    def socket_options(self) -> dict[int, int | bytes]:
        """Options to set before ``bind``."""
        options: dict[int, int | bytes] = {
            zmq.CURVE_SERVER: 1,
            zmq.CURVE_PUBLICKEY: self.keys.public,
            zmq.CURVE_SECRETKEY: self.keys.secret,
            zmq.ZAP_DOMAIN: self.domain.encode(),
        }
        enforce = getattr(zmq, "ZAP_ENFORCE_DOMAIN", None)
        if enforce is not None and zmq.zmq_version_info() >= (4, 3):
            options[enforce] = 1  # no handler bound: refuse (libzmq would accept)
        return options


class ZapHandler:
    """The ZAP handler of one context, as a trio task (see the module docstring).

    ``await nursery.start(ZapHandler(server, ctx).run)`` before binding the CURVE sockets in
    ``ctx``; cancel it after closing them. :meth:`decide` is the sans-IO part.
    """

    def __init__(self, server: CurveServer, ctx: zmq.Context) -> None:
        self.server = server
        self._ctx = ctx
        self._allow: frozenset[bytes] | None = None
        self._allow_stamp: tuple[int, int] | None = None
        self.accepted = 0
        self.refused = 0
        self.malformed = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = ZmqSocket.open(self._ctx, zmq.ROUTER, hwm=10_000, max_msg_size=64 << 10)
        with sock:
            try:
                sock.bind(ZAP_ENDPOINT)
            except zmq.ZMQError as exc:
                raise CurveError(
                    f"cannot bind the ZAP handler ({exc}): this context has one already; a "
                    "CURVE server needs a context of its own"
                ) from None
            self.allowed_keys()  # read the allow-list before the first handshake
            task_status.started()
            while True:
                frames = await sock.recv_multipart()
                reply = self.decide(frames)
                if reply is None:
                    continue
                try:
                    if not sock.try_send_multipart(reply):
                        log.warning("ZAP reply dropped (libzmq's queue is full)")
                except PeerUnreachable:
                    pass  # the handshake it was for is gone already

    def allowed_keys(self) -> frozenset[bytes] | None:
        """The allow-list now (re-read when the directory changed); None: any key."""
        folder = self.server.allow_dir
        if folder is None:
            return None
        try:
            info = os.stat(folder)
            stamp = (info.st_mtime_ns, info.st_ino)
        except OSError:
            stamp = None
        if stamp is None or stamp != self._allow_stamp:
            try:
                self._allow = load_allowed_keys(folder)
            except CurveError as exc:
                if self._allow is None:
                    raise
                log.error("allow-list %s unreadable, keeping the previous one: %s", folder, exc)
            else:
                self._allow_stamp = stamp
                log.info("CURVE allow-list %s: %d keys", folder, len(self._allow))
        return self._allow

    def decide(self, frames: Sequence[Any]) -> list[bytes] | None:
        """The reply to one ZAP request as a ROUTER receives it
        (``[peer, b"", version, request_id, domain, address, identity, mechanism, *creds]``);
        None for something that is not a ZAP request."""
        frames = [bytes(f) for f in frames]
        if len(frames) < 8 or frames[1] != b"" or frames[2] != _ZAP_VERSION:
            self.malformed += 1
            return None
        envelope, request_id = frames[:2], frames[3]
        domain, address, mechanism, credentials = frames[4], frames[5], frames[7], frames[8:]

        def answer(code: bytes, text: str, user: bytes = b"") -> list[bytes]:
            return [*envelope, _ZAP_VERSION, request_id, code, text.encode(), user, b""]

        peer = address.decode(errors="replace")
        if domain != self.server.domain.encode():
            self.refused += 1
            return answer(b"400", "unknown ZAP domain")
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self.refused += 1
            log.warning("refused %s: mechanism %r, CURVE required", peer, mechanism)
            return answer(b"400", "CURVE required")
        key = zmq.utils.z85.encode(credentials[0])
        allow = self.allowed_keys()
        if allow is not None and key not in allow:
            self.refused += 1
            log.warning("refused %s: client key %s is not in the allow-list", peer, key.decode())
            return answer(b"400", "client key not allowed")
        self.accepted += 1
        return answer(b"200", "OK", key)

    def statistics(self) -> dict[str, int]:
        return {"accepted": self.accepted, "refused": self.refused, "malformed": self.malformed}
