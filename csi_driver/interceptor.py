"""The one place where Tessera errors become gRPC status codes.

Every RPC handler raises `tessera.errors` types (or lets them propagate
from the management / node-agent clients); this interceptor turns them
into the status code the CSI spec asks for, logs each call with its
duration, and keeps tracebacks out of the answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from tessera import errors

log = logging.getLogger("tessera.csi")

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
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return inner(request, context)
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
                elapsed_ms = (time.perf_counter() - started) * 1000
                log.info("%s %s %.1fms", method, code.name, elapsed_ms)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
