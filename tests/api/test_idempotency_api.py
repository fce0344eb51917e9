"""POST /forget-requests with an Idempotency-Key: a retry gets the first response, never a second request."""

import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from service.core.db import transaction
from service.core.models import ForgetRequest, IdempotencyRecord, RequestStatus, Sample, Subject


def request_count(engine) -> int:
    with transaction(engine) as session:
        return session.scalar(select(func.count()).select_from(ForgetRequest))


def test_a_retry_gets_the_first_response_and_files_nothing(client, seed, engine):
    body = {"subject_id": "alice", "sample_ids": seed.samples["alice"][:2]}
    first = client.post("/forget-requests", json=body, headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    # Meanwhile the request moves on; the retry still gets the first answer, as sent.
    with transaction(engine) as session:
        session.execute(update(ForgetRequest).values(status=RequestStatus.batched))
    again = client.post("/forget-requests", json=body, headers={"Idempotency-Key": "retry-1"})
    assert (again.status_code, again.content) == (first.status_code, first.content)
    assert again.headers["idempotent-replayed"] == "true"
    assert request_count(engine) == 1
    with transaction(engine) as session:
        record = session.scalars(select(IdempotencyRecord)).one()
        assert (record.key, record.forget_request_id, record.status_code) == ("retry-1", first.json()["id"], 202)


def test_the_same_body_in_another_key_order_is_the_same_request(client, seed, engine):
    headers = {"Idempotency-Key": "k", "Content-Type": "application/json"}
    first = client.post("/forget-requests", content=b'{"subject_id": "bob", "model": null}', headers=headers)
    again = client.post("/forget-requests", content=b'{"model":null,"subject_id":"bob"}', headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert request_count(engine) == 1


def test_the_same_key_with_another_body_is_refused_naming_the_header(client, seed, engine, row_counts):
    first = client.post("/forget-requests", json={"subject_id": "alice"}, headers={"Idempotency-Key": "k"})
    assert first.status_code == 202
    before = row_counts()
    response = client.post("/forget-requests", json={"subject_id": "bob"}, headers={"Idempotency-Key": "k"})
    assert response.status_code == 422
    problem = response.json()["detail"][0]
    assert problem["loc"] == ["header", "Idempotency-Key"]
    assert problem["type"] == "idempotency_key_reused"
    assert "different request body" in problem["msg"]
    assert row_counts() == before


def test_keys_are_scoped_to_the_api_key(anonymous, seed, bearer, engine):
    one, other = bearer("submitter"), bearer("submitter")
    first = anonymous.post("/forget-requests", json={"subject_id": "alice"}, headers={**one, "Idempotency-Key": "k"})
    # The same Idempotency-Key from another API key is another request (a different body is fine).
    second = anonymous.post("/forget-requests", json={"subject_id": "bob"}, headers={**other, "Idempotency-Key": "k"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] != second.json()["id"]
    assert request_count(engine) == 2


def test_a_refused_request_is_not_remembered(client, seed, engine):
    # The first try names a subject not registered yet (422) and writes nothing; once the subject
    # is registered, the retry with the same key is taken in.
    body = {"subject_id": "erin", "sample_ids": seed.samples["alice"][:1]}
    assert client.post("/forget-requests", json=body, headers={"Idempotency-Key": "k"}).status_code == 422
    with transaction(engine) as session:
        session.add(Subject(id="erin"))
        session.flush()
        session.execute(update(Sample).where(Sample.id == body["sample_ids"][0]).values(subject_id="erin"))
    retry = client.post("/forget-requests", json=body, headers={"Idempotency-Key": "k"})
    assert retry.status_code == 202, retry.text
    assert client.post("/forget-requests", json=body, headers={"Idempotency-Key": "k"}).json() == retry.json()


@pytest.mark.parametrize(
    "key", ["", "x" * 256, "has space", "tab\tinside"], ids=["empty", "too-long", "space", "control-character"]
)
def test_a_malformed_key_is_422_naming_the_header(client, seed, row_counts, key):
    before = row_counts()
    response = client.post("/forget-requests", json={"subject_id": "alice"}, headers={"Idempotency-Key": key})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert row_counts() == before


def test_concurrent_retries_file_one_request(client, seed, engine, bearer):
    # Two clients send the same request with the same key at the same moment (a retry racing its
    # original). On PostgreSQL the second waits on the first's idempotency row, then replays it.
    headers = {**bearer("submitter"), "Idempotency-Key": "race"}
    body = {"subject_id": "carol"}
    responses: list = [None] * 4
    barrier = threading.Barrier(len(responses))

    def send(slot: int) -> None:
        own = TestClient(client.app)
        barrier.wait()
        responses[slot] = own.post("/forget-requests", json=body, headers=headers)

    threads = [threading.Thread(target=send, args=(slot,)) for slot in range(len(responses))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in responses] == [202] * len(responses), [r.text for r in responses]
    assert len({r.content for r in responses}) == 1
    assert request_count(engine) == 1


def test_an_expired_key_is_forgotten_and_makes_a_new_request(client, seed, engine):
    from datetime import timedelta

    from service.core.models import utcnow
    from service.requests.idempotency import prune_expired

    first = client.post("/forget-requests", json={"subject_id": "alice"}, headers={"Idempotency-Key": "old"})
    fresh = client.post("/forget-requests", json={"subject_id": "bob"}, headers={"Idempotency-Key": "new"})
    assert first.status_code == fresh.status_code == 202
    with transaction(engine) as session:
        session.execute(update(IdempotencyRecord).where(IdempotencyRecord.key == "old")
                        .values(created_at=utcnow() - timedelta(hours=25)))
    with transaction(engine) as session:
        assert prune_expired(session, utcnow() - timedelta(hours=24)) == 1
        assert session.scalars(select(IdempotencyRecord.key)).all() == ["new"]
    # Past its retention the key is unknown: the same key with a new body is a new request, not a 422.
    again = client.post("/forget-requests", json={"subject_id": "carol"}, headers={"Idempotency-Key": "old"})
    assert again.status_code == 202 and again.json()["id"] != first.json()["id"]
    replay = client.post("/forget-requests", json={"subject_id": "bob"}, headers={"Idempotency-Key": "new"})
    assert replay.json()["id"] == fresh.json()["id"]
    assert request_count(engine) == 3
