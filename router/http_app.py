"""The FastAPI app the ingress's routes hang on, with handlers that answer every error in OpenAI's format.

Kept apart from the routes so that each error body is decided in one place: invalid bodies (400
naming the field), our ApiErrors, FastAPI's own refusals (unknown route, wrong method) and
anything unexpected (500, logged).
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from router.errors import ApiError, bad_request, error_for_exception, error_for_status

logger = logging.getLogger("ray.serve")

app = FastAPI(title="flora-serve", description="One base model, many adapters, one batch: OpenAI-compatible API.")


@app.exception_handler(RequestValidationError)
async def _invalid_body(_request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {}
    location = [str(p) for p in first.get("loc", ()) if p != "body" and not isinstance(p, int)]
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                        for e in error.errors())
    return bad_request(f"Invalid request: {message}", location[0] if location else None).response()


@app.exception_handler(ApiError)
async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
    return error.response()


@app.exception_handler(HTTPException)
async def _http_error(_request: Request, error: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (unknown route, wrong method, a body it cannot parse) in OpenAI's format."""
    return error_for_status(error.status_code, str(error.detail)).response()


@app.exception_handler(Exception)
async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
    logger.exception("flora ingress: unexpected error")
    return error_for_exception(error).response()
