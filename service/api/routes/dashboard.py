"""The operations dashboard: a static page that draws the /metrics figures as charts.

A browser cannot add an `Authorization` header to a page it navigates to, so the page itself holds
no data and needs no key: `GET /dashboard` and its two assets are static files. The page asks for
an auditor (or admin) API key once, keeps it in the tab's sessionStorage (gone when the tab
closes; never in a cookie, so no other site can make the browser send it), and fetches
`GET /dashboard/data` with `Authorization: Bearer <key>`, as any other client would. The charts are
SVG drawn by the page's own script; nothing is loaded from another origin (the Content Security
Policy forbids it).
"""

from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse, JSONResponse

from service.api.deps import SessionDep, SettingsDep, require_role
from service.api.schemas import AUTH_ERRORS, DATABASE_UNAVAILABLE
from service.core.models import Role
from service.operations.figures import read_figures

router = APIRouter(tags=["operations"])

# Beside the package's code, so it is found both from a clone and from an installed package.
STATIC_FOLDER = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
# The page's own policy, in place of the one every other page gets (service/api/security_headers.py):
# own scripts, styles and fetches only; no framing (clickjacking), no plugins.
DASHBOARD_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@router.get("/dashboard", include_in_schema=False)
def dashboard_page() -> FileResponse:
    """The dashboard page (no data in it; it asks for an API key and fetches /dashboard/data)."""
    return FileResponse(STATIC_FOLDER / "dashboard.html", media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": DASHBOARD_POLICY, "Cache-Control": "no-cache"})


@router.get("/dashboard/assets/{name}", include_in_schema=False)
def dashboard_asset(name: str) -> FileResponse:
    """The page's script and style sheet."""
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail=f"no dashboard asset {name!r}; there are {', '.join(ASSETS)}")
    return FileResponse(STATIC_FOLDER / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


@router.get(
    "/dashboard/data",
    responses={**AUTH_ERRORS, **DATABASE_UNAVAILABLE},
    dependencies=[Depends(require_role(Role.auditor))],
)
def dashboard_data(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """The figures behind /metrics as JSON: requests, due dates, batches and their durations, queues,
    leases, held batches, batch events, deployments with their newest evaluation (auditor, admin)."""
    return JSONResponse(read_figures(session, settings).as_json())
