"""Reads of forget requests and their samples, each one statement."""

from dataclasses import dataclass

from sqlalchemy import Row, bindparam, select
from sqlalchemy.orm import Session

from service.core.models import ForgetRequest, ForgetRequestSample


@dataclass(frozen=True)
class FiledRequest:
    request: ForgetRequest | Row  # a row, with the same attributes, where it was only read
    sample_ids: list[int]  # the samples it asks to forget, ascending


_REQUESTS_BY_ID = (
    select(ForgetRequest.__table__, ForgetRequestSample.sample_id)
    .outerjoin(ForgetRequestSample, ForgetRequestSample.request_id == ForgetRequest.id)
    .where(ForgetRequest.id.in_(bindparam("request_ids", expanding=True)))
    .order_by(ForgetRequest.id, ForgetRequestSample.sample_id)
)


def requests_with_sample_ids(session: Session, request_ids: set[str]) -> dict[str, FiledRequest]:
    """{id: the request (a row of its columns, read-only) and its sample ids (ascending)} of those
    of `request_ids` that exist, in one statement."""
    found: dict[str, FiledRequest] = {}
    for row in session.connection().execute(_REQUESTS_BY_ID, {"request_ids": sorted(request_ids)}):
        if row.id not in found:
            found[row.id] = FiledRequest(row, [])
        if row.sample_id is not None:
            found[row.id].sample_ids.append(row.sample_id)
    return found


def sample_ids_of_requests(session: Session, request_ids: list[str]) -> dict[str, list[int]]:
    """{request id: its sample ids, ascending} for many requests, in one statement."""
    by_request: dict[str, list[int]] = {request_id: [] for request_id in request_ids}
    if request_ids:
        rows = session.execute(
            select(ForgetRequestSample.request_id, ForgetRequestSample.sample_id)
            .where(ForgetRequestSample.request_id.in_(request_ids))
            .order_by(ForgetRequestSample.request_id, ForgetRequestSample.sample_id)
        )
        for request_id, sample_id in rows:
            by_request[request_id].append(sample_id)
    return by_request
