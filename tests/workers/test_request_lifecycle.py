"""The client's side of a request's life, as the workers see it (service.requests.lifecycle), on
SQLite and PostgreSQL: a withdrawn part is never claimed nor counted by the batch policy, an
extended deadline is the one the policy reads, and a linked request runs nothing twice and is
completed with the requests it relies on."""

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event, select

from service.core.db import transaction
from service.core.models import AuditEntry, Batch, ForgetRequest, ForgetRequestPart, ModelVersion, RequestStatus, utcnow
from service.requests import lifecycle
from service.requests.intake import file_forget_request
from service.requests.problems import RequestConflict
from workers.batches.claims import claim_batch
from workers.batches.policy import BatchPolicy, due_models, pending_stats

# Due only by its deadline: never by its sample count or its wait.
DEADLINE_ONLY = BatchPolicy(min_samples=10_000, max_wait_seconds=10**9, due_margin_days=3)


def file(engine, seed, sample_ids=None, subject="alice", deadline_days=30, model=None) -> str:
    with transaction(engine) as session:
        return file_forget_request(session, subject_id=subject, sample_ids=sample_ids, model_name=model or seed.model,
                                   deadline_days=deadline_days, actor="test").request.id


def change(engine, transition, request_id: str, *args) -> None:
    with transaction(engine) as session:
        transition(session, session.get(ForgetRequest, request_id), *args)


def run(engine, seed, *request_ids: str) -> int:
    """Claim the pending parts of these requests as one batch of the seed's model, and complete it."""
    with transaction(engine) as session:
        parts = session.scalars(select(ForgetRequestPart).where(ForgetRequestPart.request_id.in_(request_ids))).all()
        batch = lifecycle.claim(session, list(parts), seed.model, seed.version_id, "test-worker",
                                utcnow() + timedelta(minutes=5), actor="test")
        lifecycle.complete(session, batch, session.get(ModelVersion, seed.version_id), "test", utcnow())
        return batch.id


def statuses(engine, *request_ids: str) -> list[str]:
    with transaction(engine) as session:
        return [session.get(ForgetRequest, request_id).status.value for request_id in request_ids]


def parts_of(engine, request_id: str) -> list[tuple[str, str]]:
    with transaction(engine) as session:
        return [(part.model_name, part.status.value) for part in session.scalars(
            select(ForgetRequestPart).where(ForgetRequestPart.request_id == request_id))]


def due(engine, now: datetime) -> list[str]:
    with engine.connect() as connection:
        return due_models(connection, {}, DEADLINE_ONLY, now, failed_cooldown=timedelta(0))


def test_a_withdrawn_part_is_never_claimed_nor_counted(engine, settings, seed):
    withdrawn = file(engine, seed, subject="alice", deadline_days=1)
    kept = file(engine, seed, subject="bob")
    change(engine, lifecycle.withdraw, withdrawn, "the subject changed their mind", "test", utcnow())
    with engine.connect() as connection:
        [stats] = pending_stats(connection)
    assert stats.samples == len(seed.samples["bob"])  # alice's withdrawn samples are not counted
    assert due(engine, utcnow()) == []  # her near deadline no longer makes a batch due
    claimed = claim_batch(engine, settings, seed.model)
    with transaction(engine) as session:
        batched = session.scalars(select(ForgetRequestPart.request_id).where(
            ForgetRequestPart.batch_id == claimed.batch_id)).all()
    assert batched == [kept]
    assert parts_of(engine, withdrawn) == [(seed.model, "withdrawn")]
    assert claim_batch(engine, settings, seed.model) is None  # the batch runs; nothing else pending anyway


def test_the_due_margin_reads_the_extended_deadline(engine, seed):
    request_id = file(engine, seed, deadline_days=2)
    now = utcnow()
    assert due(engine, now) == [seed.model]  # due in two days, within the three-day margin
    change(engine, lifecycle.extend, request_id, 1, "the data sit in an archive", "test", now)
    assert due(engine, now) == []
    # ... until the new deadline nears.
    with transaction(engine) as session:
        new_due = session.get(ForgetRequest, request_id).due_at
    assert due(engine, new_due.replace(tzinfo=timezone.utc) - timedelta(days=3)) == [seed.model]


def test_a_linked_request_lends_its_deadline_to_the_part_it_waits_for(engine, seed):
    alice = seed.samples["alice"]
    first = file(engine, seed, alice[:2], deadline_days=2)
    change(engine, lifecycle.extend, first, 2, "the data sit in an archive", "test", utcnow())
    assert due(engine, utcnow()) == []
    # A second request for the same samples, due in two days, relies on the first's part: its
    # deadline, not the extended one, decides when that part must run.
    linked = file(engine, seed, alice[:2], deadline_days=2)
    assert parts_of(engine, linked) == []
    assert due(engine, utcnow()) == [seed.model]
    # A request of the subject that relies on nothing lends nothing.
    change(engine, lifecycle.withdraw, linked, "filed twice", "test", utcnow())
    file(engine, seed, alice[2:3], deadline_days=30)
    assert due(engine, utcnow()) == []


def test_an_extension_is_by_one_or_two_months(engine, seed):
    request_id = file(engine, seed)
    with pytest.raises(ValueError, match="not 3"):
        change(engine, lifecycle.extend, request_id, 3, "too long", "test", utcnow())
    with transaction(engine) as session:
        assert session.get(ForgetRequest, request_id).original_due_at is None


@pytest.mark.parametrize(
    ("due_at", "months", "extended"),
    [((2027, 1, 31), 1, (2027, 2, 28)), ((2028, 1, 31), 1, (2028, 2, 29)), ((2027, 12, 31), 2, (2028, 2, 29)),
     ((2027, 11, 30), 1, (2027, 12, 30)), ((2027, 3, 15), 2, (2027, 5, 15))],
)
def test_a_month_is_a_calendar_month_ending_on_the_last_day(due_at, months, extended):
    moment = datetime(*due_at, 17, 45, 12, tzinfo=timezone.utc)
    assert lifecycle.add_months(moment, months) == datetime(*extended, 17, 45, 12, tzinfo=timezone.utc)


def test_a_linked_request_runs_nothing_twice_and_completes_with_the_one_it_follows(engine, seed):
    alice = seed.samples["alice"]
    first = file(engine, seed, alice[:3])
    again = file(engine, seed, alice[:3])
    with transaction(engine) as session:
        assert session.get(ForgetRequest, again).linked_request_id == first
    assert parts_of(engine, again) == []  # no second part for samples under way
    with transaction(engine) as session:
        parts = session.scalars(select(ForgetRequestPart).where(ForgetRequestPart.request_id == first)).all()
        batch = lifecycle.claim(session, list(parts), seed.model, seed.version_id, "test-worker",
                                utcnow() + timedelta(minutes=5), actor="test")
        batch_id = batch.id
    assert statuses(engine, first, again) == ["batched", "batched"]  # it follows the one it is linked to
    with transaction(engine) as session:
        batch = session.get(Batch, batch_id)
        lifecycle.complete(session, batch, session.get(ModelVersion, seed.version_id), "test", utcnow())
    assert statuses(engine, first, again) == ["completed", "completed"]
    with transaction(engine) as session:
        assert session.get(ForgetRequest, again).completed_at is not None
        completed = session.scalars(select(AuditEntry.object_id).where(AuditEntry.action == "request.completed")).all()
    assert sorted(completed) == sorted([first, again])


def test_a_linked_request_with_a_part_of_its_own_waits_for_the_parts_it_relies_on(engine, seed):
    alice = seed.samples["alice"]
    first = file(engine, seed, alice[:2])
    second = file(engine, seed, alice[:4])  # alice[2:4] are its own
    assert parts_of(engine, second) == [(seed.model, "pending")]
    run(engine, seed, second)  # its own part runs first
    # Its part is done, but alice[:2] are still the first request's to forget: not completed yet.
    assert statuses(engine, first, second) == ["pending", "batched"]
    run(engine, seed, first)
    assert statuses(engine, first, second) == ["completed", "completed"]


def test_a_request_covered_by_two_waits_for_both(engine, seed):
    alice = seed.samples["alice"]
    one = file(engine, seed, alice[:1])
    other = file(engine, seed, alice[1:2])
    both = file(engine, seed, alice[:2])
    with transaction(engine) as session:
        assert session.get(ForgetRequest, both).linked_request_id == other  # the newest that covers it
    assert parts_of(engine, both) == []
    run(engine, seed, other)
    assert statuses(engine, one, other, both) == ["pending", "completed", "pending"]
    run(engine, seed, one)
    assert statuses(engine, one, other, both) == ["completed", "completed", "completed"]


def test_an_unrelated_request_of_the_subject_is_not_linked(engine, seed):
    alice = seed.samples["alice"]
    first = file(engine, seed, alice[:1])
    other = file(engine, seed, alice[1:2])
    with transaction(engine) as session:
        assert session.get(ForgetRequest, other).linked_request_id is None
    run(engine, seed, other)
    assert statuses(engine, first, other) == ["pending", "completed"]
    change(engine, lifecycle.withdraw, first, "withdrawn", "test", utcnow())  # nothing relies on it
    assert statuses(engine, first) == ["withdrawn"]


def test_a_request_that_others_rely_on_is_withdrawn_after_them(engine, seed):
    alice = seed.samples["alice"]
    first = file(engine, seed, alice[:2])
    linked = file(engine, seed, alice[1:3])
    with pytest.raises(RequestConflict, match=linked) as refused:
        change(engine, lifecycle.withdraw, first, "withdrawn", "test", utcnow())
    assert refused.value.error_type == "linked_requests_open"
    change(engine, lifecycle.withdraw, linked, "withdrawn", "test", utcnow())
    change(engine, lifecycle.withdraw, first, "withdrawn", "test", utcnow())
    assert statuses(engine, first, linked) == ["withdrawn", "withdrawn"]


def test_settling_costs_the_same_statements_for_one_request_or_many_with_their_links(engine, seed):
    def statements(request_ids: list[str]) -> int:
        sent: list[str] = []

        def collect(conn, cursor, statement, *_):
            sent.append(statement)

        with transaction(engine) as session:
            session.connection()  # begun before counting
            event.listen(engine, "before_cursor_execute", collect)
            try:
                lifecycle._settle_requests(session, request_ids, now=utcnow())
            finally:
                event.remove(engine, "before_cursor_execute", collect)
        return len(sent)

    alice, bob = seed.samples["alice"], seed.samples["bob"]
    one = file(engine, seed, alice[:1], subject="alice")
    many = [file(engine, seed, bob[:2], subject="bob"), *(file(engine, seed, bob[:i], subject="bob") for i in (1, 2)),
            file(engine, seed, seed.samples["carol"], subject="carol")]
    assert statements([one]) == statements(many) <= 5


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_withdrawal_racing_a_claim_either_wins_or_is_refused(database_url, engine, settings, seed):
    # Both at once, many times: the request ends withdrawn and unclaimed, or batched and the
    # withdrawal refused; never withdrawn in a batch, and never a deadlock.
    for _ in range(5):
        request_id = file(engine, seed, seed.samples["alice"][:2])
        start, outcomes = threading.Barrier(2), []

        def withdraw():
            start.wait()
            try:
                change(engine, lifecycle.withdraw, request_id, "withdrawn", "test", utcnow())
                outcomes.append("withdrawn")
            except RequestConflict as refused:
                outcomes.append(refused.error_type)

        def claim():
            start.wait()
            outcomes.append("claimed" if claim_batch(engine, settings, seed.model) else "nothing")

        threads = [threading.Thread(target=withdraw), threading.Thread(target=claim)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(outcomes) in (["nothing", "withdrawn"], ["claimed", "request_batched"]), outcomes
        with transaction(engine) as session:
            part = session.scalars(select(ForgetRequestPart).where(ForgetRequestPart.request_id == request_id)).one()
            assert (part.status == RequestStatus.withdrawn) == (part.batch_id is None)
            batch = session.get(Batch, part.batch_id) if part.batch_id else None
            if batch is not None:
                lifecycle.complete(session, batch, session.get(ModelVersion, seed.version_id), "test", utcnow())
