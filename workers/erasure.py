"""Erasing every copy the service holds of completed requests' samples: the worker's side, which
has the model store and the decoded-image caches (the steps: service/requests/erasure.py)."""

import logging
from datetime import timedelta

from sqlalchemy import Engine, select

from service.core.db import drop_deleted_content, transaction
from service.core.models import ForgetRequest, Model, ReferenceRequest, utcnow
from service.core.settings import Settings
from service.deployments.retention import delete_artifacts_carrying
from service.requests.erasure import Tombstoned, close_erasure, freeze_and_tombstone, requests_due
from service.requests.holdings import erased_indices
from workers import engine as qf
from workers.references.training import drop_reference_checkpoints
from workers.runtime import WORKER_ID, load_data

log = logging.getLogger(__name__)


def erase_due_requests(engine: Engine, settings: Settings) -> list[str]:
    """Erase the copies of every request whose erasure window has passed. Returns their ids."""
    with transaction(engine) as session:
        due = requests_due(session, utcnow(), timedelta(hours=settings.erasure_window_hours))
    erased_requests = [request_id for request_id in due if erase_request(engine, settings, request_id)]
    if erased_requests:
        drop_deleted_content(engine)  # once for the sweep: on SQLite it rebuilds the whole file
    return erased_requests


def erase_request(engine: Engine, settings: Settings, request_id: str) -> bool:
    """Freeze the request's evidence, tombstone its samples, erase their copies, record it. False
    when another worker holds the request or it was erased already."""
    actor = f"worker:{WORKER_ID}"
    with transaction(engine) as session:
        request = _locked(session, request_id)
        if request is None:
            return False
        tombstoned = freeze_and_tombstone(session, request, utcnow())
    # From here the samples are unreadable to every code path; what follows removes the files'
    # copies. A crash leaves the request not erased: the next sweep does it all again.
    files = _erase_files(engine, settings, tombstoned)
    with transaction(engine) as session:
        request = _locked(session, request_id)
        if request is None:
            return False
        close_erasure(session, request, tombstoned, files, actor, utcnow())
    log.info("forget request erased: %d samples, %d still held by a model outside its scope",
             tombstoned.count, tombstoned.still_held)
    return True


def _locked(session, request_id: str) -> ForgetRequest | None:
    """The request, locked, if it waits for erasure; None if another worker holds it or it is done."""
    request = session.scalar(select(ForgetRequest).where(ForgetRequest.id == request_id)
                             .with_for_update(skip_locked=True))
    return request if request is not None and request.erased_at is None else None


def _erase_files(engine: Engine, settings: Settings, tombstoned: Tombstoned) -> dict:
    """Rewrite the decoded-image caches of every model's data without the data set's tombstoned
    samples, and delete the reference checkpoints and the version artifacts that carry them."""
    deleted_versions: list[int] = []
    rewritten = dropped_checkpoints = 0
    for dataset, sample_ids in tombstoned.sample_ids.items():
        with transaction(engine) as session:
            models = session.execute(select(Model.name, Model.spec).where(Model.dataset == dataset)).all()
            erased = erased_indices(session, dataset)
            # Checkpoints of reference trainings started before these samples were forgotten hold them.
            reference_requests = session.scalars(select(ReferenceRequest.id).where(
                ReferenceRequest.model_name.in_([name for name, _ in models]))).all()
            deleted_versions += delete_artifacts_carrying(session, dataset, sample_ids)
        for request_id in reference_requests:
            dropped_checkpoints += drop_reference_checkpoints(settings, request_id)
        for _, spec in models:
            # Loading with the tombstones would blank them too; erasing here says whether a cache held any.
            data = load_data(qf.ModelSpec.from_dict(spec), [])
            rewritten += data.train.erase(erased)
    return {"artifacts_deleted": deleted_versions, "cache_files_rewritten": rewritten,
            "checkpoints_deleted": dropped_checkpoints}
