"""API-key authentication: `Authorization: Bearer <key>`, compared in constant time.

Applied as a router dependency to every route except /health and /metrics (monitoring must keep
working without the key). With no key configured, everything is open.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import AuthenticationError
from server.state import get_state


def require_api_key(request: Request) -> None:
    """Raise AuthenticationError (401) unless the request carries the configured key."""
    expected = get_state(request).config.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not reveal how much of a guessed key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             expected.encode()):
        raise AuthenticationError("missing or incorrect API key; send the header "
                                  "`Authorization: Bearer <key>`")
