"""FastAPI dependencies, as Annotated aliases for route signatures.

Authentication: `Authorization: Bearer <API key>`. `CallerDep` is the authenticated caller (any
role), `ActorDep` its name for audit entries; `require_role(...)` makes a dependency that also
checks the role (admin passes every check). Use them in a signature or in a router's
`dependencies=[Depends(require_role(Role.auditor))]`.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, get_args, get_origin

from fastapi import Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.core.api_keys import Caller, authenticate, hash_key
from service.core.models import Role
from service.core.settings import Settings

# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in its thread
# pool, a hand-off that costs more than the few lines they run.


async def hold_database_slot(request: Request) -> AsyncIterator[None]:
    """Wait (in the event loop) until fewer than settings.api_database_sessions requests of this
    process hold a database session; hold the slot until the request's session is closed."""
    slots = getattr(request.app.state, "database_slots", None)
    if slots is None:  # one per app, made on first use: uvicorn runs one event loop per process
        slots = request.app.state.database_slots = asyncio.Semaphore(request.app.state.settings.api_database_sessions)
    async with slots:
        yield


def get_session(request: Request, _slot: Annotated[None, Depends(hold_database_slot)]) -> Iterator[Session]:
    """A session per request; routes commit what they change, anything else is rolled back."""
    # A plain generator on purpose: FastAPI closes it in a thread outside the thread pool's limit,
    # so a request waiting to give its connection back never waits behind requests waiting for one.
    with request.app.state.session_factory() as session:
        yield session


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def _takes_many(annotation) -> bool:
    # list[str], list[str] | None, ...: a parameter that may be repeated.
    sequences = (list, tuple, set, frozenset)
    return get_origin(annotation) in sequences or any(get_origin(arg) in sequences for arg in get_args(annotation))


def _query_parameters(route) -> dict[str, bool]:
    """{name: whether it takes many values} for every query parameter of the route."""
    parameters, dependants = {}, [route.dependant]
    while dependants:
        dependant = dependants.pop()
        parameters.update({field.alias: _takes_many(field.field_info.annotation) for field in dependant.query_params})
        dependants.extend(dependant.dependencies)
    return parameters


async def reject_unknown_query_parameters(request: Request) -> None:
    """422 for a query parameter the route does not take, or a single-valued one given twice, on
    routes that take query parameters (the app applies it to every route).

    A misspelt filter (`?stauts=pending`) would otherwise be ignored, and the caller would read an
    unfiltered list as the filtered one; of a repeated one, only the last would count. Routes
    without query parameters have nothing to misspell and ignore them (a load balancer's
    cache-busting `/health?ts=...` must not fail).
    """
    route = request.scope.get("route")
    if route is None or not request.query_params:
        return
    parameters = getattr(route, "_qforget_query_parameters", None)
    if parameters is None:
        parameters = route._qforget_query_parameters = _query_parameters(route)
    if not parameters:
        return
    takes = f"it takes {', '.join(sorted(parameters))}"
    problems = []
    for name in dict.fromkeys(request.query_params):
        if name not in parameters:
            problems.append(
                {"type": "extra_forbidden", "loc": ("query", name), "msg": f"unknown query parameter; {takes}"}
            )
        elif not parameters[name] and len(request.query_params.getlist(name)) > 1:
            problems.append(
                {"type": "repeated", "loc": ("query", name), "msg": "given more than once; it takes one value"}
            )
    if problems:
        raise RequestValidationError(problems)


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `qforget keys create`, sent as `Authorization: Bearer qf_...`.",
)


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED, detail=message, headers={"WWW-Authenticate": "Bearer"}
    )


class ApiKeyCache:
    """Callers authenticated in the last `seconds`, by their key's hash: most requests then need
    no statement to authenticate. The price: a key revoked meanwhile keeps working in this process
    for up to `seconds` (QFORGET_API_KEY_CACHE_SECONDS; 0 checks every request)."""

    MAX_ENTRIES = 10_000

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._callers: dict[str, tuple[Caller, float]] = {}

    def get(self, key: str) -> Caller | None:
        hashed = hash_key(key)
        entry = self._callers.get(hashed)
        if entry is None:
            return None
        if time.monotonic() - entry[1] >= self.seconds:
            del self._callers[hashed]  # stale: the database decides again
            return None
        return entry[0]

    def put(self, key: str, caller: Caller) -> None:
        if self.seconds <= 0:
            return
        if len(self._callers) >= self.MAX_ENTRIES:
            self._callers.clear()  # rare (that many keys in a few seconds); keeps memory bounded
        self._callers[hash_key(key)] = (caller, time.monotonic())


async def get_caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Caller:
    """The caller behind the request's API key; 401 when there is none, or it is not valid."""
    if credentials is None:
        raise _unauthorized("an API key is required: send it as 'Authorization: Bearer <key>'")
    key = credentials.credentials
    cache: ApiKeyCache = request.app.state.api_keys
    caller = cache.get(key)
    if caller is None:
        # Outside the database slots: a request may hold one (its route's session) while it is
        # authenticated, and this session holds nothing else while it waits for a connection.
        caller = await run_in_threadpool(_authenticate, request.app.state.session_factory, key)
        if caller is None:
            # One message for unknown, malformed and revoked keys: which it is helps only a guesser.
            raise _unauthorized("the API key is not valid (unknown or revoked)")
        cache.put(key, caller)
    return caller


def _authenticate(session_factory, key: str) -> Caller | None:
    with session_factory() as session:
        return authenticate(session, key)


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_actor(caller: CallerDep) -> str:
    return caller.actor


ActorDep = Annotated[str, Depends(get_actor)]


def require_role(*roles: Role | str) -> Callable[[Caller], Caller]:
    """A dependency that lets through callers with one of `roles` (admins always) and gives the caller."""
    allowed = frozenset(Role(role) for role in roles) | {Role.admin}
    names = " or ".join(sorted(role.value for role in allowed))

    async def check_role(caller: CallerDep) -> Caller:
        if caller.role not in allowed:
            raise HTTPException(
                status_code=status.HTTP_403_FORBIDDEN,
                detail=f"this needs an API key with role {names}; key {caller.prefix} has role {caller.role.value}",
            )
        return caller

    return check_role


# The usual checks, as aliases (the two checks also serve service/api/hot_path.py).
check_submitter = require_role(Role.submitter)
check_reader = require_role(Role.submitter, Role.auditor)
SubmitterDep = Annotated[Caller, Depends(check_submitter)]
ReaderDep = Annotated[Caller, Depends(check_reader)]
AuditorDep = Annotated[Caller, Depends(require_role(Role.auditor))]
AdminDep = Annotated[Caller, Depends(require_role(Role.admin))]
