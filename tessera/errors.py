"""Error types shared by every Tessera process.

Code raises these; exactly one place per transport maps them to a status:
`management.problems` / `node_agent.api` to HTTP problem+json, and
`csi_driver.interceptor` to gRPC codes. Each error carries the field it
is about, when there is one, so the message can name it.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Base of every error we expect and can explain to a user."""

    #: short stable identifier, sent as the problem+json `type` suffix
    kind = "error"
    http_status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidArgument(TesseraError):
    kind = "invalid-argument"
    http_status = 422


class NotFound(TesseraError):
    kind = "not-found"
    http_status = 404


class AlreadyExists(TesseraError):
    """Same name, incompatible request (CSI ALREADY_EXISTS, HTTP 409)."""

    kind = "already-exists"
    http_status = 409


class Conflict(TesseraError):
    """The request contradicts current state, e.g. an access-mode clash."""

    kind = "conflict"
    http_status = 409


class FailedPrecondition(TesseraError):
    """The target is in a state where this operation cannot run yet."""

    kind = "failed-precondition"
    http_status = 409


class OutOfRange(TesseraError):
    """A size or limit outside what we support."""

    kind = "out-of-range"
    http_status = 422


class ResourceExhausted(TesseraError):
    """No pool has room, or a node is at its volume limit."""

    kind = "resource-exhausted"
    http_status = 507


class Unauthenticated(TesseraError):
    kind = "unauthenticated"
    http_status = 401


class Unavailable(TesseraError):
    """A peer (management, an agent) did not answer; retrying is right."""

    kind = "unavailable"
    http_status = 503


class Misconfigured(TesseraError):
    """We reached something that does not serve this API the way we call it.

    An unknown route, a method the route does not take, a bare 404 from some
    other server (a wrong URL path prefix, a proxy), a peer of another
    version: the request never reached a handler, and retrying cannot help
    until someone fixes the URL or the versions. Never a NotFound: "no such
    route" says nothing about whether the volume exists, and treating it as
    "already gone" would let DeleteVolume answer OK and leak the volume.
    """

    kind = "misconfigured"
    #: relayed by a server acting for a client (management driving an agent): Bad Gateway
    http_status = 502


class NoSuchRoute(Misconfigured):
    """A server's own answer to a path or method it does not serve (404 / 405)."""

    kind = "no-such-route"
    http_status = 404


class OutcomeUnknown(TesseraError):
    """The request was sent, and no answer came (a read timeout, a dropped connection).

    The call may or may not have run. Every Tessera call is idempotent, so the
    right reaction is to send it again; what it must never be read as is
    "unreachable" (nothing happened) or "not found".
    """

    kind = "outcome-unknown"
    #: relayed by a server whose upstream did not answer in time: Gateway Timeout
    http_status = 504


class Aborted(TesseraError):
    """Another operation on the same volume is in progress."""

    kind = "aborted"
    http_status = 409


class Internal(TesseraError):
    """Something that should not happen did; retry may or may not help."""

    kind = "internal"
    http_status = 500


ERROR_KINDS: dict[str, type[TesseraError]] = {
    cls.kind: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Conflict,
        FailedPrecondition,
        OutOfRange,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
        Misconfigured,
        NoSuchRoute,
        OutcomeUnknown,
        Aborted,
        Internal,
    )
}

PROBLEM_TYPE_PREFIX = "https://tessera.io/problems/"


def to_problem(err: TesseraError) -> dict[str, object]:
    """RFC 9457 problem document for an error."""
    body: dict[str, object] = {
        "type": PROBLEM_TYPE_PREFIX + err.kind,
        "title": err.kind.replace("-", " "),
        "status": err.http_status,
        "detail": err.message,
    }
    if err.field:
        body["field"] = err.field
    return body


PROBLEM_JSON = "application/problem+json"


def from_problem(status: int, body: object, *, content_type: str) -> TesseraError:
    """Rebuild the error a peer sent us, so it crosses process hops intact.

    Only a Tessera problem document (Content-Type application/problem+json,
    `type` under PROBLEM_TYPE_PREFIX) is taken at its word. Anything else
    came from something that is not a Tessera server answering this API (a
    wrong path prefix, a proxy, another service on the port): a 4xx from it
    is a configuration error, never NotFound; a 502-504 is a gateway in
    the way that may recover (Unavailable).
    """
    problem = _our_problem(body, content_type)
    if problem is None:
        return _foreign(status, content_type)
    kind = str(problem["type"]).removeprefix(PROBLEM_TYPE_PREFIX)
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    field = problem.get("field")
    cls = ERROR_KINDS.get(kind)
    if cls is None:  # a Tessera peer of a newer version: keep the status class
        cls = _by_status(status)
    return cls(detail, field=str(field) if field else None)


def _our_problem(body: object, content_type: str) -> dict[str, object] | None:
    media = content_type.partition(";")[0].strip().lower()
    if media != PROBLEM_JSON or not isinstance(body, dict):
        return None
    kind = body.get("type")
    if not isinstance(kind, str) or not kind.startswith(PROBLEM_TYPE_PREFIX):
        return None
    return body


def _by_status(status: int) -> type[TesseraError]:
    if status in (404, 405):
        return Misconfigured
    if 400 <= status < 500:
        return InvalidArgument
    return Internal


def _foreign(status: int, content_type: str) -> TesseraError:
    what = f"HTTP {status} ({content_type or 'no content type'}), not a Tessera problem document"
    if status in (502, 503, 504):
        return Unavailable(f"a gateway answered {what}; retry")
    if 400 <= status < 500:
        return Misconfigured(
            f"the server answered {what}: it does not serve the Tessera API at this URL "
            "(check the URL, its path prefix and the API version)"
        )
    return Internal(f"unexpected {what}")
