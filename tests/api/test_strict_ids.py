"""Ids are taken only as integers: in a JSON body a JSON integer (not `true`, "60" or 60.0), in a path
or a query plain decimal digits (not "1.0", "+1", " 1" or "1_0"). Anything else is a 422 naming the
field, and nothing is written.

The cases are read from the app's OpenAPI document, so that an id field added later is covered
too: every integer property of a request body named `*_id`, `*_ids` or `*_index`, and every
integer path or query parameter.
"""

import re
from collections.abc import Iterator

import pytest
from sqlalchemy import update

from service.api.app import create_app
from service.core.db import transaction
from service.core.models import Sample, Subject
from service.core.settings import Settings

DOCUMENT = create_app(Settings(database_url="sqlite://", _env_file=None)).openapi()
ID_NAME = re.compile(r".+_(id|ids|index)")
# Validation reads no database: these run on SQLite only.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _resolve(schema: dict) -> dict:
    """The schema itself: a reference followed, an optional one (`anyOf` with null) unwrapped."""
    if "$ref" in schema:
        return _resolve(DOCUMENT["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]])
    branches = [branch for branch in schema.get("anyOf", ()) if branch.get("type") != "null"]
    return _resolve(branches[0]) if len(branches) == 1 else schema


def _integer_ids(schema: dict, name: str = "") -> Iterator[list[str | int]]:
    """Where each integer id of a body schema is, as a `loc` below "body" (0: a list's first item)."""
    schema = _resolve(schema)
    if schema.get("type") == "object":
        for field, field_schema in schema.get("properties", {}).items():
            yield from ([field, *where] for where in _integer_ids(field_schema, field))
    elif schema.get("type") == "array":
        yield from ([0, *where] for where in _integer_ids(schema["items"], name))
    elif schema.get("type") == "integer" and ID_NAME.fullmatch(name):
        yield []


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


BODY_IDS = [
    (method.upper(), path, where)
    for path, operations in DOCUMENT["paths"].items()
    for method, operation in operations.items()
    if "requestBody" in operation
    for where in _integer_ids(operation["requestBody"]["content"]["application/json"]["schema"])
]
PARAMETERS = [
    (method.upper(), path, parameter["in"], parameter["name"])
    for path, operations in DOCUMENT["paths"].items()
    for method, operation in operations.items()
    for parameter in operation.get("parameters", ())
    if _resolve(parameter["schema"]).get("type") == "integer"
]


def test_the_document_is_read_for_every_id_family():
    assert {(method, path, tuple(where)) for method, path, where in BODY_IDS} >= {
        ("POST", "/forget-requests", ("sample_ids", 0)),
        ("POST", "/datasets/{dataset}/samples", ("samples", 0, "dataset_index")),
        ("POST", "/models/{model}/rollback", ("version_id",)),
    }
    assert {(method, path, name) for method, path, _, name in PARAMETERS} >= {
        ("GET", "/models/{version_id}", "version_id"),
        ("GET", "/audit/versions/{version_id}", "version_id"),
        ("POST", "/batches/{batch_id}/approve", "batch_id"),
        ("GET", "/forget-requests", "limit"),
        ("GET", "/audit/log", "offset"),
    }


def _body(where: list[str | int], value) -> dict:
    """A body with `value` at `where` (and nothing else: the other fields' problems are listed too)."""
    for step in reversed(where):
        value = [value] if isinstance(step, int) else {step: value}
    return value


# Each is refused for its type, whatever else is wrong with the body.
WRONG_TYPES = [True, False, "1", 1.0]
NOT_DECIMAL_DIGITS = ["true", "1.0", "+1", " 1", "1_0"]


@SQLITE_ONLY
@pytest.mark.parametrize(("method", "path", "where"), BODY_IDS, ids=[f"{m} {p} {w}" for m, p, w in BODY_IDS])
def test_a_body_id_of_another_type_is_refused_naming_it(client, seed, row_counts, method, path, where):
    before = row_counts()
    for value in WRONG_TYPES:
        response = client.request(method, _concrete(path), json=_body(where, value))
        assert response.status_code == 422, (value, response.text)
        problems = {tuple(problem["loc"]): problem["msg"] for problem in response.json()["detail"]}
        assert problems.get(("body", *where)) == "Input should be a valid integer", (value, problems)
    assert row_counts() == before


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("method", "path", "where", "name"), PARAMETERS, ids=[f"{m} {p} {n}" for m, p, _, n in PARAMETERS]
)
def test_an_integer_parameter_in_other_than_decimal_digits_is_refused_naming_it(
    client, seed, row_counts, method, path, where, name
):
    before = row_counts()
    for text in NOT_DECIMAL_DIGITS:
        if where == "path":
            response = client.request(method, _concrete(path.replace(f"{{{name}}}", text)))
        else:
            response = client.request(method, _concrete(path), params={name: text})
        assert response.status_code == 422, (text, response.text)
        messages = [problem["msg"] for problem in response.json()["detail"] if problem["loc"] == [where, name]]
        assert messages == ["Value error, expected a whole number in decimal digits, such as 12"], (text, messages)
    assert row_counts() == before


@SQLITE_ONLY
def test_decimal_digits_are_read(client, seed):
    assert client.get("/forget-requests", params={"limit": "2", "offset": "0"}).status_code == 200
    assert client.get(f"/models/{seed.version_id}").json()["id"] == seed.version_id


# The outside test's probes, on a subject that owns samples 1 and 60: read loosely, `true` and "60"
# named them, and a request was filed for each.
PROBE_SUBJECT = "subject-0107"


@pytest.fixture
def probe_subject(seed, engine) -> None:
    assert 1 in seed.samples["alice"] and max(seed.samples["alice"]) < 60
    with transaction(engine) as session:
        session.add(Subject(id=PROBE_SUBJECT))
        session.flush()
        session.execute(update(Sample).where(Sample.id == 1).values(subject_id=PROBE_SUBJECT))
        session.add(Sample(id=60, dataset=seed.dataset, dataset_index=60, subject_id=PROBE_SUBJECT))


@pytest.mark.parametrize("sample_id", [True, "60", 60.0], ids=["true", "string-60", "float-60"])
def test_the_outside_probes_file_nothing(client, probe_subject, row_counts, sample_id):
    before = row_counts()
    # Twice: the first through FastAPI, the second with the key cached, where the hot path
    # (service/api/hot_path.py) validates the body first.
    for _ in range(2):
        response = client.post("/forget-requests", json={"subject_id": PROBE_SUBJECT, "sample_ids": [sample_id]})
        assert response.status_code == 422, response.text
        [problem] = response.json()["detail"]
        assert (problem["loc"], problem["msg"]) == (["body", "sample_ids", 0], "Input should be a valid integer")
    assert row_counts() == before


def test_the_same_samples_as_integers_are_filed(client, probe_subject):
    response = client.post("/forget-requests", json={"subject_id": PROBE_SUBJECT, "sample_ids": [60, 1]})
    assert response.status_code == 202, response.text
    assert response.json()["sample_ids"] == [1, 60]
