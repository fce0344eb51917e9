"""Logging for every qforget process: JSON lines in production, readable text otherwise.

Records carry the ids of the work they belong to (request, batch, model version, model) from
context variables, so a line logged deep inside a run says which batch it is about without every
call passing the ids along. `log_context(batch_id=...)` binds ids for a block; `bind_log_context`
binds them until `clear_log_context` (the Celery worker clears them before each task). An id
given with `extra=` on one call wins over the context.

Only ids go into the context: never API keys, request bodies, subject ids or query strings.
"""

import json
import logging
import logging.config
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

# The ids a record may carry, in the order the text format prints them.
CONTEXT_FIELDS = ("request_id", "task_id", "model", "batch_id", "version_id")

_context: dict[str, ContextVar] = {name: ContextVar(f"qforget_log_{name}", default=None) for name in CONTEXT_FIELDS}

# Attributes every LogRecord has; anything else on a record came from `extra=`. uvicorn adds
# `color_message`, its message again with terminal colour codes: not a field either.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "color_message"}

# C0 and C1 control characters and Unicode's line and paragraph separators: whatever could end a
# line of text, or rewrite it on a terminal.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _check_fields(ids: dict) -> None:
    unknown = set(ids) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context field(s) {sorted(unknown)}; known: {', '.join(CONTEXT_FIELDS)}")


def bind_log_context(**ids) -> None:
    """Bind ids to every record logged from here on in this context (thread or task)."""
    _check_fields(ids)
    for name, value in ids.items():
        _context[name].set(value)


def clear_log_context() -> None:
    for variable in _context.values():
        variable.set(None)


@contextmanager
def log_context(**ids) -> Iterator[None]:
    """Bind ids for the block, restoring the previous ones after it."""
    _check_fields(ids)
    tokens = [(_context[name], _context[name].set(value)) for name, value in ids.items()]
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


def current_log_context() -> dict:
    return {name: variable.get() for name, variable in _context.items() if variable.get() is not None}


class ContextFilter(logging.Filter):
    """Copies the bound ids onto each record (an id already set through `extra=` stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current_log_context().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def _extra_fields(record: logging.LogRecord) -> dict:
    return {key: value for key, value in vars(record).items()
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_") and value is not None}


def _utc_time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the ids and any
    other `extra=` fields, and the exception's traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _utc_time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extra_fields(record))
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        # default=str: an id or figure of a type JSON lacks (a UUID, a Decimal) is still written.
        return json.dumps(entry, ensure_ascii=False, default=str)


def _escaped(text: str) -> str:
    """`text` with its control characters written as escapes: a newline as `\\n`, ESC as `\\x1b`."""
    return _CONTROL_CHARACTERS.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [key=value ...]`, the ids and `extra=` fields at the end.

    A record is one line: control characters in its message and fields are written escaped, so no
    input (a newline in a decoded URL path, a terminal escape) can forge a record or a field. A
    traceback follows on lines of its own, each indented, so that none of them reads as a record.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = _escaped(record.getMessage())
        record.asctime = self.formatTime(record)
        line = self.formatMessage(record)
        fields = _extra_fields(record)
        if fields:
            ordered = [name for name in CONTEXT_FIELDS if name in fields] + sorted(set(fields) - set(CONTEXT_FIELDS))
            line += " [" + " ".join(f"{name}={_escaped(str(fields[name]))}" for name in ordered) + "]"
        details = []  # the traceback and the stack, when the record has them
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)  # kept on the record, as logging does
        if record.exc_text:
            details.append(record.exc_text)
        if record.stack_info:
            details.append(self.formatStack(record.stack_info))
        continued = [f"  {_escaped(text)}" for detail in details for text in detail.split("\n")]
        return "\n".join([line, *continued])


def logging_config(level: str | int = "INFO", json_format: bool = False) -> dict:
    """The whole set-up as a `logging.config.dictConfig` dictionary: one stderr handler on the root
    logger in the chosen format. uvicorn takes it as its `log_config` and applies it in each of
    its worker processes too."""
    level_number = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(level_number, int):
        raise ValueError(f"unknown log level {level!r}")  # noqa: TRY004 -- a bad name, not a bad type
    formatter = f"{__name__}.{'JsonFormatter' if json_format else 'TextFormatter'}"
    # Alembic and httpx report every revision and request at INFO: noise in the output.
    quiet = logging.getLevelName(max(logging.WARNING, level_number))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"qforget": {"()": formatter}},
        "filters": {"context": {"()": f"{__name__}.ContextFilter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "qforget", "filters": ["context"]}},
        "root": {"level": logging.getLevelName(level_number), "handlers": ["stderr"]},
        "loggers": {name: {"level": quiet} for name in ("alembic", "httpx")},
    }


def configure_logging(level: str | int = "INFO", json_format: bool = False) -> None:
    """Send every logger's records to stderr in the chosen format, replacing earlier handlers.

    Called once at start by the CLI (text), and again by `api`, `worker` and `scheduler` once
    their settings are read (see `Settings.log_json`). Safe to call more than once.
    """
    logging.config.dictConfig(logging_config(level, json_format))
