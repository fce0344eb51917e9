"""Request and response bodies. Times are UTC (ISO 8601 with the offset).

Response bodies are read from what the domain's queries return (`from_attributes`): ORM objects,
rows, or small dataclasses that hold an ORM object with figures computed for it. A field named
otherwise than its source says where it reads from (`validation_alias`); the JSON and the OpenAPI
document use the field's own name.
"""

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, AliasPath, BaseModel, BeforeValidator, ConfigDict, Field

from service.core.models import RequestStatus, VersionKind, as_utc
from service.requests.intake import MAX_SAMPLES_PER_REQUEST
from service.requests.lifecycle import EXTENSION_MONTHS, MAX_REASON_LENGTH
from service.requests.samples import MAX_SAMPLES_PER_REGISTRATION

UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


def _to_utc(moment: datetime) -> datetime:
    # A time a caller sends, in UTC (SQLite stores the wall time without its offset). Naive means
    # UTC. Year 1 at +14:00 has no UTC equivalent: a 422, not an OverflowError.
    try:
        return as_utc(moment).astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("the time is out of range once converted to UTC") from None


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _not_a_number(value):
    # Pydantic would read a bare number as Unix time; the API documents ISO 8601 (RFC 3339) text.
    if isinstance(value, (int, float)) or (isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
        raise ValueError("expected an ISO 8601 date-time such as 2025-01-31T12:00:00Z, not a number")
    return value
# A time a caller sends: ISO 8601; naive means UTC; converted to UTC.
UtcInput = Annotated[datetime, BeforeValidator(_not_a_number), AfterValidator(_to_utc)]
# PostgreSQL text cannot hold the NUL character: refuse it here, for every string a caller sends,
# rather than fail in the driver.
NO_NUL = r"^[^\x00]*$"
# Ids are 32-bit integer keys; anything outside cannot name a row. In a body an id is a JSON
# integer, strictly: `true` is not sample 1, nor is "60" or 60.0 sample 60.
Id = Annotated[int, Field(strict=True, ge=1, le=2**31 - 1)]
_DECIMAL_DIGITS = re.compile(r"[0-9]+")


def _decimal_digits(value):
    # Path and query values are text, which pydantic's lax int parsing reads generously: "1.0",
    # "+1", " 1" and "1_0" would each name a row. Only plain decimal digits do.
    if isinstance(value, str) and not _DECIMAL_DIGITS.fullmatch(value):
        raise ValueError("expected a whole number in decimal digits, such as 12")
    return value


# For every integer path or query parameter, after its Path(...) or Query(...):
# `Annotated[int, Path(ge=1), DigitsOnly]` (placed before it, FastAPI would document the bounds as
# "ge" and "le" instead of "minimum" and "maximum").
DigitsOnly = BeforeValidator(_decimal_digits)


class ForgetRequestCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject_id: str = Field(
        min_length=1, max_length=128, pattern=NO_NUL, description="The data subject asking to be forgotten."
    )
    sample_ids: list[Id] | None = Field(
        default=None,
        description="The subject's samples to forget; omitted: all of the subject's active samples.",
        # Documented here, enforced by service.requests.intake for every caller, with its messages.
        json_schema_extra={"minItems": 1, "maxItems": MAX_SAMPLES_PER_REQUEST, "uniqueItems": True},
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=NO_NUL,
        description="The one model to forget them from; omitted: every model that holds them (a key limited "
        "to a model: that model).",
    )


Reason = Annotated[str, Field(min_length=1, max_length=MAX_REASON_LENGTH, pattern=NO_NUL)]


class WithdrawalCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason = Field(description="Why the request is withdrawn (kept on the request, not in the audit log).")


class ExtensionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    months: int = Field(
        strict=True, ge=min(EXTENSION_MONTHS), le=max(EXTENSION_MONTHS),
        description="How many calendar months the deadline moves (GDPR Art. 12(3): at most two further months). "
        "A day the month reached does not have becomes its last day: due 31 January plus one month is due "
        "28 (or 29) February, at the same time of day.",
    )
    reason: Reason = Field(description="Why the extension is necessary (kept on the request, not in the audit log).")


Item = TypeVar("Item")


class Page(BaseModel, Generic[Item]):
    """One page of a listing, in the order its route gives; `count` is the number of all that match."""

    data: list[Item]
    count: int


class RequestPartPublic(BaseModel):
    """What one model does for a request: forget the request's samples that it holds."""

    model_config = ConfigDict(from_attributes=True)

    model: str = Field(validation_alias="model_name")
    status: RequestStatus
    batch_id: int | None
    completed_version_id: int | None = Field(description="The deployed version of the model that forgot them.")
    completed_at: UtcDatetime | None
    instant_version_id: int | None = Field(
        default=None, description="A semi-parametric model only: the deployed version whose datastore no longer "
        "holds the samples (the instant stage), before the batch that unlearns its encoder.")
    instant_at: UtcDatetime | None = Field(default=None, description="When that version was deployed.")
    error: str | None = Field(description="The last failed attempt's error, while the part waits to run again.")


class ForgetRequestPublic(BaseModel):
    # Read from a service.requests.queries.FiledRequest: its request's columns, its sample ids and their
    # count, its parts. The hot path (service/api/hot_path.py) answers with it; a path into `request`
    # validates as fast as a plain attribute.
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(validation_alias=AliasPath("request", "id"))
    subject_id: str = Field(validation_alias=AliasPath("request", "subject_id"))
    model: str | None = Field(
        validation_alias=AliasPath("request", "model_name"),
        description="The one model the request was filed for; null: every model that held the samples.",
    )
    status: RequestStatus = Field(
        validation_alias=AliasPath("request", "status"),
        description="completed when every part is (each model that held the samples deployed a version that "
        "forgot them) and, for a linked request, the earlier requests' parts it relies on are; batched while a part "
        "is under way; instant when no part is pending and one took instant effect (a semi-parametric model's "
        "datastore no longer holds the samples; its encoder is unlearned by a later batch); withdrawn by the client "
        "before any part was batched; else pending.",
    )
    sample_ids: list[int]
    sample_count: int
    received_at: UtcDatetime = Field(validation_alias=AliasPath("request", "received_at"))
    due_at: UtcDatetime = Field(
        validation_alias=AliasPath("request", "due_at"),
        description="The GDPR Art. 12(3) deadline: received_at plus the deadline days, or as extended.",
    )
    completed_at: UtcDatetime | None = Field(
        validation_alias=AliasPath("request", "completed_at"), description="When its last part completed."
    )
    erased_at: UtcDatetime | None = Field(
        default=None, validation_alias=AliasPath("request", "erased_at"),
        description="When every copy of its samples the service held was erased (QFORGET_ERASURE_WINDOW_HOURS after "
        "completion, at the latest on the due date), its evidence frozen just before. A sample a model outside the "
        "request's scope still holds is erased when that model has forgotten it too.",
    )
    erasure_acknowledged_at: UtcDatetime | None = Field(
        default=None, validation_alias=AliasPath("request", "erasure_acknowledged_at"),
        description="When the data owner's endpoint answered 2xx to the request.erased webhook that told it which of "
        "its records to delete (docs/webhooks.md).",
    )
    linked_to: str | None = Field(
        validation_alias=AliasPath("request", "linked_request_id"),
        description="The newest earlier request whose open part covered some of these samples when this one was "
        "filed: those got no second part here, and this request is completed only once the parts it relies on are.",
    )
    withdrawn_at: UtcDatetime | None = Field(validation_alias=AliasPath("request", "withdrawn_at"))
    withdrawal_reason: str | None = Field(validation_alias=AliasPath("request", "withdrawal_reason"))
    original_due_at: UtcDatetime | None = Field(
        validation_alias=AliasPath("request", "original_due_at"), description="The deadline before its extension."
    )
    extended_at: UtcDatetime | None = Field(validation_alias=AliasPath("request", "extended_at"))
    extension_reason: str | None = Field(validation_alias=AliasPath("request", "extension_reason"))
    parts: list[RequestPartPublic] = Field(
        description="One per model the samples are forgotten from, by model name; none when every sample is "
        "covered by the request it is linked to."
    )


class SampleHoldingPublic(BaseModel):
    """A model on the sample's data set: whether it still holds the sample."""

    model_config = ConfigDict(from_attributes=True)

    model: str
    status: Literal["held", "forgotten"]
    forgotten_at: UtcDatetime | None
    version_id: int | None = Field(
        description="The version that forgot it (or the original, trained without it: never learned)."
    )


class SamplePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    dataset: str
    dataset_index: int = Field(description="The sample's stable position in the data set's training split.")
    subject_id: str
    models: list[SampleHoldingPublic] = Field(description="Every model on the sample's data set, by name.")


class RegisteredSamplePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    dataset: str
    dataset_index: int
    subject_id: str


class SubjectPublic(BaseModel):
    """A data subject: their samples, which model still holds each, and their forget requests (newest first)."""

    # Read from a service.requests.queries.SubjectRecord.
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(validation_alias=AliasPath("subject", "id"),
                    description="The subject's id; once every copy of its data was erased, its pseudonym instead.")
    created_at: UtcDatetime = Field(validation_alias=AliasPath("subject", "created_at"))
    erased_at: UtcDatetime | None = Field(validation_alias=AliasPath("subject", "erased_at"),
                                          description="When the last copy of the subject's data was erased.")
    held_sample_count: int = Field(description="Samples some model still holds.")
    forgotten_sample_count: int = Field(description="Samples no model holds any more.")
    samples: list[SamplePublic]
    requests: list[ForgetRequestPublic]


class SampleRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_index: int = Field(
        strict=True, ge=0, le=2**31 - 1, description="The sample's position in the training split."
    )
    subject_id: str = Field(min_length=1, max_length=128, pattern=NO_NUL, description="Its owner; created if new.")


class SamplesCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: list[SampleRegistration] = Field(
        min_length=1,
        max_length=MAX_SAMPLES_PER_REGISTRATION,
        description=f"Training samples and their subjects, at most {MAX_SAMPLES_PER_REGISTRATION} per call; "
        "each dataset_index at most once, none already registered.",
    )


class SamplesRegistered(BaseModel):
    dataset: str
    sample_count: int
    subjects_created: int = Field(description="How many of the subjects did not exist before.")
    samples: list[RegisteredSamplePublic]


class ModelVersionPublic(BaseModel):
    """An immutable model version with its lineage."""

    # Read from a row of service.deployments.queries.versions_page.
    model_config = ConfigDict(from_attributes=True)

    id: int
    model: str = Field(validation_alias="model_name")
    kind: VersionKind
    deployed: bool = Field(description="Whether this version is the model's deployment (the one serving).")
    parent_id: int | None = Field(description="The version it was made from (unlearned versions).")
    batch_id: int | None = Field(description="The batch of forget requests that made it.")
    method: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    sha256: str = Field(description="The artifact file's sha256: its content address and its ETag.")
    excluded_sample_count: int = Field(description="How many samples this version was made without.")
    approximate: bool = Field(
        default=False, description="A retrain reference trained on a coreset of the retain set "
        "(QFORGET_APPROXIMATE_REFERENCE_FRACTION; its coreset in metrics.coreset): an interim stand-in until the full "
        "reference of the same state exists; figures against it can be off by several points of AG (docs/audit.md).")
    created_at: UtcDatetime


class AuditEntryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: UtcDatetime
    actor: str = Field(description='Who made the change: "key:<prefix>", "worker:<id>", "cli:<user>".')
    action: str
    object_type: str
    object_id: str
    details: dict[str, Any]
    prev_hash: str
    entry_hash: str


class ChainReportPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    ok: bool = Field(description="Whether every entry's hashes fit its contents and its predecessor.")
    entries: int
    first_broken_id: int | None = Field(description="The first entry that does not fit, if any.")
    reason: str | None


class MetricsPublic(BaseModel):
    """Accuracy on the forget, retain and test sets and membership-inference efficacy, in percent."""

    FA: float
    RA: float
    TA: float
    MIA: float = Field(description="Mean over the membership attackers' draws (docs/audit.md).")
    MIA_sd: float | None = Field(default=None, description="The spread (sd) of MIA between the attackers' draws; "
                                 "None for figures recorded before MIA was averaged.")


class GapsPublic(BaseModel):
    """Absolute differences to the retrain reference, and AG, their average."""

    FA: float
    RA: float
    TA: float
    MIA: float
    AG: float


class EvaluationPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    version_id: int = Field(description="The model version evaluated.")
    reference_id: int = Field(description="The retrain reference it is compared with.")
    approximate: bool = Field(
        description="Against an approximate reference (trained on a coreset of the retain set): interim figures "
        "that can be off by several points of AG, until the full reference of the state is evaluated (docs/audit.md).")
    metrics: MetricsPublic
    reference_metrics: MetricsPublic
    gaps: GapsPublic
    forget_count: int
    retain_count: int
    test_count: int
    computed_at: UtcDatetime = Field(validation_alias="created_at")


class AuditPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    model: str
    deployed_version_id: int | None
    status: Literal["current", "interim", "stale", "missing"] = Field(
        description="current: the evaluation is of the deployed version against a full reference of its state; "
        "interim: against an approximate reference of its state (a coreset's; its figures can be off by several "
        "points of AG) until the full one is recorded; stale: only an older version has been evaluated, or the "
        "deployed one only against an approximate reference (that evaluation is given); missing: no evaluation at all."
    )
    approximate: bool = Field(default=False, description="The evaluation given is against an approximate reference.")
    message: str
    evaluation: EvaluationPublic | None
    reference: "ReferenceStatePublic | None" = Field(
        default=None, description="The deployed version against the retrain references; None when nothing is deployed."
    )


class HealthPublic(BaseModel):
    status: Literal["ok"]


class ReadyPublic(BaseModel):
    """Each dependency's state; `detail` says what is down."""

    status: Literal["ready", "not_ready"]
    database: Literal["ok", "down"]
    broker: Literal["ok", "down", "unchecked"] = Field(
        description="unchecked: a broker kind this probe does not know how to reach (not redis:// or filesystem://)."
    )
    detail: str | None = None


class ErrorPublic(BaseModel):
    """An error about the request as a whole (unknown id, service not ready)."""

    detail: str


# Every route that reads the database may answer this (service/api/app.py).
DATABASE_UNAVAILABLE = {503: {"model": ErrorPublic, "description": "The database is unavailable; retry later."}}
# Every route behind an API key (service/api/deps.py).
AUTH_ERRORS = {
    401: {"model": ErrorPublic, "description": "No API key, or not a valid one (unknown or revoked)."},
    403: {"model": ErrorPublic, "description": "The API key's role (or model) does not allow this."},
}
# Every route that takes a body (service/api/body_limit.py).
BODY_TOO_LARGE = {413: {"model": ErrorPublic, "description": "The body is larger than the stated limit."}}


class ProblemItem(BaseModel):
    loc: list[str | int] = Field(description='Where the problem is, e.g. ["body", "sample_ids"].')
    msg: str
    type: str


class ProblemPublic(BaseModel):
    """Problems with named fields: the same shape as FastAPI's validation errors."""

    detail: list[ProblemItem]


# The audit: a version against its retrain reference, per-request evidence, reference requests.


class ReferenceStatePublic(BaseModel):
    """How a version stands against the model's retrain references."""

    model_config = ConfigDict(from_attributes=True)

    status: Literal["matching", "stale", "missing"] = Field(
        description="matching: a reference excludes exactly the version's samples; stale: the newest reference "
        "excludes a different set (it is given, with the differences); missing: no reference at all."
    )
    message: str
    reference_id: int | None
    approximate: bool = Field(default=False, description="The reference is an approximate one (trained on a coreset "
                              "of the retain set): it stands in until the full reference of the state is recorded.")
    created_at: UtcDatetime | None
    excluded_sample_count: int | None = Field(description="How many samples the reference was trained without.")
    excluded_sample_ids: list[int] | None = Field(description="The exact samples the reference was trained without.")
    missing_from_reference: list[int] = Field(
        description="Samples the version excludes that the reference was still trained on (stale only)."
    )
    extra_in_reference: list[int] = Field(description="Samples the reference excludes and the version does not.")


AuditPublic.model_rebuild()  # its `reference` field names ReferenceStatePublic, defined above


class VersionAuditPublic(BaseModel):
    """One version's FA, RA, TA, MIA against the newest reference that excludes the same samples."""

    model_config = ConfigDict(from_attributes=True)

    version_id: int
    model: str
    kind: VersionKind
    deployed: bool
    method: str = Field(description="How the version was made (qat, qmul, retrain).")
    config: dict[str, Any] = Field(description="With what settings.")
    created_at: UtcDatetime
    excluded_sample_count: int
    status: Literal["current", "interim", "not_evaluated", "stale_reference", "missing_reference",
                    "not_applicable"] = Field(
        description="current: evaluated against a reference that excludes the same samples; interim: only against "
        "an approximate reference of its state (a coreset's; its figures can be off by several points of AG); "
        "not_evaluated: such a "
        "reference exists, this version was not evaluated against it; stale_reference: the newest reference "
        "excludes a different set; missing_reference: no reference yet; not_applicable: a reference itself, or "
        "a version that excludes nothing."
    )
    message: str
    reference: ReferenceStatePublic | None
    evaluation: EvaluationPublic | None


class ReferenceRequestPublic(BaseModel):
    """A retrain reference asked for; the scheduler sends the training task, a worker records it."""

    # Read from the request's columns with `queue` and `created` (service/api/routes/models.py).
    id: int
    model: str = Field(validation_alias="model_name")
    requested_at: UtcDatetime
    requested_by: str
    reason: str
    deployed_version_id: int | None = Field(description="The deployment when it was asked for.")
    excluded_sample_count: int = Field(description="How many samples that deployment excludes.")
    queue: str = Field(description="The Celery queue its training task goes to.")
    sent_at: UtcDatetime | None = Field(description="When the scheduler last sent the task; None: not yet.")
    reference_version_id: int | None = Field(description="The reference, once trained.")
    finished_at: UtcDatetime | None
    error: str | None = Field(description="The last failed attempt's error. A failed request stays open and is "
                                          "sent again, until QFORGET_REFERENCE_MAX_ATTEMPTS failures close it "
                                          "(finished_at set, no reference_version_id).")
    failed_attempts: int
    created: bool = Field(description="False: an open request for the same deployment existed and is given instead.")


class SampleFiguresPublic(BaseModel):
    """One version on one sample, computed by a worker."""

    model_config = ConfigDict(from_attributes=True)

    version_id: int
    correct: bool = Field(description="The version predicts the sample's label.")
    confidence: float = Field(description="The softmax probability of the true label (0 to 1).")
    confidence_logit: float | None = Field(
        default=None, description="log(p / (1 - p)) of the true label, computed from every class's probability "
        "(finite where p rounds to 1); what the comparison with the reference uses. None on figures recorded before "
        "it was kept.")
    member: bool = Field(description="Most of the MIA attackers (each fitted on the version's retain vs test, on its "
                         "own class-balanced draw of members) call it a member.")
    computed_at: UtcDatetime


class FiguresSummaryPublic(BaseModel):
    """One version on the request's samples."""

    model_config = ConfigDict(from_attributes=True)

    version_id: int
    sample_count: int = Field(description="How many of the request's samples have figures.")
    accuracy: float = Field(description="Percent of them the version predicts right.")
    mean_confidence: float = Field(description="Mean softmax probability of the true label.")
    member_share: float = Field(description="Percent of them the MIA attacker calls training members.")


class EvidenceSamplePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    sample_id: int
    dataset_index: int
    before: SampleFiguresPublic | None
    after: SampleFiguresPublic | None
    reference: SampleFiguresPublic | None
    reference_difference: float | None = Field(
        default=None, description="after minus reference on the logit-scaled true-label confidence (positive: the "
        "version is surer of the true label than a model that never saw the sample); None when either lacks it.")


class ReferenceComparisonPublic(BaseModel):
    """The version after against the reference, sample by sample, on the logit-scaled true-label confidence."""

    model_config = ConfigDict(from_attributes=True)

    version_id: int
    reference_id: int
    sample_count: int = Field(description="The request's samples both versions have the logit-scaled confidence for.")
    mean_difference: float = Field(description="Mean |after - reference| over them.")
    max_difference: float = Field(description="Largest |after - reference|.")
    above_count: int = Field(description="Samples whose |after - reference| exceeds the threshold.")
    above_share: float = Field(description="Percent of sample_count above the threshold.")
    threshold: float = Field(description="The |difference| that counts: what two references differing only in their "
                             "training seed exceed on 5% of their unseen samples.")
    threshold_source: str = Field(description="Where the threshold was measured.")
    verdict: str = Field(description="'indistinguishable from the reference on these samples' when no sample is "
                         "above the threshold, else 'differs from the reference on N of M samples'.")


class IntegerExportPublic(BaseModel):
    FA: float | None = Field(default=None, description="Forget accuracy of the integer export, percent.")
    MIA: float | None = Field(default=None, description="MIA efficacy of the integer export, percent.")
    fake_quantized_FA: float | None = None
    fake_quantized_MIA: float | None = None
    prediction_agreement: float | None = Field(default=None, description="Percent of the forget samples both models "
                                               "predict the same class for.")
    membership_agreement: float | None = Field(default=None, description="Percent of the forget samples both get the "
                                               "same membership call for.")
    within_tolerance: bool | None = Field(default=None, description="Both agreements at least 99 percent: FA and "
                                          "MIA of the two differ by at most one point.")
    error: str | None = Field(default=None, description="Why the export could not be checked (an architecture it "
                              "cannot rebuild).")


class DatastoreDeltaPublic(BaseModel):
    """What an edge device drops from a semi-parametric model's datastore to match the deployed one."""

    model_config = ConfigDict(from_attributes=True)

    model: str
    from_sha256: str = Field(description="The artifact the device holds.")
    to_sha256: str = Field(description="The deployed artifact (its ETag) the device has after dropping the rows.")
    to_version_id: int
    removed_dataset_indices: list[int] = Field(description="The dataset indices of the datastore rows to drop "
                                               "(the datastore's store_index); empty when the device is current.")


class InstantStagePublic(BaseModel):
    """A semi-parametric model's instant stage: its datastore no longer holds the request's samples."""

    model_config = ConfigDict(from_attributes=True)

    version_id: int = Field(description="The version deployed without the samples in its datastore.")
    at: UtcDatetime = Field(description="When it was deployed.")
    before: FiguresSummaryPublic | None = Field(description="The version deployed before it, on the samples.")
    after: FiguresSummaryPublic | None = Field(description="That version on the samples; None until the worker "
                                               "recorded its figures (seconds after the deployment).")


class EvidencePublic(BaseModel):
    """A forget request's samples before (the batch's parent version) and after (the version that
    completed it), against a retrain reference that never saw them."""

    # Read from a service.audit.evidence.Evidence, or from its dump as frozen when the samples were erased.
    model_config = ConfigDict(from_attributes=True, validate_by_name=True)

    request_id: str = Field(validation_alias=AliasPath("request", "id"))
    model: str = Field(description="The model whose part of the request this is.")
    request_status: RequestStatus = Field(validation_alias=AliasPath("request", "status"))
    status: Literal[
        "pending", "figures_missing", "reference_missing", "reference_stale", "interim", "complete"
    ] = Field(
        description="pending: not completed yet, no figures; figures_missing: "
        "completed but the worker recorded no figures for its versions; reference_missing: no reference excluding "
        "these samples has figures yet; reference_stale: the reference given excludes these samples but not the "
        "same set as the version after; interim: before, after and an approximate reference of the same state (a "
        "coreset's; its figures can be off by several points of AG) until the full one is recorded; complete: "
        "before, after and a matching full reference."
    )
    approximate: bool = Field(default=False, description="The reference given is an approximate one (trained on a "
                              "coreset of the retain set); evidence frozen before this was kept has none (false).")
    message: str
    sample_count: int
    before: FiguresSummaryPublic | None
    after: FiguresSummaryPublic | None
    reference: FiguresSummaryPublic | None
    samples: list[EvidenceSamplePublic]
    reference_comparison: ReferenceComparisonPublic | None = Field(
        default=None, description="The version after against the reference on each sample's logit-scaled "
        "confidence; None without a reference, or without that figure on both (figures recorded before it was "
        "kept).")
    integer_export: IntegerExportPublic | None = Field(
        default=None, description="Whether quantization brings forgetting back: the version after's integer export "
        "(the edge artifact) on the batch's forget set beside the fake-quantized model these figures are of; None for "
        "versions made before it was checked.")
    instant: InstantStagePublic | None = Field(
        default=None, description="A semi-parametric model only: its instant stage, the version whose datastore "
        "no longer holds the samples (deployed before the batch that unlearns the encoder), and the samples' figures "
        "in it and in the version before.")
    frozen_at: UtcDatetime | None = Field(
        default=None, description="Set once the request's samples were erased: the evidence as it stood then, kept "
        "unchanged (nothing can recompute it without the samples); later audits of the version rely on it.")


class AuditLogVerificationPublic(ChainReportPublic):
    ok: bool = Field(description="Whether every entry's keyed hash fits its contents and its predecessor, and the "
                     "log still holds every checkpointed head: nothing was edited, removed, cut off or wiped.")
    checkpoints: int = Field(description="The signed checkpoints of the chain's head (kept in the model store, "
                             "outside the database) the log was checked against.")


class SubjectRequestAuditPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    request_id: str
    received_at: UtcDatetime
    completed_at: UtcDatetime | None
    version_ids: list[int] = Field(description="The model versions its entries name: those that forgot its samples.")


class SubjectAuditPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    subject_pseudonym: str = Field(description="What the audit log records for the subject, never its id.")
    requests: list[SubjectRequestAuditPublic]
    entries: list[AuditEntryPublic] = Field(description="Every entry about the subject's requests, in the chain's order.")
