"""Forget requests: a data subject's Art. 17 erasure request, its withdrawal and its deadline's extension."""

from typing import Annotated

from fastapi import APIRouter, FastAPI, Header, HTTPException, Path, Query, Request, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import ReaderDep, SessionDep, SubmitterDep
from service.api.schemas import (
    AUTH_ERRORS,
    BODY_TOO_LARGE,
    DATABASE_UNAVAILABLE,
    NO_NUL,
    DigitsOnly,
    ErrorPublic,
    ExtensionCreate,
    ForgetRequestCreate,
    ForgetRequestPublic,
    Page,
    ProblemPublic,
    UtcInput,
    WithdrawalCreate,
)
from service.core.api_keys import Caller
from service.core.models import ForgetRequest, RequestStatus, utcnow
from service.requests import idempotency, lifecycle
from service.requests.intake import IdempotencyClaim, Submission
from service.requests.problems import RequestValidationProblem
from service.requests.queries import FiledRequest, as_seen_by, find_request, requests_page, requests_with_sample_ids

router = APIRouter(
    prefix="/forget-requests", tags=["forget-requests"], responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE}
)

MAX_PAGE = 500
RequestId = Annotated[str, Path(max_length=36, pattern=NO_NUL)]
NOT_FOUND = {404: {"model": ErrorPublic, "description": "No forget request has this id (that this key may see)."}}


def check_model_allowed(caller: Caller, model: str) -> None:
    """403 unless the caller's key may act on `model` (a submitter key may be limited to one)."""
    if caller.model is not None and caller.model != model:
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail=f"key {caller.prefix} is limited to model {caller.model!r}, not {model!r}",
        )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ForgetRequestPublic,
    responses={
        **BODY_TOO_LARGE,
        400: {"model": ErrorPublic, "description": "The body is not UTF-8 text."},
        422: {
            "model": ProblemPublic,
            "description": "The body is malformed, or names a model, subject or samples that cannot be "
            "forgotten; or the Idempotency-Key was used before with another body. `loc` names the field.",
        },
    },
)
async def create_forget_request(
    body: ForgetRequestCreate,
    request: Request,
    caller: SubmitterDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=idempotency.HEADER,
            min_length=1,
            max_length=idempotency.MAX_KEY_LENGTH,
            pattern=idempotency.KEY_PATTERN,
            description="Any unique string (a UUID, say). A retry with the same key and body gets the first "
            "response again instead of filing a second request; keys are scoped to the API key.",
        ),
    ] = None,
) -> JSONResponse:
    """Accept a request to forget a subject's samples; a worker unlearns them in a later batch."""
    return await file_request(request.app, body, caller, idempotency_key)


async def file_request(
    app: FastAPI, body: ForgetRequestCreate, caller: Caller, idempotency_key: str | None
) -> JSONResponse:
    """The route's work once its input is checked (also called by service/api/hot_path.py)."""
    settings = app.state.settings
    # A key limited to a model files for that model when the body names none; else every model holding them.
    model = body.model or caller.model
    check_model_allowed(caller, model)
    claim = None
    if idempotency_key is not None:
        claim = IdempotencyClaim(
            caller.key_id, idempotency_key, idempotency.fingerprint(body.model_dump(mode="json"))
        )
    submission = Submission(
        subject_id=body.subject_id,
        sample_ids=body.sample_ids,
        model_name=model,
        deadline_days=settings.deadline_days,
        actor=caller.actor,
        idempotency=claim,
    )
    # Filed with whatever else arrived meanwhile, in one transaction (service/api/batch_queue.py).
    outcome = await app.state.intake.submit(submission)
    if isinstance(outcome, RequestValidationProblem):
        raise outcome
    if isinstance(outcome, idempotency.Replay):
        return JSONResponse(
            status_code=outcome.status_code, content=outcome.body, headers={"Idempotent-Replayed": "true"}
        )
    if outcome.instant_models:
        # After the commit, so the task finds the request; a semi-parametric model's datastore drops
        # the samples within seconds, before any batch (workers/instant.py).
        await run_in_threadpool(app.state.wakeups.instant_stage, outcome.instant_models)
    # The same serialisation as a replay's, so that a retry's body equals the first, byte for byte.
    return JSONResponse(status_code=status.HTTP_202_ACCEPTED, content=response_body(outcome))


def response_body(filed: FiledRequest) -> dict:
    """A request's body, as answered (202 when filed, 200 when read) and as stored for its idempotency key."""
    return ForgetRequestPublic.model_validate(filed).model_dump(mode="json")


@router.get(
    "",
    response_model=Page[ForgetRequestPublic],
    responses={422: {"model": ProblemPublic, "description": "A filter or the paging is malformed."}},
)
def list_forget_requests(
    session: SessionDep,
    caller: ReaderDep,
    status_: Annotated[RequestStatus | None, Query(alias="status")] = None,
    subject_id: Annotated[str | None, Query(min_length=1, max_length=128, pattern=NO_NUL)] = None,
    model: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
    received_after: Annotated[UtcInput | None, Query(description="Received at or after this time.")] = None,
    received_before: Annotated[UtcInput | None, Query(description="Received before this time.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE), DigitsOnly] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1), DigitsOnly] = 0,
) -> Page[ForgetRequestPublic]:
    """List forget requests, newest first, filtered by status, subject, model and time received."""
    if model is not None:
        check_model_allowed(caller, model)
    requests, count = requests_page(
        session,
        status=status_,
        subject_id=subject_id,
        model_name=model or caller.model,  # a key limited to a model sees that model's requests only
        received_after=received_after,
        received_before=received_before,
        limit=limit,
        offset=offset,
    )
    return Page[ForgetRequestPublic](data=[as_seen_by(filed, caller.model) for filed in requests], count=count)


@router.get("/{request_id}", response_model=ForgetRequestPublic, responses=NOT_FOUND)
async def read_forget_request(request_id: RequestId, request: Request, caller: ReaderDep) -> JSONResponse:
    """Get a forget request: its status, deadline and, once completed, the model version that forgot it."""
    return await read_request(request.app, request_id, caller)


async def read_request(app: FastAPI, request_id: str, caller: Caller) -> JSONResponse:
    """The route's work once its input is checked (also called by service/api/hot_path.py)."""
    # Read with the other ids asked for meanwhile, in one statement (service/api/batch_queue.py).
    filed = await app.state.reads.submit(request_id)
    # Another model's request is "not found" to a key limited to a model, as in its listing.
    if filed is None or (caller.model is not None and caller.model not in {p.model_name for p in filed.parts}):
        raise HTTPException(status_code=404, detail=f"forget request {request_id!r} not found")
    return JSONResponse(content=response_body(as_seen_by(filed, caller.model)))


def _request_to_change(session, request_id: str, caller: Caller) -> ForgetRequest:
    """The request a withdrawal or an extension names, if the caller's key may change it: one it
    may see (404 otherwise, as when reading), and for a key limited to a model, one whose every part
    is that model's (403): what the request asks of another model is not this key's to change."""
    request = find_request(session, request_id)
    models = set() if request is None else {part.model_name for part in request.parts}
    if request is None or (caller.model is not None and caller.model not in models):
        raise HTTPException(status_code=404, detail=f"forget request {request_id!r} not found")
    if caller.model is not None and models != {caller.model}:
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail=f"key {caller.prefix} is limited to model {caller.model!r}; request {request_id!r} "
            "also goes to other models",
        )
    return request


def _changed(session, request_id: str, caller: Caller) -> JSONResponse:
    """The request as it is now committed, as the caller sees it (200)."""
    filed = requests_with_sample_ids(session, {request_id})[request_id]
    return JSONResponse(content=response_body(as_seen_by(filed, caller.model)))


@router.post(
    "/{request_id}/withdrawal",
    response_model=ForgetRequestPublic,
    responses={
        **NOT_FOUND,
        **BODY_TOO_LARGE,
        403: {"model": ErrorPublic, "description": "The key's role may not, or the key is limited to a model and the "
                                                  "request also goes to another."},
        409: {"model": ProblemPublic, "description": "The request is withdrawn or completed already, a part of it is "
              "in a batch, or an open request linked later relies on its parts; `type` says which."},
        422: {"model": ProblemPublic, "description": "The body is malformed; `loc` names the field."},
    },
)
def withdraw_forget_request(
    request_id: RequestId, body: WithdrawalCreate, session: SessionDep, caller: SubmitterDep
) -> JSONResponse:
    """Withdraw a request before any part of it is batched: it and its parts become withdrawn and no
    batch takes them. Withdrawing it again is a 409 that changes nothing."""
    request = _request_to_change(session, request_id, caller)
    lifecycle.withdraw(session, request, body.reason, caller.actor, utcnow())
    session.commit()
    return _changed(session, request_id, caller)


@router.post(
    "/{request_id}/extension",
    response_model=ForgetRequestPublic,
    responses={
        **NOT_FOUND,
        **BODY_TOO_LARGE,
        403: {"model": ErrorPublic, "description": "The key's role may not, or the key is limited to a model and the "
                                                  "request also goes to another."},
        409: {"model": ProblemPublic, "description": "The request was extended already, or is completed or "
              "withdrawn; `type` says which."},
        422: {"model": ProblemPublic, "description": "The body is malformed (months not 1 or 2, say); `loc` names "
              "the field."},
    },
)
def extend_forget_request(
    request_id: RequestId, body: ExtensionCreate, session: SessionDep, caller: SubmitterDep
) -> JSONResponse:
    """Extend the request's deadline, once, by one or two calendar months (GDPR Art. 12(3)): `due_at`
    moves, `original_due_at` keeps the deadline before, and the batch policy reads the new one."""
    request = _request_to_change(session, request_id, caller)
    lifecycle.extend(session, request, body.months, body.reason, caller.actor, utcnow())
    session.commit()
    return _changed(session, request_id, caller)
