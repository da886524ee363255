"""Object ids: a short type prefix and 20 random URL-safe characters."""

from __future__ import annotations

import secrets

__all__ = [
    "ADMIN_TOKEN_PREFIX",
    "CLIENT_KEY_PREFIX",
    "PROVIDER_KEY_PREFIX",
    "ROUTE_PREFIX",
    "SIDECAR_TOKEN_PREFIX",
    "new_id",
]

PROVIDER_KEY_PREFIX = "pk_"
ROUTE_PREFIX = "rt_"
CLIENT_KEY_PREFIX = "ck_"
ADMIN_TOKEN_PREFIX = "at_"
SIDECAR_TOKEN_PREFIX = "st_"


def new_id(prefix: str) -> str:
    """``prefix`` followed by 20 URL-safe random characters (120 bits)."""
    return prefix + secrets.token_urlsafe(15)
