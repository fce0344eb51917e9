"""The whole path against real PostgreSQL, Redis and Celery worker and scheduler processes.

A client files deletion requests over the API; nobody calls the worker: the scheduler notices the
pending requests, the worker claims them, runs Q-MUL, and deploys the new version in one
transaction. Then a retrain reference is trained through the broker and the audit reads it.
"""

import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.core.audit_log import verify_chain
from service.core.db import transaction
from service.core.models import (
    AuditEntry,
    Batch,
    BatchStatus,
    ForgetRequest,
    ForgottenSample,
    Model,
    ModelVersion,
    Sample,
    VersionKind,
)
from service.core.tasks import REFERENCE_TASK
from workers.celery_app import create_celery

pytestmark = pytest.mark.integration

SUBJECTS = ["subject-0001", "subject-0002", "subject-0003"]


def test_requests_are_unlearned_deployed_and_audited(stack):
    settings, engine, services = stack.settings, stack.engine, stack.services
    worker = services.start("worker", "worker", "--concurrency", "1")
    services.start("scheduler", "scheduler")
    client = stack.client()
    request_ids = stack.file_requests(client, SUBJECTS)
    bodies = stack.wait_for_completion(client, request_ids)
    # It trained at the worker's CPU niceness, its pool process too (QFORGET_WORKER_NICE).
    pool = [int(pid) for pid in Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()]
    assert pool  # Celery's prefork pool process, which ran the task
    for pid in [worker.pid, *pool]:
        assert os.getpriority(os.PRIO_PROCESS, pid) == settings.worker_nice
    version_ids = {part["completed_version_id"] for body in bodies for part in body["parts"]}
    assert None not in version_ids

    with transaction(engine) as session:
        model = session.get(Model, settings.default_model)
        deployed = session.get(ModelVersion, model.deployed_version_id)
        # The deployed version is the newest version that forgot these requests (invariant 2).
        assert deployed.id == max(version_ids)
        assert deployed.kind == VersionKind.unlearned and deployed.method == "qmul"
        original = session.get(ModelVersion, session.get(ModelVersion, min(version_ids)).parent_id)
        assert original.kind == VersionKind.original

        subject_samples = session.scalars(select(Sample).where(Sample.subject_id.in_(SUBJECTS))).all()
        forgotten = session.execute(select(ForgottenSample.sample_id, ForgottenSample.version_id)
                                    .where(ForgottenSample.model_name == model.name)).all()
        assert subject_samples and {sample_id for sample_id, _ in forgotten} == {s.id for s in subject_samples}
        assert all(version_id in version_ids for _, version_id in forgotten)
        assert set(deployed.excluded_sample_ids) == {s.id for s in subject_samples}

        for request_id in request_ids:
            [part] = session.get(ForgetRequest, request_id).parts
            assert part.batch.status == BatchStatus.completed
            assert part.batch.result_version_id == part.completed_version_id
        assert session.scalar(select(func.count()).select_from(Batch).where(
            Batch.status == BatchStatus.running)) == 0

        # Content-addressed artifact: the file's bytes hash to the recorded sha256 and its name.
        artifact = Path(deployed.artifact_path)
        assert hashlib.sha256(artifact.read_bytes()).hexdigest() == deployed.sha256 == artifact.stem

        completed_entries = session.scalars(select(AuditEntry.object_id).where(
            AuditEntry.action == "request.completed")).all()
        assert sorted(completed_entries) == sorted(request_ids)  # each exactly once
        assert verify_chain(session).ok

    # The audit has nothing to compare with until a retrain reference exists, and says so.
    assert client.get("/audit").json()["status"] == "missing"
    create_celery(settings).send_task(REFERENCE_TASK, args=[settings.default_model])
    audit = services.wait_until(lambda: (a := client.get("/audit").json())["status"] == "current" and a,
                                "the audit evaluation", timeout=240)["evaluation"]
    assert audit["version_id"] == deployed.id
    assert audit["forget_count"] == len(subject_samples)
    metric_keys = ("FA", "RA", "TA", "MIA")
    for key in metric_keys:
        assert 0 <= audit["metrics"][key] <= 100 and 0 <= audit["reference_metrics"][key] <= 100
        assert audit["gaps"][key] == pytest.approx(abs(audit["metrics"][key] - audit["reference_metrics"][key]))
    assert audit["gaps"]["AG"] == pytest.approx(sum(audit["gaps"][k] for k in metric_keys) / 4)
    with transaction(engine) as session:
        reference = session.get(ModelVersion, audit["reference_id"])
        # The reference never saw a forgotten sample (invariant 4).
        assert reference.kind == VersionKind.reference
        assert set(reference.excluded_sample_ids) == {s.id for s in subject_samples}
        assert verify_chain(session).ok
