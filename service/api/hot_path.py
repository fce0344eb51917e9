"""The common case of the two hot routes, served without FastAPI's per-request machinery.

`POST /forget-requests` and `GET /forget-requests/{request_id}` are most of the API's traffic.
Through FastAPI each pays its routing, its exception and exit-stack middleware and, most of all,
its generic dependency solving: about 0.3 ms of CPU per request on a 2-core machine, as much as
filing it in a batch (docs/performance.md). This ASGI middleware checks the common case's input
itself (a cached API key with the route's role, a JSON body that validates, no Idempotency-Key,
no query string) and calls the routes' own functions (`file_request`, `read_request`). Anything
else, and any input it does not accept, goes to FastAPI unchanged, so every refusal is FastAPI's
and reads the same. Errors the routes' functions raise are answered by the app's own handlers.
"""

import json

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.body_limit import read_body, replaying
from service.api.deps import check_reader, check_submitter
from service.api.routes import forget_requests as routes
from service.api.schemas import ForgetRequestCreate

PREFIX = "/forget-requests"
MAX_REQUEST_ID_LENGTH = 36  # as the GET route's path parameter


class HotPath:
    def __init__(self, app: ASGIApp):
        self.app = app
        # The routes it stands in for, for the access log's path template (service/api/request_logging.py).
        self.post_route = _route_of(routes.create_forget_request)
        self.get_route = _route_of(routes.read_forget_request)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["query_string"]:
            path, method = scope["path"], scope["method"]
            if method == "POST" and path == PREFIX:
                await self._post(scope, receive, send)
                return
            if method == "GET" and path.startswith(PREFIX + "/") and _is_request_id(path[len(PREFIX) + 1:]):
                await self._get(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _headers(scope)
        caller = _cached_caller(scope, headers)
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if caller is None or content_type != b"application/json" or b"idempotency-key" in headers:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # the client went away
        try:
            parsed = ForgetRequestCreate.model_validate(json.loads(body))
        except (ValueError, ValidationError):  # FastAPI says what is wrong with it
            await self.app(scope, replaying(body, receive), send)
            return
        scope["route"] = self.post_route
        await _answer(scope, receive, send, self._file(scope, caller, parsed))

    async def _file(self, scope, caller, parsed):
        # The role check inside the work _answer awaits: its 403 is answered by the app's handler.
        return await routes.file_request(scope["app"], parsed, await check_submitter(caller), None)

    async def _get(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller = _cached_caller(scope, _headers(scope))
        if caller is None:
            await self.app(scope, receive, send)
            return
        request_id = scope["path"][len(PREFIX) + 1:]
        scope["route"] = self.get_route
        scope["path_params"] = {"request_id": request_id}
        await _answer(scope, receive, send, self._read(scope, caller, request_id))

    async def _read(self, scope, caller, request_id):
        return await routes.read_request(scope["app"], request_id, await check_reader(caller))


def _route_of(endpoint):
    [route] = [route for route in routes.router.routes if route.endpoint is endpoint]
    return route


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """Header names (lower case in ASGI) to their first value, as Starlette's `headers.get` reads them."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name, value)
    return headers


def _is_request_id(text: str) -> bool:
    return 0 < len(text) <= MAX_REQUEST_ID_LENGTH and "/" not in text and "\x00" not in text


def _cached_caller(scope: Scope, headers: dict[bytes, bytes]):
    """The caller whose Bearer key this process authenticated lately (service/api/deps.py's cache), or None."""
    scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not key:
        return None
    return scope["app"].state.api_keys.get(key)


async def _answer(scope: Scope, receive: Receive, send: Send, work) -> None:
    """Send the response `work` (a coroutine) returns, or the app's own answer to what it raises,
    as FastAPI's exception middleware would; an exception with no handler goes up, as there."""
    try:
        response = await work
    except Exception as error:  # noqa: BLE001 - looked up below, re-raised when unhandled
        app: FastAPI = scope["app"]
        handler = next((app.exception_handlers[kind] for kind in type(error).__mro__
                        if kind in app.exception_handlers and kind is not Exception), None)
        if handler is None:
            raise
        response = await handler(Request(scope, receive), error)
    await response(scope, receive, send)
