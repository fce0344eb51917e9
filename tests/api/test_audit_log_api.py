"""GET /audit/log and GET /audit/log/verify: the hash-chained log through the API."""

from sqlalchemy import text

from service.core.audit_log import append_audit
from service.core.db import transaction


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
    assert client.get("/audit/log/verify").json() == {"ok": True, "entries": 5, "first_broken_id": None, "reason": None}


def test_verify_finds_a_row_edited_in_the_database(client, engine):
    append(engine, ENTRIES)
    with engine.begin() as connection:
        # Someone with database access rewrites who did it.
        connection.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE id = 3"))
    body = client.get("/audit/log/verify").json()
    assert (body["ok"], body["entries"], body["first_broken_id"]) == (False, 5, 3)
    assert "changed" in body["reason"]


def test_verify_finds_a_deleted_row(client, engine):
    append(engine, ENTRIES)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_log WHERE id = 3"))
    body = client.get("/audit/log/verify").json()
    assert (body["ok"], body["first_broken_id"]) == (False, 4)


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
