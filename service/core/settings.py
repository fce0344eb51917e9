"""One settings object for every qforget process, read from the environment (prefix QFORGET_).

The defaults are the embedded set-up: a SQLite file, a Celery broker kept in a folder, a model
store folder, all under `data_dir`; no server to install. Production sets the database and broker
URLs to PostgreSQL and Redis.
"""

import base64
import binascii
import os
import secrets
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The unlearning settings of a run, each bounded here once: the service-wide values in Settings
# (QFORGET_UNLEARN_*) and an admin's per-model overrides (UnlearnSettings) are checked against the
# same bounds, and the worker hands those the method's config has to the engine.
# The engine's methods the service may run for a batch (workers/engine/methods.py; "retrain" is the
# reference, not an unlearning run). Named here because the API and the scheduler never load the engine.
# "lethevit" runs on vision transformers only (a model bootstrapped with --architecture digits-vit).
UnlearnMethod = Literal["qmul", "qmul-no-sl", "qmul-no-agr", "qmul-public", "ft", "ga", "rl", "l1-sparse", "salun",
                        "iu", "oeu", "quail", "lethevit"]
QMUL_METHODS = ("qmul", "qmul-no-sl", "qmul-no-agr", "qmul-public")
UnlearnEpochs = Annotated[int, Field(ge=1, le=1000)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
Momentum = Annotated[float, Field(ge=0, lt=1)]
WeightDecay = Annotated[float, Field(ge=0, le=1)]
BatchSize = Annotated[int, Field(ge=1, le=4096)]
GradNormBatches = Annotated[int, Field(ge=0, le=100_000)]  # 0: a full pass over each set
CoresetFraction = Annotated[float, Field(gt=0, le=1)]
CoresetSelector = Literal["random", "res", "jscds"]  # workers/engine/coresets.py
QMUL_ONLY = ("similar_labels", "gradient_reweighting", "grad_norm_batches", "retain_coreset", "coreset_selector")


class UnlearnSettings(BaseModel):
    """Unlearning settings for a model's next runs, overriding the service-wide ones; omitted:
    unchanged. `method` picks another of the engine's methods (the one its benchmark found best, say);
    `similar_labels`, `gradient_reweighting`, `grad_norm_batches`, `retain_coreset` and
    `coreset_selector` are Q-MUL's (the first two turn its components off: ablations; the last two run
    its retain pass over a coreset of the retain set, off unless set: docs/engine.md, Coresets)."""

    model_config = ConfigDict(extra="forbid")
    method: UnlearnMethod | None = None
    epochs: UnlearnEpochs | None = None
    lr: LearningRate | None = None
    momentum: Momentum | None = None
    weight_decay: WeightDecay | None = None
    batch_size: BatchSize | None = None
    similar_labels: bool | None = None
    gradient_reweighting: bool | None = None
    grad_norm_batches: GradNormBatches | None = None
    retain_coreset: CoresetFraction | None = None
    coreset_selector: CoresetSelector | None = None

    @model_validator(mode="after")
    def _qmul_fields_for_qmul(self) -> "UnlearnSettings":
        if self.method is not None and self.method not in QMUL_METHODS:
            given = [name for name in QMUL_ONLY if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} are Q-MUL's settings; method {self.method!r} has none")
        return self


# A shorter QFORGET_AUDIT_KEY is refused: the audit log's hashes are only as strong as its key.
MIN_AUDIT_KEY_LENGTH = 32
# The Standard Webhooks secret format: "whsec_" and the base64 of the HMAC key's bytes, of which the
# convention asks for 24 to 64.
WEBHOOK_SECRET_PREFIX = "whsec_"
MIN_WEBHOOK_KEY_BYTES = 24
MAX_WEBHOOK_KEY_BYTES = 64


def webhook_key(secret: str) -> bytes:
    """The HMAC key a `whsec_<base64>` secret stands for; ValueError when it is not one."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(f"QFORGET_WEBHOOK_SECRET: must start with {WEBHOOK_SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX):], validate=True)
    except binascii.Error:
        raise ValueError("QFORGET_WEBHOOK_SECRET: the part after whsec_ is not base64") from None
    if not MIN_WEBHOOK_KEY_BYTES <= len(key) <= MAX_WEBHOOK_KEY_BYTES:
        raise ValueError(f"QFORGET_WEBHOOK_SECRET: the key must be {MIN_WEBHOOK_KEY_BYTES} to "
                         f"{MAX_WEBHOOK_KEY_BYTES} bytes, not {len(key)}")
    return key


def new_webhook_secret() -> str:
    """A fresh secret in the whsec_ format (32 random bytes)."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QFORGET_", env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("var")
    # Empty means "the embedded default under data_dir".
    database_url: str = ""
    broker_url: str = ""
    model_store: Path | None = None
    # The audit log's secret (service/core/audit_log.py): its entry hashes and checkpoints are HMACs
    # with it, and so are the pseudonyms it records for subject and sample ids. Production must set
    # it (at least 32 characters); elsewhere an unset key is made once and kept in <data_dir>/audit.key.
    audit_key: SecretStr | None = None

    # The model a request targets when it names none; bootstrap registers it.
    default_model: str = "digits-cnn-4bit"
    device: str = "auto"  # "auto": CUDA when present, else the CPU
    torch_threads: int = 0  # 0 leaves torch's own choice
    # A worker runs at this CPU niceness (0 to 19; service/cli/processes.py): where it shares cores with
    # the API, its minutes-long training yields to the requests, which someone is waiting on.
    worker_nice: int = Field(19, ge=0, le=19)

    # Q-MUL settings of every model's runs (an admin may override them per model: UnlearnSettings).
    # The method a batch runs (a model's UnlearnSettings may name another): Q-MUL unless said otherwise.
    unlearn_method: UnlearnMethod = "qmul"
    unlearn_epochs: UnlearnEpochs = 10
    unlearn_lr: LearningRate = 0.01
    unlearn_momentum: Momentum = 0.9
    unlearn_weight_decay: WeightDecay = 5e-4
    unlearn_batch_size: BatchSize = 64
    # Adaptive Gradient Reweighting estimates the forget and retain gradient norms each epoch on at
    # most this many mini-batches per set (0: a full pass). A full pass over a large retain set costs
    # about one more epoch per epoch (docs/performance.md: 22-24% of a run saved at 8 batches).
    unlearn_grad_norm_batches: GradNormBatches = 20

    # Batch policy (workers/batches/policy.py): a default, and overrides per model name, e.g.
    # QFORGET_BATCH_POLICIES='{"digits-cnn-4bit": {"min_samples": 1}}'.
    batch_min_samples: int = 50
    batch_max_wait_seconds: float = 600.0
    batch_due_margin_days: float = 3.0
    batch_policies: dict[str, dict] = {}

    # Scheduling and leases: how often the scheduler looks for due work, how long a claimed batch
    # may go without a heartbeat before another worker may take it over.
    scheduler_interval_seconds: float = 5.0
    lease_seconds: int = 900
    max_attempts: int = 3
    # After a failed attempt the batch waits retry_backoff_seconds * 2^(attempt-1) before the next;
    # after the last attempt its model gets no new batch for failed_batch_cooldown_seconds.
    retry_backoff_seconds: float = 30.0
    failed_batch_cooldown_seconds: float = 3600.0

    # Quality gate: a new version whose test accuracy fell more than this many points below its
    # parent's is held for review instead of deployed.
    quality_gate_max_ta_drop: float = 5.0
    # Artifacts of versions that still carry forgotten samples are deleted this long after the
    # deployment forgot them (kept meanwhile for audit evidence); the deployed one never is.
    artifact_retention_hours: float = 24.0
    # A completed request's evidence is frozen and every copy of its samples the service holds is
    # erased this long after it completed (room for an auditor to look at the live evidence), and
    # never later than its due date (service/requests/erasure.py).
    erasure_window_hours: float = Field(default=24.0, ge=0)
    # An Idempotency-Key is remembered this long (the scheduler deletes older records): a client
    # retries within minutes, and a key reused after this is a new request.
    idempotency_retention_hours: float = 24.0

    # GDPR Art. 12(3): one month to act on a request.
    deadline_days: int = 30

    # Retrain reference schedule (service/references/schedule.py): a new reference once this many unlearned
    # versions were deployed since the newest one, or once the newest one is this many days old,
    # whenever the deployment has forgotten samples the newest reference still holds. 0: off.
    reference_every_versions: int = Field(default=0, ge=0)
    reference_every_days: float = Field(default=0.0, ge=0)
    # A reference request that failed this many times is closed (a broken data file, a model that
    # does not fit the GPU): sent again forever, it would hold a GPU worker for nothing.
    reference_max_attempts: int = Field(default=3, ge=1)
    # A reference's training saves a checkpoint at most this often (seconds), so that a worker
    # restarted mid-training (a deployment, a lost GPU machine) resumes the request's run.
    checkpoint_every_seconds: float = Field(default=60.0, ge=0)
    # An approximate reference (docs/audit.md, Approximate references): when set, a reference request
    # first trains the reference's recipe on this fraction of the retain set, chosen by the selector
    # (workers/engine/coresets.py), for an interim audit until the full reference is recorded. Off
    # (None) by default: on the digits and CIFAR-10 it lay 5 to 38 points of AG from the full reference
    # (docs/bench/coresets.md), far more than unlearning methods differ by.
    approximate_reference_fraction: float | None = None
    approximate_reference_selector: CoresetSelector = "random"

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Requests that hold a database session at once, per API process; the others wait in the event
    # loop, holding nothing. At most the connection pool (service/core/db.py: 10 + 20 overflow), so that
    # a request thread never waits for a connection held by a request that itself waits for a thread
    # (that deadlocked until the pool's 30 s timeout under 200 connections). Fewer also means less
    # contention for the GIL, hence lower latency at the same throughput (docs/performance.md).
    api_database_sessions: int = Field(10, ge=1, le=30)
    # An API process trusts a key it authenticated for this long without asking the database again:
    # a revoked key keeps working up to this long (0: every request asks; service/api/deps.py).
    api_key_cache_seconds: float = Field(5.0, ge=0, le=300)
    # Request bodies larger than this are refused with 413 (service/api/body_limit.py).
    api_max_body_bytes: int = 1 << 20

    # Webhooks (service/webhooks, docs/webhooks.md): events about requests are POSTed to this URL,
    # signed with the secret (Standard Webhooks: "whsec_" and base64). No URL: none are recorded.
    # Production needs the secret with the URL; elsewhere one is made once in <data_dir>/webhook.secret.
    webhook_url: str = ""
    webhook_secret: SecretStr | None = None
    # A delivery is tried this many times, waiting backoff * 2^(attempt-1) (at most the cap) after
    # each failed attempt; each POST may take at most the timeout.
    webhook_max_attempts: int = Field(8, ge=1, le=50)
    webhook_backoff_seconds: float = Field(60.0, gt=0)
    webhook_backoff_max_seconds: float = Field(6 * 3600.0, gt=0)
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    # A delivery that failed its last attempt keeps its body this long, so that an admin can retry it
    # (POST /webhooks/deliveries/{id}/retry) once the receiver is fixed; then the body is cleared.
    webhook_failed_retention_hours: float = Field(168.0, ge=0)

    # Log lines: "json" (one object a line, for a log collector), "text" (readable), or "auto":
    # JSON in production, text otherwise (service/core/logging_setup.py).
    log_format: Literal["auto", "json", "text"] = "auto"

    @field_validator("approximate_reference_selector", mode="before")
    @classmethod
    def _known_selector(cls, value: object) -> object:
        # Named by its variable: the type's own message names only the field.
        if value not in get_args(CoresetSelector):
            raise ValueError(f"QFORGET_APPROXIMATE_REFERENCE_SELECTOR: one of {', '.join(get_args(CoresetSelector))}, "
                             f"not {value!r}")
        return value

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> "Settings":
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'qforget.db').resolve()}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.model_store is None:
            self.model_store = self.data_dir / "models"
        if self.environment == "production" and self.database_url.startswith("sqlite"):
            raise ValueError("QFORGET_DATABASE_URL: production needs a server database, not SQLite")
        if self.audit_key is not None and not self.audit_key.get_secret_value():
            self.audit_key = None  # set but empty, as an unset variable in docker-compose.yml is
        if self.audit_key is not None and len(self.audit_key.get_secret_value()) < MIN_AUDIT_KEY_LENGTH:
            raise ValueError(f"QFORGET_AUDIT_KEY: at least {MIN_AUDIT_KEY_LENGTH} characters "
                             "(e.g. the 64 hex digits of `openssl rand -hex 32`)")
        if self.environment == "production" and self.audit_key is None:
            raise ValueError("QFORGET_AUDIT_KEY: production needs the audit log's secret key, the same in every "
                             "process (e.g. the 64 hex digits of `openssl rand -hex 32`; docs/audit.md)")
        self._check_webhooks()
        fraction = self.approximate_reference_fraction
        if fraction is not None and not 0 < fraction < 1:
            raise ValueError(f"QFORGET_APPROXIMATE_REFERENCE_FRACTION: a fraction of the retain set in (0, 1), "
                             f"not {fraction:g} (unset: no approximate reference)")
        return self

    def _check_webhooks(self) -> None:
        if self.webhook_secret is not None and not self.webhook_secret.get_secret_value():
            self.webhook_secret = None  # set but empty, as an unset variable in docker-compose.yml is
        if self.webhook_secret is not None:
            webhook_key(self.webhook_secret.get_secret_value())
        if not self.webhook_url:
            return
        parts = urlsplit(self.webhook_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("QFORGET_WEBHOOK_URL: an http:// or https:// URL with a host")
        if self.environment == "production" and self.webhook_secret is None:
            raise ValueError("QFORGET_WEBHOOK_SECRET: production needs the secret that signs webhook deliveries "
                             "with QFORGET_WEBHOOK_URL (whsec_ and the base64 of 32 random bytes; docs/webhooks.md)")

    def unlearn_settings(self, overrides: dict | None = None) -> dict:
        """A model's unlearning method and settings: the service-wide ones, then the admin's overrides."""
        values = {"method": self.unlearn_method, "epochs": self.unlearn_epochs, "lr": self.unlearn_lr,
                  "momentum": self.unlearn_momentum, "weight_decay": self.unlearn_weight_decay, "batch_size": self.unlearn_batch_size,
                  "grad_norm_batches": self.unlearn_grad_norm_batches}
        return values | (overrides or {})

    @property
    def log_json(self) -> bool:
        return self.log_format == "json" or (self.log_format == "auto" and self.environment == "production")

    @property
    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # only the processes that train ask for it

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def audit_secret(self) -> bytes:
        """The audit log's key: QFORGET_AUDIT_KEY, else (never in production) the one kept in
        <data_dir>/audit.key, made on first use."""
        if self.audit_key is not None:
            return self.audit_key.get_secret_value().encode()
        return _key_kept_in((self.data_dir / "audit.key").resolve())

    @property
    def webhook_signing_key(self) -> bytes | None:
        """The HMAC key of webhook signatures: QFORGET_WEBHOOK_SECRET's, else (never in production) the
        one of the secret kept in <data_dir>/webhook.secret, made on first use; None without a URL."""
        if not self.webhook_url:
            return None
        if self.webhook_secret is not None:
            return webhook_key(self.webhook_secret.get_secret_value())
        kept = _key_kept_in((self.data_dir / "webhook.secret").resolve(), make=new_webhook_secret)
        return webhook_key(kept.decode())

    @property
    def broker_folder(self) -> Path:
        """Where the filesystem broker keeps its messages (embedded default only)."""
        return (self.data_dir / "broker").resolve()


def _key_kept_in(path: Path, make: Callable[[], str] = lambda: secrets.token_hex(32)) -> bytes:
    """The secret in `path`; made by `make` (by default 64 random hex digits), readable by this user only,
    when there is none.
    Processes that start at once (the demo's API, worker and scheduler) agree on one: the file
    appears whole, as a link to a complete temporary file, or not at all."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(make() + "\n")
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another process made it first: its key is the key
        finally:
            temporary.unlink(missing_ok=True)
    key = path.read_bytes().strip()
    if len(key) < MIN_AUDIT_KEY_LENGTH:
        raise ValueError(f"{path}: the secret kept there is shorter than {MIN_AUDIT_KEY_LENGTH} characters; "
                         "restore it, or set the QFORGET_ variable it stands in for")
    return key


@lru_cache
def get_settings() -> Settings:
    return Settings()
