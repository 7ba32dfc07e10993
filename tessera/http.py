"""HTTP client plumbing shared by every Tessera client.

Peers are addressed as `unix:///path/to.sock` (same host) or
`http(s)://host:port`. Every request carries the bearer token; every error
response is a problem+json document that we turn back into the matching
`tessera.errors` type, so an error keeps its meaning across hops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tessera.errors import TesseraError, Unavailable, from_problem

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


def read_token(path: str | Path) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def make_client(url: str, token: str, timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"}
    if url.startswith("unix://"):
        transport = httpx.HTTPTransport(uds=url.removeprefix("unix://"))
        return httpx.Client(
            base_url="http://localhost", transport=transport, headers=headers, timeout=timeout
        )
    return httpx.Client(base_url=url, headers=headers, timeout=timeout)


class JsonClient:
    """A small typed wrapper: JSON in, JSON out, problems raised as errors."""

    def __init__(self, url: str, token: str, *, peer: str) -> None:
        self.url = url
        self.peer = peer
        self._http = make_client(url, token)

    def close(self) -> None:
        self._http.close()

    def healthy(self) -> bool:
        """Whether the peer answers its open /healthz route."""
        try:
            self.request("GET", "/healthz")
        except (TesseraError, ValueError):
            return False
        return True

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(f"{self.peer} at {self.url} is unreachable: {exc}") from exc
        if resp.status_code == 204:
            return None
        if resp.is_success:
            return resp.json()
        raise self._error(resp)

    def _error(self, resp: httpx.Response) -> TesseraError:
        try:
            body = resp.json()
        except ValueError:
            body = None
        err = from_problem(resp.status_code, body)
        if resp.status_code >= 500 and not isinstance(err, Unavailable):
            err.message = f"{self.peer}: {err.message}"
        return err
