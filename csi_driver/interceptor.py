"""The one place where Tessera errors become gRPC status codes.

Every RPC handler raises `tessera.errors` types (or lets them propagate
from the management / node-agent clients); this interceptor turns them
into the status code the CSI spec asks for, keeps tracebacks out of the
answer, and observes every call: the tessera_csi_* metrics by method and
code, and one `tessera.access` line with the request id (the caller's
x-request-id metadata, else a new one), the volume id, duration and code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from tessera import errors
from tessera.observability.logs import request_id_from, request_scope
from tessera.observability.metrics import record_rpc

log = logging.getLogger("tessera.csi")
access = logging.getLogger("tessera.access")

GRPC_CODES: dict[type[errors.TesseraError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    # A wrong URL prefix, an unknown route, a peer of another version: nothing
    # ran, and retrying cannot help until an operator fixes the configuration,
    # which is gRPC's own definition of FAILED_PRECONDITION (UNAVAILABLE would
    # promise that a retry alone can succeed). Never NOT_FOUND: that lets
    # DeleteVolume / ControllerUnpublish answer OK and leak the volume.
    errors.Misconfigured: grpc.StatusCode.FAILED_PRECONDITION,
    # Sent, never answered: gRPC defines DEADLINE_EXCEEDED as "may have
    # completed", and the CO (external-provisioner, kubelet) treats it as
    # non-final: it retries and never assumes nothing was done.
    errors.OutcomeUnknown: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def status_for(err: errors.TesseraError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in GRPC_CODES:
            return GRPC_CODES[cls]
    return grpc.StatusCode.INTERNAL


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Wraps unary handlers: log, time, and map errors to status codes."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is not None and handler.unary_stream is not None:
            return _wrap_stream(handler, handler_call_details.method.rsplit("/", 1)[-1])
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            with _guarded(method, request, context):
                return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _wrap_stream(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """Server-streaming RPCs (SnapshotMetadata): the same mapping, raised mid-stream too.

    The spec: an SP that fails while sending metadata "MUST abort transmission
    of the stream" with an error, which the CO tells apart from the end of it.
    """
    inner = handler.unary_stream

    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with _guarded(method, request, context):
            yield from inner(request, context)

    return grpc.unary_stream_rpc_method_handler(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@contextmanager
def _guarded(method: str, request: Any, context: grpc.ServicerContext) -> Iterator[None]:
    """Map what the handler raises to a status code, and observe the call, however it ends.

    One guard for unary and streaming handlers alike: a streaming handler's
    error raised mid-stream reaches here too, between two messages.
    """
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    with request_scope(_request_id(context)) as request_id:
        try:
            yield
        except errors.TesseraError as err:
            code = status_for(err)
            context.abort(code, err.message)
        except Exception:
            if context.code() not in (None, grpc.StatusCode.OK):
                code = context.code()  # already aborted by the handler
                raise
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed unexpectedly", method)
            context.abort(code, f"{method}: internal error (see plugin log)")
        finally:
            _observe(method, request, code, time.perf_counter() - started, request_id)


def _request_id(context: grpc.ServicerContext) -> str:
    """The caller's `x-request-id` metadata when it is a plain short token, else a new id."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return request_id_from(value)
    return request_id_from(None)


def _observe(
    method: str, request: Any, code: grpc.StatusCode, seconds: float, request_id: str
) -> None:
    """Metrics and the access line; never the request's secrets, only its ids."""
    record_rpc(method, code.name, seconds)
    fields: dict[str, Any] = {
        "rpc": method,
        "request_id": request_id,
        "code": code.name,
        "duration_ms": round(seconds * 1000, 1),
    }
    for name in ("volume_id", "node_id"):
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            fields[name] = value[:128]
    # the CO and the livenessprobe sidecar Probe every few seconds: a line each only on DEBUG
    level = logging.DEBUG if method == "Probe" and code == grpc.StatusCode.OK else logging.INFO
    access.log(level, "%s %s %.1fms", method, code.name, fields["duration_ms"], extra=fields)
