"""API keys: Bearer authentication, roles, keys limited to a model, and the `qforget keys` CLI."""

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from service import cli
from service.core.api_keys import ApiKeyError, create_api_key, find_api_key, hash_key, revoke_api_key
from service.core.audit_log import verify_chain
from service.core.db import session_factory, transaction
from service.core.models import ApiKey, AuditEntry
from service.core.settings import get_settings
from tests.conftest import add_deployed_model

# Every route behind a key, with a harmless request for each: {"METHOD /template": (path, json body)}.
PROTECTED = {
    "POST /forget-requests": ("/forget-requests", {"subject_id": "alice"}),
    "GET /forget-requests": ("/forget-requests", None),
    "GET /forget-requests/{request_id}": ("/forget-requests/00000000-0000-0000-0000-000000000000", None),
    "GET /subjects/{subject_id}": ("/subjects/alice", None),
    "GET /models": ("/models", None),
    "GET /models/{version_id}": ("/models/1", None),
    "GET /models/deployed/artifact": ("/models/deployed/artifact", None),
    "POST /datasets/{dataset}/samples": (
        "/datasets/digits/samples", {"samples": [{"dataset_index": 9999, "subject_id": "new"}]}
    ),
    "GET /audit": ("/audit", None),
    "GET /audit/log": ("/audit/log", None),
    "GET /audit/log/verify": ("/audit/log/verify", None),
    "GET /webhooks/deliveries": ("/webhooks/deliveries", None),
}
# Which routes each role may call, besides admin, who may call everything.
ALLOWED = {
    "submitter": {
        "POST /forget-requests", "GET /forget-requests", "GET /forget-requests/{request_id}",
        "GET /subjects/{subject_id}",
    },
    "auditor": {
        "GET /forget-requests", "GET /forget-requests/{request_id}", "GET /subjects/{subject_id}", "GET /models",
        "GET /models/{version_id}", "GET /models/deployed/artifact", "GET /audit", "GET /audit/log",
        "GET /audit/log/verify", "GET /webhooks/deliveries",
    },
}
ROUTES = pytest.mark.parametrize("route", PROTECTED)
# The route-by-role matrices do not depend on the database: run them on SQLite only.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def call(client: TestClient, route: str, headers) -> int:
    path, body = PROTECTED[route]
    return client.request(route.split()[0], path, json=body, headers=headers).status_code


def test_every_documented_route_but_the_probes_needs_a_key(anonymous, seed):
    paths = anonymous.get("/openapi.json").json()["paths"]
    documented = {f"{method.upper()} {path}" for path, operations in paths.items() for method in operations}
    assert set(PROTECTED) <= documented
    for route in documented - {"GET /health", "GET /ready"}:
        method, path = route.split()
        concrete = re.sub(r"\{[^}]+\}", "1", path)
        response = anonymous.request(method, concrete, json={})
        assert (response.status_code, response.headers.get("www-authenticate")) == (401, "Bearer"), route


@SQLITE_ONLY
@ROUTES
def test_no_key_is_401_with_a_bearer_challenge(anonymous, seed, row_counts, route):
    before = row_counts()
    path, body = PROTECTED[route]
    response = anonymous.request(route.split()[0], path, json=body)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key is required" in response.json()["detail"]
    assert row_counts() == before


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer qf_0123abcd_" + "x" * 43,  # well-formed, unknown
        "Bearer not-a-key",
        "Basic YWxpY2U6c2VjcmV0",
        "Bearer ",
    ],
    ids=["unknown", "malformed", "basic", "empty"],
)
def test_a_wrong_key_is_401(anonymous, seed, authorization):
    response = anonymous.get("/forget-requests", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_key_with_one_wrong_character_is_401(anonymous, seed, api_key):
    key = api_key("auditor")
    assert anonymous.get("/audit/log", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert anonymous.get("/audit/log", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401


def test_a_revoked_key_is_401_from_then_on_without_the_key_cache(anonymous, seed, api_key, engine):
    anonymous.app.state.api_keys.seconds = 0  # QFORGET_API_KEY_CACHE_SECONDS=0
    key = api_key("auditor")
    headers = {"Authorization": f"Bearer {key}"}
    assert anonymous.get("/audit/log", headers=headers).status_code == 200
    with transaction(engine) as session:
        revoke_api_key(session, key[3:11], actor="tests")
    response = anonymous.get("/audit/log", headers=headers)
    assert response.status_code == 401
    assert "unknown or revoked" in response.json()["detail"]


def test_a_revoked_key_works_until_the_cached_authentication_expires(anonymous, seed, api_key, engine):
    cache = anonymous.app.state.api_keys
    key = api_key("auditor")
    headers = {"Authorization": f"Bearer {key}"}
    assert anonymous.get("/audit/log", headers=headers).status_code == 200
    with transaction(engine) as session:
        revoke_api_key(session, key[3:11], actor="tests")
    assert anonymous.get("/audit/log", headers=headers).status_code == 200  # trusted from the cache
    cache.seconds = 0  # as if QFORGET_API_KEY_CACHE_SECONDS had passed
    assert anonymous.get("/audit/log", headers=headers).status_code == 401
    cache.seconds = 60
    assert anonymous.get("/audit/log", headers=headers).status_code == 401  # a refused key is never cached


@SQLITE_ONLY
@pytest.mark.parametrize("role", ["submitter", "auditor"])
@ROUTES
def test_roles(anonymous, seed, bearer, role, route):
    status = call(anonymous, route, bearer(role))
    if route in ALLOWED[role]:
        assert status not in (401, 403), (role, route)
    else:
        assert status == 403, (role, route)


def test_a_wrong_role_is_403_naming_the_roles_needed(anonymous, seed, bearer):
    response = anonymous.get("/audit/log", headers=bearer("submitter"))
    assert response.status_code == 403
    assert "admin or auditor" in response.json()["detail"]


@SQLITE_ONLY
@ROUTES
def test_admin_may_call_everything(anonymous, seed, bearer, route):
    assert call(anonymous, route, bearer("admin")) not in (401, 403)


@pytest.fixture
def other_model(engine, seed) -> str:
    """A second deployed model on the seed's data set: it holds the same samples."""
    add_deployed_model(engine, "other")
    return "other"


def test_a_key_limited_to_a_model_files_for_it_only(anonymous, seed, bearer, other_model):
    limited = bearer("submitter", other_model)
    response = anonymous.post("/forget-requests", json={"subject_id": "alice", "model": seed.model}, headers=limited)
    assert response.status_code == 403
    assert f"limited to model '{other_model}'" in response.json()["detail"]
    # Naming no model means its model, not the service's default.
    response = anonymous.post("/forget-requests", json={"subject_id": "alice"}, headers=limited)
    assert response.status_code == 202, response.text
    assert response.json()["model"] == other_model


def test_a_key_limited_to_a_model_sees_that_models_requests_only(anonymous, seed, bearer, other_model):
    admin = bearer("admin")
    mine = anonymous.post("/forget-requests", json={"subject_id": "alice", "model": other_model}, headers=admin)
    theirs = anonymous.post("/forget-requests", json={"subject_id": "bob", "model": seed.model}, headers=admin)
    limited = bearer("submitter", other_model)

    listing = anonymous.get("/forget-requests", headers=limited).json()
    assert (listing["count"], [r["id"] for r in listing["data"]]) == (1, [mine.json()["id"]])
    assert anonymous.get("/forget-requests", params={"model": seed.model}, headers=limited).status_code == 403
    assert anonymous.get(f"/forget-requests/{mine.json()['id']}", headers=limited).status_code == 200
    assert anonymous.get(f"/forget-requests/{theirs.json()['id']}", headers=limited).status_code == 404
    # An unlimited submitter sees both.
    assert anonymous.get("/forget-requests", headers=bearer("submitter")).json()["count"] == 2
    subject = anonymous.get("/subjects/bob", headers=limited).json()
    assert subject["requests"] == []


def test_keys_are_stored_hashed_and_their_changes_audited(engine, seed):
    with transaction(engine) as session:
        row, key = create_api_key(session, role="submitter", name="web", model=seed.model, actor="cli:ops")
        key_id = row.id
    assert key.startswith(f"qf_{row.prefix}_") and len(key) == 3 + 8 + 1 + 43
    with transaction(engine) as session:
        stored = session.get(ApiKey, key_id)
        assert stored.key_hash == hash_key(key)
        dump = session.execute(text("SELECT * FROM api_keys")).all()
        assert key not in repr(dump) and key.split("_", 2)[2] not in repr(dump)
        revoke_api_key(session, str(key_id), actor="cli:ops")
    with session_factory(engine)() as session:
        entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
        assert [(e.actor, e.action, e.object_id) for e in entries] == [
            ("cli:ops", "api_key.created", str(key_id)), ("cli:ops", "api_key.revoked", str(key_id))
        ]
        assert entries[0].details == {"prefix": row.prefix, "name": "web", "role": "submitter", "model": seed.model}
        assert verify_chain(session).ok


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"role": "root"}, "unknown role"),
        ({"role": "auditor", "model": "digits-cnn-4bit"}, "only submitter keys"),
        ({"role": "submitter", "model": "nope"}, "unknown model"),
        ({"role": "admin", "name": " "}, "1 to 128"),
    ],
)
def test_keys_that_cannot_be_made(engine, seed, kwargs, phrase):
    with pytest.raises(ApiKeyError, match=phrase), transaction(engine) as session:
        create_api_key(session, **{"name": "x", **kwargs}, actor="tests")


def test_revoking_twice_or_an_unknown_key_is_refused(engine, api_key):
    key = api_key("auditor")
    with transaction(engine) as session:
        revoke_api_key(session, key[3:11], actor="tests")
    with pytest.raises(ApiKeyError, match="already revoked"), transaction(engine) as session:
        revoke_api_key(session, key[3:11], actor="tests")
    with pytest.raises(ApiKeyError, match="no API key"), transaction(engine) as session:
        revoke_api_key(session, "999", actor="tests")


def test_a_key_is_found_by_id_or_by_prefix_even_an_all_digit_one(engine, api_key):
    api_key("auditor")
    with transaction(engine) as session:
        session.get(ApiKey, 1).prefix = "00000002"  # hex digits that happen to be decimal ones
    api_key("auditor")  # id 2
    with transaction(engine) as session:
        assert find_api_key(session, "00000002").id == 1
        assert find_api_key(session, "qf_00000002").id == 1
        assert find_api_key(session, "2").id == 2
        assert find_api_key(session, "99") is None


@pytest.fixture
def cli_env(database_url, tmp_path, monkeypatch):
    monkeypatch.setenv("QFORGET_DATABASE_URL", database_url)
    monkeypatch.setenv("QFORGET_DATA_DIR", str(tmp_path / "cli"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_keys_cli_creates_lists_and_revokes(cli_env, anonymous, seed, capsys):
    anonymous.app.state.api_keys.seconds = 0  # revocation takes effect at once without the key cache
    assert cli.main(["keys", "create", "--role", "auditor", "--name", "ops team"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert "shown only now" in err and key.startswith("qf_")
    headers = {"Authorization": f"Bearer {key}"}
    assert anonymous.get("/audit/log", headers=headers).status_code == 200

    assert cli.main(["keys", "list"]) == 0
    out, _ = capsys.readouterr()
    assert key[3:11] in out and "auditor" in out and "ops team" in out and key not in out

    assert cli.main(["keys", "revoke", key[3:11]]) == 0
    assert "revoked" in capsys.readouterr().out
    assert anonymous.get("/audit/log", headers=headers).status_code == 401
    assert cli.main(["keys", "revoke", key[3:11]]) == 2
    assert "already revoked" in capsys.readouterr().err


def test_the_keys_cli_limits_a_submitter_to_a_model(cli_env, seed, capsys):
    assert cli.main(["keys", "create", "--role", "submitter", "--name", "web", "--model", seed.model]) == 0
    capsys.readouterr()
    assert cli.main(["keys", "create", "--role", "submitter", "--name", "web", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
