"""POST /forget-requests/{id}/withdrawal and /extension: who may, when, what they store and audit,
and that a refusal changes nothing."""

import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update

from service.core.db import transaction
from service.core.models import AuditEntry, Batch, ForgetRequest, ForgetRequestPart, ModelVersion, RequestStatus, utcnow
from service.requests import lifecycle
from tests.conftest import add_deployed_model

REASON = "The subject withdrew the erasure by letter of 3 March (Jane Roe, ref 4411)."


def file(client, **body) -> dict:
    response = client.post("/forget-requests", json={"subject_id": "alice", **body})
    assert response.status_code == 202, response.text
    return response.json()


def withdraw(client, request_id: str, reason: str = REASON, **kwargs):
    return client.post(f"/forget-requests/{request_id}/withdrawal", json={"reason": reason}, **kwargs)


def extend(client, request_id: str, months=1, reason: str = "the erasure needs a full retrain", **kwargs):
    return client.post(f"/forget-requests/{request_id}/extension", json={"months": months, "reason": reason}, **kwargs)


def stored(engine) -> dict:
    """Every request and part as stored, and how many audit entries there are: what a refusal must leave."""
    with transaction(engine) as session:
        requests = [tuple(row) for row in session.execute(select(ForgetRequest.__table__).order_by(ForgetRequest.id))]
        parts = [tuple(row) for row in session.execute(select(ForgetRequestPart.__table__)
                                                       .order_by(ForgetRequestPart.request_id))]
        return {"requests": requests, "parts": parts, "audit": len(session.scalars(select(AuditEntry.id)).all())}


def audit_entries(engine, action: str) -> list[AuditEntry]:
    with transaction(engine) as session:
        entries = session.scalars(select(AuditEntry).where(AuditEntry.action == action)).all()
        session.expunge_all()
        return entries


def claim(engine, seed, request_id: str) -> int:
    """A running batch of the request's part of the seed's model."""
    with transaction(engine) as session:
        parts = session.scalars(select(ForgetRequestPart).where(ForgetRequestPart.request_id == request_id)).all()
        return lifecycle.claim(session, list(parts), seed.model, seed.version_id, "test-worker",
                               utcnow() + timedelta(minutes=5), actor="test").id


def in_batch(transition):
    """Set up a request whose part is in a batch: running, held for review, or completed."""
    def setup(engine, seed, request_id: str) -> None:
        batch_id = claim(engine, seed, request_id)
        if transition is not None:
            with transaction(engine) as session:
                batch = session.get(Batch, batch_id)
                version = session.get(ModelVersion, seed.version_id)
                if transition is lifecycle.hold:
                    lifecycle.hold(session, batch, version, "test accuracy fell", "test")
                else:
                    lifecycle.complete(session, batch, version, "test", utcnow())

    return setup


def test_a_withdrawal_withdraws_the_request_and_its_parts(client, engine, seed, bearer):
    submitter = bearer("submitter")
    filed = file(client, sample_ids=seed.samples["alice"][:2])
    response = withdraw(client, filed["id"], headers=submitter)
    assert response.status_code == 200, response.text
    withdrawn = response.json()
    assert (withdrawn["status"], withdrawn["withdrawal_reason"]) == ("withdrawn", REASON)
    assert [part["status"] for part in withdrawn["parts"]] == ["withdrawn"]
    assert datetime.fromisoformat(withdrawn["withdrawn_at"]).utcoffset() == timedelta(0)
    assert (withdrawn["due_at"], withdrawn["sample_ids"]) == (filed["due_at"], filed["sample_ids"])
    assert client.get(f"/forget-requests/{filed['id']}").json() == withdrawn
    listed = client.get("/forget-requests", params={"status": "withdrawn"}).json()
    assert [request["id"] for request in listed["data"]] == [filed["id"]]
    assert client.get("/forget-requests", params={"status": "pending"}).json()["count"] == 0

    [entry] = audit_entries(engine, "request.withdrawn")
    assert (entry.object_id, entry.details) == (filed["id"], {"parts": [seed.model], "reason_length": len(REASON)})
    # The audit log names no one: not the reason's words, nor anyone named in them.
    with transaction(engine) as session:
        details = json.dumps(session.scalars(select(AuditEntry.details)).all())
    assert "Jane" not in details and "letter" not in details


def test_withdrawing_twice_is_a_409_that_changes_nothing(client, engine, seed):
    filed = file(client)
    assert withdraw(client, filed["id"]).status_code == 200
    before = stored(engine)
    again = withdraw(client, filed["id"], reason="another reason")
    assert again.status_code == 409
    [problem] = again.json()["detail"]
    assert (problem["type"], problem["loc"]) == ("already_withdrawn", ["path", "request_id"])
    assert stored(engine) == before
    assert client.get(f"/forget-requests/{filed['id']}").json()["withdrawal_reason"] == REASON


@pytest.mark.parametrize(
    ("setup", "error_type"),
    [(in_batch(None), "request_batched"), (in_batch(lifecycle.hold), "request_batched"),
     (in_batch(lifecycle.complete), "request_completed")],
    ids=["claimed", "held-for-review", "completed"],
)
def test_a_request_in_a_batch_cannot_be_withdrawn(client, engine, seed, setup, error_type):
    filed = file(client)
    setup(engine, seed, filed["id"])
    before, body = stored(engine), client.get(f"/forget-requests/{filed['id']}").json()
    response = withdraw(client, filed["id"])
    assert response.status_code == 409, response.text
    [problem] = response.json()["detail"]
    assert (problem["type"], problem["loc"]) == (error_type, ["path", "request_id"])
    assert filed["id"] in problem["msg"]
    assert stored(engine) == before
    assert client.get(f"/forget-requests/{filed['id']}").json() == body


def test_a_request_others_are_linked_to_is_withdrawn_after_them(client, engine, seed):
    alice = seed.samples["alice"]
    first = file(client, sample_ids=alice[:2])
    linked = file(client, sample_ids=alice[:2])  # no part of its own: relies on the first's
    assert (linked["linked_to"], linked["parts"]) == (first["id"], [])
    before = stored(engine)
    refused = withdraw(client, first["id"])
    assert refused.status_code == 409
    [problem] = refused.json()["detail"]
    assert problem["type"] == "linked_requests_open" and linked["id"] in problem["msg"]
    assert stored(engine) == before
    assert withdraw(client, linked["id"]).json()["status"] == "withdrawn"
    assert withdraw(client, first["id"]).json()["status"] == "withdrawn"


def test_an_extension_moves_the_deadline_once(client, engine, seed):
    filed = file(client)
    response = extend(client, filed["id"], months=2)
    assert response.status_code == 200, response.text
    extended = response.json()
    due = datetime.fromisoformat(filed["due_at"])
    assert extended["original_due_at"] == filed["due_at"]
    assert datetime.fromisoformat(extended["due_at"]) == lifecycle.add_months(due, 2)
    assert extended["extension_reason"] == "the erasure needs a full retrain"
    assert extended["extended_at"] is not None and extended["status"] == "pending"
    assert client.get(f"/forget-requests/{filed['id']}").json() == extended
    [entry] = audit_entries(engine, "request.extended")
    assert entry.details == {"old_due_at": due.isoformat(), "new_due_at": extended["due_at"].replace("Z", "+00:00"),
                             "months": 2, "reason_length": len("the erasure needs a full retrain")}

    before = stored(engine)
    again = extend(client, filed["id"], months=1)
    assert again.status_code == 409
    [problem] = again.json()["detail"]
    assert (problem["type"], problem["loc"]) == ("already_extended", ["path", "request_id"])
    assert stored(engine) == before


def test_an_extension_to_a_month_without_the_day_ends_on_its_last_day(client, engine, seed):
    filed = file(client)
    with transaction(engine) as session:
        session.execute(update(ForgetRequest).where(ForgetRequest.id == filed["id"])
                        .values(due_at=datetime(2027, 1, 31, 9, 30, tzinfo=timezone.utc)))
    extended = extend(client, filed["id"], months=1).json()
    assert datetime.fromisoformat(extended["due_at"]) == datetime(2027, 2, 28, 9, 30, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("body", "field"),
    [({"months": 3, "reason": "r"}, "months"), ({"months": 0, "reason": "r"}, "months"),
     ({"months": "1", "reason": "r"}, "months"), ({"months": 1.5, "reason": "r"}, "months"),
     ({"months": True, "reason": "r"}, "months"), ({"reason": "r"}, "months"),
     ({"months": 1, "reason": ""}, "reason"), ({"months": 1, "reason": "x" * 501}, "reason"),
     ({"months": 1, "reason": "r", "due_at": "2030-01-01T00:00:00Z"}, "due_at")],
    ids=["three", "zero", "a-string", "a-fraction", "a-boolean", "missing", "empty-reason", "long-reason",
         "unknown-field"],
)
def test_a_bad_extension_is_a_422_naming_the_field_and_changes_nothing(client, engine, seed, body, field):
    filed = file(client)
    before = stored(engine)
    response = client.post(f"/forget-requests/{filed['id']}/extension", json=body)
    assert response.status_code == 422, response.text
    assert [problem["loc"] for problem in response.json()["detail"]] == [["body", field]]
    assert stored(engine) == before


@pytest.mark.parametrize(
    "body", [{"reason": ""}, {"reason": "x" * 501}, {}, {"reason": "r", "note": "x"}, {"reason": 5}],
    ids=["empty", "too-long", "missing", "unknown-field", "a-number"],
)
def test_a_bad_withdrawal_is_a_422_and_changes_nothing(client, engine, seed, body):
    filed = file(client)
    before = stored(engine)
    response = client.post(f"/forget-requests/{filed['id']}/withdrawal", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"
    assert stored(engine) == before


@pytest.mark.parametrize("change", ["withdraw", "extend"])
def test_a_closed_request_keeps_its_deadline(client, engine, seed, change):
    filed = file(client)
    if change == "withdraw":
        withdraw(client, filed["id"])
    else:
        in_batch(lifecycle.complete)(engine, seed, filed["id"])
    before = stored(engine)
    response = extend(client, filed["id"])
    assert response.status_code == 409
    assert response.json()["detail"][0]["type"] == "request_closed"
    assert stored(engine) == before


def test_who_may_withdraw_or_extend(client, anonymous, engine, seed, bearer):
    other = "digits-mlp"
    add_deployed_model(engine, other, seed.dataset)
    alice, bob = seed.samples["alice"], seed.samples["bob"]
    both = file(client, sample_ids=alice[:1])  # a part for each model
    mine = file(client, sample_ids=bob[:1], subject_id="bob", model=seed.model)
    theirs = file(client, sample_ids=bob[1:2], subject_id="bob", model=other)
    assert [p["model"] for p in both["parts"]] == [seed.model, other]
    limited, auditor, submitter = bearer("submitter", seed.model), bearer("auditor"), bearer("submitter")
    before = stored(engine)
    # A key limited to a model: another model's request is not found; one that also goes to another
    # model is not its to change; an auditor's key changes nothing.
    assert withdraw(anonymous, theirs["id"], headers=limited).status_code == 404
    assert extend(anonymous, theirs["id"], headers=limited).status_code == 404
    for response in (withdraw(anonymous, both["id"], headers=limited), extend(anonymous, both["id"], headers=limited)):
        assert response.status_code == 403 and "other models" in response.json()["detail"]
    assert withdraw(anonymous, mine["id"], headers=auditor).status_code == 403
    assert withdraw(anonymous, mine["id"]).status_code == 401
    assert stored(engine) == before
    # Its own model's request it may; an unlimited submitter key may change any.
    assert extend(anonymous, mine["id"], headers=limited).status_code == 200
    assert withdraw(anonymous, mine["id"], headers=limited).json()["parts"] == [
        {"model": seed.model, "status": "withdrawn", "batch_id": None, "completed_version_id": None,
         "completed_at": None, "instant_version_id": None, "instant_at": None, "error": None}]
    assert withdraw(anonymous, both["id"], headers=submitter).status_code == 200


def test_an_unknown_request_is_404(client, seed):
    assert withdraw(client, "00000000-0000-0000-0000-000000000000").status_code == 404
    assert extend(client, "00000000-0000-0000-0000-000000000000").status_code == 404


def test_a_withdrawn_request_is_not_open_for_a_later_one(client, engine, seed):
    alice = seed.samples["alice"]
    first = file(client, sample_ids=alice[:2])
    withdraw(client, first["id"])
    again = file(client, sample_ids=alice[:2])
    # Nothing under way covers them any more: a part of its own, and no link.
    assert (again["linked_to"], [p["model"] for p in again["parts"]]) == (None, [seed.model])
    with transaction(engine) as session:
        assert session.get(ForgetRequest, first["id"]).status == RequestStatus.withdrawn


def test_a_request_with_no_part_of_its_own_points_to_the_evidence_of_the_one_it_follows(client, seed):
    first = file(client, sample_ids=seed.samples["alice"][:2])
    linked = file(client, sample_ids=seed.samples["alice"][:2])
    response = client.get(f"/forget-requests/{linked['id']}/evidence")
    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert (problem["type"], problem["loc"]) == ("no_parts", ["query", "model"]) and first["id"] in problem["msg"]
