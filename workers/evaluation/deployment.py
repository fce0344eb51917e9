"""Evaluating the deployed version against the retrain reference that excludes the same samples."""

from pathlib import Path

from sqlalchemy import Engine, select

from service.audit.comparison import compare_with_references
from service.core.audit_log import append_audit
from service.core.db import transaction
from service.core.models import Evaluation, Model, ModelVersion, Sample
from service.core.settings import Settings
from service.requests.holdings import erased_indices, held_by
from workers import engine as qf
from workers.evaluation.samples import SCORE_BIN_EDGES, assess_samples, record_sample_scores, score_histogram
from workers.runtime import WORKER_ID, load_data


def _audit_splits(session, model: Model, forgotten_ids) -> tuple[list[tuple[int, int]], list[int]]:
    """(sample id, dataset index) of the forget split (the given forgotten samples, in the split's
    order) and the dataset indices of the retain split."""
    forget_samples = _forget_samples(session, forgotten_ids)
    retain_indices = sorted(row.dataset_index for row in session.execute(held_by(model.name, model.dataset)))
    return forget_samples, retain_indices


def _forget_samples(session, forgotten_ids) -> list[tuple[int, int]]:
    """(sample id, dataset index) of the given samples that are not erased, in the forget split's
    order. An erased sample cannot be read: its figures are its request's frozen evidence."""
    return [tuple(row) for row in session.execute(
        select(Sample.id, Sample.dataset_index).where(Sample.id.in_(forgotten_ids), Sample.erased_at.is_(None))
        .order_by(Sample.dataset_index)
    )]


def _evaluate_artifact(settings: Settings, spec: qf.ModelSpec, artifact_path: str, sha256: str,
                       forget_indices: list[int], retain_indices: list[int], erased: list[int]) -> dict:
    data = load_data(spec, erased)
    network, _ = qf.load_artifact(Path(artifact_path), sha256, device=settings.torch_device)
    forget, retain = data.train.subset(forget_indices), data.train.subset(retain_indices)
    return qf.evaluate(network, forget, retain, data.test, device=settings.torch_device)


def evaluate_on_deployment_splits(engine: Engine, settings: Settings, model_name: str, version_id: int) -> dict:
    """FA, RA, TA, MIA of any version on the splits the deployed version is audited on."""
    with transaction(engine) as session:
        model = session.get(Model, model_name)
        deployed = session.get(ModelVersion, model.deployed_version_id)
        version = session.get(ModelVersion, version_id)
        forget_samples, retain_indices = _audit_splits(session, model, deployed.excluded_sample_ids)
        erased = erased_indices(session, model.dataset)
    forget_indices = [index for _, index in forget_samples]
    return _evaluate_artifact(settings, qf.ModelSpec.from_dict(model.spec), version.artifact_path, version.sha256,
                              forget_indices, retain_indices, erased)


def evaluate_deployment(engine: Engine, settings: Settings, model_name: str) -> int | None:
    """Evaluate the deployed version against the newest reference that excludes the same samples.

    Returns the evaluation id, or None when there is nothing forgotten yet, no such reference, or
    every forgotten sample is erased (the audit endpoint then says so).
    """
    with transaction(engine) as session:
        model = session.get(Model, model_name)
        deployed = session.get(ModelVersion, model.deployed_version_id)
        excluded = set(deployed.excluded_sample_ids)
        if not excluded:
            return None
        comparison = compare_with_references(session, deployed)
        if comparison.status != "matching":
            return None
        reference = comparison.reference
        forget_samples, retain_indices = _audit_splits(session, model, excluded)
        if not forget_samples:
            return None
        forget_sample_ids = [sample_id for sample_id, _ in forget_samples]
        forget_indices = [index for _, index in forget_samples]
        spec = qf.ModelSpec.from_dict(model.spec)
        erased = erased_indices(session, model.dataset)
    data = load_data(spec, erased)
    forget, retain = data.train.subset(forget_indices), data.train.subset(retain_indices)
    assessments = {}
    for version in (deployed, reference):
        network, _ = qf.load_artifact(Path(version.artifact_path), version.sha256, device=settings.torch_device)
        assessments[version.id] = assess_samples(network, forget, retain, data.test, settings.torch_device)
    with transaction(engine) as session:
        evaluation = Evaluation(
            version_id=deployed.id,
            reference_id=reference.id,
            metrics=assessments[deployed.id].metrics,
            reference_metrics=assessments[reference.id].metrics,
            gaps=qf.gaps(assessments[deployed.id].metrics, assessments[reference.id].metrics),
            forget_count=len(forget_indices),
            retain_count=len(retain_indices),
            test_count=len(data.test),
            score_histograms={
                "score": "per-sample loss, -ln p(true label)",
                "bin_edges": SCORE_BIN_EDGES,
                **{role: {"forget": score_histogram(assessments[version.id].forget_loss),
                          "test": score_histogram(assessments[version.id].test_loss)}
                   for role, version in (("version", deployed), ("reference", reference))},
            },
        )
        session.add(evaluation)
        session.flush()
        for version in (deployed, reference):
            record_sample_scores(session, version.id, forget_sample_ids, assessments[version.id])
        append_audit(session, actor=f"worker:{WORKER_ID}", action="evaluation.recorded",
                     object_type="model_version", object_id=str(evaluation.version_id),
                     details={"evaluation_id": evaluation.id, "reference_id": evaluation.reference_id,
                              "gaps": evaluation.gaps})
        return evaluation.id


def measure_approximation(engine: Engine, evaluation_id: int) -> dict | None:
    """Once a version is evaluated against a full reference: how far its interim evaluation against an
    approximate reference of the same state was, recorded in the audit log
    ("reference.approximation_measured", docs/audit.md): the approximate reference's gaps to the full
    one, and the error of the interim audit's AG. Both evaluations are on the same splits (unless
    samples were erased between them), so no model is loaded. None when there was no interim one."""
    with transaction(engine) as session:
        full = session.get(Evaluation, evaluation_id)
        if full is None or full.approximate:
            return None
        excluded = set(full.reference.excluded_sample_ids)
        interim = next((evaluation for evaluation in session.scalars(
            select(Evaluation).join(ModelVersion, ModelVersion.id == Evaluation.reference_id)
            .where(Evaluation.version_id == full.version_id, ModelVersion.approximate.is_(True))
            .order_by(Evaluation.id.desc())) if set(evaluation.reference.excluded_sample_ids) == excluded), None)
        if interim is None:
            return None
        details = {"version_id": full.version_id, "evaluation_id": full.id, "interim_evaluation_id": interim.id,
                   "reference_id": full.reference_id, "approximate_reference_id": interim.reference_id,
                   "coreset": interim.reference.metrics.get("coreset"),
                   "approximate_reference_gaps": qf.gaps(interim.reference_metrics, full.reference_metrics),
                   "interim_AG": interim.gaps["AG"], "AG": full.gaps["AG"],
                   "interim_AG_error": interim.gaps["AG"] - full.gaps["AG"]}
        append_audit(session, actor=f"worker:{WORKER_ID}", action="reference.approximation_measured",
                     object_type="model_version", object_id=str(interim.reference_id), details=details)
        return details
