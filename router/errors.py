"""Exceptions -> OpenAI error bodies `{"error": {"message", "type", "param", "code"}}` with a status.

The ingress raises `ApiError` for what it detects itself; everything else goes through
`error_for_exception`, so no request ever ends without a well-formed body.
"""

from __future__ import annotations

import re
from typing import Optional

from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError

from flora_core.adapter_pool import PoolExhaustedError, UnknownAdapterError
from router.protocol import ErrorDetail, ErrorResponse

RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str, param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code if self.code is not None else self.status))
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if self.status in (429, 503) else None
        return JSONResponse(status_code=self.status, content=body.model_dump(), headers=headers)


def bad_request(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


_SAMPLING_FIELD = re.compile(r"SamplingParams\.(\w+)")


def bad_value(error: ValueError) -> ApiError:
    """A 400 for the engine's ValueError, naming the SamplingParams field that its message names."""
    field = _SAMPLING_FIELD.search(str(error))
    return bad_request(str(error), field.group(1) if field else None)


def unknown_model(name: str, known_hint: str) -> ApiError:
    return ApiError(404, f"The model {name!r} does not exist: it is neither the base model nor a known adapter. "
                         f"{known_hint}", "invalid_request_error", "model", "model_not_found")


def overloaded(message: str) -> ApiError:
    return ApiError(503, message, "server_overloaded", None, "server_overloaded")


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def error_for_status(status: int, message: str) -> ApiError:
    """An ApiError for a bare HTTP status and message (the web framework's own refusals)."""
    default = "internal_error" if status >= 500 else "invalid_request_error"
    return ApiError(status, message, _STATUS_TYPES.get(status, default))


def error_for_exception(error: BaseException) -> ApiError:
    """Map an exception raised while serving a request to the ApiError a client should see."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, UnknownAdapterError):
        return ApiError(404, str(error), "invalid_request_error", "model", "model_not_found")
    if isinstance(error, PoolExhaustedError):
        return overloaded(f"{error} Retry shortly.")
    if isinstance(error, RayActorError):  # the replica running the request died (Serve starts another)
        return overloaded("the model replica running this request stopped; Serve is replacing it, retry shortly")
    if isinstance(error, ValueError):
        return bad_value(error)
    return ApiError(500, f"Internal error ({type(error).__name__}); the server logged it. Retry, and report it "
                         "if it persists.", "internal_error")
