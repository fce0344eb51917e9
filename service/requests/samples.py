"""Registering a data set's training samples and their subjects (a deployment's id-to-subject map).

Plain functions over a Session, like service.requests.intake: every check runs before the first
write, so a refused registration leaves nothing behind; the work is a fixed number of statements
whatever the number of samples.
"""

from collections import Counter

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from service.core.audit_log import append_audit
from service.core.models import Dataset, Sample, Subject
from service.requests.problems import RequestConflict, RequestValidationProblem, format_ids

MAX_SAMPLES_PER_REGISTRATION = 10_000


def register_samples(
    session: Session, *, dataset: str, samples: list[tuple[int, str]], actor: str
) -> tuple[list[Sample], int]:
    """Register `(dataset_index, subject_id)` pairs as active samples of `dataset`, creating the
    subjects that do not exist yet. Returns the samples (by dataset_index) and how many subjects
    were created.

    Raises:
        RequestValidationProblem: an empty or oversized list, an index listed twice, a data set no
            model was bootstrapped on, or an index beyond its training split; RequestConflict (409)
            when some indexes are already registered in the data set.
    """
    if not samples:
        raise RequestValidationProblem("samples", "the list is empty", error_type="too_short")
    if len(samples) > MAX_SAMPLES_PER_REGISTRATION:
        raise RequestValidationProblem(
            "samples",
            f"{len(samples)} samples, more than the {MAX_SAMPLES_PER_REGISTRATION} one call may register",
            error_type="too_long",
        )
    indexes = [index for index, _ in samples]
    repeated = [index for index, count in Counter(indexes).items() if count > 1]
    if repeated:
        raise RequestValidationProblem(
            "samples", f"dataset_index listed more than once: {format_ids(repeated)}", error_type="duplicate_samples"
        )
    # A sample the data set does not have would sit in every retain set of its models.
    train_size = session.scalar(select(Dataset.train_size).where(Dataset.name == dataset))
    if train_size is None:
        raise RequestValidationProblem(
            "dataset", f"unknown data set {dataset!r}: no model has been bootstrapped on it", error_type="unknown_dataset",
            location="path",
        )
    beyond = [index for index in indexes if not 0 <= index < train_size]
    if beyond:
        raise RequestValidationProblem(
            "samples",
            f"dataset_index beyond data set {dataset!r}'s training split (0 to {train_size - 1}): {format_ids(beyond)}",
            error_type="index_out_of_range",
        )
    registered = list(
        session.scalars(
            select(Sample.dataset_index).where(Sample.dataset == dataset, Sample.dataset_index.in_(indexes))
        )
    )
    if registered:
        raise RequestConflict(
            "samples",
            f"dataset_index already registered in data set {dataset!r}: {format_ids(registered)}",
            error_type="samples_already_registered",
        )

    subject_ids = sorted({subject for _, subject in samples})
    existing = set(session.scalars(select(Subject.id).where(Subject.id.in_(subject_ids))))
    new_subjects = [subject for subject in subject_ids if subject not in existing]
    if new_subjects:
        session.execute(insert(Subject), [{"id": subject} for subject in new_subjects])
    session.execute(
        insert(Sample),
        [{"dataset": dataset, "dataset_index": index, "subject_id": subject} for index, subject in samples],
    )
    created = list(
        session.scalars(
            select(Sample)
            .where(Sample.dataset == dataset, Sample.dataset_index.in_(indexes))
            .order_by(Sample.dataset_index)
        )
    )
    # Counts only: the audit log is append-only, so it should not become a second copy of the map.
    append_audit(
        session, actor=actor, action="samples.registered", object_type="dataset", object_id=dataset,
        details={"samples": len(created), "subjects_created": len(new_subjects)},
    )
    return created, len(new_subjects)
