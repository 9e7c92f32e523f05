"""Errors in ComfyUI's own shape, raised anywhere and rendered by one middleware (`api.middleware`).

ComfyUI answers a refused prompt with `{"error": {"type", "message", "details", "extra_info"},
"node_errors": {}}`; the proxy's own refusals use the same shape with their own `type` and status, so a
client that can show ComfyUI's errors can show the proxy's.
"""

from __future__ import annotations

from typing import Any


def error_body(type_: str, message: str, details: str = "", extra_info: dict[str, Any] | None = None,
               node_errors: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "error": {"type": type_, "message": message, "details": details, "extra_info": extra_info or {}},
        "node_errors": node_errors or {},
    }


class ProxyError(Exception):
    """A refusal with an HTTP status and a ComfyUI error `type`."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, details: str = "", *, extra_info: dict[str, Any] | None = None,
                 node_errors: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.extra_info = extra_info
        self.node_errors = node_errors
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.type, self.message, self.details, self.extra_info, self.node_errors)


class BadRequest(ProxyError):
    status = 400
    type = "bad_request"

    def __init__(self, type_: str, message: str, details: str = "", **kw: Any) -> None:
        super().__init__(message, details, **kw)
        self.type = type_


class PromptRejected(ProxyError):
    """ComfyUI's own validation refusal: the error dict and node_errors come from `comfy.validation`."""

    status = 400

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any]) -> None:
        super().__init__(error.get("message", ""), error.get("details", ""),
                         extra_info=error.get("extra_info"), node_errors=node_errors)
        self.type = error.get("type", "invalid_prompt")


class Unauthorized(ProxyError):
    status = 401
    type = "unauthorized"


class Forbidden(ProxyError):
    status = 403
    type = "forbidden"


class NotFound(ProxyError):
    status = 404
    type = "not_found"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "payload_too_large"


class QuotaExceeded(ProxyError):
    status = 429
    type = "quota_exceeded"


class BackendError(ProxyError):
    status = 502
    type = "backend_error"


class NoBackendAvailable(ProxyError):
    status = 503
    type = "no_backend_available"


class StoreUnavailable(ProxyError):
    status = 503
    type = "store_unavailable"
