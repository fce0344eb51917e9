"""Idempotency keys: a POST retried with the same `Idempotency-Key` gets the first response again.

The intake (service.requests.intake.file_forget_requests) records the key before any other work
and stores the response with the request it filed, in the same transaction. Only a request that
succeeded is remembered: a refused one wrote nothing, so its retry simply runs again. On
PostgreSQL a concurrent request with the same key waits on the first one's insert until it
commits, then replays its response; on SQLite transactions are serialised already (service.core.db).
Records are kept QFORGET_IDEMPOTENCY_RETENTION_HOURS: the scheduler deletes older ones
(`prune_expired`), after which the same key makes a new request.
"""

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.orm import Session

from service.core.models import IdempotencyRecord

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# Visible ASCII only: what every HTTP stack passes through unchanged.
KEY_PATTERN = r"^[\x21-\x7e]+$"


@dataclass(frozen=True)
class Replay:
    status_code: int
    body: dict


def fingerprint(body: dict) -> str:
    """The sha256 of a request body as parsed (key order and whitespace do not matter)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def prune_expired(session: Session, older_than: datetime) -> int:
    """Delete the records created before `older_than`; returns how many."""
    result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < older_than))
    return result.rowcount
