"""Group commit of forget requests: many submissions in one transaction, each with the outcome it
would have had alone in arrival order; the API batches concurrent POSTs, and concurrent GETs of
requests by id."""

import asyncio

import httpx
import pytest
from sqlalchemy import event, func, select

from service.api.batch_queue import MAX_BATCH_PARAMETERS, intake_queue, take_intake_batch
from service.core.audit_log import verify_chain
from service.core.db import make_engine, session_factory, transaction
from service.core.models import (
    ApiKey,
    AuditEntry,
    ForgetRequest,
    ForgetRequestPart,
    ForgetRequestSample,
    IdempotencyRecord,
)
from service.requests.idempotency import Replay
from service.requests.intake import IdempotencyClaim, Submission, file_forget_requests
from service.requests.problems import RequestValidationProblem
from service.requests.queries import FiledRequest


def submission(subject: str, sample_ids: list[int] | None = None, model: str = "digits-cnn-4bit", **extra):
    return Submission(subject, sample_ids, model, 30, "test", **extra)


def body_of(filed: FiledRequest) -> dict:
    return {"id": filed.request.id, "sample_ids": filed.sample_ids}


def test_a_batch_files_each_as_if_alone_in_order(engine, seed):
    alice, bob = seed.samples["alice"], seed.samples["bob"]
    batch = [
        submission("alice", alice[:2]),
        submission("alice", alice[1:3]),  # sample alice[1] was just claimed by the first: linked to it
        submission("nobody"),
        submission("bob"),  # all of bob's
        submission("bob"),  # nothing left of its own: every sample is in the request just filed
        submission("alice", alice[3:4], model="no-such-model"),
        submission("alice", [alice[4], alice[4]]),
        submission("carol", bob[:1]),
    ]
    with transaction(engine) as session:
        outcomes = file_forget_requests(session, batch)
    first, overlapping, nobody, all_bob, bob_again, unknown_model, repeated, foreign = outcomes
    assert isinstance(first, FiledRequest) and first.sample_ids == alice[:2]
    assert first.request.linked_request_id is None
    assert isinstance(overlapping, FiledRequest) and overlapping.sample_ids == alice[1:3]
    assert (overlapping.request.linked_request_id, len(overlapping.parts)) == (first.request.id, 1)
    assert (nobody.field, nobody.error_type) == ("subject_id", "unknown_subject")
    assert isinstance(all_bob, FiledRequest) and all_bob.sample_ids == bob
    assert isinstance(bob_again, FiledRequest) and bob_again.sample_ids == bob
    assert (bob_again.request.linked_request_id, bob_again.parts) == (all_bob.request.id, [])
    assert (unknown_model.field, unknown_model.error_type) == ("model", "unknown_model")
    assert (repeated.field, repeated.error_type) == ("sample_ids", "duplicate_samples")
    assert (foreign.field, foreign.error_type) == ("sample_ids", "foreign_samples")
    with transaction(engine) as session:
        stored = {row.id: row.subject_id for row in session.execute(select(ForgetRequest.id, ForgetRequest.subject_id))}
        filed = [first, overlapping, all_bob, bob_again]
        assert stored == {f.request.id: f.request.subject_id for f in filed}
        assert session.scalar(select(func.count()).select_from(ForgetRequestSample)) == 2 + 2 + 2 * len(bob)
        assert session.scalar(select(func.count()).select_from(ForgetRequestPart)) == 3
        audited = session.scalars(select(AuditEntry.object_id).where(AuditEntry.action == "request.received")
                                  .order_by(AuditEntry.id)).all()
        assert audited == [f.request.id for f in filed]  # one entry each, in arrival order
        assert verify_chain(session).ok


def test_a_batch_costs_the_same_statements_as_one_request(engine, seed):
    def statements_for(submissions: list[Submission]) -> list[str]:
        sent: list[str] = []

        def collect(conn, cursor, statement, *_):
            sent.append(statement)

        event.listen(engine, "before_cursor_execute", collect)
        try:
            with transaction(engine) as session:
                outcomes = file_forget_requests(session, submissions)
        finally:
            event.remove(engine, "before_cursor_execute", collect)
        assert all(isinstance(outcome, FiledRequest) for outcome in outcomes), outcomes
        return sent

    # The first entry of a log is followed by its first checkpoint, read on a connection of its own
    # after the commit (service.core.audit_log): not what this compares.
    statements_for([submission("carol", seed.samples["carol"][1:2])])
    one = statements_for([submission("carol", seed.samples["carol"][:1])])
    many = statements_for(
        [submission("alice", [sample]) for sample in seed.samples["alice"]]
        + [submission("bob", [sample]) for sample in seed.samples["bob"]]
    )
    assert len(many) == len(one), many


def test_idempotency_keys_in_a_batch(engine, seed, api_key):
    api_key("submitter")
    with transaction(engine) as session:
        key_id = session.scalar(select(ApiKey.id))

    def keyed(subject: str, key: str, fingerprint: str, sample_ids: list[int] | None = None) -> Submission:
        return submission(subject, sample_ids, idempotency=IdempotencyClaim(key_id, key, fingerprint))

    first_sample = seed.samples["alice"][:1]
    with transaction(engine) as session:
        filed, refused = file_forget_requests(
            session, [keyed("alice", "k1", "a", first_sample), keyed("nobody", "k2", "b")], body_of
        )
    assert isinstance(filed, FiledRequest) and isinstance(refused, RequestValidationProblem)
    with transaction(engine) as session:
        # Only the filed one is remembered, with the response it got.
        records = {record.key: record for record in session.scalars(select(IdempotencyRecord))}
        assert set(records) == {"k1"} and records["k1"].response_body == body_of(filed)
        assert records["k1"].forget_request_id == filed.request.id
    with transaction(engine) as session:
        replay, retried = file_forget_requests(
            session, [keyed("alice", "k1", "a", first_sample), keyed("bob", "k2", "b")], body_of
        )
    assert replay == Replay(202, body_of(filed))
    assert isinstance(retried, FiledRequest)  # a refused request's key was not kept: it runs again
    with transaction(engine) as session:
        [reused] = file_forget_requests(session, [keyed("carol", "k1", "c")], body_of)
    assert (reused.field, reused.error_type, reused.location) == ("Idempotency-Key", "idempotency_key_reused", "header")


def test_take_batch_keeps_arrival_order_and_its_limits():
    claim = IdempotencyClaim(1, "same", "f")
    pending = [(submission("a"), None), (submission("b", idempotency=claim), None),
               (submission("c"), None), (submission("d", idempotency=claim), None), (submission("e"), None)]
    # A second use of the same key waits for the next batch.
    assert [s.subject_id for s, _ in take_intake_batch(pending)] == ["a", "b", "c"]
    assert [s.subject_id for s, _ in take_intake_batch(pending)] == ["d", "e"]
    assert pending == []
    large = [(submission("big", list(range(MAX_BATCH_PARAMETERS // 2))), None) for _ in range(3)]
    assert len(take_intake_batch(large)) == 1 and len(large) == 2
    huge = [(submission("huge", list(range(MAX_BATCH_PARAMETERS + 1))), None)]
    assert len(take_intake_batch(huge)) == 1  # alone, however large: it is checked like any other


def test_concurrent_posts_share_transactions(settings, seed, bearer, engine):
    from service.api.app import create_app

    app = create_app(settings)
    commits = []
    event.listen(app.state.engine, "commit", lambda *_: commits.append(1))
    bodies = [{"subject_id": subject, "sample_ids": [sample]}
              for subject, samples in seed.samples.items() for sample in samples]

    async def post_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer("submitter")) as client:
            await client.get("/models")  # authenticated once, before the burst
            return await asyncio.gather(*(client.post("/forget-requests", json=body) for body in bodies))

    try:
        commits.clear()
        responses = asyncio.run(post_all())
    finally:
        app.state.engine.dispose()
    assert [response.status_code for response in responses] == [202] * len(bodies)
    assert [response.json()["sample_ids"] for response in responses] == [body["sample_ids"] for body in bodies]
    # They arrived together: a few transactions between them, not one each.
    assert 1 <= len(commits) <= len(bodies) // 3, len(commits)
    with transaction(engine) as session:
        assert session.scalar(select(func.count()).select_from(ForgetRequest)) == len(bodies)
        assert verify_chain(session).ok


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_database_failure_fails_every_request_of_its_batch(database_url, seed):
    # A server that does not answer: every submission waiting on the transaction gets the error
    # (the API answers 503 to each), none is filed.
    unreachable = make_engine("postgresql+psycopg://postgres@127.0.0.1:9/nothing", "test")
    queue = intake_queue(session_factory(unreachable), body_of)

    async def file_three():
        return await asyncio.gather(*(queue.submit(submission("alice", [sample])) for sample in seed.samples["alice"][:3]),
                                    return_exceptions=True)

    try:
        outcomes = asyncio.run(file_three())
    finally:
        unreachable.dispose()
    assert len(outcomes) == 3 and all(type(outcome).__name__ == "OperationalError" for outcome in outcomes), outcomes


def test_concurrent_reads_share_statements(settings, seed, bearer, engine):
    from service.api.app import create_app

    with transaction(engine) as session:
        filed = [file_forget_requests(session, [submission(subject)])[0] for subject in ("alice", "bob", "carol")]
    app = create_app(settings)
    reads = []
    event.listen(app.state.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *_: reads.append(1) if "FROM forget_requests" in statement else None)
    unknown = "00000000-0000-0000-0000-000000000000"
    ids = [f.request.id for f in filed] * 5 + [unknown]

    async def get_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer("auditor")) as client:
            await client.get("/models")  # authenticated once, before the burst
            return await asyncio.gather(*(client.get(f"/forget-requests/{request_id}") for request_id in ids))

    try:
        responses = asyncio.run(get_all())
    finally:
        app.state.engine.dispose()
    assert [r.status_code for r in responses] == [200] * (len(ids) - 1) + [404]
    expected = {f.request.id: f.sample_ids for f in filed}
    assert all(r.json()["sample_ids"] == expected[r.json()["id"]] for r in responses[:-1])
    assert 1 <= len(reads) <= len(ids) // 3, len(reads)
