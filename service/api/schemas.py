"""Request and response bodies. Times are UTC (ISO 8601 with the offset)."""

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.forget_requests import MAX_SAMPLES_PER_REQUEST
from service.models import ForgetRequest, RequestStatus, as_utc

UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]
# PostgreSQL text cannot hold the NUL character: refuse it here, for every string a caller sends,
# rather than fail in the driver.
NO_NUL = r"^[^\x00]*$"
# Sample ids are 32-bit integer keys; anything outside cannot name a sample.
SampleId = Annotated[int, Field(ge=1, le=2**31 - 1)]


class ForgetRequestCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject_id: str = Field(
        min_length=1, max_length=128, pattern=NO_NUL, description="The data subject asking to be forgotten."
    )
    sample_ids: list[SampleId] | None = Field(
        default=None,
        description="The subject's samples to forget; omitted: all of the subject's active samples.",
        # Documented here, enforced by service.forget_requests for every caller, with its messages.
        json_schema_extra={"minItems": 1, "maxItems": MAX_SAMPLES_PER_REQUEST, "uniqueItems": True},
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=NO_NUL,
        description="The model to forget them from; omitted: the default.",
    )


class ForgetRequestPublic(BaseModel):
    id: str
    subject_id: str
    model: str
    status: RequestStatus
    sample_ids: list[int]
    sample_count: int
    received_at: UtcDatetime
    due_at: UtcDatetime = Field(description="The GDPR Art. 12(3) deadline: received_at plus the deadline days.")
    batch_id: int | None
    completed_version_id: int | None = Field(description="The deployed model version that forgot the samples.")
    completed_at: UtcDatetime | None
    error: str | None

    @classmethod
    def of(cls, request: ForgetRequest, sample_ids: list[int]) -> "ForgetRequestPublic":
        return cls(
            id=request.id,
            subject_id=request.subject_id,
            model=request.model_name,
            status=request.status,
            sample_ids=sample_ids,
            sample_count=len(sample_ids),
            received_at=request.received_at,
            due_at=request.due_at,
            batch_id=request.batch_id,
            completed_version_id=request.completed_version_id,
            completed_at=request.completed_at,
            error=request.error,
        )


class MetricsPublic(BaseModel):
    """Accuracy on the forget, retain and test sets and membership-inference efficacy, in percent."""

    FA: float
    RA: float
    TA: float
    MIA: float


class GapsPublic(MetricsPublic):
    """Absolute differences to the retrain reference, and AG, their average."""

    AG: float


class EvaluationPublic(BaseModel):
    id: int
    version_id: int = Field(description="The model version evaluated.")
    reference_id: int = Field(description="The retrain reference it is compared with.")
    metrics: MetricsPublic
    reference_metrics: MetricsPublic
    gaps: GapsPublic
    forget_count: int
    retain_count: int
    test_count: int
    computed_at: UtcDatetime


class AuditPublic(BaseModel):
    model: str
    deployed_version_id: int | None
    status: Literal["current", "stale", "missing"] = Field(
        description="current: the evaluation is of the deployed version; stale: only an older version "
        "has been evaluated (that evaluation is given); missing: no evaluation at all."
    )
    message: str
    evaluation: EvaluationPublic | None


class HealthPublic(BaseModel):
    status: Literal["ok"]


class ReadyPublic(BaseModel):
    status: Literal["ready"]
    database: Literal["ok"]


class ErrorPublic(BaseModel):
    """An error about the request as a whole (unknown id, service not ready)."""

    detail: str


# Every route that reads the database may answer this (service/api/app.py).
DATABASE_UNAVAILABLE = {503: {"model": ErrorPublic, "description": "The database is unavailable; retry later."}}


class ProblemItem(BaseModel):
    loc: list[str | int] = Field(description='Where the problem is, e.g. ["body", "sample_ids"].')
    msg: str
    type: str


class ProblemPublic(BaseModel):
    """Problems with named fields: the same shape as FastAPI's validation errors."""

    detail: list[ProblemItem]
