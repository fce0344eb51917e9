"""POST /datasets/{dataset}/samples: a deployment registers its own id-to-subject map."""

import pytest
from sqlalchemy import select

from service.core.db import transaction
from service.core.models import AuditEntry, Sample, Subject
from service.requests.samples import MAX_SAMPLES_PER_REGISTRATION


def register(client, samples: list[dict], dataset: str = "cifar10"):
    return client.post(f"/datasets/{dataset}/samples", json={"samples": samples})


def test_samples_and_new_subjects_are_registered(client, seed, engine):
    response = register(client, [
        {"dataset_index": 2, "subject_id": "erin"},
        {"dataset_index": 0, "subject_id": "alice"},  # an existing subject
        {"dataset_index": 1, "subject_id": "erin"},
    ])
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["dataset"], body["sample_count"], body["subjects_created"]) == ("cifar10", 3, 1)
    assert [(s["dataset_index"], s["subject_id"], s["status"]) for s in body["samples"]] == [
        (0, "alice", "active"), (1, "erin", "active"), (2, "erin", "active")
    ]
    with transaction(engine) as session:
        assert session.get(Subject, "erin") is not None
        stored = session.scalars(select(Sample).where(Sample.dataset == "cifar10").order_by(Sample.dataset_index))
        assert [(s.id, s.subject_id) for s in stored] == [(s["id"], s["subject_id"]) for s in body["samples"]]
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "samples.registered")).one()
        assert (entry.object_type, entry.object_id) == ("dataset", "cifar10")
        assert entry.actor.startswith("key:")
        assert entry.details["samples"] == 3 and entry.details["subjects_created"] == 1
        assert "erin" not in str(entry.details)  # counts only: the audit log is not a copy of the map


def test_registered_samples_can_then_be_forgotten(client, seed, engine):
    samples = register(client, [{"dataset_index": i, "subject_id": "erin"} for i in range(3)], dataset="digits-extra")
    assert samples.status_code == 201
    subject = client.get("/subjects/erin").json()
    assert [s["id"] for s in subject["samples"]] == [s["id"] for s in samples.json()["samples"]]


@pytest.mark.parametrize(
    ("samples", "loc", "phrase"),
    [
        ([], ["body", "samples"], "at least 1"),
        ([{"dataset_index": i, "subject_id": "x"} for i in range(MAX_SAMPLES_PER_REGISTRATION + 1)],
         ["body", "samples"], str(MAX_SAMPLES_PER_REGISTRATION)),
        ([{"dataset_index": 5, "subject_id": "x"}, {"dataset_index": 5, "subject_id": "y"}],
         ["body", "samples"], "listed more than once: 5"),
        ([{"dataset_index": -1, "subject_id": "x"}], ["body", "samples", 0, "dataset_index"], "greater than"),
        ([{"dataset_index": "one", "subject_id": "x"}], ["body", "samples", 0, "dataset_index"], "integer"),
        ([{"dataset_index": 1, "subject_id": ""}], ["body", "samples", 0, "subject_id"], "at least 1"),
        ([{"dataset_index": 1}], ["body", "samples", 0, "subject_id"], "required"),
        ([{"dataset_index": 1, "subject_id": "x", "label": 3}], ["body", "samples", 0, "label"], "Extra inputs"),
    ],
    ids=["empty", "over-the-limit", "duplicate-index", "negative-index", "index-not-a-number", "empty-subject",
         "missing-subject", "unknown-field"],
)
def test_refused_registrations_name_the_field_and_write_nothing(client, seed, row_counts, samples, loc, phrase):
    before = row_counts()
    response = register(client, samples)
    assert response.status_code == 422, response.text
    problem = response.json()["detail"][0]
    assert problem["loc"] == loc
    assert phrase in problem["msg"]
    assert row_counts() == before


def test_already_registered_indexes_are_a_conflict_naming_them(client, seed, row_counts):
    # The seed registered "digits" indexes 0..14 (and "fashion" 15, 16).
    before = row_counts()
    response = register(client, [{"dataset_index": i, "subject_id": "erin"} for i in (14, 15, 3)], dataset="digits")
    assert response.status_code == 409
    problem = response.json()["detail"][0]
    assert problem["loc"] == ["body", "samples"]
    assert "already registered in data set 'digits': 3, 14" in problem["msg"]
    assert row_counts() == before


def test_the_data_set_name_is_checked(client, seed):
    assert client.post(f"/datasets/{'x' * 65}/samples", json={"samples": [
        {"dataset_index": 1, "subject_id": "x"}]}).status_code == 422


def test_only_admins_register(anonymous, seed, bearer):
    body = {"samples": [{"dataset_index": 1, "subject_id": "x"}]}
    for role in ("submitter", "auditor"):
        assert anonymous.post("/datasets/cifar10/samples", json=body, headers=bearer(role)).status_code == 403
