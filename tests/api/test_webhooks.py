"""Signed webhook deliveries (service/webhooks, docs/webhooks.md), on SQLite and PostgreSQL, to a real
HTTP receiver on 127.0.0.1 that checks each signature the way the Standard Webhooks convention
describes it, with its own HMAC code (not the service's)."""

import base64
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, func, select

from service.core.db import transaction
from service.core.models import AuditEntry, DeliveryStatus, ForgetRequest, WebhookDelivery, utcnow
from service.core.settings import Settings
from service.requests.intake import file_forget_request
from service.webhooks import outbox
from service.webhooks.config import WebhookConfig, with_webhooks
from service.webhooks.delivery import deliver_due
from tests.webhook_receiver import SECRET, TOLERANCE_SECONDS, Receiver, running_receiver, signature_is_valid


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as endpoint:
        yield endpoint


@pytest.fixture
def hooked_settings(database_url, tmp_path, receiver) -> Settings:
    return Settings(database_url=database_url, data_dir=tmp_path / "var", webhook_url=receiver.url,
                    webhook_secret=SECRET, webhook_max_attempts=3, webhook_backoff_seconds=10,
                    webhook_timeout_seconds=2, _env_file=None)


@pytest.fixture
def hooked(engine, hooked_settings):
    """The test engine, carrying the receiver's endpoint."""
    return with_webhooks(engine, WebhookConfig.from_settings(hooked_settings))


@pytest.fixture
def hooked_client(hooked_settings, bearer) -> Iterator[TestClient]:
    from service.api.app import create_app

    with TestClient(create_app(hooked_settings), headers=bearer("admin")) as client:
        yield client


def file_request(engine, subject: str = "alice") -> str:
    with transaction(engine) as session:
        return file_forget_request(session, subject_id=subject, sample_ids=None, model_name=None,
                                   deadline_days=30, actor="test").request.id


def deliveries(engine) -> list[WebhookDelivery]:
    with transaction(engine) as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))


def test_the_receiver_verifies_the_signature_and_refuses_a_tampered_body(hooked_client, hooked, seed, receiver):
    filed = hooked_client.post("/forget-requests", json={"subject_id": "alice"})
    assert filed.status_code == 202
    [attempt] = deliver_due(hooked)
    assert attempt.delivered and attempt.status_code == 204

    [got] = receiver.received
    assert got.signed and got.answered == 204
    envelope = json.loads(got.body)
    assert envelope["type"] == "request.received" and set(envelope) == {"type", "timestamp", "data"}
    assert envelope["data"]["request_id"] == filed.json()["id"]
    assert envelope["data"]["parts"] == [seed.model] and envelope["data"]["sample_count"] == 6
    assert got.headers["content-type"] == "application/json"
    [delivery] = deliveries(hooked)
    assert got.headers["webhook-id"] == delivery.id and delivery.id.startswith("msg_")
    assert hashlib.sha256(got.body).hexdigest() == delivery.payload_sha256

    # The same headers on a body changed by one character, or signed with another secret: refused.
    tampered = got.body.replace(b'"sample_count":6', b'"sample_count":7')
    assert tampered != got.body
    answer = httpx.post(receiver.url, content=tampered, headers=got.headers)
    assert answer.status_code == 400 and not receiver.received[-1].signed
    other = "whsec_" + base64.b64encode(b"another secret, 32 bytes long!!!").decode()
    assert not signature_is_valid(other, got.headers, got.body, time.time())
    assert not signature_is_valid(SECRET, got.headers, got.body, time.time() + 2 * TOLERANCE_SECONDS)


def test_a_receiver_that_fails_twice_gets_it_on_the_third_attempt(hooked, seed, receiver):
    receiver.answers = [500, 500]
    request_id = file_request(hooked)
    start = utcnow()
    assert [a.status_code for a in deliver_due(hooked, now=start)] == [500]
    assert deliver_due(hooked, now=start + timedelta(seconds=9)) == []  # backoff: 10 s after the first
    assert [a.status_code for a in deliver_due(hooked, now=start + timedelta(seconds=10))] == [500]
    assert deliver_due(hooked, now=start + timedelta(seconds=29)) == []  # then 20 s
    assert [a.status_code for a in deliver_due(hooked, now=start + timedelta(seconds=30))] == [204]
    assert deliver_due(hooked, now=start + timedelta(hours=1)) == []  # delivered: never again

    [delivery] = deliveries(hooked)
    assert (delivery.status, delivery.attempts, delivery.request_id) == (DeliveryStatus.delivered, 3, request_id)
    assert [(a["status_code"], a["error"]) for a in delivery.attempt_log] == [
        (500, "HTTP 500"), (500, "HTTP 500"), (204, None)]
    assert delivery.payload is None and delivery.next_attempt_at is None
    # Every attempt: the same id and body, signed anew with its own timestamp.
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    assert len({r.body for r in receiver.received}) == 1
    assert len({r.headers["webhook-timestamp"] for r in receiver.received}) == 3
    assert all(r.signed for r in receiver.received)


def test_after_the_last_attempt_it_fails_and_an_admin_sends_it_again(hooked_client, hooked, seed, receiver, bearer):
    receiver.answers = [503] * 3
    file_request(hooked)
    start = utcnow()
    for seconds in (0, 10, 30):
        deliver_due(hooked, now=start + timedelta(seconds=seconds))
    [delivery] = deliveries(hooked)
    assert (delivery.status, delivery.attempts, delivery.next_attempt_at) == (DeliveryStatus.failed, 3, None)
    assert delivery.payload is not None  # kept for a retry, for QFORGET_WEBHOOK_FAILED_RETENTION_HOURS
    assert deliver_due(hooked, now=start + timedelta(days=1)) == []

    path = f"/webhooks/deliveries/{delivery.id}"
    assert hooked_client.post(f"{path}/retry", headers=bearer("auditor")).status_code == 403
    retried = hooked_client.post(f"{path}/retry")
    assert retried.status_code == 200, retried.text
    assert (retried.json()["status"], retried.json()["attempts"]) == ("pending", 0)
    [attempt] = deliver_due(hooked)
    assert attempt.delivered
    shown = hooked_client.get(path).json()
    assert (shown["status"], shown["attempts"], shown["body_kept"]) == ("delivered", 1, False)
    assert [a["status_code"] for a in shown["attempt_log"]] == [503, 503, 503, 204]

    refused = hooked_client.post(f"{path}/retry")
    assert refused.status_code == 409 and "delivered, not failed" in refused.json()["detail"]
    assert hooked_client.post("/webhooks/deliveries/msg_nothing/retry").status_code == 404
    with transaction(hooked) as session:
        assert session.scalars(select(AuditEntry.action).where(AuditEntry.object_id == delivery.id)).all() == [
            "webhook.retried"]


def test_an_abandoned_delivery_keeps_no_body_and_cannot_be_retried(hooked_client, hooked, seed, receiver):
    receiver.answers = [500] * 3
    file_request(hooked)
    start = utcnow()
    for seconds in (0, 10, 30):
        deliver_due(hooked, now=start + timedelta(seconds=seconds))
    with transaction(hooked) as session:
        assert outbox.clear_abandoned(session, start) == 0  # failed after `start`: still in its retention
        assert outbox.clear_abandoned(session, start + timedelta(hours=1)) == 1
    [delivery] = deliveries(hooked)
    assert (delivery.status, delivery.payload) == (DeliveryStatus.failed, None)
    refused = hooked_client.post(f"/webhooks/deliveries/{delivery.id}/retry")
    assert refused.status_code == 409 and "abandoned" in refused.json()["detail"]


def test_deliveries_are_listed_with_their_attempts_and_never_the_body(hooked_client, hooked, seed, receiver, bearer):
    first, second = file_request(hooked, "alice"), file_request(hooked, "bob")
    receiver.answers = [500]
    deliver_due(hooked)  # the first fails once, the second is delivered
    auditor = bearer("auditor")

    listed = hooked_client.get("/webhooks/deliveries", headers=auditor)
    assert listed.status_code == 200
    body = listed.json()
    assert body["count"] == 2 and [d["request_id"] for d in body["data"]] == [second, first]  # newest first
    assert "payload" not in body["data"][0] and "alice" not in listed.text and "bob" not in listed.text
    by_status = hooked_client.get("/webhooks/deliveries", params={"status": "pending"}, headers=auditor).json()
    assert [d["request_id"] for d in by_status["data"]] == [first]
    [pending] = by_status["data"]
    assert (pending["attempts"], pending["last_status_code"], pending["body_kept"]) == (1, 500, True)
    assert [(a["status_code"], a["error"]) for a in pending["attempt_log"]] == [(500, "HTTP 500")]
    assert hooked_client.get("/webhooks/deliveries", params={"request_id": second},
                             headers=auditor).json()["count"] == 1
    assert hooked_client.get("/webhooks/deliveries", params={"event_type": "request.completed"},
                             headers=auditor).json() == {"data": [], "count": 0}
    page = hooked_client.get("/webhooks/deliveries", params={"limit": 1, "offset": 1}, headers=auditor).json()
    assert (page["count"], [d["request_id"] for d in page["data"]]) == (2, [first])
    assert hooked_client.get("/webhooks/deliveries", headers=bearer("submitter")).status_code == 403
    assert hooked_client.get("/webhooks/deliveries/msg_nothing", headers=auditor).status_code == 404

    delivered = next(d for d in body["data"] if d["request_id"] == second)
    one = hooked_client.get(f"/webhooks/deliveries/{delivered['id']}", headers=auditor).json()
    assert (one["status"], one["body_kept"], one["attempts"]) == ("delivered", False, 1)
    assert one["payload_sha256"] == hashlib.sha256(receiver.received[-1].body).hexdigest()


def test_an_extension_and_a_withdrawal_are_sent_without_their_reasons(hooked_client, hooked, seed, receiver):
    request_id = hooked_client.post("/forget-requests", json={"subject_id": "alice"}).json()["id"]
    extended = hooked_client.post(f"/forget-requests/{request_id}/extension",
                                  json={"months": 2, "reason": "Alice's case needs the archive"})
    assert extended.status_code == 200, extended.text
    withdrawn = hooked_client.post(f"/forget-requests/{request_id}/withdrawal", json={"reason": "Alice asked"})
    assert withdrawn.status_code == 200, withdrawn.text
    deliver_due(hooked)

    events = {envelope["type"]: envelope["data"] for envelope in (json.loads(r.body) for r in receiver.received)}
    assert set(events) == {"request.received", "request.extended", "request.withdrawn"}
    assert events["request.extended"] == {
        "request_id": request_id, "extended_at": extended.json()["extended_at"].replace("Z", "+00:00"),
        "original_due_at": extended.json()["original_due_at"].replace("Z", "+00:00"),
        "due_at": extended.json()["due_at"].replace("Z", "+00:00")}
    assert events["request.withdrawn"]["request_id"] == request_id
    assert "Alice" not in " ".join(r.body.decode() for r in receiver.received)


def test_the_erasure_delivered_records_the_owners_acknowledgement_and_names_no_one_after(
        hooked, seed, receiver, caplog):
    request_id = file_request(hooked)
    data = {"request_id": request_id, "subject_id": "alice",
            "samples": [{"dataset": "digits", "dataset_index": i} for i in range(3)]}
    with transaction(hooked) as session:
        outbox.emit(session, "request.erased", data)
    with caplog.at_level(logging.DEBUG):
        attempts = deliver_due(hooked)
    assert [a.delivered for a in attempts] == [True, True]  # request.received, then request.erased
    assert json.loads(receiver.received[-1].body)["data"] == data
    assert "alice" not in caplog.text and "dataset_index" not in caplog.text

    with transaction(hooked) as session:
        assert session.get(ForgetRequest, request_id).erasure_acknowledged_at is not None
        [entry] = session.scalars(select(AuditEntry).where(AuditEntry.action == "request.erasure_acknowledged"))
        assert entry.object_id == request_id and "alice" not in json.dumps(entry.details)
        rows = session.execute(select(WebhookDelivery.__table__)).all()
    assert all(row.payload is None for row in rows)
    assert "alice" not in repr(rows)


def test_without_a_url_nothing_is_recorded_or_sent(client, engine, seed, receiver):
    statements = []

    def collect(_connection, _cursor, statement, *_):
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", collect)  # every engine: the API's and the test's
    try:
        file_request(engine)
        assert client.post("/forget-requests", json={"subject_id": "bob"}).status_code == 202
        assert deliver_due(engine) == []
    finally:
        event.remove(Engine, "before_cursor_execute", collect)
    assert statements and not [s for s in statements if "webhook_deliveries" in s]
    with transaction(engine) as session:
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0
        with pytest.raises(ValueError, match="unknown webhook event type"):
            outbox.emit(session, "request.nonsense", {})  # a misspelt type is refused all the same
    assert receiver.received == []


PRODUCTION = {"environment": "production", "database_url": "postgresql+psycopg://db/q", "audit_key": "k" * 32}


def test_production_refuses_a_url_without_a_secret(tmp_path):
    with pytest.raises(ValueError, match="QFORGET_WEBHOOK_SECRET: production needs"):
        Settings(data_dir=tmp_path, webhook_url="https://owner.example/hooks", _env_file=None, **PRODUCTION)
    with pytest.raises(ValueError, match="QFORGET_WEBHOOK_SECRET: production needs"):
        Settings(data_dir=tmp_path, webhook_url="https://owner.example/hooks", webhook_secret="",
                 _env_file=None, **PRODUCTION)
    configured = Settings(data_dir=tmp_path, webhook_url="https://owner.example/hooks", webhook_secret=SECRET,
                          _env_file=None, **PRODUCTION)
    assert configured.webhook_signing_key == bytes(range(32))
    assert Settings(data_dir=tmp_path, _env_file=None, **PRODUCTION).webhook_signing_key is None


@pytest.mark.parametrize(("values", "message"), [
    ({"webhook_secret": "not-whsec"}, "must start with 'whsec_'"),
    ({"webhook_secret": "whsec_%%%"}, "not base64"),
    ({"webhook_secret": "whsec_" + base64.b64encode(b"short").decode()}, "24 to 64 bytes"),
    ({"webhook_url": "ftp://owner.example/hooks"}, "http:// or https://"),
])
def test_a_malformed_secret_or_url_is_refused(tmp_path, values, message):
    with pytest.raises(ValueError, match=message):
        Settings(data_dir=tmp_path, _env_file=None, **{"webhook_url": "https://owner.example/h", **values})


def test_elsewhere_a_url_without_a_secret_signs_with_one_kept_in_the_data_folder(tmp_path):
    settings = Settings(data_dir=tmp_path, webhook_url="http://127.0.0.1:9/h", _env_file=None)
    key = settings.webhook_signing_key
    assert len(key) == 32 and settings.webhook_signing_key == key
    kept = (tmp_path / "webhook.secret").read_text().strip()
    assert kept.startswith("whsec_") and base64.b64decode(kept[len("whsec_"):]) == key
    assert (tmp_path / "webhook.secret").stat().st_mode & 0o777 == 0o600


def test_an_unreachable_endpoint_costs_one_attempt_per_run(engine, seed, hooked_settings):
    unreachable = hooked_settings.model_copy(update={"webhook_url": "http://127.0.0.1:9/nothing-listens"})
    hooked = with_webhooks(engine, WebhookConfig.from_settings(unreachable))
    file_request(hooked, "alice")
    file_request(hooked, "bob")
    [attempt] = deliver_due(hooked)
    assert (attempt.status_code, attempt.unreachable) == (None, True) and attempt.error.startswith("ConnectError")
    first, second = deliveries(hooked)
    assert (first.attempts, second.attempts) == (1, 0)  # the second was given back untried, due at once
    assert [a.delivery_id for a in deliver_due(hooked)] == [second.id]
