"""The FastAPI application. It reads and writes the database only: no model code is imported here."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from service.api.batch_queue import intake_queue, read_queue
from service.api.body_limit import BodySizeLimit
from service.api.deps import ApiKeyCache, reject_unknown_query_parameters
from service.api.hot_path import HotPath
from service.api.request_logging import RequestLogging, route_template
from service.api.routes import (
    audit,
    dashboard,
    datasets,
    deployments,
    evidence,
    forget_requests,
    health,
    metrics,
    models,
    subjects,
    webhooks,
)
from service.api.schemas import ErrorPublic
from service.api.security_headers import SecurityHeaders, with_security_headers
from service.core.db import get_engine, session_factory
from service.core.readiness import make_probe_engine
from service.core.settings import Settings, get_settings
from service.core.wakeups import Wakeups
from service.requests.problems import RequestValidationProblem

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = get_engine(settings, "api")
    probe_engine = make_probe_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()
        probe_engine.dispose()

    app = FastAPI(
        title="qforget",
        summary="GDPR Art. 17 erasure requests in, unlearned quantized model versions and their audit out.",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(reject_unknown_query_parameters)],
        # No interactive documentation: Swagger UI and ReDoc load their scripts from a CDN, into the
        # origin whose dashboard keeps an API key. The OpenAPI document stays, at /openapi.json.
        docs_url=None,
        redoc_url=None,
        # One URL per resource: `/subjects/x/` is a 404, not a redirect built from the Host header.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = session_factory(engine)
    app.state.intake = intake_queue(app.state.session_factory, forget_requests.response_body)
    # Reads of requests by id run without a transaction on PostgreSQL (no BEGIN and ROLLBACK round
    # trips; one statement is its own snapshot). SQLite's transactions begin IMMEDIATE (service.core.db):
    # it reads on a plain session.
    reads = engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else engine
    app.state.reads = read_queue(session_factory(reads))
    app.state.api_keys = ApiKeyCache(settings.api_key_cache_seconds)
    app.state.wakeups = Wakeups(settings)
    app.state.probe_engine = probe_engine
    # Innermost of these: it stands in for two routes, behind the size limit and the request log.
    app.add_middleware(HotPath)
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    routers = [forget_requests.router, evidence.router, subjects.router, models.router, datasets.router,
               audit.router, deployments.router, webhooks.router, health.router, metrics.router, dashboard.router]
    # Added last, so outermost: they see every answer, the size limit's 413 included.
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestLogging, routes=[route for router in routers for route in router.routes])
    app.add_exception_handler(RequestValidationProblem, _request_problem)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected_error)
    for router in routers:
        app.include_router(router)
    _document_body_errors(app, settings.api_max_body_bytes)
    return app


def _document_body_errors(app: FastAPI, max_bytes: int) -> None:
    # Two answers every route that takes a body may give, whatever its router documents: 413 from
    # the size limit (middleware) and 400 from FastAPI for a body that is not UTF-8 text. The
    # OpenAPI document says so for each of them.
    errors = {
        "400": "The body is not UTF-8 text.",
        "413": f"The body is larger than the limit of {max_bytes} bytes.",
    }

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(
                "ErrorPublic", ErrorPublic.model_json_schema()
            )
            content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorPublic"}}}
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    if "requestBody" in operation:
                        for code, description in errors.items():
                            operation["responses"].setdefault(code, {"description": description, "content": content})
        return app.openapi_schema

    app.openapi = openapi


async def _request_problem(_request: Request, exc: RequestValidationProblem) -> JSONResponse:
    # The same shape as FastAPI's own validation errors, so clients read one format.
    problem = {"type": exc.error_type, "loc": [exc.location, exc.field], "msg": exc.message}
    return JSONResponse(status_code=exc.status_code, content={"detail": [problem]})


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": [_readable(error) for error in exc.errors()]})


def _readable(error: dict) -> dict:
    # The shape of every other problem: type, loc, msg. FastAPI's default also echoes the input
    # back (10,000 ids, say) and says only "JSON decode error" for a malformed body.
    item = {"type": error["type"], "loc": list(error["loc"]), "msg": error["msg"]}
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", "cannot be decoded")
        item["msg"] = f"the body is not valid JSON: {reason} (at character {item['loc'][-1]})"
    elif item["loc"] == ["body"] and error["type"] == "model_attributes_type":
        item["msg"] = "the body must be a JSON object, sent as application/json"
    return item


async def _database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
    # Unreachable, locked, a deadlock victim: all worth retrying, none the caller's fault. The
    # driver's message can name hosts and users, so it goes to the log, not into the response.
    log.warning("%s %s: database unavailable: %s", request.method, route_template(request.scope), exc.orig or exc)
    return JSONResponse(
        status_code=503, content={"detail": "database unavailable, retry later"}, headers={"Retry-After": "5"}
    )


async def _unexpected_error(_request: Request, _exc: Exception) -> JSONResponse:
    # Starlette logs the traceback and re-raises to the server; the caller gets the usual shape. It
    # answers outside every middleware, so the security headers are added here.
    response = JSONResponse(status_code=500, content={"detail": "internal server error"})
    response.raw_headers = with_security_headers(response.raw_headers)
    return response
