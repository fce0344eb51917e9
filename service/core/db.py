"""Database engines and sessions.

Each process names its engine (api, worker, scheduler, cli) so that PostgreSQL's
pg_stat_activity shows who holds which connection. On SQLite every transaction begins
IMMEDIATE: the write lock is taken up front, so two writers serialise instead of failing when
one upgrades a read lock (the audit log's hash chain reads the last entry, then appends).

An engine made from settings carries the audit log's key and checkpoint file (the execution option
service.core.audit_log.AUDIT_OPTION), which every session made from it inherits: appending to the
audit log needs them. It carries the webhook endpoint the same way (service.webhooks.config), when
one is configured: recording an event needs it.
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event, exc, make_url
from sqlalchemy.orm import Session, sessionmaker

from service.core.audit_log import AUDIT_OPTION, AuditLogConfig
from service.core.settings import Settings, get_settings
from service.webhooks.config import WebhookConfig, with_webhooks

log = logging.getLogger(__name__)

# Connections per engine (and process): the API lets at most its settings.api_database_sessions
# requests hold one at once, which must not exceed POOL_SIZE + MAX_OVERFLOW.
POOL_SIZE = 10
MAX_OVERFLOW = 20
# A PostgreSQL connection idle this long is pinged before it is handed out (see _ping_connections_idle_for).
PING_AFTER_IDLE_SECONDS = 1.0


def make_engine(database_url: str, name: str = "qforget", audit: AuditLogConfig | None = None) -> Engine:
    """An engine on `database_url`; with `audit` (AuditLogConfig.from_settings), one whose sessions
    may append to the audit log."""
    engine = _make_engine(database_url, name)
    return engine if audit is None else engine.execution_options(**{AUDIT_OPTION: audit})


def _make_engine(database_url: str, name: str) -> Engine:
    if database_url.startswith("sqlite"):
        # An in-memory database lives in one connection (SingletonThreadPool): no pool to size.
        in_memory = make_url(database_url).database in (None, "", ":memory:")
        pool = {} if in_memory else {"pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW}
        engine = create_engine(database_url, **pool, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # let SQLAlchemy's begin event issue BEGIN
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            # Deleted and overwritten rows are zeroed on disk, not left in free pages: what an erasure
            # removes from a table (a subject's id) is gone from the file too.
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(connection):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(
        database_url,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        connect_args={"application_name": f"qforget-{name}"},
    )
    _ping_connections_idle_for(engine, PING_AFTER_IDLE_SECONDS)
    return engine


def _ping_connections_idle_for(engine: Engine, seconds: float) -> None:
    """Ping a pooled connection at checkout only if it sat idle `seconds` or more; a dead one is
    replaced (SQLAlchemy's pessimistic disconnect handling, as pool_pre_ping does for every
    checkout). A connection in steady use is not pinged: a round trip saved per request. One the
    server dropped within `seconds` of its last use fails its statement once (503, retry), and
    SQLAlchemy then replaces every connection of the pool."""

    @event.listens_for(engine, "checkin")
    def _remember_checkin(_dbapi_connection, record):
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection, record, _proxy):
        checked_in_at = record.info.get("checked_in_at")
        if checked_in_at is None or time.monotonic() - checked_in_at < seconds:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:  # whatever the driver raises for a dead connection
            raise exc.DisconnectionError(f"pooled connection is dead: {error}") from error


@lru_cache
def _engine_for(database_url: str, name: str) -> Engine:
    return make_engine(database_url, name)


def get_engine(settings: Settings | None = None, name: str = "qforget") -> Engine:
    settings = settings or get_settings()
    # One pool per database and name, whatever the settings' audit key and webhook endpoint: a view
    # of it that carries them.
    engine = _engine_for(settings.database_url, name).execution_options(
        **{AUDIT_OPTION: AuditLogConfig.from_settings(settings)}
    )
    return with_webhooks(engine, WebhookConfig.from_settings(settings))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any exception."""
    with session_factory(engine)() as session, session.begin():
        yield session


def drop_deleted_content(engine: Engine) -> None:
    """Remove from the database's files what was deleted or overwritten (after an erasure: the
    subject's former id, a delivered webhook's body). SQLite keeps such bytes in free pages, in the
    inner pages of indexes and in its write-ahead log: VACUUM rebuilds the file from the live rows,
    then the log is checkpointed into it and truncated to nothing. PostgreSQL keeps dead row versions
    until VACUUM reuses their space, out of the service's hands (docs/audit.md): nothing is done."""
    if engine.dialect.name != "sqlite":
        return
    connection = engine.raw_connection()  # the driver's own, in autocommit: VACUUM cannot run in a transaction
    try:
        cursor = connection.cursor()
        cursor.execute("VACUUM")
        busy, _, _ = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        connection.close()
    if busy:
        log.warning("the database's write-ahead log could not be truncated (a reader held it); deleted content "
                    "stays in it until it is overwritten or the next erasure truncates it")
