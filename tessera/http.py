"""HTTP client plumbing shared by every Tessera client.

Peers are addressed as `unix:///path/to.sock` (same host) or
`http(s)://host:port`. Every request carries the bearer token; every error
response is a problem+json document that we turn back into the matching
`tessera.errors` type, so an error keeps its meaning across hops.

The client is the standard library's `http.client` over a small pool of
keep-alive connections rather than httpx: every CreateVolume crosses two
HTTP hops (plugin -> management -> agent), and httpx's request and cookie
machinery was half of the CSI plugin's CPU per call (measured with py-spy
in bench/provision.py); `http.client` does the same work for a third.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import threading
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from tessera.errors import TesseraError, Unavailable, from_problem

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
MAX_IDLE = 32

# A kept-alive connection the peer has meanwhile closed (idle timeout, restart)
# fails like this on its next use; the request never reached the peer's handler.
_STALE = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ssl.SSLEOFError,  # a TLS peer that hung up without close-notify
    ssl.SSLZeroReturnError,
)


def read_token(path: str | os.PathLike[str]) -> str:
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix socket (the agent's and the dev stack's endpoints)."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(self.socket_path)
            sock.settimeout(self.timeout)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _TcpConnection(http.client.HTTPConnection):
    """Connect with the short connect timeout, then wait for replies with the long one."""

    def connect(self) -> None:
        self.sock = _tcp_socket(self.host, self.port, self.timeout)


class _TlsConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        sock = _tcp_socket(self.host, self.port, self.timeout)
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]
        except BaseException:
            sock.close()  # a refused certificate must not leak the socket
            raise


def _tcp_socket(host: str, port: int | None, timeout: float | None) -> socket.socket:
    sock = socket.create_connection((host, port), CONNECT_TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


class ConnectionPool:
    """Idle keep-alive connections to one peer, shared by threads.

    A connection is used by one request at a time: taken from the pool,
    given back only after its response was read to the end and the server
    did not ask to close it.
    """

    def __init__(self, url: str, timeout: float = READ_TIMEOUT) -> None:
        self.url = url
        self._timeout = timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        parts = urlsplit(url)
        if parts.scheme == "unix":
            self._base = ""
            self._socket_path = parts.path
        elif parts.scheme in ("http", "https"):
            if not parts.hostname:
                raise ValueError(f"{url!r} has no host")
            self._base = parts.path.rstrip("/")
        else:
            raise ValueError(f"{url!r}: use unix:///path/to.sock or http(s)://host:port")
        self._parts = parts

    def new_connection(self) -> http.client.HTTPConnection:
        parts = self._parts
        if parts.scheme == "unix":
            return _UnixConnection(self._socket_path, self._timeout)
        if parts.scheme == "https":
            context = ssl.create_default_context()
            return _TlsConnection(
                parts.hostname or "", parts.port, timeout=self._timeout, context=context
            )
        return _TcpConnection(parts.hostname or "", parts.port, timeout=self._timeout)

    def path(self, path: str) -> str:
        return self._base + path

    def take(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection and whether it was used before (and so may have gone stale)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self.new_connection(), False

    def give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close idle connections now; busy ones are closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class JsonClient:
    """A small typed wrapper: JSON in, JSON out, problems raised as errors."""

    def __init__(self, url: str, token: str, *, peer: str, timeout: float = READ_TIMEOUT) -> None:
        self.url = url
        self.peer = peer
        self._pool = ConnectionPool(url, timeout)
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    def close(self) -> None:
        self._pool.close()

    def healthy(self) -> bool:
        """Whether the peer answers its open /healthz route."""
        try:
            self.request("GET", "/healthz")
        except (TesseraError, ValueError):
            return False
        return True

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,  # noqa: A002 - the name callers know from every HTTP client
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Send one request; the decoded JSON body, None for 204, or the peer's error."""
        target = self._pool.path(quote(path)) + (f"?{urlencode(params)}" if params else "")
        headers = dict(self._headers)
        body = None
        if json is not None:
            body = _dumps(json)
            headers["Content-Type"] = "application/json"
        status, data = self._exchange(method, target, body, headers)
        if status == 204:
            return None
        if 200 <= status < 300:
            return _loads(data) if data else None
        raise self._error(status, data)

    def _exchange(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        conn, reused = self._pool.take()
        try:
            return self._once(conn, method, target, body, headers)
        except _STALE:
            conn.close()
            if not reused:
                raise self._unreachable("closed the connection") from None
            # Only a reused keep-alive connection is retried, and only once: the
            # peer closed it while idle. Every Tessera call is idempotent anyway.
            conn = self._pool.new_connection()
            try:
                return self._once(conn, method, target, body, headers)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise self._unreachable(exc) from exc
            except BaseException:
                conn.close()
                raise
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._unreachable(exc) from exc
        except BaseException:
            conn.close()  # in an unknown state: never back into the pool
            raise

    def _once(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        target: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> tuple[int, bytes]:
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.will_close:
            conn.close()
        else:
            self._pool.give_back(conn)
        return resp.status, data

    def _unreachable(self, reason: object) -> Unavailable:
        return Unavailable(f"{self.peer} at {self.url} is unreachable: {reason}")

    def _error(self, status: int, data: bytes) -> TesseraError:
        try:
            body = _loads(data)
        except ValueError:
            body = None
        err = from_problem(status, body)
        if status >= 500 and not isinstance(err, Unavailable):
            err.message = f"{self.peer}: {err.message}"
        return err


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _loads(data: bytes) -> Any:
    return json.loads(data)
