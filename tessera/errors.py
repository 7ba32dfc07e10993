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


def from_problem(status: int, body: object) -> TesseraError:
    """Rebuild the error a peer sent us, so it crosses process hops intact."""
    if isinstance(body, dict):
        kind = str(body.get("type", "")).removeprefix(PROBLEM_TYPE_PREFIX)
        detail = str(body.get("detail") or body.get("title") or f"HTTP {status}")
        field = body.get("field")
        cls = ERROR_KINDS.get(kind)
        if cls is None:
            cls = InvalidArgument if 400 <= status < 500 else Internal
        return cls(detail, field=str(field) if field else None)
    return Internal(f"unexpected HTTP {status} from peer")
