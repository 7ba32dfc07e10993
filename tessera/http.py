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
from enum import StrEnum
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

from tessera.errors import (
    Misconfigured,
    OutcomeUnknown,
    TesseraError,
    Unavailable,
    from_problem,
)
from tessera.observability.logs import current_request_id

#: every answer of a Tessera server names the service that sent it (tessera.rest.ServiceHeader)
SERVICE_HEADER = "Tessera-Service"


class Service(StrEnum):
    """The Tessera REST services; each answers with its name in SERVICE_HEADER."""

    MANAGEMENT = "management"
    NODE_AGENT = "node-agent"


#: where the URL of each service comes from, for the message when it reaches the wrong one
_URL_SOURCE = {
    Service.MANAGEMENT: "check --management",
    Service.NODE_AGENT: "check --agent-socket, or the agent_url its node registered with",
}

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

    def __init__(self, url: str, timeout: float = READ_TIMEOUT, ca_file: str | None = None) -> None:
        self.url = url
        self._timeout = timeout
        #: a CA bundle to trust for https (a private CA); None: the system's
        self._ca_file = ca_file
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
            context = ssl.create_default_context(cafile=self._ca_file)
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
    """A small typed wrapper: JSON in, JSON out, problems raised as errors.

    Management and the node-agent serve the same paths (`DELETE
    /v1/volumes/{id}`) and accept the same token, so a management URL given
    the agent's socket would have DeleteVolume unlink the volume's file
    behind management's back. Every request names `service` (a Tessera
    server refuses one meant for another service before running it), and
    every answer must come from `service`.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        service: Service,
        timeout: float = READ_TIMEOUT,
        ca_file: str | None = None,
    ) -> None:
        self.url = url
        self.service = Service(service)
        #: the peer's name in messages
        self.peer = self.service.value
        self._pool = ConnectionPool(url, timeout, ca_file)
        # the service meant rides on every request: the other one refuses it unrun
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            SERVICE_HEADER: self.service.value,
        }

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
        if request_id := current_request_id():  # the RPC or request this call serves
            headers["X-Request-Id"] = request_id
        body = None
        if json is not None:
            body = _dumps(json)
            headers["Content-Type"] = "application/json"
        reply = self._exchange(method, target, body, headers)
        self._check_service(reply)
        if reply.status == 204:
            return None
        if 200 <= reply.status < 300:
            return self._decoded(reply, method, target)
        raise self._error(reply)

    def _exchange(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> _Reply:
        """One request, sent again once if it went out and no answer came back.

        Failing to connect means nothing reached the peer: unreachable. Once
        connected, a failure (a read timeout, a connection dropped before
        the answer) leaves the outcome unknown: the call may have run. Every
        Tessera call is idempotent by design (creates by name, PUT upserts,
        grow-to sizes, deletes that accept "already gone"), so sending it once
        more is safe and settles most cases; the usual one is a kept-alive
        connection the peer closed while idle.
        """
        conn, reused = self._pool.take()
        try:
            return self._once(conn, method, target, body, headers)
        except _ConnectFailed as exc:
            raise self._unreachable(exc.reason) from exc.reason
        except (OSError, http.client.HTTPException) as exc:
            first = exc
        # A reused connection that failed this way had gone stale while idle:
        # the request never reached a handler.
        stale = reused and isinstance(first, _STALE)
        try:
            return self._once(self._pool.new_connection(), method, target, body, headers)
        except _ConnectFailed as exc:
            if stale:
                raise self._unreachable(exc.reason) from exc.reason
            raise self._outcome_unknown(
                method, target, first, "could not reconnect to resend it"
            ) from exc.reason
        except (OSError, http.client.HTTPException) as exc:
            raise self._outcome_unknown(method, target, exc, "sent twice") from exc

    def _once(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        target: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> _Reply:
        """Connect if needed, send, read the whole answer; the connection closes on any failure."""
        try:
            if conn.sock is None:
                try:
                    conn.connect()
                except (OSError, http.client.HTTPException, UnicodeError) as exc:
                    # UnicodeError: a host name the resolver cannot even encode
                    # ("a..b", a label over 63 characters) - unreachable too
                    raise _ConnectFailed(exc) from exc
            conn.request(method, target, body=body, headers=headers)
            resp = conn.getresponse()
            reply = _Reply(
                resp.status,
                resp.getheader("Content-Type", ""),
                resp.getheader(SERVICE_HEADER, ""),
                resp.read(),
            )
        except BaseException:
            conn.close()  # in an unknown state: never back into the pool
            raise
        if resp.will_close:
            conn.close()
        else:
            self._pool.give_back(conn)
        return reply

    def _check_service(self, reply: _Reply) -> None:
        """Any answer (2xx, 204 or an error) from another service, or from no Tessera server.

        Checked before the status: a 204 from the wrong service may already
        have deleted something, and its error documents mean the wrong thing
        (the agent's not-found is not management's). One exception: a 502-504
        without the header is a gateway whose upstream did not answer, which
        may recover (`from_problem` makes it Unavailable); it changed nothing.
        """
        if reply.service == self.service:
            return
        if not reply.service and reply.status in (502, 503, 504):
            return
        if reply.service:
            what = f"the {reply.service}, not {self.service}"
        else:
            what = (
                f"not a Tessera {self.service} server (it answered HTTP {reply.status} "
                f"without {SERVICE_HEADER})"
            )
        raise Misconfigured(f"{self.url} is {what}: {_URL_SOURCE[self.service]}")

    def _unreachable(self, reason: object) -> Unavailable:
        return Unavailable(f"{self.peer} at {self.url} is unreachable: {reason}")

    def _outcome_unknown(
        self, method: str, target: str, reason: object, attempts: str
    ) -> OutcomeUnknown:
        why = "timed out waiting for the answer" if isinstance(reason, TimeoutError) else reason
        return OutcomeUnknown(
            f"{self.peer} at {self.url} did not answer {method} {target} ({why}; {attempts}): "
            "the call may have run; retrying it is safe"
        )

    def _decoded(self, reply: _Reply, method: str, target: str) -> Any:
        if not reply.data:
            return None
        try:
            return _loads(reply.data)
        except ValueError:
            raise Misconfigured(
                f"{self.peer} at {self.url} answered {method} {target} with HTTP "
                f"{reply.status} ({reply.content_type or 'no content type'}) that is not JSON: "
                "it does not serve the Tessera API there (check the URL and its path prefix)"
            ) from None

    def _error(self, reply: _Reply) -> TesseraError:
        try:
            body = _loads(reply.data)
        except ValueError:
            body = None
        err = from_problem(reply.status, body, content_type=reply.content_type)
        if isinstance(err, Misconfigured):
            # A plain Misconfigured, not the peer's NoSuchRoute: relayed by a
            # server, it is about that server's upstream, not its own routes.
            err = Misconfigured(f"{self.peer} at {self.url}: {err.message}", field=err.field)
        elif reply.status >= 500 and not isinstance(err, Unavailable | OutcomeUnknown):
            err.message = f"{self.peer}: {err.message}"
        return err


class _ConnectFailed(Exception):
    """Internal: the connection could not be opened, so nothing was sent."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(str(reason))
        self.reason = reason


class _Reply(NamedTuple):
    status: int
    content_type: str
    service: str
    data: bytes


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _loads(data: bytes) -> Any:
    return json.loads(data)
