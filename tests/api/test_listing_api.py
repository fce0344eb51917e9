"""GET /forget-requests (filters, paging) and GET /subjects/{id}."""

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import inspect, update

from service.core.db import transaction
from service.core.models import ForgetRequest, ForgetRequestPart, ForgottenSample, RequestStatus
from tests.conftest import add_deployed_model


def file(client, subject: str, **body) -> dict:
    response = client.post("/forget-requests", json={"subject_id": subject, **body})
    assert response.status_code == 202, response.text
    return response.json()


def set_request(engine, request_id: str, **values) -> None:
    with transaction(engine) as session:
        session.execute(update(ForgetRequest).where(ForgetRequest.id == request_id).values(**values))


@pytest.fixture
def three_requests(client, seed, engine) -> dict[str, dict]:
    """alice for every model holding her samples, "digits-cnn-4bit" and "other" (pending, 3 days ago), bob
    on "digits-cnn-4bit" (completed, 2 days ago), carol on model "other" (pending, 1 day ago)."""
    add_deployed_model(engine, "other")
    requests = {
        "alice": file(client, "alice"),
        "bob": file(client, "bob", model=seed.model),
        "carol": file(client, "carol", model="other"),
    }
    now = datetime.now(timezone.utc)
    for days, subject in ((3, "alice"), (2, "bob"), (1, "carol")):
        set_request(engine, requests[subject]["id"], received_at=now - timedelta(days=days))
    set_request(engine, requests["bob"]["id"], status=RequestStatus.completed, completed_at=now)
    with transaction(engine) as session:
        session.execute(update(ForgetRequestPart).where(ForgetRequestPart.request_id == requests["bob"]["id"])
                        .values(status=RequestStatus.completed, completed_at=now))
    return requests


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [request["id"] for request in response.json()["data"]]


def test_newest_first_with_the_total(client, three_requests):
    response = client.get("/forget-requests")
    body = response.json()
    assert body["count"] == 3
    assert ids(response) == [three_requests[s]["id"] for s in ("carol", "bob", "alice")]
    assert body["data"][2]["sample_ids"] == three_requests["alice"]["sample_ids"]
    assert [p["model"] for p in body["data"][2]["parts"]] == ["digits-cnn-4bit", "other"]
    assert [(p["model"], p["status"]) for p in body["data"][1]["parts"]] == [("digits-cnn-4bit", "completed")]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status": "pending"}, ["carol", "alice"]),
        ({"status": "completed"}, ["bob"]),
        ({"status": "batched"}, []),
        ({"subject_id": "bob"}, ["bob"]),
        ({"subject_id": "nobody"}, []),
        # A request is listed under every model it has a part for.
        ({"model": "other"}, ["carol", "alice"]),
        ({"model": "digits-cnn-4bit"}, ["bob", "alice"]),
        ({"model": "digits-cnn-4bit", "status": "pending"}, ["alice"]),
        ({"model": "nope"}, []),
    ],
)
def test_filters(client, three_requests, params, expected):
    response = client.get("/forget-requests", params=params)
    assert ids(response) == [three_requests[s]["id"] for s in expected]
    assert response.json()["count"] == len(expected)


def test_a_status_that_does_not_exist_is_refused_naming_it(client, three_requests):
    response = client.get("/forget-requests", params={"status": "failed"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == "status"


def test_time_window(client, three_requests):
    now = datetime.now(timezone.utc)
    window = {"received_after": (now - timedelta(days=2, hours=1)).isoformat(),
              "received_before": (now - timedelta(hours=12)).isoformat()}
    assert ids(client.get("/forget-requests", params=window)) == [three_requests[s]["id"] for s in ("carol", "bob")]
    # Another offset, the same moment.
    moment = (now - timedelta(days=2, hours=1)).astimezone(timezone(timedelta(hours=-5))).isoformat()
    assert len(ids(client.get("/forget-requests", params={"received_after": moment}))) == 2
    # No offset means UTC.
    naive = (now - timedelta(days=2, hours=1)).replace(tzinfo=None).isoformat()
    assert len(ids(client.get("/forget-requests", params={"received_after": naive}))) == 2


def test_paging(client, three_requests):
    newest_first = [three_requests[s]["id"] for s in ("carol", "bob", "alice")]
    page = client.get("/forget-requests", params={"limit": 2, "offset": 0})
    assert (ids(page), page.json()["count"]) == (newest_first[:2], 3)
    page = client.get("/forget-requests", params={"limit": 2, "offset": 2})
    assert (ids(page), page.json()["count"]) == (newest_first[2:], 3)
    assert ids(client.get("/forget-requests", params={"offset": 10})) == []


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"status": "done"}, ["query", "status"]),
        ({"limit": 0}, ["query", "limit"]),
        ({"limit": 501}, ["query", "limit"]),
        ({"offset": -1}, ["query", "offset"]),
        ({"received_after": "yesterday"}, ["query", "received_after"]),
        # Year 1 at +14:00 is before year 1 in UTC: out of range, not a server error.
        ({"received_before": "0001-01-01T00:00:00+14:00"}, ["query", "received_before"]),
        ({"subject_id": "a\x00b"}, ["query", "subject_id"]),
        # A bare number would be Unix time to pydantic; the API documents ISO 8601.
        ({"received_after": "15"}, ["query", "received_after"]),
        # A misspelt filter is refused, not ignored (the caller would take the whole list for the filtered one).
        ({"stauts": "pending"}, ["query", "stauts"]),
        ({"status": ["pending", "completed"]}, ["query", "status"]),
    ],
    ids=["unknown-status", "limit-0", "limit-too-big", "negative-offset", "not-a-time", "time-out-of-range", "nul",
         "unix-time", "unknown-parameter", "repeated-parameter"],
)
def test_malformed_filters_are_422(client, seed, params, loc):
    response = client.get("/forget-requests", params=params)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == loc


def test_an_unknown_query_parameter_is_named_with_what_the_route_takes(client, seed):
    problem = client.get("/audit/log", params={"actions": "x"}).json()["detail"][0]
    assert problem == {
        "type": "extra_forbidden", "loc": ["query", "actions"],
        "msg": "unknown query parameter; it takes action, limit, object_id, object_type, offset",
    }
    # Routes that take no query parameters have none to misspell, and ignore them.
    assert client.get("/subjects/alice", params={"verbose": "1"}).status_code == 200
    assert client.get("/health", params={"ts": "1"}).status_code == 200


def test_the_filters_have_indexes(engine):
    indexes = {tuple(index["column_names"]) for index in inspect(engine).get_indexes("forget_requests")}
    assert {("status", "received_at"), ("received_at",), ("subject_id",)} <= indexes
    # The model filter looks for a part of the model: by its key (request_id, model_name), and by
    # model and status for the workers' claims.
    assert inspect(engine).get_pk_constraint("forget_request_parts")["constrained_columns"] == [
        "request_id", "model_name"]
    indexes = {tuple(index["column_names"]) for index in inspect(engine).get_indexes("forget_request_parts")}
    assert {("model_name", "status"), ("batch_id",)} <= indexes
    indexes = {tuple(index["column_names"]) for index in inspect(engine).get_indexes("audit_log")}
    assert {("action",), ("object_type", "object_id")} <= indexes


def test_a_subject_with_samples_and_requests(client, seed, engine):
    alice = seed.samples["alice"]
    first = file(client, "alice", sample_ids=alice[:2])
    second = file(client, "alice", sample_ids=alice[2:3])
    forgotten_at = datetime.now(timezone.utc)
    with transaction(engine) as session:
        session.add(ForgottenSample(model_name=seed.model, sample_id=alice[0], forgotten_at=forgotten_at,
                                    version_id=seed.version_id))
    response = client.get("/subjects/alice")
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == "alice"
    assert (body["held_sample_count"], body["forgotten_sample_count"]) == (len(alice) - 1, 1)
    assert [(s["id"], s["dataset"], s["subject_id"]) for s in body["samples"]] == [
        (i, "digits", "alice") for i in alice]
    [forgotten] = body["samples"][0]["models"]
    assert (forgotten["model"], forgotten["status"], forgotten["version_id"]) == (seed.model, "forgotten",
                                                                                  seed.version_id)
    assert datetime.fromisoformat(forgotten["forgotten_at"]) == forgotten_at
    assert [s["models"] for s in body["samples"][1:]] == [
        [{"model": seed.model, "status": "held", "forgotten_at": None, "version_id": None}]] * (len(alice) - 1)
    assert [r["id"] for r in body["requests"]] == [second["id"], first["id"]]
    assert body["requests"][1]["sample_ids"] == alice[:2]
    assert [p["model"] for p in body["requests"][1]["parts"]] == [seed.model]


def test_a_sample_counts_as_forgotten_once_no_model_holds_it(client, seed, engine):
    other_version = add_deployed_model(engine, "other")
    carol = seed.samples["carol"]
    with transaction(engine) as session:
        session.add_all([ForgottenSample(model_name=seed.model, sample_id=i, forgotten_at=datetime.now(timezone.utc),
                                         version_id=seed.version_id) for i in carol]
                        + [ForgottenSample(model_name="other", sample_id=carol[0],
                                           forgotten_at=datetime.now(timezone.utc), version_id=other_version)])
    body = client.get("/subjects/carol").json()
    assert (body["held_sample_count"], body["forgotten_sample_count"]) == (2, 1)
    assert [[(h["model"], h["status"]) for h in s["models"]] for s in body["samples"]] == [
        [(seed.model, "forgotten"), ("other", "forgotten")],
        [(seed.model, "forgotten"), ("other", "held")],
        [(seed.model, "forgotten"), ("other", "held")],
    ]


def test_a_subject_without_requests(client, seed):
    body = client.get("/subjects/carol").json()
    assert (len(body["samples"]), body["requests"]) == (3, [])


def test_an_unknown_subject_is_404(client, seed):
    response = client.get("/subjects/zed")
    assert response.status_code == 404
    assert response.json() == {"detail": "subject 'zed' not found"}


def test_a_key_limited_to_a_model_sees_its_data_set_only(anonymous, seed, bearer):
    # dave owns samples only in "fashion", not in the model's data set "digits".
    body = anonymous.get("/subjects/dave", headers=bearer("submitter", seed.model)).json()
    assert body["samples"] == []
    body = anonymous.get("/subjects/dave", headers=bearer("submitter")).json()
    assert [s["id"] for s in body["samples"]] == seed.other_dataset_samples["dave"]
    assert [s["models"] for s in body["samples"]] == [[], []]  # no model was trained on "fashion"


def test_a_key_limited_to_a_model_sees_that_models_holdings_and_parts_only(client, anonymous, seed, engine, bearer):
    add_deployed_model(engine, "other")
    file(client, "alice", model=seed.model, sample_ids=seed.samples["alice"][:1])  # not "other"'s business
    filed = file(client, "alice")  # for both models
    assert [p["model"] for p in filed["parts"]] == [seed.model, "other"]
    everything = anonymous.get("/subjects/alice", headers=bearer("auditor")).json()
    assert {h["model"] for s in everything["samples"] for h in s["models"]} == {seed.model, "other"}
    limited = anonymous.get("/subjects/alice", headers=bearer("submitter", "other")).json()
    assert [s["id"] for s in limited["samples"]] == seed.samples["alice"]
    assert {h["model"] for s in limited["samples"] for h in s["models"]} == {"other"}
    [request] = limited["requests"]
    assert request["id"] == filed["id"] and [p["model"] for p in request["parts"]] == ["other"]
