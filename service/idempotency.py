"""Idempotency keys: a POST retried with the same `Idempotency-Key` gets the first response again.

Usage, inside the transaction that does the work:

    outcome = claim(session, api_key_id=..., key=..., fingerprint=fingerprint(body))
    if isinstance(outcome, Replay):
        return outcome                      # the first response, status and body
    ... do the work, build the response body ...
    outcome.status_code, outcome.response_body = 202, body
    session.commit()

Only a request that succeeded is remembered: a refused one wrote nothing, so its retry simply runs
again. The record is inserted before the work: on PostgreSQL a concurrent request with the same key
waits on that insert until the first commits, then replays its response; on SQLite transactions
are serialised already (service.db). Records are kept QFORGET_IDEMPOTENCY_RETENTION_HOURS: the
scheduler deletes older ones (`prune_expired`), after which the same key makes a new request.
"""

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.forget_requests import RequestValidationProblem
from service.models import IdempotencyRecord

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


def claim(session: Session, *, api_key_id: int, key: str, fingerprint: str) -> Replay | IdempotencyRecord:
    """The stored first response for this key, or a new record for the caller to fill in.

    Raises:
        RequestValidationProblem: the key was used before with a different body (422, naming the header).
    """
    stored = session.get(IdempotencyRecord, (api_key_id, key))
    if stored is None:
        record = IdempotencyRecord(
            api_key_id=api_key_id, key=key, fingerprint=fingerprint, status_code=0, response_body={}
        )
        try:
            with session.begin_nested():
                session.add(record)
        except IntegrityError:
            # A request with the same key committed while this one waited on the insert.
            stored = session.get(IdempotencyRecord, (api_key_id, key), populate_existing=True)
            if stored is None:  # it was deleted meanwhile: nothing sensible to replay
                raise
        else:
            return record
    if stored.fingerprint != fingerprint:
        raise RequestValidationProblem(
            HEADER,
            f"this {HEADER} was already used with a different request body; "
            "send a new key for a new request, or the same body to get the first response again",
            error_type="idempotency_key_reused",
            location="header",
        )
    return Replay(status_code=stored.status_code, body=stored.response_body)


def prune_expired(session: Session, older_than: datetime) -> int:
    """Delete the records created before `older_than`; returns how many."""
    result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < older_than))
    return result.rowcount
