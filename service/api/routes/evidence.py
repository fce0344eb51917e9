"""Per-request evidence: a forget request's samples before and after unlearning, against a reference
(service/audit/evidence.py; the workers compute the figures, this route only reads them)."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query

from service.api.deps import ReaderDep, SessionDep
from service.api.schemas import AUTH_ERRORS, DATABASE_UNAVAILABLE, NO_NUL, ErrorPublic, EvidencePublic, ProblemPublic
from service.audit.evidence import request_evidence
from service.requests.problems import RequestValidationProblem
from service.requests.queries import find_request

router = APIRouter(prefix="/forget-requests", tags=["forget-requests"],
                   responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE})


@router.get(
    "/{request_id}/evidence",
    response_model=EvidencePublic,
    responses={
        404: {"model": ErrorPublic, "description": "No forget request has this id (that this key may see)."},
        422: {"model": ProblemPublic, "description": "The request id is malformed, the request has several "
              "parts and `model` names none of them, or it has none (a linked request: see `linked_to`)."},
    },
)
def read_evidence(
    request_id: Annotated[str, Path(max_length=36, pattern=NO_NUL)],
    session: SessionDep,
    caller: ReaderDep,
    model: Annotated[str | None, Query(max_length=64, pattern=NO_NUL,
                                       description="Whose part: needed when the request has several.")] = None,
) -> EvidencePublic:
    """Get the request's samples before and after unlearning by one model: accuracy, true-label
    confidence and membership calls of the parent version, the version that forgot them, and a
    retrain reference. Once the samples are erased, the evidence frozen just before (`frozen_at`)."""
    request = find_request(session, request_id)
    model = model or caller.model
    parts = {} if request is None else {part.model_name: part for part in request.parts}
    # Another model's request is "not found" to a key limited to a model, as in GET /forget-requests/{id}.
    if request is None or (caller.model is not None and (caller.model not in parts or model != caller.model)):
        raise HTTPException(status_code=404, detail=f"forget request {request_id!r} not found")
    if not parts:
        raise RequestValidationProblem(
            "model", f"request {request_id!r} has no part of its own: earlier requests forget its samples; read the "
            f"evidence of the one it is linked to, {request.linked_request_id!r}", error_type="no_parts",
            location="query")
    if model is None and len(parts) == 1:
        [model] = parts
    if model not in parts:
        raise RequestValidationProblem("model", f"name one of the request's models: {', '.join(sorted(parts))}",
                                       error_type="unknown_part", location="query")
    part = parts[model]
    if part.frozen_evidence is not None:  # the samples are erased: the evidence as it was kept then
        return EvidencePublic.model_validate({**part.frozen_evidence, "frozen_at": part.evidence_frozen_at})
    return EvidencePublic.model_validate(request_evidence(session, request, part))
