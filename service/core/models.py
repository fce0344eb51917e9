"""The database schema (SQLAlchemy 2 typed models). Alembic migrations are the only way it changes.

Vocabulary (docs/design.md): a subject owns samples of a data set; every model on that data set
learned them, but those its original was trained without. A forget request asks to forget a
subject's samples from every model that holds them (or from one named model): it has one part per
such model, and each part is run in a batch of that model; each run produces an immutable model
version; the deployment is the model's pointer to the version now serving; a retrain reference
is a version of kind "reference", trained from scratch without the model's forgotten samples.
"""

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC, so make it aware again."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    # Every constraint gets a predictable name: later migrations can drop or alter it by name (SQLite's
    # batch mode needs that) and PostgreSQL and SQLite agree on the names.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {datetime: DateTime(timezone=True), dict: JSON, list: JSON}


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings (no native PostgreSQL enum type): adding a status is a data change,
    # not a type migration.
    return Enum(cls, native_enum=False, length=16, values_callable=lambda c: [m.value for m in c])


class RequestStatus(str, enum.Enum):
    pending = "pending"
    # A part of a semi-parametric model whose samples its datastore no longer holds (a deployed
    # version without them), waiting for the batch that unlearns the encoder; a request whose
    # parts are all instant or further, with one instant.
    instant = "instant"
    batched = "batched"
    completed = "completed"
    withdrawn = "withdrawn"  # withdrawn by the client before any of its parts was batched


class BatchStatus(str, enum.Enum):
    running = "running"
    held = "held"  # the quality gate refused its version: waits for an admin to approve or retry
    completed = "completed"
    failed = "failed"  # gave up after the last attempt; its requests went back to pending
    discarded = "discarded"  # an admin refused a held batch; its requests went back to pending


class DeliveryStatus(str, enum.Enum):
    pending = "pending"  # waits for its next attempt
    delivered = "delivered"  # the receiver answered 2xx
    failed = "failed"  # the last attempt failed; an admin may retry it


class VersionKind(str, enum.Enum):
    original = "original"
    unlearned = "unlearned"
    reference = "reference"


class Role(str, enum.Enum):
    """What an API key may do. submitter: file and read forget requests; auditor: read everything;
    admin: everything (models, samples, keys)."""

    submitter = "submitter"
    auditor = "auditor"
    admin = "admin"


class Subject(Base):
    __tablename__ = "subjects"

    # Once every copy of the subject's data is erased, the id is replaced by its pseudonym
    # (service.core.pseudonyms): the service no longer names the subject, and an auditor given the
    # id still finds the row by hashing it.
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    erased_at: Mapped[datetime | None]

    samples: Mapped[list["Sample"]] = relationship(back_populates="subject")


class Dataset(Base):
    """A data set models are trained on: its training split has `train_size` samples, positions
    0 to train_size - 1. Recorded by the first bootstrap on it; sample registrations are checked
    against it."""

    __tablename__ = "datasets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    train_size: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Sample(Base):
    """One training example. `dataset_index` is its stable position in the dataset's train split."""

    __tablename__ = "samples"
    __table_args__ = (Index("uq_samples_dataset_index", "dataset", "dataset_index", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset: Mapped[str] = mapped_column(String(64))
    dataset_index: Mapped[int]
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id"), index=True)
    # The tombstone: every copy the service held was erased then (no model holds it any more). Data
    # loading blanks it, and nothing reads it again.
    erased_at: Mapped[datetime | None]

    subject: Mapped[Subject] = relationship(back_populates="samples")


class ForgottenSample(Base):
    """A sample a model no longer holds: forgotten by `version_id` (an unlearned version), or never
    learned (`version_id` is the model's original, trained after the sample's erasure was asked).

    A model holds every sample of its data set but these (service.requests.holdings); a version
    carries the model's samples but its `excluded_sample_ids`. Only what is forgotten is stored, so
    the record grows with erasures, not with the data set.
    """

    __tablename__ = "forgotten_samples"

    model_name: Mapped[str] = mapped_column(ForeignKey("models.name"), primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), primary_key=True, index=True)
    forgotten_at: Mapped[datetime]
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))


class Model(Base):
    """A named model trained on one dataset; `deployed_version_id` is its deployment pointer."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict]
    deployed_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", use_alter=True, name="fk_models_deployed_version")
    )
    # Q-MUL settings an admin chose for this model's next runs (e.g. after a held batch);
    # None: the service-wide settings.
    unlearn_config: Mapped[dict | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A semi-parametric model (its spec has "spm"): its forget requests take effect first by removing
    # their samples from its datastore (workers/instant.py), before the batch.
    semi_parametric: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class ModelVersion(Base):
    """An immutable, content-addressed artifact with its lineage."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name"), index=True)
    kind: Mapped[VersionKind] = mapped_column(_enum(VersionKind))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    batch_id: Mapped[int | None] = mapped_column(
        ForeignKey("batches.id", use_alter=True, name="fk_model_versions_batch")
    )
    method: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict]
    metrics: Mapped[dict] = mapped_column(default=dict)
    sha256: Mapped[str] = mapped_column(String(64))
    artifact_path: Mapped[str] = mapped_column(Text)
    # The model's samples this version was made without (the model's forgotten samples at its creation).
    excluded_sample_ids: Mapped[list] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set when the retention policy deleted the artifact file (the row and its lineage stay).
    artifact_deleted_at: Mapped[datetime | None]
    # A reference trained on a coreset of the retain set (QFORGET_APPROXIMATE_REFERENCE_FRACTION): an
    # interim stand-in until the full reference of the same state exists, which supersedes it
    # (service/audit/comparison.py). Its metrics say which coreset ("coreset").
    approximate: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class Batch(Base):
    """One unlearning run over the requests claimed together for a model.

    At most one batch per model is `running` (a partial unique index): one run per model at a
    time, enforced by the database whatever the broker does.
    """

    __tablename__ = "batches"
    __table_args__ = (
        Index(
            "uq_batches_one_running_per_model",
            "model_name",
            unique=True,
            sqlite_where=text("status = 'running'"),
            postgresql_where=text("status = 'running'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name"), index=True)
    status: Mapped[BatchStatus] = mapped_column(_enum(BatchStatus), default=BatchStatus.running)
    parent_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    result_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=1)
    error: Mapped[str | None] = mapped_column(Text)
    hold_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    parts: Mapped[list["ForgetRequestPart"]] = relationship(back_populates="batch")


class ForgetRequest(Base):
    """A subject's erasure: its samples, forgotten by every model that holds them (`model_name`
    None) or by one named model. Its status sums up its parts': completed when every part is,
    batched while any part is batched, else pending (service.requests.lifecycle).

    A request some of whose samples an earlier request's open part already covers gets no part for
    them and is linked to the newest such request (`linked_request_id`); it is completed only once
    the parts it relies on are. A client may withdraw it before any part is batched, and extend its
    deadline once (GDPR Art. 12(3)).
    """

    __tablename__ = "forget_requests"
    # For GET /forget-requests: status, or a time window, newest first.
    __table_args__ = (
        Index("ix_forget_requests_status_received_at", "status", "received_at"),
        Index("ix_forget_requests_received_at", "received_at"),
        # The scheduler asks every tick which completed requests wait for erasure: few, among many.
        Index("ix_forget_requests_awaiting_erasure", "completed_at",
              sqlite_where=text("status = 'completed' AND erased_at IS NULL"),
              postgresql_where=text("status = 'completed' AND erased_at IS NULL")),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id"), index=True)
    model_name: Mapped[str | None] = mapped_column(ForeignKey("models.name"))  # the scope; None: every model
    status: Mapped[RequestStatus] = mapped_column(_enum(RequestStatus))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    due_at: Mapped[datetime]  # the deadline, extended or not
    completed_at: Mapped[datetime | None]
    # When the copies of its samples that the service held were erased (service.requests.erasure).
    erased_at: Mapped[datetime | None]
    # When the data owner acknowledged (2xx) the request.erased webhook telling it which records to delete.
    erasure_acknowledged_at: Mapped[datetime | None]
    # The newest request whose open part covered one of this one's samples when it was filed.
    linked_request_id: Mapped[str | None] = mapped_column(ForeignKey("forget_requests.id"))
    withdrawn_at: Mapped[datetime | None]
    withdrawal_reason: Mapped[str | None] = mapped_column(Text)
    # Set by the one extension a request may have: the deadline before it, when and why.
    original_due_at: Mapped[datetime | None]
    extended_at: Mapped[datetime | None]
    extension_reason: Mapped[str | None] = mapped_column(Text)

    parts: Mapped[list["ForgetRequestPart"]] = relationship(back_populates="request",
                                                            order_by="ForgetRequestPart.model_name")
    samples: Mapped[list[Sample]] = relationship(secondary="forget_request_samples", order_by="Sample.id")


class ForgetRequestPart(Base):
    """What one model must do for a request: forget the request's samples that it holds. Claimed
    into a batch of that model, completed when the batch's version is deployed."""

    __tablename__ = "forget_request_parts"
    __table_args__ = (Index("ix_forget_request_parts_model_status", "model_name", "status"),)

    request_id: Mapped[str] = mapped_column(ForeignKey("forget_requests.id"), primary_key=True)
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name"), primary_key=True)
    status: Mapped[RequestStatus] = mapped_column(_enum(RequestStatus))
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"), index=True)
    completed_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    completed_at: Mapped[datetime | None]
    # The instant stage (semi-parametric models): the deployed version whose datastore no longer
    # holds the part's samples, and when it was deployed.
    instant_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    instant_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    # The part's evidence (GET /forget-requests/{id}/evidence) as it stood just before the samples
    # were erased: afterwards nothing can recompute it, so it is kept as it was.
    frozen_evidence: Mapped[dict | None]
    evidence_frozen_at: Mapped[datetime | None]

    request: Mapped[ForgetRequest] = relationship(back_populates="parts")
    batch: Mapped[Batch | None] = relationship(back_populates="parts")


class ForgetRequestSample(Base):
    __tablename__ = "forget_request_samples"

    request_id: Mapped[str] = mapped_column(ForeignKey("forget_requests.id"), primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), primary_key=True, index=True)


class Evaluation(Base):
    """FA, RA, TA, MIA of a version and of a retrain reference on the same splits, with the gaps."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    reference_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    metrics: Mapped[dict]
    reference_metrics: Mapped[dict]
    gaps: Mapped[dict]
    forget_count: Mapped[int]
    retain_count: Mapped[int]
    test_count: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Histograms of the membership score (per-sample loss, -ln of the true label's softmax
    # probability) on the forget and test splits, of the version and of the reference:
    # {"bin_edges": [...], "version": {"forget": [...], "test": [...]}, "reference": {...}}.
    # None for evaluations recorded before they were kept.
    score_histograms: Mapped[dict | None]
    reference: Mapped[ModelVersion] = relationship(foreign_keys=[reference_id])

    @property
    def approximate(self) -> bool:
        """Against an approximate reference (a coreset's): interim figures, labelled wherever shown."""
        return self.reference.approximate


class SampleScore(Base):
    """A version's figures on one training sample, computed by a worker (the API holds no model).

    Written when a batch runs (its parent version and its new version, on the batch's samples)
    and when an evaluation runs (the evaluated version and its reference, on every forgotten
    sample); a later computation replaces an earlier one. The evidence for a forget request.
    """

    __tablename__ = "sample_scores"

    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), primary_key=True, index=True)
    correct: Mapped[bool] = mapped_column(Boolean)  # the version predicts the sample's label
    confidence: Mapped[float]  # softmax probability of the true label
    # log(p / (1 - p)) of the true label, computed by the worker from all the classes' probabilities
    # (from `confidence` alone it is infinite wherever p rounds to 1): what the evidence compares with
    # the reference's. None on rows written before it was kept.
    confidence_logit: Mapped[float | None] = mapped_column(nullable=True)
    member: Mapped[bool] = mapped_column(Boolean)  # most of the MIA attackers call it a training member
    computed_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReferenceRequest(Base):
    """A retrain reference asked for, by an admin or by the schedule, until a worker records it.

    The scheduler sends the training task for an open request, and sends it again only after the
    broker's redelivery time (the task was lost, or it failed); an open request also stops the
    schedule from asking twice for the same state. After QFORGET_REFERENCE_MAX_ATTEMPTS failures a
    request is closed without a reference (`finished_at` set, `error` kept), and the schedule does
    not ask again for the same deployment: an admin can (POST /models/{model}/references).
    """

    __tablename__ = "reference_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name"), index=True)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    requested_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    # The deployment when it was asked for, and how many samples that version excludes.
    deployed_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    excluded_sample_count: Mapped[int]
    sent_at: Mapped[datetime | None]  # the last time the scheduler sent the task
    reference_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)  # the last failed attempt's error
    failed_attempts: Mapped[int] = mapped_column(default=0, server_default="0")


class AuditEntry(Base):
    """An append-only, hash-chained record of a state change."""

    __tablename__ = "audit_log"
    # For GET /audit/log's filters.
    __table_args__ = (
        Index("ix_audit_log_action", "action"),
        Index("ix_audit_log_object", "object_type", "object_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64), unique=True)


class ApiKey(Base):
    """A caller's credential. Only the key's sha256 is stored; `prefix` is its public, unique part,
    used to find the row and to name the caller (audit actor "key:<prefix>")."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[Role] = mapped_column(_enum(Role))
    # A submitter key may be limited to one model: it files and reads that model's requests only.
    model_name: Mapped[str | None] = mapped_column(ForeignKey("models.name"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None]
    revoked_by: Mapped[str | None] = mapped_column(String(128))


class IdempotencyRecord(Base):
    """The first response to a POST sent with an `Idempotency-Key`, replayed to its retries.

    Keys are scoped to the API key that sent them; `fingerprint` is the sha256 of the request body
    as parsed, so a retry with a different body is told so instead of being given the old answer.
    """

    __tablename__ = "idempotency_keys"

    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(SmallInteger)
    response_body: Mapped[dict]
    forget_request_id: Mapped[str | None] = mapped_column(ForeignKey("forget_requests.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class WebhookDelivery(Base):
    """One event to POST to the webhook endpoint (service/webhooks), recorded in the transaction of
    the change it reports, and what became of its attempts.

    `payload` is the body (which may name a subject) until the delivery is delivered or abandoned
    (its last attempt failed, and it was not retried within QFORGET_WEBHOOK_FAILED_RETENTION_HOURS);
    then it is cleared and only its sha256 stays. `attempt_log` holds every attempt, as
    {at, status_code, error, duration_ms}; `attempts` counts those since it was filed or retried.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the webhook-id header: "msg_..."
    event_type: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(ForeignKey("forget_requests.id"), index=True)
    payload: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))  # None is SQL NULL, not JSON null
    payload_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus), default=DeliveryStatus.pending)
    attempts: Mapped[int] = mapped_column(default=0)
    attempt_log: Mapped[list] = mapped_column(default=list)
    next_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(SmallInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]  # when its last attempt failed (the retention counts from here)

    @property
    def body_kept(self) -> bool:
        """Whether the body is still stored: until the delivery is delivered or abandoned."""
        return self.payload is not None
