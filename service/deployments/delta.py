"""The datastore delta for edge devices: what a device holding an earlier artifact of a
semi-parametric model must drop from its datastore to match the deployed one.

Between two versions whose encoder is the same (every version on the way is an instant stage,
workers/instant.py, which only removes rows), the datastore changes by the rows it lost: the
device deletes the rows of those dataset indices and has the deployed datastore, byte for byte in
its rows. Once a batch unlearned the encoder, every embedding changed: no delta, the device fetches
the whole artifact.
"""

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import ForgetRequestPart, ForgetRequestSample, Model, ModelVersion, Sample

# Written by workers.instant (its METHOD): a version that only removed datastore rows.
DATASTORE_REMOVAL = "datastore-removal"


class NoDelta(Exception):
    """No delta leads from that version to the deployed one; the message says why."""


@dataclass(frozen=True)
class DatastoreDelta:
    model: str
    from_sha256: str
    to_sha256: str
    to_version_id: int
    removed_dataset_indices: list[int]


def datastore_delta(session: Session, model: Model, since_sha256: str) -> DatastoreDelta:
    """The rows (dataset indices) to drop from the artifact `since_sha256` of the model to get its
    deployed datastore. NoDelta when the model is not semi-parametric, that artifact is not an
    ancestor of the deployed version, or a version between them changed the encoder."""
    if not model.semi_parametric:
        raise NoDelta(f"model {model.name!r} is not semi-parametric: it has no datastore")
    deployed = session.get(ModelVersion, model.deployed_version_id)
    chain, version = [], deployed
    while version.sha256 != since_sha256:
        if version.method != DATASTORE_REMOVAL:
            raise NoDelta(f"version {version.id} of model {model.name!r} changed more than its datastore since, or "
                          "that artifact is not one of its ancestors: fetch the whole artifact")
        chain.append(version.id)
        version = session.get(ModelVersion, version.parent_id)
    removed = session.scalars(
        select(Sample.dataset_index).distinct()
        .join(ForgetRequestSample, ForgetRequestSample.sample_id == Sample.id)
        .join(ForgetRequestPart, ForgetRequestPart.request_id == ForgetRequestSample.request_id)
        .where(ForgetRequestPart.model_name == model.name, ForgetRequestPart.instant_version_id.in_(chain),
               Sample.dataset == model.dataset)
        .order_by(Sample.dataset_index)
    ).all() if chain else []
    return DatastoreDelta(model.name, since_sha256, deployed.sha256, deployed.id, list(removed))
