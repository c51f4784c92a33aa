"""Every error leaves as JSON {"detail": ..., "code": ...} with a precise status; no tracebacks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from lqf_core.errors import (
    IncompatibleModelError,
    InvalidConfigError,
    InvalidDataError,
    LQFError,
    UnknownBackboneError,
    WeightsNotFoundError,
)
from state.locks import StoreBusy
from state.remote import IntegrityError

log = logging.getLogger("lqf.api")


class ApiError(Exception):
    def __init__(self, status: int, detail: str | list[dict[str, object]], code: str = "error",
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.code, self.headers = status, detail, code, headers


class ValidationDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error's body: what is wrong (a sentence, or pydantic's list for a body that
    fails validation) and a stable code."""

    detail: str | list[ValidationDetail]
    code: str


# Documented on every route (app.main), so that a client, or a fuzzer checking responses
# against the schema, knows each status and its body.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in (
        (400, "the body cannot be read (e.g. not JSON, not a zip)"),
        (401, "no or an unknown API key"),
        (404, "not found, or another tenant's"),
        (409, "conflicts with the current state (e.g. a job still running)"),
        (408, "the request body stopped arriving (LQF_BODY_IDLE_TIMEOUT_S, LQF_BODY_TIMEOUT_S)"),
        (413, "the body or an image is over its limit"),
        (415, "a content type the route does not take"),
        (422, "invalid input, named in `detail`"),
        (429, "over a per-tenant limit (request rate, unfinished jobs), named in `detail`, "
              "with Retry-After"),
    )}

# OpenAPI `responses` of a route whose closed-form part runs under LQF_QUERY_TIMEOUT_S (and
# whose prediction, if any, under LQF_PREDICT_TIMEOUT_S).
QUERY_TIMEOUT_RESPONSE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody,
          "description": "the query passed LQF_QUERY_TIMEOUT_S and was stopped (code "
                         "query_timeout), or the model's posterior is still being built "
                         "(code posterior_building, with Retry-After), or, for a "
                         "leave-one-out answer, its leverages (code leverages_building)"},
    504: {"model": ErrorBody,
          "description": "the prediction passed LQF_PREDICT_TIMEOUT_S (code predict_timeout)"}}


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)  # PARTIAL: the path, another method
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def not_found(kind: str, ident: str) -> ApiError:
    # The same answer whether it does not exist or belongs to another tenant.
    return ApiError(404, f"{kind} {ident!r} not found", f"{kind}_not_found")


_LQF_STATUS: list[tuple[type[LQFError], int, str]] = [
    (InvalidDataError, 422, "invalid_data"),
    (InvalidConfigError, 422, "invalid_config"),
    (UnknownBackboneError, 422, "unknown_backbone"),
    (WeightsNotFoundError, 422, "weights_not_found"),
    (IncompatibleModelError, 409, "incompatible_model"),
]


def validation_detail(errors: Sequence[Any]) -> list[dict[str, object]]:
    """Pydantic's errors as every 422 here shows them: where (`loc`), what (`msg`) and
    which check (`type`); never the input, which may be a whole upload."""
    errors = jsonable_encoder(errors, custom_encoder={bytes: lambda b: "<bytes>"})
    return [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors]


def invalid(exc: ValidationError) -> ApiError:
    """A body validated by hand (multipart or JSON, app.bodies) fails as FastAPI's own do."""
    return ApiError(422, validation_detail(exc.errors()), "validation_error")


def _json(status: int, detail: object, code: str,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail, "code": code},
                        headers=headers)


# The dashboard's pages (app.ui) answer errors as an HTML page with the same status and
# message; it registers its renderer here, for paths under its prefix.
HtmlErrorRenderer = Callable[[Request, int, Any, str], Response]
HTML_ERROR_PREFIX = "/ui"


def _respond(request: Request, status: int, detail: object, code: str,
             headers: dict[str, str] | None = None) -> Response:
    renderer: HtmlErrorRenderer | None = getattr(request.app.state, "html_errors", None)
    path = request.url.path
    if renderer is not None and (path == HTML_ERROR_PREFIX
                                 or path.startswith(HTML_ERROR_PREFIX + "/")):
        response = renderer(request, status, detail, code)
        response.headers.update(headers or {})
        return response
    return _json(status, detail, code, headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _respond(request, exc.status, exc.detail, exc.code, exc.headers)

    @app.exception_handler(LQFError)
    async def _lqf_error(request: Request, exc: LQFError) -> Response:
        for cls, status, code in _LQF_STATUS:
            if isinstance(exc, cls):
                return _respond(request, status, str(exc), code)
        return _respond(request, 400, str(exc), "lqf_error")

    @app.exception_handler(StoreBusy)
    async def _store_busy(request: Request, exc: StoreBusy) -> Response:
        return _respond(request, 503, str(exc), "store_busy", {"Retry-After": "5"})

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, exc: IntegrityError) -> Response:
        log.error("artifact failed verification", extra={"path": request.url.path,
                                                        "error": str(exc)})
        return _respond(request, 503, str(exc), "artifact_corrupted")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return _respond(request, 422, validation_detail(list(exc.errors())),
                        "validation_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                413: "too_large"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only; FastAPI
            # has one route per method.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return _respond(request, exc.status_code, exc.detail, code, headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
        return _respond(request, 500, "internal server error", "internal_error")
