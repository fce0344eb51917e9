"""Which model holds which sample: the record erasure is decided on.

A model learned every sample of its data set's training split (positions below the data set's
`train_size`), and holds each until it forgets it; a model bootstrapped after a sample's erasure
was asked never learned it. Both are rows of `forgotten_samples`, the only thing stored: a model
holds a registered sample of its data set exactly when no such row names the two. A version
carries its model's samples but its `excluded_sample_ids`. A sample no model holds may be erased
(service.requests.erasure): its tombstone, `samples.erased_at`, is what data loading blanks.
"""

from sqlalchemy import Select, exists, select
from sqlalchemy.orm import Session

from service.core.models import Dataset, ForgottenSample, Model, Sample


def held_by(model_name: str, dataset: str) -> Select:
    """Id and dataset index of every sample the model holds, by id."""
    forgotten = exists().where(ForgottenSample.model_name == model_name, ForgottenSample.sample_id == Sample.id)
    return (
        select(Sample.id, Sample.dataset_index)
        .join(Dataset, Dataset.name == Sample.dataset)
        .where(Sample.dataset == dataset, Sample.dataset_index < Dataset.train_size, ~forgotten)
        .order_by(Sample.id)
    )


def forgotten_by(session: Session, model_name: str) -> dict[int, object]:
    """{sample id: when the model forgot it} of every sample the model no longer holds."""
    return dict(session.execute(
        select(ForgottenSample.sample_id, ForgottenSample.forgotten_at).where(ForgottenSample.model_name == model_name)
    ).all())


def holders(session: Session, sample_ids: list[int]) -> dict[str, list[int]]:
    """{model name: the given samples it holds, ascending} for every deployed model holding any."""
    if not sample_ids:
        return {}
    forgotten = exists().where(ForgottenSample.model_name == Model.name, ForgottenSample.sample_id == Sample.id)
    rows = session.execute(
        select(Model.name, Sample.id)
        .join(Sample, Sample.dataset == Model.dataset)
        .join(Dataset, Dataset.name == Sample.dataset)
        .where(Sample.id.in_(sample_ids), Sample.dataset_index < Dataset.train_size,
               Model.deployed_version_id.is_not(None), ~forgotten)
        .order_by(Model.name, Sample.id)
    )
    held: dict[str, list[int]] = {}
    for model_name, sample_id in rows:
        held.setdefault(model_name, []).append(sample_id)
    return held


def erased_indices(session: Session, dataset: str) -> list[int]:
    """The dataset indices of the data set's tombstoned samples, ascending: what data loading blanks."""
    return list(session.scalars(
        select(Sample.dataset_index).where(Sample.dataset == dataset, Sample.erased_at.is_not(None))
        .order_by(Sample.dataset_index)
    ))
