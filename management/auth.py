"""Bearer-token check for every /v1 route.

Constant-time comparison (hmac.compare_digest) so response timing says
nothing about how much of a guessed token was right.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from tessera.errors import Unauthenticated


def bearer_dependency(token: str):  # noqa: ANN201 - returns a FastAPI dependency
    expected = token.encode()

    def require_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(presented.strip().encode(), expected):
            raise Unauthenticated("invalid bearer token")

    return require_token
