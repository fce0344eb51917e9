"""The webhook endpoint and its retry schedule, carried by the engine.

As the audit log's key (service.core.audit_log), the endpoint reaches every emitter with its engine:
service.core.db.get_engine(settings) sets a WebhookConfig as the engine's execution option
"webhooks" when QFORGET_WEBHOOK_URL is set, which every connection and Session made from it inherits.
So `emit` needs only the caller's session, and costs nothing where no endpoint is configured.
"""

from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import Connection, Engine

from service.core.settings import Settings

WEBHOOK_OPTION = "webhooks"


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    key: bytes = field(repr=False)  # the HMAC key the whsec_ secret stands for
    max_attempts: int
    backoff_seconds: float
    backoff_max_seconds: float
    timeout_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> "WebhookConfig | None":
        """The settings' endpoint, or None when QFORGET_WEBHOOK_URL is unset."""
        if not settings.webhook_url:
            return None
        return cls(url=settings.webhook_url, key=settings.webhook_signing_key,
                   max_attempts=settings.webhook_max_attempts, backoff_seconds=settings.webhook_backoff_seconds,
                   backoff_max_seconds=settings.webhook_backoff_max_seconds,
                   timeout_seconds=settings.webhook_timeout_seconds)

    def backoff(self, attempts: int) -> timedelta:
        """How long after its `attempts`-th failed attempt a delivery is tried again."""
        return timedelta(seconds=min(self.backoff_max_seconds, self.backoff_seconds * 2 ** (attempts - 1)))


def with_webhooks(engine: Engine, config: WebhookConfig | None) -> Engine:
    """The engine, carrying `config` (None: no endpoint, nothing is recorded)."""
    return engine.execution_options(**{WEBHOOK_OPTION: config})


def webhook_config(bind: Connection | Engine) -> WebhookConfig | None:
    """The WebhookConfig the connection's (or engine's) engine carries; None: no endpoint."""
    return bind.get_execution_options().get(WEBHOOK_OPTION)
