"""API keys: created and revoked here (the `qforget keys` CLI, the demo, tests), checked by the API.

A key reads `qf_<prefix>_<secret>`: the prefix (8 hex characters) is public, unique, and names the
caller in the audit log ("key:<prefix>"); the secret is 256 random bits. The database keeps the
prefix and the sha256 of the whole key, never the key: a stolen database holds no usable key, and
a fast hash is enough because the key has far too much entropy to guess (unlike a password).
"""

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.audit_log import append_audit
from service.core.models import ApiKey, Model, Role, utcnow

KEY_PREFIX = "qf_"
PREFIX_LENGTH = 8
# The whole shape, so that anything else is refused before a database lookup.
KEY_PATTERN = re.compile(rf"^{KEY_PREFIX}(?P<prefix>[0-9a-f]{{{PREFIX_LENGTH}}})_[A-Za-z0-9_-]{{43}}$")


class ApiKeyError(ValueError):
    """A key that cannot be created or revoked as asked; the message says why."""


@dataclass(frozen=True)
class Caller:
    """Who sent an API request: the identity behind a valid, unrevoked key."""

    key_id: int
    prefix: str
    name: str
    role: Role
    model: str | None  # a submitter key limited to one model

    @property
    def actor(self) -> str:
        """The caller's name in audit entries."""
        return f"key:{self.prefix}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(
    session: Session, *, role: Role | str, name: str, model: str | None = None, actor: str
) -> tuple[ApiKey, str]:
    """Create a key in the caller's transaction. Returns the row and the key, which is shown only now.

    Raises:
        ApiKeyError: an unknown role or model, an empty or long name, or a model limit on a key
            that is not a submitter's.
    """
    try:
        role = Role(role)
    except ValueError:
        raise ApiKeyError(f"unknown role {role!r}; one of {', '.join(r.value for r in Role)}") from None
    name = name.strip()
    if not 1 <= len(name) <= 128:
        raise ApiKeyError("the name must be 1 to 128 characters")
    if model is not None:
        if role is not Role.submitter:
            raise ApiKeyError(f"only submitter keys can be limited to a model, not {role.value} keys")
        if session.get(Model, model) is None:
            raise ApiKeyError(f"unknown model {model!r}")
    # The prefix is unique: draw again on the (one in four billion) collision.
    while True:
        prefix = secrets.token_hex(PREFIX_LENGTH // 2)
        if session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is None:
            break
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        prefix=prefix, key_hash=hash_key(key), name=name, role=role, model_name=model, created_by=actor
    )
    session.add(row)
    session.flush()
    append_audit(
        session, actor=actor, action="api_key.created", object_type="api_key", object_id=str(row.id),
        details={"prefix": prefix, "name": name, "role": role.value, "model": model},
    )
    return row, key


def find_api_key(session: Session, id_or_prefix: str) -> ApiKey | None:
    """A key by its id ("12") or its prefix ("3fa9c2d1", or "qf_3fa9c2d1")."""
    text = id_or_prefix.strip().removeprefix(KEY_PREFIX).lower()
    # A prefix may be all digits too ("20095183"): it wins over an id of the same spelling.
    if re.fullmatch(rf"[0-9a-f]{{{PREFIX_LENGTH}}}", text):
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == text))
        if row is not None:
            return row
    if text.isdigit() and len(text) < 10:
        return session.get(ApiKey, int(text))
    return None


def revoke_api_key(session: Session, id_or_prefix: str, *, actor: str) -> ApiKey:
    """Revoke a key in the caller's transaction; requests with it are refused from the commit on.

    Raises:
        ApiKeyError: no such key, or it is already revoked.
    """
    row = find_api_key(session, id_or_prefix)
    if row is None:
        raise ApiKeyError(f"no API key {id_or_prefix!r}")
    if row.revoked_at is not None:
        raise ApiKeyError(f"API key {row.id} ({row.prefix}) was already revoked at {row.revoked_at.isoformat()}")
    row.revoked_at = utcnow()
    row.revoked_by = actor
    session.flush()
    append_audit(
        session, actor=actor, action="api_key.revoked", object_type="api_key", object_id=str(row.id),
        details={"prefix": row.prefix, "name": row.name, "role": row.role.value},
    )
    return row


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def authenticate(session: Session, key: str) -> Caller | None:
    """The caller a key identifies, or None if it is malformed, unknown or revoked."""
    match = KEY_PATTERN.match(key)
    if match is None:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == match["prefix"]))
    # Compared in constant time, so response times say nothing about how much of a guess was right.
    if row is None or not hmac.compare_digest(row.key_hash, hash_key(key)) or row.revoked_at is not None:
        return None
    return Caller(key_id=row.id, prefix=row.prefix, name=row.name, role=row.role, model=row.model_name)
