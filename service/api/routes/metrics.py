"""GET /metrics: the operations figures in Prometheus's text format, read when scraped (no key).

service/operations reads and writes them; docs/operations.md describes each metric.
"""

from fastapi import APIRouter, Response

from service.api.deps import SessionDep, SettingsDep
from service.operations.exposition import CONTENT_TYPE, prometheus_text
from service.operations.figures import read_figures

router = APIRouter(tags=["operations"])


@router.get("/metrics", include_in_schema=False)
def metrics(session: SessionDep, settings: SettingsDep) -> Response:
    """Prometheus text exposition of the service's figures, read from the database and the broker."""
    return Response(prometheus_text(read_figures(session, settings)), media_type=CONTENT_TYPE)
