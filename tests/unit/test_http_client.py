"""JsonClient against a real HTTP/1.1 server on a unix socket (no root)."""

from __future__ import annotations

import json
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tessera.errors import (
    Misconfigured,
    NoSuchRoute,
    NotFound,
    OutcomeUnknown,
    Unavailable,
    to_problem,
)
from tessera.http import SERVICE_HEADER, JsonClient, Service

CLIENT_TIMEOUT = 0.3
SLOW_REPLY = 1.0  # well past CLIENT_TIMEOUT: the client has given up by then


#: canned answers of servers that are not Tessera (a proxy, another web server)
_FOREIGN = ("html", "fastapi-default", "foreign-problem")


class _Handler(BaseHTTPRequestHandler):
    """Answers as the Tessera service `service` names ("" : as no Tessera server)."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, str, bytes]] = []
    service = Service.MANAGEMENT.value

    def _reply(
        self, status: int, body: object | None, content_type: str, *, foreign: bool = False
    ) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if self.service and not foreign:
            self.send_header(SERVICE_HEADER, self.service)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append((self.command, self.path, self.headers["Authorization"], body))
        if self.path.startswith("/missing"):
            err = NotFound("volume vol-x does not exist", field="volume_id")
            self._reply(404, to_problem(err), "application/problem+json")
        elif self.path.startswith("/canned/"):
            self._canned()
        elif self.path.startswith("/slow"):
            self._slow()
        elif self.command == "DELETE":
            self._reply(204, None, "application/json")
        else:
            self._reply(200, {"path": self.path, "echo": body.decode()}, "application/json")
        if self.path.startswith("/then-hang-up"):
            # Close without saying so, as a peer restarting or timing out idle does.
            self.close_connection = True

    def _canned(self) -> None:
        """/canned/<status>/<what>: answers as other servers (or a confused peer) would."""
        _, _, status, what = self.path.split("/", 3)
        code = int(status)
        if what == "html":
            data = b"<html><body>404 Not Found</body></html>"
            self.send_response(code)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif what == "fastapi-default":
            self._reply(code, {"detail": "Not Found"}, "application/json", foreign=True)
        elif what == "foreign-problem":
            body = {"type": "about:blank", "title": "Not Found", "status": code}
            self._reply(code, body, "application/problem+json", foreign=True)
        elif what == "not-found-as-plain-json":
            self._reply(
                code, to_problem(NotFound("volume vol-x does not exist")), "application/json"
            )
        elif what == "no-such-route":
            err = NoSuchRoute("management has no route DELETE /x: check the URL")
            self._reply(code, to_problem(err), "application/problem+json")

    def _slow(self) -> None:
        """/slow/<n>: the first n requests are answered only after the client gave up."""
        _, _, n = self.path.split("/")
        if sum(1 for s in self.seen if s[1] == self.path) <= int(n):
            time.sleep(SLOW_REPLY)
        try:
            self._reply(200, {"path": self.path}, "application/json")
        except OSError:
            self.close_connection = True  # the client had hung up

    do_GET = do_PUT = do_POST = do_DELETE = _handle

    def log_message(self, *args: object) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # noqa: ANN201 - socketserver's signature
        sock, _ = super().get_request()
        return sock, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port) peer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[_Server, str]]:
    sock = tmp_path / "peer.sock"
    srv = _Server(str(sock), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    _Handler.seen = []
    _Handler.service = Service.MANAGEMENT.value
    try:
        yield srv, f"unix://{sock}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_json_body_query_and_token_reach_the_peer(server: tuple[_Server, str]) -> None:
    client = JsonClient(server[1], "s3cret", service=Service.MANAGEMENT)
    reply = client.request("PUT", "/v1/volumes/v1", json={"size": 1}, params={"a": "b c"})
    assert reply["path"] == "/v1/volumes/v1?a=b+c"
    assert json.loads(reply["echo"]) == {"size": 1}
    assert _Handler.seen[0][2] == "Bearer s3cret"
    assert client.request("DELETE", "/v1/volumes/v1") is None
    client.close()


def test_a_problem_from_the_peer_comes_back_as_the_same_error_type(
    server: tuple[_Server, str],
) -> None:
    client = JsonClient(server[1], "t", service=Service.MANAGEMENT)
    with pytest.raises(NotFound) as err:
        client.request("GET", "/missing")
    assert "vol-x does not exist" in err.value.message
    assert err.value.field == "volume_id"


def test_a_connection_the_peer_closed_while_idle_is_replaced_transparently(
    server: tuple[_Server, str],
) -> None:
    client = JsonClient(server[1], "t", service=Service.MANAGEMENT)
    client.request("GET", "/then-hang-up")
    assert len(client._pool._idle) == 1  # the client still believes it is alive
    assert client.request("GET", "/two")["path"] == "/two"
    assert [s[1] for s in _Handler.seen] == ["/then-hang-up", "/two"]


def test_connections_are_kept_alive_between_requests(server: tuple[_Server, str]) -> None:
    client = JsonClient(server[1], "t", service=Service.MANAGEMENT)
    client.request("GET", "/a")
    first = client._pool._idle[0]
    client.request("GET", "/b")
    assert client._pool._idle == [first]


def test_a_peer_that_is_not_listening_is_unavailable_and_says_where(tmp_path: Path) -> None:
    url = f"unix://{tmp_path / 'nobody.sock'}"
    client = JsonClient(url, "t", service=Service.NODE_AGENT)
    with pytest.raises(Unavailable) as err:
        client.request("GET", "/healthz")
    assert "node-agent" in err.value.message and url in err.value.message
    assert client.healthy() is False


def test_a_host_name_the_resolver_cannot_encode_is_unreachable_not_a_crash() -> None:
    # found by the REST fuzzer: getaddrinfo raises UnicodeError for "a..b" (a 500)
    client = JsonClient("http://a..b:1", "t", service=Service.NODE_AGENT)
    with pytest.raises(Unavailable, match="unreachable"):
        client.request("GET", "/v1/volumes")


def test_urls_other_than_unix_and_http_are_refused() -> None:
    with pytest.raises(ValueError, match="unix:///path"):
        JsonClient("ftp://host", "t", service=Service.MANAGEMENT)


@pytest.mark.parametrize(
    "what", ["html", "fastapi-default", "foreign-problem", "not-found-as-plain-json"]
)
def test_a_404_that_is_not_a_tessera_not_found_problem_is_a_configuration_error(
    server: tuple[_Server, str], what: str
) -> None:
    """A wrong path prefix reaches some other 404: DeleteVolume must not read it as "gone"."""
    client = JsonClient(server[1], "t", service=Service.MANAGEMENT)
    with pytest.raises(Misconfigured) as err:
        client.request("DELETE", f"/canned/404/{what}")
    assert not isinstance(err.value, NotFound)
    assert "check" in err.value.message and server[1] in err.value.message


def test_a_peers_no_such_route_names_the_peer_and_its_url(server: tuple[_Server, str]) -> None:
    client = JsonClient(server[1], "t", service=Service.MANAGEMENT)
    with pytest.raises(Misconfigured) as err:
        client.request("DELETE", "/canned/404/no-such-route")
    # relayed by whoever called us, it must not claim *their* route is missing
    assert type(err.value) is Misconfigured
    assert err.value.message.startswith(f"management at {server[1]}: management has no route")


def test_a_405_is_a_configuration_error(server: tuple[_Server, str]) -> None:
    client = JsonClient(server[1], "t", service=Service.MANAGEMENT)
    with pytest.raises(Misconfigured):
        client.request("PUT", "/canned/405/html")


def test_an_html_page_with_status_200_is_a_configuration_error_not_a_crash(
    server: tuple[_Server, str],
) -> None:
    client = JsonClient(server[1], "t", service=Service.MANAGEMENT)
    with pytest.raises(Misconfigured, match="not a Tessera management server"):
        client.request("GET", "/canned/200/html")


def test_a_gateway_error_page_is_unavailable(server: tuple[_Server, str]) -> None:
    client = JsonClient(server[1], "t", service=Service.MANAGEMENT)
    with pytest.raises(Unavailable):
        client.request("GET", "/canned/503/html")


def test_a_call_answered_too_late_is_sent_once_more_and_then_succeeds(
    server: tuple[_Server, str],
) -> None:
    client = JsonClient(server[1], "t", service=Service.MANAGEMENT, timeout=CLIENT_TIMEOUT)
    assert client.request("POST", "/slow/1")["path"] == "/slow/1"
    assert [s[1] for s in _Handler.seen] == ["/slow/1", "/slow/1"]


def test_a_call_never_answered_is_outcome_unknown_not_unreachable(
    server: tuple[_Server, str],
) -> None:
    client = JsonClient(server[1], "t", service=Service.MANAGEMENT, timeout=CLIENT_TIMEOUT)
    with pytest.raises(OutcomeUnknown) as err:
        client.request("DELETE", "/slow/2")
    assert not isinstance(err.value, Unavailable)
    assert "may have run" in err.value.message and "timed out" in err.value.message
    assert [s[1] for s in _Handler.seen] == ["/slow/2", "/slow/2"], "retried exactly once"


def test_an_answer_of_another_shape_is_a_version_mismatch_not_an_internal_error(
    server: tuple[_Server, str],
) -> None:
    """A peer of another version answers 2xx JSON our models cannot read."""
    from tessera.clients import AgentClient, ManagementClient

    with pytest.raises(Misconfigured, match="same Tessera version"):
        ManagementClient(server[1], "t").get_volume("vol-" + "a" * 32)
    _Handler.service = Service.NODE_AGENT.value
    with pytest.raises(Misconfigured, match="not a list of AgentAttachment"):
        AgentClient(server[1], "t").list_attachments()


# ---- the answer must come from the service the client expects ----------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/volumes/v1"), ("DELETE", "/v1/volumes/v1"), ("GET", "/missing")],
)
def test_an_answer_from_the_other_service_is_a_configuration_error_even_a_204(
    server: tuple[_Server, str], method: str, path: str
) -> None:
    """A management URL given the agent's socket: its 204 must not read as "deleted"."""
    _Handler.service = Service.NODE_AGENT.value
    client = JsonClient(server[1], "t", service=Service.MANAGEMENT)
    with pytest.raises(Misconfigured) as err:
        client.request(method, path)
    assert type(err.value) is Misconfigured
    assert err.value.message == f"{server[1]} is the node-agent, not management: check --management"
    assert client.healthy() is False


def test_an_answer_that_names_no_service_is_a_configuration_error(
    server: tuple[_Server, str],
) -> None:
    _Handler.service = ""
    client = JsonClient(server[1], "t", service=Service.NODE_AGENT)
    with pytest.raises(Misconfigured) as err:
        client.request("DELETE", "/v1/volumes/v1")
    assert f"{server[1]} is not a Tessera node-agent server" in err.value.message
    assert SERVICE_HEADER in err.value.message
    assert client.healthy() is False


def test_the_expected_service_answering_is_healthy(server: tuple[_Server, str]) -> None:
    _Handler.service = Service.NODE_AGENT.value
    assert JsonClient(server[1], "t", service=Service.NODE_AGENT).healthy() is True


def test_a_client_refuses_to_expect_a_service_that_does_not_exist() -> None:
    with pytest.raises(ValueError, match="agent"):
        JsonClient("unix:///x.sock", "t", service="agent")  # type: ignore[arg-type]


def test_a_servers_unexpected_error_still_names_the_service() -> None:
    """A 500 leaves through Starlette's outermost error middleware, past `add_middleware` ones."""
    import logging

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tessera.rest import BearerAuth, announce_service, install_problem_handlers

    app = FastAPI()
    install_problem_handlers(app, logging.getLogger("test"), "node-agent")
    app.add_middleware(BearerAuth, token="t")
    announce_service(app, Service.NODE_AGENT)

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        crashed = client.get("/v1/boom", headers={"Authorization": "Bearer t"})
        refused = client.get("/v1/boom")
        misdirected = client.get(
            "/v1/boom", headers={"Authorization": "Bearer t", SERVICE_HEADER: "management"}
        )
    assert crashed.status_code == 500 and crashed.headers[SERVICE_HEADER] == "node-agent"
    assert refused.status_code == 401 and refused.headers[SERVICE_HEADER] == "node-agent"
    assert misdirected.status_code == 421, "a request meant for management is not run"
    assert misdirected.headers[SERVICE_HEADER] == "node-agent"
    assert misdirected.json()["type"].endswith("/misconfigured")
