"""Training retrain references, with checkpoints a redelivered task resumes from."""

import hashlib
import json
import logging
from pathlib import Path

from sqlalchemy import Engine

from service.core.audit_log import append_audit
from service.core.db import transaction
from service.core.models import Model, ModelVersion, ReferenceRequest, VersionKind, utcnow
from service.core.settings import Settings
from service.requests.holdings import erased_indices, forgotten_by, held_by
from workers import engine as qf
from workers.runtime import WORKER_ID, artifact_spec, load_data, readable_indices

log = logging.getLogger(__name__)


def train_reference(engine: Engine, settings: Settings, model_name: str, reference_request_id: int | None = None,
                    progress: bool = False) -> int | None:
    """Train a retrain reference from scratch on the samples the model still holds. Returns its version id.

    With a reference request, the request is closed in the transaction that records the reference;
    a request already closed (a duplicate delivery) trains nothing and returns None.
    """
    with transaction(engine) as session:
        model = session.get(Model, model_name)
        if model is None:
            raise ValueError(f"unknown model {model_name!r}")
        if reference_request_id is not None:
            request = session.get(ReferenceRequest, reference_request_id)
            if request is None or request.finished_at is not None:
                log.info("reference request %s is closed already: nothing to train", reference_request_id)
                return None
        held_indices = sorted(row.dataset_index for row in session.execute(held_by(model.name, model.dataset)))
        excluded = list(forgotten_by(session, model.name))
        spec = qf.ModelSpec.from_dict(model.spec)
        erased = erased_indices(session, model.dataset)
    data = load_data(spec, erased)
    active_indices, unreadable = readable_indices(held_indices, len(data.train))
    if unreadable:
        log.warning("reference for %s: %d samples beyond the data set's %d skipped", model_name, unreadable,
                    len(data.train))
    retain = data.train.subset(active_indices)
    checkpoint = None if reference_request_id is None else reference_checkpoint(
        settings, reference_request_id, spec, active_indices)
    reference = qf.retrain_reference(spec, retain, device=settings.torch_device, progress=progress,
                                     checkpoint=checkpoint, checkpoint_every_s=settings.checkpoint_every_seconds,
                                     indices=active_indices)
    path, sha256 = qf.save_artifact(reference, artifact_spec(spec), Path(settings.model_store))
    with transaction(engine) as session:
        if set(erased_indices(session, spec.dataset)) & set(active_indices):
            # Forgotten by the model and erased while this trained: the reference must not exist.
            path.unlink(missing_ok=True)
            raise ErasedDuringTraining("samples this reference trained on were erased meanwhile; it is trained again")
        version = ModelVersion(
            model_name=model_name,
            kind=VersionKind.reference,
            method="retrain",
            config=spec.to_dict(),
            metrics={"RA": qf.accuracy(reference, retain, settings.torch_device),
                     "TA": qf.accuracy(reference, data.test, settings.torch_device)},
            sha256=sha256,
            artifact_path=str(path),
            excluded_sample_ids=sorted(excluded),
        )
        session.add(version)
        session.flush()
        details = {"model": model_name, "excluded_samples": len(excluded),
                   "retain_samples": len(active_indices), "sha256": sha256}
        if reference_request_id is not None:
            request = session.get(ReferenceRequest, reference_request_id, with_for_update=True)
            request.reference_version_id, request.finished_at, request.error = version.id, utcnow(), None
            details["reference_request_id"] = reference_request_id
        append_audit(session, actor=f"worker:{WORKER_ID}", action="reference.trained",
                     object_type="model_version", object_id=str(version.id), details=details)
        version_id = version.id
    if reference_request_id is not None:  # others of the request's, for a retain set since changed
        drop_reference_checkpoints(settings, reference_request_id)
    return version_id


class ErasedDuringTraining(RuntimeError):
    """Samples a reference trained on were erased before it was recorded."""


def reference_checkpoint(settings: Settings, reference_request_id: int, spec: qf.ModelSpec,
                         active_indices: list[int]) -> Path:
    """Where a request's reference training keeps its checkpoint: named by the request and the exact
    retain set, so that a retried or redelivered task resumes, and one that finds more samples
    forgotten since starts over (a reference must never have trained on them)."""
    trained_on = json.dumps([spec.to_dict(), active_indices], sort_keys=True).encode()
    return (Path(settings.model_store) / "checkpoints"
            / f"reference-{reference_request_id}-{hashlib.sha256(trained_on).hexdigest()[:16]}.pt")


def drop_reference_checkpoints(settings: Settings, reference_request_id: int) -> int:
    """Delete a request's checkpoints (a closed request's: they may hold samples forgotten since, and
    nothing resumes them). Returns how many there were."""
    paths = list((Path(settings.model_store) / "checkpoints").glob(f"reference-{reference_request_id}-*.pt"))
    for path in paths:
        path.unlink(missing_ok=True)
    return len(paths)


def record_reference_failure(engine: Engine, settings: Settings, reference_request_id: int,
                             error: BaseException) -> None:
    """A reference run raised: the error goes on the request, which stays open (the scheduler sends
    it again after the redelivery time) until it has failed QFORGET_REFERENCE_MAX_ATTEMPTS times;
    then it is closed without a reference ("reference.abandoned")."""
    with transaction(engine) as session:
        request = session.get(ReferenceRequest, reference_request_id, with_for_update=True)
        if request is None or request.finished_at is not None:
            return
        request.error = f"{type(error).__name__}: {error}"
        request.failed_attempts += 1
        abandoned = request.failed_attempts >= settings.reference_max_attempts
        if abandoned:
            request.finished_at = utcnow()
            drop_reference_checkpoints(settings, reference_request_id)
        append_audit(session, actor=f"worker:{WORKER_ID}",
                     action="reference.abandoned" if abandoned else "reference.failed",
                     object_type="model", object_id=request.model_name,
                     details={"reference_request_id": reference_request_id, "error": request.error,
                              "failed_attempts": request.failed_attempts})
