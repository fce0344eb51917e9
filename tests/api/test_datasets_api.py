"""POST /datasets/{dataset}/samples: a deployment registers its own id-to-subject map."""

import pytest
from sqlalchemy import select

from service.core.db import transaction
from service.core.models import AuditEntry, Sample, Subject
from service.requests.samples import MAX_SAMPLES_PER_REGISTRATION


# The seed registered "digits" indexes 0..14 and "fashion" 15, 16; both data sets have 1437 training samples.
def register(client, samples: list[dict], dataset: str = "fashion"):
    return client.post(f"/datasets/{dataset}/samples", json={"samples": samples})


def test_samples_and_new_subjects_are_registered(client, seed, engine):
    response = register(client, [
        {"dataset_index": 2, "subject_id": "erin"},
        {"dataset_index": 0, "subject_id": "alice"},  # an existing subject
        {"dataset_index": 1, "subject_id": "erin"},
    ])
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["dataset"], body["sample_count"], body["subjects_created"]) == ("fashion", 3, 1)
    assert [(s["dataset"], s["dataset_index"], s["subject_id"]) for s in body["samples"]] == [
        ("fashion", 0, "alice"), ("fashion", 1, "erin"), ("fashion", 2, "erin")
    ]
    assert all(set(s) == {"id", "dataset", "dataset_index", "subject_id"} for s in body["samples"])
    with transaction(engine) as session:
        assert session.get(Subject, "erin") is not None
        stored = session.scalars(select(Sample).where(Sample.dataset == "fashion", Sample.dataset_index < 3)
                                 .order_by(Sample.dataset_index))
        assert [(s.id, s.subject_id) for s in stored] == [(s["id"], s["subject_id"]) for s in body["samples"]]
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "samples.registered")).one()
        assert (entry.object_type, entry.object_id) == ("dataset", "fashion")
        assert entry.actor.startswith("key:")
        assert entry.details["samples"] == 3 and entry.details["subjects_created"] == 1
        # Counts only, no sample id: the audit log is not a copy of the map.
        assert entry.details == {"samples": 3, "subjects_created": 1}


def test_registered_samples_can_then_be_forgotten(client, seed, engine):
    samples = register(client, [{"dataset_index": i, "subject_id": "erin"} for i in range(100, 103)], dataset="digits")
    assert samples.status_code == 201
    ids = [s["id"] for s in samples.json()["samples"]]
    subject = client.get("/subjects/erin").json()
    assert [s["id"] for s in subject["samples"]] == ids
    # The seed's model, on "digits", learned them: it holds them until it forgets them.
    assert [s["models"] for s in subject["samples"]] == [
        [{"model": seed.model, "status": "held", "forgotten_at": None, "version_id": None}]] * 3
    assert (subject["held_sample_count"], subject["forgotten_sample_count"]) == (3, 0)
    filed = client.post("/forget-requests", json={"subject_id": "erin"})
    assert filed.status_code == 202, filed.text
    assert filed.json()["sample_ids"] == ids
    assert [(p["model"], p["status"]) for p in filed.json()["parts"]] == [(seed.model, "pending")]


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
    before = row_counts()
    response = register(client, [{"dataset_index": i, "subject_id": "erin"} for i in (14, 15, 3)], dataset="digits")
    assert response.status_code == 409
    problem = response.json()["detail"][0]
    assert problem["loc"] == ["body", "samples"]
    assert "already registered in data set 'digits': 3, 14" in problem["msg"]
    assert row_counts() == before


def test_registration_on_an_unknown_data_set_is_refused_naming_it(client, seed, row_counts):
    # No model was bootstrapped on it: its size is unknown, so no index can be checked against it.
    before = row_counts()
    response = register(client, [{"dataset_index": 1, "subject_id": "erin"}], dataset="cifar10")
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert (problem["type"], problem["loc"]) == ("unknown_dataset", ["path", "dataset"])
    assert "unknown data set 'cifar10'" in problem["msg"]
    assert row_counts() == before


def test_an_index_beyond_the_training_split_is_refused_naming_it(client, seed, row_counts):
    before = row_counts()
    samples = [{"dataset_index": i, "subject_id": "erin"} for i in (1436, 1437, 5000)]
    response = register(client, samples, dataset="digits")
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert (problem["type"], problem["loc"]) == ("index_out_of_range", ["body", "samples"])
    assert "(0 to 1436): 1437, 5000" in problem["msg"]
    assert row_counts() == before
    # The last index of the split is accepted.
    assert register(client, samples[:1], dataset="digits").status_code == 201


def test_the_data_set_name_is_checked(client, seed):
    assert client.post(f"/datasets/{'x' * 65}/samples", json={"samples": [
        {"dataset_index": 1, "subject_id": "x"}]}).status_code == 422


def test_only_admins_register(anonymous, seed, bearer):
    body = {"samples": [{"dataset_index": 1, "subject_id": "x"}]}
    for role in ("submitter", "auditor"):
        assert anonymous.post("/datasets/fashion/samples", json=body, headers=bearer(role)).status_code == 403
