"""Liveness and readiness probes (no API key needed)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.schemas import HealthPublic, ReadyPublic
from service.core import readiness

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthPublic)
def read_health() -> HealthPublic:
    """Answer while the process is up, whatever the database does."""
    return HealthPublic(status="ok")


@router.get(
    "/ready",
    response_model=ReadyPublic,
    responses={503: {"model": ReadyPublic, "description": "The database or the broker is unreachable; "
                     "the body says which."}},
)
def read_ready(request: Request) -> JSONResponse:
    """Answer 200 when the database and the broker are reachable, 503 naming what is down otherwise."""
    database = "ok" if readiness.database_ok(request.app.state.probe_engine) else "down"
    broker = readiness.broker_state(request.app.state.settings)
    down = [name for name, state in (("database", database), ("broker", broker)) if state == "down"]
    body = ReadyPublic(
        status="not_ready" if down else "ready",
        database=database,
        broker=broker,
        detail=f"unavailable: {', '.join(down)}" if down else None,
    )
    return JSONResponse(status_code=503 if down else 200, content=body.model_dump(mode="json"))
