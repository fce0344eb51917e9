"""POST and GET /forget-requests: intake, its validation, and what it writes."""

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import NamedTuple

import pytest
from sqlalchemy import event, insert, select, update

from service.core.audit_log import audit_key
from service.core.db import transaction
from service.core.models import (
    AuditEntry,
    ForgetRequest,
    ForgetRequestPart,
    ForgottenSample,
    Model,
    RequestStatus,
    Sample,
    Subject,
    utcnow,
)
from service.core.pseudonyms import pseudonym
from service.requests.intake import MAX_SAMPLES_PER_REQUEST
from tests.conftest import add_deployed_model


def forget(engine, model: str, sample_ids: list[int], version_id: int) -> None:
    """Record that `model` no longer holds these samples (forgotten by `version_id`)."""
    with transaction(engine) as session:
        session.add_all(ForgottenSample(model_name=model, sample_id=sample_id, forgotten_at=utcnow(),
                                        version_id=version_id) for sample_id in sample_ids)


def set_part_status(engine, request_id: str, status: RequestStatus) -> None:
    """Set every part of the request, and the request itself, to `status`."""
    with transaction(engine) as session:
        session.execute(update(ForgetRequestPart).where(ForgetRequestPart.request_id == request_id)
                        .values(status=status))
        session.execute(update(ForgetRequest).where(ForgetRequest.id == request_id).values(status=status))


def test_create_then_read(client, seed, engine, api_key):
    alice = seed.samples["alice"]
    key = api_key("submitter")
    response = client.post(
        "/forget-requests",
        json={"subject_id": "alice", "sample_ids": [alice[1], alice[0]]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["subject_id"] == "alice"
    assert created["model"] is None  # no model named: every model that holds the samples
    assert created["status"] == "pending"
    assert created["sample_ids"] == sorted(alice[:2])
    assert created["sample_count"] == 2
    assert created["completed_at"] is None
    assert created["parts"] == [{"model": seed.model, "status": "pending", "batch_id": None,
                                 "completed_version_id": None, "completed_at": None, "instant_version_id": None,
                                 "instant_at": None, "error": None}]
    assert not {"batch_id", "completed_version_id", "error"} & set(created)
    received_at = datetime.fromisoformat(created["received_at"])
    assert received_at.utcoffset() == timedelta(0)
    assert datetime.fromisoformat(created["due_at"]) - received_at == timedelta(days=30)

    read = client.get(f"/forget-requests/{created['id']}")
    assert read.status_code == 200
    assert read.json() == created

    with transaction(engine) as session:
        audit = session.scalars(select(AuditEntry).where(AuditEntry.object_type == "forget_request")).one()
        # The actor is the key that filed it, by its public prefix ("qf_<prefix>_<secret>").
        assert (audit.action, audit.object_type, audit.object_id, audit.actor) == (
            "request.received", "forget_request", created["id"], f"key:{key[3:11]}"
        )
        # Named by their pseudonyms only (service.core.pseudonyms), as the subject is.
        key = audit_key(session)
        assert audit.details["sample_pseudonyms"] == [pseudonym(key, "sample", sample) for sample in sorted(alice[:2])]
        assert (audit.details["model"], audit.details["parts"]) == (None, [seed.model])


def test_a_request_naming_a_model_is_filed_for_it_alone(client, seed, engine):
    add_deployed_model(engine, "digits-mlp", "digits")
    response = client.post("/forget-requests", json={"subject_id": "alice", "model": seed.model})
    assert response.status_code == 202, response.text
    created = response.json()
    assert (created["model"], [p["model"] for p in created["parts"]]) == (seed.model, [seed.model])
    assert created["sample_ids"] == seed.samples["alice"]


def test_without_a_model_a_request_goes_to_every_model_that_holds_the_samples(client, seed, engine):
    mlp_version = add_deployed_model(engine, "digits-mlp", "digits")
    add_deployed_model(engine, "fashion-cnn", "fashion")
    with transaction(engine) as session:
        session.add(Model(name="digits-untrained", dataset="digits", spec={}))  # never deployed: holds nothing
    alice = client.post("/forget-requests", json={"subject_id": "alice"}).json()
    assert [(p["model"], p["status"]) for p in alice["parts"]] == [("digits-cnn-4bit", "pending"),
                                                                   ("digits-mlp", "pending")]
    assert (alice["model"], alice["sample_ids"]) == (None, seed.samples["alice"])
    dave = client.post("/forget-requests", json={"subject_id": "dave"}).json()
    assert [p["model"] for p in dave["parts"]] == ["fashion-cnn"]
    assert dave["sample_ids"] == seed.other_dataset_samples["dave"]

    # A model that forgot some of bob's samples has a part for the rest; the request names them all.
    bob = seed.samples["bob"]
    forget(engine, "digits-mlp", bob[:2], mlp_version)
    filed = client.post("/forget-requests", json={"subject_id": "bob"}).json()
    assert filed["sample_ids"] == bob and [p["model"] for p in filed["parts"]] == ["digits-cnn-4bit", "digits-mlp"]
    # A model that forgot all of carol's has no part.
    forget(engine, "digits-mlp", seed.samples["carol"], mlp_version)
    carol = client.post("/forget-requests", json={"subject_id": "carol"}).json()
    assert [p["model"] for p in carol["parts"]] == [seed.model]
    assert client.get(f"/forget-requests/{alice['id']}").json() == alice


def test_a_named_sample_already_in_an_open_request_is_linked_not_run_twice(client, seed, engine):
    # A second request for samples under way is filed, linked to the open request: the samples that
    # request covers get no second part; the others get one as usual.
    alice = seed.samples["alice"]
    first = client.post("/forget-requests", json={"subject_id": "alice", "sample_ids": alice[:1]}).json()
    assert first["linked_to"] is None
    second = client.post("/forget-requests", json={"subject_id": "alice", "sample_ids": alice[:2]})
    assert second.status_code == 202, second.text
    second = second.json()
    assert (second["linked_to"], second["sample_ids"], [p["model"] for p in second["parts"]]) == (
        first["id"], alice[:2], [seed.model])
    # Nothing of its own left: filed with no part, linked to the subject's newest request under way.
    third = client.post("/forget-requests", json={"subject_id": "alice", "sample_ids": alice[:1]})
    assert third.status_code == 202, third.text
    assert (third.json()["linked_to"], third.json()["parts"], third.json()["status"]) == (second["id"], [], "pending")
    assert client.get(f"/forget-requests/{third.json()['id']}").json() == third.json()
    with transaction(engine) as session:
        parts = session.execute(select(ForgetRequestPart.request_id, ForgetRequestPart.model_name)).all()
        audit = session.scalars(select(AuditEntry.details).where(AuditEntry.object_id == third.json()["id"])).one()
    assert sorted(parts) == sorted([(first["id"], seed.model), (second["id"], seed.model)])
    assert (audit["linked_to"], audit["parts"]) == (second["id"], [])


def test_one_model_with_the_samples_in_an_open_request_leaves_them_to_the_others(client, seed, engine):
    add_deployed_model(engine, "digits-mlp", "digits")
    carol = seed.samples["carol"]
    first = client.post("/forget-requests", json={"subject_id": "carol", "model": seed.model}).json()
    # The seed's model already has them on their way: the new request goes to digits-mlp only.
    second = client.post("/forget-requests", json={"subject_id": "carol"})
    assert second.status_code == 202, second.text
    assert (second.json()["sample_ids"], [p["model"] for p in second.json()["parts"]]) == (carol, ["digits-mlp"])
    assert second.json()["linked_to"] == first["id"]
    # Now every model that holds them has them in an open part: linked, with no part of its own.
    third = client.post("/forget-requests", json={"subject_id": "carol"})
    assert third.status_code == 202, third.text
    assert (third.json()["sample_ids"], third.json()["parts"], third.json()["linked_to"]) == (
        carol, [], second.json()["id"])


@pytest.mark.parametrize("status", [RequestStatus.pending, RequestStatus.batched])
def test_samples_in_a_pending_or_batched_request_are_linked(client, seed, engine, status):
    alice = seed.samples["alice"]
    first = client.post("/forget-requests", json={"subject_id": "alice", "sample_ids": alice[:2]}).json()
    set_part_status(engine, first["id"], status)
    second = client.post("/forget-requests", json={"subject_id": "alice", "sample_ids": alice[:2]})
    assert second.status_code == 202, second.text
    assert (second.json()["linked_to"], second.json()["parts"]) == (first["id"], [])


def test_without_sample_ids_all_held_samples_of_the_subject_are_taken(client, seed, engine):
    bob = seed.samples["bob"]
    forget(engine, seed.model, bob[:1], seed.version_id)
    response = client.post("/forget-requests", json={"subject_id": "bob"})
    assert response.status_code == 202, response.text
    assert response.json()["sample_ids"] == bob[1:]


def test_without_sample_ids_samples_already_requested_get_no_second_part(client, seed, engine):
    alice = seed.samples["alice"]
    first = client.post("/forget-requests", json={"subject_id": "alice", "sample_ids": alice[:2]}).json()
    response = client.post("/forget-requests", json={"subject_id": "alice"})
    assert response.status_code == 202, response.text
    # It names every sample the subject asked about; its part covers what the first does not, and it
    # follows the first for the rest.
    assert (response.json()["sample_ids"], response.json()["linked_to"]) == (alice, first["id"])
    assert [p["model"] for p in response.json()["parts"]] == [seed.model]


def test_samples_of_a_completed_request_may_be_requested_again_for_the_model(client, seed, engine):
    # Only open requests block: a completed one whose samples were restored (say, by a rollback)
    # does not.
    alice = seed.samples["alice"]
    first = client.post("/forget-requests", json={"subject_id": "alice", "sample_ids": alice[:1]}).json()
    set_part_status(engine, first["id"], RequestStatus.completed)
    assert client.post("/forget-requests", json={"subject_id": "alice", "sample_ids": alice[:1]}).status_code == 202


def _forget(client, engine, seed) -> None:
    forget(engine, seed.model, seed.samples["alice"][1:2], seed.version_id)


def _forget_all_of_carol(client, engine, seed) -> None:
    forget(engine, seed.model, seed.samples["carol"], seed.version_id)


class Refused(NamedTuple):
    body: Callable  # the seed -> the request body
    loc: list
    phrase: str  # the message must contain it
    status: int = 422
    setup: Callable | None = None  # (client, engine, seed), before the counts are taken


def alice(sample_ids: Callable) -> Callable:
    return lambda seed: {"subject_id": "alice", "sample_ids": sample_ids(seed)}


SAMPLE_IDS = ["body", "sample_ids"]
SUBJECT_ID = ["body", "subject_id"]
REFUSED = {
    "unknown-model": Refused(lambda s: {"subject_id": "alice", "model": "nope"}, ["body", "model"], "unknown model"),
    "unknown-subject": Refused(lambda s: {"subject_id": "zed"}, SUBJECT_ID, "unknown subject"),
    "unknown-samples": Refused(alice(lambda s: [s.samples["alice"][0], 999_999]), SAMPLE_IDS, "999999"),
    "another-subjects-samples": Refused(
        alice(lambda s: [s.samples["alice"][0], s.samples["bob"][2]]), SAMPLE_IDS, "do not belong to subject 'alice'"
    ),
    # The model learned only its own data set: another data set's samples are not held by it.
    "samples-in-another-data-set-for-the-model": Refused(
        lambda s: {"subject_id": "dave", "sample_ids": s.other_dataset_samples["dave"], "model": s.model},
        SAMPLE_IDS,
        "no longer held by model 'digits-cnn-4bit'",
    ),
    # No model was trained on "fashion": nothing holds dave's samples.
    "samples-no-model-holds": Refused(
        lambda s: {"subject_id": "dave", "sample_ids": s.other_dataset_samples["dave"]},
        SAMPLE_IDS,
        "samples no longer held (already forgotten, or never learned)",
    ),
    "forgotten-samples": Refused(
        alice(lambda s: s.samples["alice"][:2]), SAMPLE_IDS, "already forgotten", setup=_forget
    ),
    "duplicates": Refused(alice(lambda s: [s.samples["alice"][0]] * 2), SAMPLE_IDS, "more than once"),
    "empty-list": Refused(alice(lambda s: []), SAMPLE_IDS, "empty"),
    "over-the-limit": Refused(
        alice(lambda s: list(range(1, MAX_SAMPLES_PER_REQUEST + 2))), SAMPLE_IDS, str(MAX_SAMPLES_PER_REQUEST)
    ),
    "no-samples-held-by-any-model": Refused(
        lambda s: {"subject_id": "dave"}, SUBJECT_ID, "subject 'dave' has no samples that any model still holds"
    ),
    "no-samples-held-by-the-model": Refused(
        lambda s: {"subject_id": "dave", "model": s.model}, SUBJECT_ID,
        "subject 'dave' has no samples that model 'digits-cnn-4bit' still holds"
    ),
    "all-samples-forgotten": Refused(
        lambda s: {"subject_id": "carol"}, SUBJECT_ID, "has no samples that any model still holds",
        setup=_forget_all_of_carol,
    ),
    "empty-subject-id": Refused(lambda s: {"subject_id": ""}, SUBJECT_ID, "at least 1"),
    "long-subject-id": Refused(lambda s: {"subject_id": "x" * 129}, SUBJECT_ID, "at most 128"),
    "missing-subject-id": Refused(lambda s: {"sample_ids": [1]}, SUBJECT_ID, "required"),
    "sample-id-zero": Refused(alice(lambda s: [0]), [*SAMPLE_IDS, 0], "greater than or equal to 1"),
    "sample-id-too-big": Refused(alice(lambda s: [2**63]), [*SAMPLE_IDS, 0], "less than or equal"),
    # PostgreSQL text cannot hold NUL; unchecked, this is a 500 there.
    "nul-in-subject-id": Refused(lambda s: {"subject_id": "alice\x00"}, SUBJECT_ID, "pattern"),
    "unknown-field": Refused(lambda s: {"subject_id": "alice", "reason": "x"}, ["body", "reason"], "Extra inputs"),
    # Wrong types: each named, none coerced from another type.
    "subject-id-a-number": Refused(lambda s: {"subject_id": 5}, SUBJECT_ID, "valid string"),
    "sample-ids-a-string": Refused(alice(lambda s: "1,2"), SAMPLE_IDS, "valid list"),
    "sample-id-a-string": Refused(alice(lambda s: ["one"]), [*SAMPLE_IDS, 0], "valid integer"),
    "sample-id-a-fraction": Refused(alice(lambda s: [1.5]), [*SAMPLE_IDS, 0], "valid integer"),
    "model-a-list": Refused(lambda s: {"subject_id": "alice", "model": ["a"]}, ["body", "model"], "valid string"),
}


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_refused_input_names_the_field_and_writes_nothing(client, seed, engine, row_counts, case):
    if case.setup is not None:
        case.setup(client, engine, seed)
    before = row_counts()
    response = client.post("/forget-requests", json=case.body(seed))
    assert response.status_code == case.status, response.text
    problems = response.json()["detail"]
    assert [problem["loc"] for problem in problems] == [case.loc]
    assert case.phrase in problems[0]["msg"]
    assert row_counts() == before


def test_a_refused_sample_of_another_subject_does_not_name_that_subject(client, seed):
    response = client.post("/forget-requests", json={"subject_id": "alice", "sample_ids": seed.samples["bob"][:1]})
    assert response.status_code == 422
    assert "bob" not in response.text


@pytest.mark.parametrize(
    ("content", "content_type", "phrase"),
    [
        (b'{"subject_id": ', "application/json", "not valid JSON"),
        (b'["alice"]', "application/json", "must be a JSON object"),
        (b"subject_id=alice", "application/x-www-form-urlencoded", "must be a JSON object"),
    ],
    ids=["truncated-json", "json-array", "form-encoded"],
)
def test_a_malformed_body_is_a_clear_422(client, seed, row_counts, content, content_type, phrase):
    before = row_counts()
    response = client.post("/forget-requests", content=content, headers={"content-type": content_type})
    assert response.status_code == 422
    problem = response.json()["detail"][0]
    assert problem["loc"][0] == "body" and phrase in problem["msg"]
    assert row_counts() == before


def test_a_body_that_is_not_utf8_is_a_400(client, seed, row_counts):
    before = row_counts()
    response = client.post(
        "/forget-requests", content=b'{"subject_id": "\xe9"}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"detail": "There was an error parsing the body"}
    assert row_counts() == before


def test_a_request_id_that_cannot_be_one_is_422(client, seed):
    assert client.get("/forget-requests/a%00b").status_code == 422
    assert client.get(f"/forget-requests/{'x' * 37}").status_code == 422


def test_an_unknown_request_id_is_404_naming_it(client, seed):
    unknown = str(uuid.uuid4())
    response = client.get(f"/forget-requests/{unknown}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"forget request {unknown!r} not found"}


def test_intake_runs_the_same_statements_for_5_or_500_samples(client, seed, engine):
    with transaction(engine) as session:
        session.execute(insert(Subject), [{"id": "zoe"}])
        session.execute(
            insert(Sample), [{"dataset": "digits", "dataset_index": 500 + i, "subject_id": "zoe"} for i in range(505)]
        )
        zoe = list(session.scalars(select(Sample.id).where(Sample.subject_id == "zoe").order_by(Sample.id)))
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    api_engine = client.app.state.engine
    assert client.get("/models").status_code == 200  # the key is authenticated (and cached) before counting
    event.listen(api_engine, "before_cursor_execute", count)
    try:
        assert client.post("/forget-requests", json={"subject_id": "zoe", "sample_ids": zoe[:5]}).status_code == 202
        small = len(statements)
        statements.clear()
        assert client.post("/forget-requests", json={"subject_id": "zoe", "sample_ids": zoe[5:]}).status_code == 202
        large = len(statements)
    finally:
        event.remove(api_engine, "before_cursor_execute", count)
    assert large == small, statements
    assert large <= 12, statements


LIMIT = 1 << 20  # QFORGET_API_MAX_BODY_BYTES' default


def test_a_body_over_the_size_limit_is_413_naming_the_limit(client, seed, row_counts):
    before = row_counts()
    body = b'{"subject_id": "alice", "padding": "' + b"x" * LIMIT + b'"}'
    response = client.post("/forget-requests", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"detail": "the request body is larger than the limit of 1048576 bytes (1 MiB)"}
    assert row_counts() == before


def test_a_streamed_body_without_content_length_is_counted_too(client, seed, row_counts):
    before = row_counts()

    def chunks():
        yield b'{"subject_id": "alice", "padding": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    response = client.post("/forget-requests", content=chunks(), headers={"content-type": "application/json"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert "1048576 bytes" in response.json()["detail"]
    assert row_counts() == before


def test_a_body_at_the_size_limit_is_read(client, seed):
    body = b'{"subject_id": "alice"}'
    body += b" " * (LIMIT - len(body))  # JSON allows trailing whitespace
    assert len(body) == LIMIT
    response = client.post("/forget-requests", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text
