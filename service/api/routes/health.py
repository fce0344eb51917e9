"""Liveness and readiness probes."""

from fastapi import APIRouter, Request
from sqlalchemy import text

from service.api.schemas import DATABASE_UNAVAILABLE, HealthPublic, ReadyPublic

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthPublic)
def read_health() -> HealthPublic:
    """Answer while the process is up, whatever the database does."""
    return HealthPublic(status="ok")


@router.get("/ready", response_model=ReadyPublic, responses=DATABASE_UNAVAILABLE)
def read_ready(request: Request) -> ReadyPublic:
    """Answer 200 when the database answers a query, 503 otherwise."""
    # A failure is an OperationalError, which the app answers with 503 (service/api/app.py).
    with request.app.state.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return ReadyPublic(status="ready", database="ok")
