"""Training retrain references, with checkpoints a redelivered task resumes from; and, when
QFORGET_APPROXIMATE_REFERENCE_FRACTION is set, an approximate one on a coreset first (docs/audit.md)."""

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from service.audit.comparison import references_newest_first
from service.core.audit_log import append_audit
from service.core.db import transaction
from service.core.models import Model, ModelVersion, ReferenceRequest, VersionKind, utcnow
from service.core.settings import Settings
from service.requests.holdings import erased_indices, forgotten_by, held_by
from workers import engine as qf
from workers.engine.coresets import select_coreset
from workers.runtime import WORKER_ID, artifact_spec, load_data, readable_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetainState:
    """What a reference of the model's current state trains on."""

    spec: qf.ModelSpec
    excluded: list[int]  # the model's forgotten sample ids
    active_indices: list[int]  # dataset indices of the samples it still holds (readable ones)
    retain: qf.Split  # those samples
    test: qf.Split
    deployed: ModelVersion | None  # the selectors of an approximate reference score the samples with it


def _retain_state(engine: Engine, model_name: str, reference_request_id: int | None) -> RetainState | None:
    """The model's current retain set; None when the reference request is closed already."""
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
        deployed = None if model.deployed_version_id is None else session.get(ModelVersion, model.deployed_version_id)
    data = load_data(spec, erased)
    active_indices, unreadable = readable_indices(held_indices, len(data.train))
    if unreadable:
        log.warning("reference for %s: %d samples beyond the data set's %d skipped", model_name, unreadable,
                    len(data.train))
    return RetainState(spec, excluded, active_indices, data.train.subset(active_indices), data.test, deployed)


def train_reference(engine: Engine, settings: Settings, model_name: str, reference_request_id: int | None = None,
                    progress: bool = False) -> int | None:
    """Train a retrain reference from scratch on the samples the model still holds. Returns its version id.

    With a reference request, the request is closed in the transaction that records the reference;
    a request already closed (a duplicate delivery) trains nothing and returns None.
    """
    state = _retain_state(engine, model_name, reference_request_id)
    if state is None:
        return None
    spec, active_indices, retain = state.spec, state.active_indices, state.retain
    checkpoint = None if reference_request_id is None else reference_checkpoint(
        settings, reference_request_id, spec, active_indices)
    reference = qf.retrain_reference(spec, retain, device=settings.torch_device, progress=progress,
                                     checkpoint=checkpoint, checkpoint_every_s=settings.checkpoint_every_seconds,
                                     indices=active_indices)
    version_id = _record_reference(engine, settings, model_name, state, reference, active_indices,
                                   reference_request_id=reference_request_id)
    if reference_request_id is not None:  # others of the request's, for a retain set since changed
        drop_reference_checkpoints(settings, reference_request_id)
    return version_id


def train_approximate_reference(engine: Engine, settings: Settings, model_name: str, reference_request_id: int,
                                progress: bool = False) -> int | None:
    """For a reference request, with QFORGET_APPROXIMATE_REFERENCE_FRACTION set: the reference's recipe on
    a coreset of the same retain set (QFORGET_APPROXIMATE_REFERENCE_SELECTOR's choice, scored with the
    deployed version), recorded as an approximate reference for an interim audit. The request stays
    open: the full reference still comes (train_reference) and supersedes it. Returns its version id;
    None when off, the request is closed, or a reference of this state exists (a redelivery)."""
    fraction, selector = settings.approximate_reference_fraction, settings.approximate_reference_selector
    if fraction is None:
        return None
    state = _retain_state(engine, model_name, reference_request_id)
    if state is None:
        return None
    with transaction(engine) as session:
        if any(set(reference.excluded_sample_ids) == set(state.excluded)
               for reference in references_newest_first(session, model_name)):
            return None
    started = time.monotonic()
    retain = state.retain
    # Only RES and JSCDS score the samples: a random draw needs no model loaded.
    scorer = None if selector == "random" else qf.load_artifact(
        Path(state.deployed.artifact_path), state.deployed.sha256, device=settings.torch_device)[0]
    chosen = select_coreset(scorer, retain, fraction, selector, seed=state.spec.train.seed,
                            device=settings.torch_device).tolist()
    coreset_indices = [state.active_indices[i] for i in chosen]
    # Not checkpointed: a fraction of the full run, trained again if cut.
    reference = qf.retrain_reference(state.spec, retain.subset(chosen), device=settings.torch_device,
                                     progress=progress, indices=coreset_indices)
    coreset = {"fraction": fraction, "selector": selector, "samples": len(chosen),
               "retain_samples": len(state.active_indices), "seconds": round(time.monotonic() - started, 3)}
    return _record_reference(engine, settings, model_name, state, reference, coreset_indices, coreset=coreset)


def _record_reference(engine: Engine, settings: Settings, model_name: str, state: RetainState, reference,
                      trained_on: list[int], reference_request_id: int | None = None,
                      coreset: dict | None = None) -> int:
    """Record a reference version trained on the dataset indices `trained_on`: a full one (closing its
    request, if any), or with `coreset` an approximate one (the request stays open)."""
    spec, active_indices = state.spec, state.active_indices
    path, sha256 = qf.save_artifact(reference, artifact_spec(spec), Path(settings.model_store))
    with transaction(engine) as session:
        if set(erased_indices(session, spec.dataset)) & set(trained_on):
            # Forgotten by the model and erased while this trained: the reference must not exist.
            path.unlink(missing_ok=True)
            raise ErasedDuringTraining("samples this reference trained on were erased meanwhile; it is trained again")
        metrics = {"RA": qf.accuracy(reference, state.retain, settings.torch_device),
                   "TA": qf.accuracy(reference, state.test, settings.torch_device)}
        version = ModelVersion(
            model_name=model_name,
            kind=VersionKind.reference,
            method="retrain",
            config=spec.to_dict(),
            metrics=metrics if coreset is None else {**metrics, "coreset": coreset},
            sha256=sha256,
            artifact_path=str(path),
            excluded_sample_ids=sorted(state.excluded),
            approximate=coreset is not None,
        )
        session.add(version)
        session.flush()
        details = {"model": model_name, "excluded_samples": len(state.excluded),
                   "retain_samples": len(active_indices), "sha256": sha256}
        if coreset is not None:
            details["coreset"] = coreset
        if reference_request_id is not None and coreset is None:
            request = session.get(ReferenceRequest, reference_request_id, with_for_update=True)
            request.reference_version_id, request.finished_at, request.error = version.id, utcnow(), None
            details["reference_request_id"] = reference_request_id
        append_audit(session, actor=f"worker:{WORKER_ID}",
                     action="reference.trained" if coreset is None else "reference.approximated",
                     object_type="model_version", object_id=str(version.id), details=details)
        return version.id


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
