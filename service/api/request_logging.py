"""ASGI middleware: an X-Request-ID for every request, and one log line per request.

The id is the caller's `X-Request-ID` when it is a plausible id (a proxy or client that already
assigned one keeps it end to end), else a fresh one; the response carries it back and every log
line written while serving the request carries it (service/core/logging_setup.py).

The line holds method, route, status and duration. The route is the path template
(`/subjects/{subject_id}`), not the path: paths and query strings can hold subject ids, which are
personal data and stay out of the logs. A path that matches no route (404) is logged as
`<unmatched>`. Headers (API keys) and bodies are never logged.
"""

import logging
import re
import time
import uuid
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match

from service.core.logging_setup import log_context

log = logging.getLogger("qforget.access")

REQUEST_ID_HEADER = "X-Request-ID"
UNMATCHED_ROUTE = "<unmatched>"
# Letters, digits and . _ - only, at most 128: anything else could forge log fields or lines.
_PLAUSIBLE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"x-request-id":
            candidate = value.decode("latin-1")
            if _PLAUSIBLE_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def route_template(scope, routes: Sequence[BaseRoute] = ()) -> str:
    """The template of the route the request is for, never its path (which can name a subject).

    The route that served it, else the first of `routes` its path and method match: a request
    answered before routing (the body size limit's 413) has no route in its scope."""
    route = scope.get("route") or next((route for route in routes if route.matches(scope)[0] != Match.NONE), None)
    return getattr(route, "path_format", None) or UNMATCHED_ROUTE


class RequestLogging:
    def __init__(self, app, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.routes = routes  # the application's, for route_template

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        status = 500  # what the caller gets if the app raises before answering
        started = time.perf_counter()

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                path = route_template(scope, self.routes)
                duration_ms = round((time.perf_counter() - started) * 1000, 1)
                log.info("%s %s %s %.1fms", scope["method"], path, status, duration_ms,
                         extra={"request_id": request_id, "method": scope["method"], "path": path, "status": status,
                                "duration_ms": duration_ms})
