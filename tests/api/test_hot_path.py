"""The hot path (service/api/hot_path.py): the common case of POST /forget-requests and GET
/forget-requests/{id} served without FastAPI's dependency solving, with the same answers."""

import pytest
from fastapi import routing
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.db import transaction
from service.core.models import Model


@pytest.fixture
def solves(monkeypatch) -> list[str]:
    """The paths FastAPI solved a route's dependencies for (i.e. served itself)."""
    solved: list[str] = []
    original = routing.solve_dependencies

    async def counting(*, request, **kwargs):
        solved.append(f"{request.method} {request.url.path}")
        return await original(request=request, **kwargs)

    monkeypatch.setattr(routing, "solve_dependencies", counting)
    return solved


def both_ways(settings, bearer, role="submitter", model=None) -> tuple[TestClient, TestClient]:
    """Two clients on one database with one key: through FastAPI (a key cache of 0 s, so the hot
    path never knows the caller) and through the hot path."""
    headers = bearer(role, model)
    settings.broker_folder.mkdir(parents=True, exist_ok=True)
    fastapi_only = TestClient(create_app(settings.model_copy(update={"api_key_cache_seconds": 0})), headers=headers)
    hot = TestClient(create_app(settings), headers=headers)
    # Through FastAPI (the key is not cached yet), which authenticates it: cached from now on.
    assert hot.get("/forget-requests/warm-up").status_code == 404
    return fastapi_only, hot


def answer(response) -> tuple:
    headers = {k: v for k, v in response.headers.items() if k not in ("x-request-id", "content-length")}
    return response.status_code, response.json(), headers


def test_the_common_case_skips_fastapi_and_answers_as_fastapi_does(settings, seed, bearer, solves):
    fastapi_only, hot = both_ways(settings, bearer)
    alice, bob = seed.samples["alice"], seed.samples["bob"]
    solves.clear()
    through_fastapi = fastapi_only.post("/forget-requests", json={"subject_id": "alice", "sample_ids": [alice[0]]})
    assert solves == ["POST /forget-requests"]
    solves.clear()
    through_hot = hot.post("/forget-requests", json={"subject_id": "bob", "sample_ids": [bob[0]]})
    read = hot.get(f"/forget-requests/{through_hot.json()['id']}")
    assert solves == []  # neither went through FastAPI's routes
    assert through_hot.status_code == through_fastapi.status_code == 202
    assert through_hot.headers["content-type"] == through_fastapi.headers["content-type"]
    assert set(through_hot.json()) == set(through_fastapi.json())
    assert read.status_code == 200 and read.json() == through_hot.json()
    assert fastapi_only.get(f"/forget-requests/{through_hot.json()['id']}").json() == read.json()


@pytest.mark.parametrize(
    ("method", "path", "body", "key_model"),
    [
        ("POST", "/forget-requests", {"subject_id": "bob", "sample_ids": [0]}, None),  # 422: alice's sample, below
        ("POST", "/forget-requests", {"subject_id": "nobody"}, None),  # 422 unknown subject
        ("POST", "/forget-requests", {"subject_id": "bob", "model": "other"}, "digits-cnn-4bit"),  # 403 model
        ("GET", "/forget-requests/no-such-request", None, None),  # 404
        ("GET", "/forget-requests/{alice}", None, "other-model"),  # 404 to a key limited to another model
    ],
)
def test_refusals_raised_on_the_hot_path_read_as_fastapis(
    settings, engine, seed, bearer, solves, method, path, body, key_model
):
    first = TestClient(create_app(settings), headers=bearer("submitter"))
    alice = seed.samples["alice"]
    filed = first.post("/forget-requests", json={"subject_id": "alice", "sample_ids": [alice[0]]}).json()["id"]
    if body is not None and body.get("sample_ids") == [0]:
        body = {**body, "sample_ids": [alice[0]]}
    path = path.replace("{alice}", filed)
    if key_model == "other-model":
        with transaction(engine) as session:
            session.add(Model(name="other-model", dataset="digits", spec={"architecture": "test"}))
    fastapi_only, hot = both_ways(settings, bearer, model=key_model)
    solves.clear()
    expected = fastapi_only.request(method, path, json=body)
    assert solves  # served by FastAPI
    solves.clear()
    got = hot.request(method, path, json=body)
    assert solves == []  # served by the hot path
    assert expected.status_code in (403, 404, 422)
    assert answer(got) == answer(expected)


@pytest.mark.parametrize(
    ("request_kwargs", "why"),
    [
        ({"json": {"subject_id": "alice", "sample_ids": "x"}}, "a body that does not validate"),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, "malformed JSON"),
        ({"json": {"subject_id": "alice"}, "headers": {"Idempotency-Key": "k-1"}}, "an idempotency key"),
        ({"content": b'{"subject_id": "alice"}', "headers": {"Content-Type": "text/plain"}}, "not JSON"),
        ({"json": {"subject_id": "alice"}, "params": {"x": "1"}}, "a query string"),
    ],
)
def test_anything_else_goes_to_fastapi_unchanged(settings, seed, bearer, solves, request_kwargs, why):
    _, hot = both_ways(settings, bearer)
    solves.clear()
    response = hot.post("/forget-requests", **request_kwargs)
    if why == "malformed JSON":  # FastAPI refuses it before it solves the dependencies
        assert response.json()["detail"][0]["msg"].startswith("the body is not valid JSON")
    else:
        assert solves == ["POST /forget-requests"], why
    assert response.status_code in (202, 422), response.text
    if response.status_code == 422:
        assert response.json()["detail"][0]["loc"][0] == "body"  # FastAPI's message, naming the field


def test_an_unknown_key_and_a_wrong_role_are_fastapis_to_refuse(settings, seed, bearer, solves):
    _, auditor = both_ways(settings, bearer, role="auditor")
    solves.clear()
    refused = auditor.post("/forget-requests", json={"subject_id": "alice"})
    assert refused.status_code == 403 and "submitter" in refused.json()["detail"]
    assert solves == []  # a cached caller of the wrong role: the route's own check, raised on the hot path
    unknown = TestClient(auditor.app, headers={"Authorization": "Bearer qf_unknown"})
    assert unknown.get("/forget-requests/x").status_code == 401
    assert solves == ["GET /forget-requests/x"]


def test_the_hot_path_logs_the_route_template_and_answers_with_a_request_id(settings, seed, bearer, solves, caplog):
    _, hot = both_ways(settings, bearer)
    solves.clear()
    caplog.set_level("INFO", logger="qforget.access")
    caplog.clear()  # the warm-up's line, where an earlier test's logging set-up let it through
    response = hot.get("/forget-requests/no-such-request", headers={"X-Request-ID": "trace-1"})
    assert solves == [] and response.status_code == 404
    assert response.headers["x-request-id"] == "trace-1"
    [line] = [record.getMessage() for record in caplog.records if record.name == "qforget.access"]
    assert line.startswith("GET /forget-requests/{request_id} 404")  # the template, not the id
