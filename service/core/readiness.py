"""Readiness probes: is the database reachable, is the broker reachable? Each answers in seconds.

The probes do not use the API's engine: on SQLite its transactions begin IMMEDIATE (service.core.db), so
a probe would wait up to the 30 s busy timeout behind any writer, and a PostgreSQL pool that is
exhausted would make the probe wait for a connection. A probe opens its own connection with a
short timeout and reads without taking a lock.
"""

import logging
import os
import sqlite3
from pathlib import Path
from urllib.request import pathname2url

from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.pool import NullPool

from service.core.settings import Settings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 2


def make_probe_engine(database_url: str) -> Engine:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        path = url.database
        if path in (None, "", ":memory:"):
            return create_engine(database_url, poolclass=NullPool)

        def connect():
            # mode=rw: a missing file is "down", not created empty. A plain deferred read: in WAL
            # mode it does not wait for writers.
            return sqlite3.connect(
                f"file:{pathname2url(str(Path(path).resolve()))}?mode=rw",
                uri=True,
                timeout=PROBE_TIMEOUT_SECONDS,
                check_same_thread=False,
            )

        return create_engine("sqlite://", creator=connect, poolclass=NullPool)
    connect_args = {}
    if url.get_backend_name() == "postgresql":
        connect_args = {
            "connect_timeout": PROBE_TIMEOUT_SECONDS,
            "options": f"-c statement_timeout={PROBE_TIMEOUT_SECONDS * 1000}",
            "application_name": "qforget-api-probe",
        }
    return create_engine(database_url, poolclass=NullPool, connect_args=connect_args)


def database_ok(engine: Engine) -> bool:
    try:
        with engine.connect() as connection:
            # Reads the schema (on SQLite, the file's first page), so a file that is not a
            # database, or is not there, fails here.
            query = "SELECT count(*) FROM sqlite_master" if engine.dialect.name == "sqlite" else "SELECT 1"
            connection.execute(text(query))
        return True
    except Exception as exc:  # any failure means "not ready"; the reason goes to the log
        log.warning("readiness: database unavailable: %s", exc)
        return False


def broker_state(settings: Settings) -> str:
    """"ok", "down", or "unchecked" for a broker this probe does not know how to reach."""
    url = settings.broker_url
    scheme = url.split("://", 1)[0].lower()
    try:
        if scheme in ("redis", "rediss"):
            import redis

            client = redis.Redis.from_url(
                url, socket_connect_timeout=PROBE_TIMEOUT_SECONDS, socket_timeout=PROBE_TIMEOUT_SECONDS
            )
            try:
                client.ping()
            finally:
                client.close()
            return "ok"
        if scheme == "filesystem":
            # kombu's filesystem transport: the folder producers and consumers share.
            folder = settings.broker_folder
            if folder.is_dir() and os.access(folder, os.R_OK | os.W_OK | os.X_OK):
                return "ok"
            log.warning("readiness: broker folder %s is missing or not writable", folder)
            return "down"
    except Exception as exc:
        log.warning("readiness: broker unavailable: %s", exc)
        return "down"
    return "unchecked"
