"""Who may publish to a run's collector: per-run CURVE keys and the ZAP check of clients.

Anything on the host (or the network, with a non-loopback address) can connect to a
socket, so the collector's PULL socket is a ZeroMQ CURVE server. Rank 0 makes two fresh
key pairs per run attempt: the collector's (server) pair, and one client pair that every
publishing process of the run uses. The other ranks get the server's public key and the
client pair through the process group (nodes need not share the run folder). A client
must know the server's public key to even start the handshake, and the collector's ZAP
handler (``ZapHandler``) then admits only the run's client public key. Everything else
fails inside libzmq's handshake: no byte of a refused peer reaches Python decoding.

``RUN_DIR/telemetry.key`` (mode 0600, readable by the run's user only) holds both pairs,
so that the user's own scripts can publish into a run (``read_keys(...).client()``). The
monitor needs no key: it only subscribes to the collector's PUB socket.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

__all__ = [
    "KEY_FILE",
    "ZAP_DOMAIN",
    "ClientKeys",
    "CurveKeys",
    "ZapHandler",
    "has_curve",
    "new_keys",
    "read_keys",
    "write_keys",
]

KEY_FILE = "telemetry.key"
ZAP_DOMAIN = b"distgraft"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)


def has_curve() -> bool:
    """Whether this libzmq was built with CURVE (pyzmq's wheels always are)."""
    return bool(zmq.has("curve"))


@dataclass(frozen=True)
class ClientKeys:
    """What a publishing process needs: the collector's public key and the run's client pair.

    All values are 40-character Z85 texts (ZeroMQ's printable form of a 32-byte key).
    """

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the collector (before ``connect``)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


@dataclass(frozen=True)
class CurveKeys:
    """The run's two key pairs: the collector's (server) and its publishers' (client)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    def client(self) -> ClientKeys:
        return ClientKeys(self.server_public, self.client_public, self.client_secret)

    def apply_server(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server whose clients the ZAP handler checks (before bind)."""
        sock.curve_server = True
        sock.curve_publickey = self.server_public
        sock.curve_secretkey = self.server_secret
        sock.zap_domain = ZAP_DOMAIN


def new_keys() -> CurveKeys:
    """Fresh key pairs from libzmq's random source; RuntimeError without CURVE."""
    if not has_curve():
        raise RuntimeError("this libzmq has no CURVE support (zmq.has('curve') is False)")
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return CurveKeys(server_public, server_secret, client_public, client_secret)


def write_keys(run_dir: str | os.PathLike[str], keys: CurveKeys) -> Path:
    """``RUN_DIR/telemetry.key`` with mode 0600, replaced atomically; its path.

    The temp file is created with mode 0600 (O_EXCL, so never through someone else's
    file or link), so the secrets are never readable by others, not even for a moment.
    """
    path = Path(run_dir) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        text = {k: v.decode("ascii") for k, v in vars(keys).items()}
        os.write(fd, (json.dumps(text, indent=1) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_keys(run_dir: str | os.PathLike[str]) -> CurveKeys:
    """The keys of ``RUN_DIR/telemetry.key``; OSError or ValueError when unusable."""
    path = Path(run_dir) / KEY_FILE
    data = json.loads(path.read_text())
    try:
        keys = CurveKeys(**{k: str(data[k]).encode("ascii") for k in CurveKeys.__annotations__})
    except (KeyError, TypeError, UnicodeEncodeError) as e:
        raise ValueError(f"{path}: not a distgraft key file ({e})") from None
    if any(len(v) != 40 for v in vars(keys).values()):
        raise ValueError(f"{path}: every key must be 40 Z85 characters")
    return keys


class ZapHandler:
    """The ZAP (RFC 27) side of the collector: admit only the run's client public key.

    libzmq asks over an inproc REP socket after a CURVE client proved it holds the secret
    key of the public key it presents; ``serve_one`` answers one such request. It runs in
    the collector's thread, which polls ``socket`` with its other sockets.
    """

    def __init__(self, ctx: zmq.Context, allowed_public: bytes) -> None:
        self._allowed = z85.decode(allowed_public)
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(_ZAP_ENDPOINT)

    def serve_one(self) -> None:
        frames = self.socket.recv_multipart()
        self.socket.send_multipart(self.reply(frames))

    def reply(self, frames: list[bytes]) -> list[bytes]:
        """The reply frames to one request: 200 for the run's key, 400 for anything else."""
        request_id = frames[1] if len(frames) > 1 else b""
        ok = (
            len(frames) == 7
            and frames[0] == b"1.0"
            and frames[2] == ZAP_DOMAIN
            and frames[5] == b"CURVE"
            and hmac.compare_digest(frames[6], self._allowed)
        )
        if not ok:
            return [b"1.0", request_id, b"400", b"not a publisher of this run", b"", b""]
        return [b"1.0", request_id, b"200", b"OK", b"run", b""]

    def close(self) -> None:
        self.socket.close(0)
