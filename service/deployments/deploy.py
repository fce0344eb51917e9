"""Deploying model versions, and the admin decisions around deployment (docs/design.md,
invariants 2 and 4).

Database work only, no model code, inside the caller's transaction: the worker deploys through
`deploy_version`, and the API's admin routes approve or discard a batch the quality gate held, or
roll back, through the rest.
"""

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from service.core.audit_log import append_audit, audit_key
from service.core.models import (
    Batch,
    BatchStatus,
    ForgetRequestPart,
    ForgottenSample,
    Model,
    ModelVersion,
    RequestStatus,
    VersionKind,
    utcnow,
)
from service.core.pseudonyms import pseudonym
from service.requests import lifecycle
from service.requests.holdings import forgotten_by


def deploy_version(session: Session, batch: Batch, model: Model, version: ModelVersion, forget_ids: list[int],
                   actor: str) -> None:
    """Deployment pointer, samples forgotten by the model, completed batch, parts and requests: all in
    the caller's transaction."""
    now = utcnow()  # one moment for the deployment: samples forgotten, batch and parts completed
    model.deployed_version_id = version.id
    if forget_ids:
        session.execute(insert(ForgottenSample), [
            {"model_name": model.name, "sample_id": sample_id, "forgotten_at": now, "version_id": version.id}
            for sample_id in forget_ids
        ])
    append_audit(session, actor=actor, action="model.deployed", object_type="model_version",
                 object_id=str(version.id),
                 details={"model": model.name, "parent_version_id": batch.parent_version_id,
                          "batch_id": batch.id, "sha256": version.sha256, "metrics": version.metrics})
    key = audit_key(session)  # the log names samples by their pseudonyms only
    append_audit(session, actor=actor, action="samples.forgotten", object_type="batch",
                 object_id=str(batch.id),
                 details={"sample_pseudonyms": [pseudonym(key, "sample", sample_id) for sample_id in forget_ids],
                          "version_id": version.id})
    lifecycle.complete(session, batch, version, actor, now)


class AdminRefusal(Exception):
    """An admin action that would break an invariant; the message says which."""


class UnknownObject(AdminRefusal):
    """The batch or version the action names does not exist."""


def _held_batch(session, batch_id: int) -> Batch:
    batch = session.get(Batch, batch_id, with_for_update=True)
    if batch is None:
        raise UnknownObject(f"batch {batch_id} does not exist")
    if batch.status != BatchStatus.held:
        raise AdminRefusal(f"batch {batch_id} is {batch.status.value}, not held")
    return batch


def approve_batch(session: Session, batch_id: int, actor: str) -> int:
    """Deploy a held batch's version despite the quality gate. Returns the version id."""
    batch = _held_batch(session, batch_id)
    model = session.get(Model, batch.model_name, with_for_update=True)
    if model.deployed_version_id != batch.parent_version_id:
        raise AdminRefusal(f"batch {batch_id} was run from version {batch.parent_version_id}, "
                           f"but version {model.deployed_version_id} is deployed now")
    version = session.get(ModelVersion, batch.result_version_id)
    parent = session.get(ModelVersion, batch.parent_version_id)
    # What the run forgot: the version's lineage, not the batch's requests (whose samples some other
    # model may be the only one to hold).
    forget_ids = sorted(set(version.excluded_sample_ids) - set(parent.excluded_sample_ids))
    append_audit(session, actor=actor, action="batch.approved", object_type="batch",
                 object_id=str(batch.id), details={"version_id": version.id, "hold_reason": batch.hold_reason})
    deploy_version(session, batch, model, version, forget_ids, actor)
    return version.id


def discard_batch(session: Session, batch_id: int, actor: str, new_config: dict | None = None) -> None:
    """Refuse a held batch: its parts go back to pending, optionally with new Q-MUL settings.

    `new_config` holds QMulConfig fields; the caller (the API's schema) has validated them.
    """
    batch = _held_batch(session, batch_id)
    if new_config is not None:
        session.get(Model, batch.model_name).unlearn_config = new_config
    lifecycle.discard(session, batch, actor, new_config)


def rollback(session: Session, model_name: str, version_id: int, actor: str) -> None:
    """Deploy an earlier version, only if it has already forgotten every sample the model forgot."""
    model = session.get(Model, model_name, with_for_update=True)
    version = session.get(ModelVersion, version_id)
    if model is None or version is None or version.model_name != model_name:
        raise UnknownObject(f"version {version_id} is not a version of model {model_name!r}")
    if version.kind == VersionKind.reference:
        raise AdminRefusal(f"version {version_id} is a retrain reference, never deployed")
    if version.artifact_deleted_at is not None:
        raise AdminRefusal(f"version {version_id}'s artifact was deleted by the retention policy")
    forgotten = set(forgotten_by(session, model_name))
    remembered = sorted(forgotten - set(version.excluded_sample_ids))
    if remembered:
        raise AdminRefusal(f"version {version_id} was made before {len(remembered)} forgotten samples "
                           f"were forgotten (e.g. sample {remembered[0]}): deploying it would bring them back")
    # A semi-parametric model's datastore lost samples at their instant stage, before the batch that
    # forgets them: every version made after that stage's is without them (workers/instant.py keeps the
    # batch's version so), every version before it still holds them.
    newest_instant = session.scalar(select(func.max(ForgetRequestPart.instant_version_id)).where(
        ForgetRequestPart.model_name == model_name, ForgetRequestPart.status != RequestStatus.completed))
    if newest_instant is not None and version.id < newest_instant:
        raise AdminRefusal(f"version {version_id}'s datastore still holds samples that version {newest_instant} "
                           "removed at their instant stage: deploying it would bring them back")
    previous = model.deployed_version_id
    model.deployed_version_id = version.id
    append_audit(session, actor=actor, action="model.rolled_back", object_type="model_version",
                 object_id=str(version.id), details={"model": model_name, "previous_version_id": previous})
