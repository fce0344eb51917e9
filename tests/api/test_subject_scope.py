"""What a submitter key limited to one model reads of a subject: that model's requests and parts,
the samples of its data set as that model holds them, and no other model's version ids. Unlimited
keys (submitter, auditor, admin) read everything."""

from dataclasses import dataclass

import pytest
from sqlalchemy import update

from service.core.db import transaction
from service.core.models import ForgetRequestPart, ForgottenSample, RequestStatus, utcnow
from service.requests.intake import file_forget_request
from tests.conftest import add_deployed_model

OTHER = "other"  # a second model on the seed's data set


@dataclass(frozen=True)
class TwoModels:
    mine: str  # alice's request for the seed's model
    theirs: str  # alice's request for OTHER, completed by `other_version`
    other_version: int
    forgotten_by_other: int  # alice's sample OTHER's version forgot
    forgotten_by_mine: int  # alice's sample a version of the seed's model forgot


@pytest.fixture
def two_models(engine, seed) -> TwoModels:
    alice = seed.samples["alice"]
    other_version = add_deployed_model(engine, OTHER, seed.dataset)
    with transaction(engine) as session:
        mine = file_forget_request(session, subject_id="alice", sample_ids=alice[2:3], model_name=seed.model,
                                   deadline_days=30, actor="test").request.id
        theirs = file_forget_request(session, subject_id="alice", sample_ids=alice[:1], model_name=OTHER,
                                     deadline_days=30, actor="test").request.id
        session.execute(update(ForgetRequestPart).where(ForgetRequestPart.request_id == theirs).values(
            status=RequestStatus.completed, completed_version_id=other_version, completed_at=utcnow()))
        for model_name, sample_id, version_id in ((OTHER, alice[0], other_version),
                                                  (seed.model, alice[1], seed.version_id)):
            session.add(ForgottenSample(model_name=model_name, sample_id=sample_id, forgotten_at=utcnow(),
                                        version_id=version_id))
    return TwoModels(mine, theirs, other_version, forgotten_by_other=alice[0], forgotten_by_mine=alice[1])


def forgotten_by(subject: dict) -> dict[tuple[int, str], int]:
    """{(sample, model): the version that forgot it} as the response shows it."""
    return {(sample["id"], holding["model"]): holding["version_id"] for sample in subject["samples"]
            for holding in sample["models"] if holding["status"] == "forgotten"}


def test_a_key_limited_to_a_model_reads_a_subject_as_it_concerns_that_model(anonymous, seed, bearer, two_models):
    subject = anonymous.get("/subjects/alice", headers=bearer("submitter", seed.model)).json()
    assert [request["id"] for request in subject["requests"]] == [two_models.mine]
    assert [sample["id"] for sample in subject["samples"]] == seed.samples["alice"]
    # Only its own model's holdings, so no other model's version id.
    assert forgotten_by(subject) == {(two_models.forgotten_by_mine, seed.model): seed.version_id}
    assert {h["model"] for sample in subject["samples"] for h in sample["models"]} == {seed.model}

    subject = anonymous.get("/subjects/alice", headers=bearer("submitter", OTHER)).json()
    assert [request["id"] for request in subject["requests"]] == [two_models.theirs]
    assert [p["completed_version_id"] for p in subject["requests"][0]["parts"]] == [two_models.other_version]
    assert forgotten_by(subject) == {(two_models.forgotten_by_other, OTHER): two_models.other_version}


@pytest.mark.parametrize("role", ["submitter", "auditor", "admin"])
def test_an_unlimited_key_reads_the_whole_subject(anonymous, seed, bearer, two_models, role):
    subject = anonymous.get("/subjects/alice", headers=bearer(role)).json()
    assert {request["id"] for request in subject["requests"]} == {two_models.mine, two_models.theirs}
    assert forgotten_by(subject) == {(two_models.forgotten_by_other, OTHER): two_models.other_version,
                                     (two_models.forgotten_by_mine, seed.model): seed.version_id}


def test_a_key_limited_to_a_model_finds_no_other_models_request_of_the_subject(anonymous, seed, bearer, two_models):
    limited = bearer("submitter", seed.model)
    listing = anonymous.get("/forget-requests", params={"subject_id": "alice"}, headers=limited).json()
    assert [request["id"] for request in listing["data"]] == [two_models.mine]
    assert anonymous.get(f"/forget-requests/{two_models.theirs}", headers=limited).status_code == 404
    assert anonymous.get(f"/forget-requests/{two_models.theirs}/evidence", headers=limited).status_code == 404
