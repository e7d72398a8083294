"""Errors of the sidecar's operations, each with the HTTP status the routes answer."""

from __future__ import annotations


class SidecarError(Exception):
    """Base: ``status`` and a human-readable message (answered as ``{"detail": msg}``)."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(SidecarError):
    """Malformed or out-of-range input (400)."""

    status = 400


class NotFound(SidecarError):
    """An id that names nothing (404)."""

    status = 404


class Conflict(SidecarError):
    """Valid input the current state does not allow (409)."""

    status = 409
