"""GET /audit/log, GET /audit/log/verify and GET /audit/subjects/{id}: the keyed, anchored log
through the API, and a log that names no one."""

from sqlalchemy import select, text

from service.core.audit_log import append_audit
from service.core.db import transaction
from service.core.models import AuditEntry, Batch, BatchStatus, ForgetRequest, ModelVersion, VersionKind
from service.core.pseudonyms import pseudonym
from tests.api.test_audit_log import tamper


def append(engine, entries: list[tuple[str, str, str]]) -> None:
    with transaction(engine) as session:
        for action, object_type, object_id in entries:
            append_audit(session, actor="tests", action=action, object_type=object_type, object_id=object_id,
                         details={"n": object_id})


ENTRIES = [
    ("request.received", "forget_request", "r1"),
    ("request.received", "forget_request", "r2"),
    ("batch.completed", "batch", "7"),
    ("request.completed", "forget_request", "r1"),
]


def file_request(anonymous, headers, subject: str, sample_ids: list[int]) -> str:
    response = anonymous.post("/forget-requests", json={"subject_id": subject, "sample_ids": sample_ids},
                              headers=headers)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def deploy_for(client, engine, seed, request_ids: list[str]) -> int:
    """Runs the requests in a batch the quality gate held, then has an admin approve it: its
    version is deployed and the requests completed, as a worker's run would. Returns the version id."""
    with transaction(engine) as session:
        batch = Batch(model_name=seed.model, status=BatchStatus.held, parent_version_id=seed.version_id,
                      hold_reason="test")
        session.add(batch)
        session.flush()
        forgotten = sorted(sample.id for request_id in request_ids
                           for sample in session.get(ForgetRequest, request_id).samples)
        version = ModelVersion(model_name=seed.model, kind=VersionKind.unlearned, parent_id=seed.version_id,
                               batch_id=batch.id, method="qmul", config={}, metrics={}, sha256="3" * 64,
                               artifact_path="/nonexistent/v.pt", excluded_sample_ids=forgotten)
        session.add(version)
        session.flush()
        batch.result_version_id = version.id
        for request_id in request_ids:
            for part in session.get(ForgetRequest, request_id).parts:
                part.batch_id = batch.id
        batch_id, version_id = batch.id, version.id
    assert client.post(f"/batches/{batch_id}/approve").status_code == 200
    return version_id


def test_the_log_in_chain_order_with_filters_and_paging(client, engine):
    # The client's own admin key made the first entry (api_key.created).
    append(engine, ENTRIES)
    body = client.get("/audit/log").json()
    assert body["count"] == 5
    assert [e["action"] for e in body["data"]] == ["api_key.created", *(action for action, _, _ in ENTRIES)]
    entries = body["data"]
    assert [e["prev_hash"] for e in entries[1:]] == [e["entry_hash"] for e in entries[:-1]]
    assert entries[1]["details"] == {"n": "r1"} and entries[1]["actor"] == "tests"

    body = client.get("/audit/log", params={"action": "request.received"}).json()
    assert (body["count"], [e["object_id"] for e in body["data"]]) == (2, ["r1", "r2"])
    body = client.get("/audit/log", params={"object_type": "forget_request", "object_id": "r1"}).json()
    assert [e["action"] for e in body["data"]] == ["request.received", "request.completed"]
    body = client.get("/audit/log", params={"object_type": "batch"}).json()
    assert [e["object_id"] for e in body["data"]] == ["7"]
    body = client.get("/audit/log", params={"limit": 2, "offset": 2}).json()
    assert (body["count"], [e["object_id"] for e in body["data"]]) == (5, ["r2", "7"])
    assert client.get("/audit/log", params={"limit": 0}).status_code == 422


def test_verify_reports_an_intact_chain(client, engine):
    append(engine, ENTRIES)
    # The first entry found no checkpoint yet, and wrote one.
    assert client.get("/audit/log/verify").json() == {
        "ok": True, "entries": 5, "first_broken_id": None, "reason": None, "checkpoints": 1,
    }


def test_verify_finds_a_row_edited_in_the_database(client, engine):
    append(engine, ENTRIES)
    # Someone with database access rewrites who did it.
    tamper(engine, "UPDATE audit_log SET actor = 'mallory' WHERE id = 3")
    body = client.get("/audit/log/verify").json()
    assert (body["ok"], body["entries"], body["first_broken_id"]) == (False, 5, 3)
    assert "changed" in body["reason"]


def test_verify_finds_a_deleted_row(client, engine):
    append(engine, ENTRIES)
    tamper(engine, "DELETE FROM audit_log WHERE id = 3")
    body = client.get("/audit/log/verify").json()
    assert (body["ok"], body["first_broken_id"]) == (False, 4)


def test_verify_finds_the_tail_cut_after_a_deployment(client, engine, seed, bearer, anonymous):
    # The outside test's cut: every entry from the 14th on deleted, new entries appended after it.
    # The deployment checkpointed the head it wrote; the cut removed that head.
    headers = bearer("submitter")
    requests = [file_request(anonymous, headers, "alice", [sample]) for sample in seed.samples["alice"]]
    deploy_for(client, engine, seed, requests)
    assert client.get("/audit/log/verify").json()["ok"]
    last_id = client.get("/audit/log").json()["count"]
    assert last_id > 14
    tamper(engine, "DELETE FROM audit_log WHERE id >= 14")
    file_request(anonymous, headers, "bob", seed.samples["bob"][:1])
    body = client.get("/audit/log/verify").json()
    assert (body["ok"], body["first_broken_id"]) == (False, last_id), body
    assert "missing" in body["reason"] and "cut" in body["reason"]


def test_a_subjects_entries_are_found_by_its_pseudonym(client, engine, seed, bearer, anonymous, settings):
    headers = bearer("submitter")
    first = file_request(anonymous, headers, "alice", seed.samples["alice"][:2])
    second = file_request(anonymous, headers, "alice", seed.samples["alice"][2:3])
    file_request(anonymous, headers, "bob", seed.samples["bob"][:1])
    version_id = deploy_for(client, engine, seed, [first])

    body = client.get("/audit/subjects/alice", headers=bearer("auditor")).json()
    assert body["subject_pseudonym"] == pseudonym(settings.audit_secret, "subject", "alice")
    requests = {request["request_id"]: request for request in body["requests"]}
    assert set(requests) == {first, second}
    assert requests[first]["completed_at"] is not None and requests[first]["version_ids"] == [version_id]
    assert (requests[second]["completed_at"], requests[second]["version_ids"]) == (None, [])
    assert [(entry["action"], entry["object_id"]) for entry in body["entries"]] == [
        ("request.received", first), ("request.received", second), ("request.part_completed", first),
        ("request.completed", first),
    ]
    assert body["entries"][0]["details"]["sample_pseudonyms"] == [
        pseudonym(settings.audit_secret, "sample", sample) for sample in seed.samples["alice"][:2]
    ]

    nobody = client.get("/audit/subjects/nobody").json()
    assert (nobody["requests"], nobody["entries"]) == ([], [])
    assert client.get("/audit/subjects/alice", headers=bearer("submitter")).status_code == 403
    assert client.get("/audit/subjects/a%00b").status_code == 422


def test_no_audit_entry_names_a_subject_or_its_samples(client, engine, seed, bearer, anonymous, settings):
    headers = bearer("submitter")
    alice = seed.samples["alice"]
    request_id = file_request(anonymous, headers, "alice", alice[:3])
    anonymous.post("/forget-requests", json={"subject_id": "alice"}, headers=headers)  # the rest of her samples
    deploy_for(client, engine, seed, [request_id])

    with engine.connect() as connection:
        # The whole table as text, whatever the backend stores JSON as.
        cast = "details::text" if connection.dialect.name == "postgresql" else "details"
        rows = connection.execute(text(f"SELECT actor, action, object_type, object_id, {cast} FROM audit_log")).all()
    assert "alice" not in " ".join(str(value) for row in rows for value in row)
    with transaction(engine) as session:
        entries = session.scalars(select(AuditEntry).where(AuditEntry.details.is_not(None))).all()
    named = [entry for entry in entries if {"subject_id", "sample_ids"} & set(entry.details)]
    assert named == []
    forgotten = next(entry for entry in entries if entry.action == "samples.forgotten")
    assert forgotten.details["sample_pseudonyms"] == [pseudonym(settings.audit_secret, "sample", s) for s in alice[:3]]


def test_the_log_is_for_auditors_and_admins(anonymous, engine, bearer):
    assert anonymous.get("/audit/log", headers=bearer("submitter")).status_code == 403
    assert anonymous.get("/audit/log/verify", headers=bearer("submitter")).status_code == 403
    assert anonymous.get("/audit/log", headers=bearer("auditor")).status_code == 200
    assert anonymous.get("/audit/log/verify", headers=bearer("auditor")).json()["ok"]


def test_requests_filed_through_the_api_are_in_the_log(client, seed, bearer, anonymous):
    headers = bearer("submitter")
    created = anonymous.post("/forget-requests", json={"subject_id": "bob"}, headers=headers).json()
    body = client.get("/audit/log", params={"object_type": "forget_request", "object_id": created["id"]}).json()
    [entry] = body["data"]
    assert entry["action"] == "request.received"
    assert entry["actor"] == f"key:{headers['Authorization'].split('_')[1]}"
