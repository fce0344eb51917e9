"""The audit report: one printable HTML page per model, for a person to read (GET /audit/report).

Plots are drawn here, server-side, by matplotlib as inline SVG: the page needs no JavaScript and
no network, and prints as it shows (a print stylesheet keeps sections whole). Everything shown
comes from the database (evaluations, their score histograms, references, forget requests); no
model is loaded. This module computes the figures; the page itself is the Jinja template
templates/report.html, rendered with autoescaping. Stable element ids (documented in docs/audit.md)
let a browser test find: `audit-summary` (with `audit-status`), `reference-state`, `gaps-over-time`,
`mia-distribution`, `request-timeline`.
"""

import io
import math
import statistics
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

import matplotlib
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, DateFormatter, DayLocator
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit.comparison import APPROXIMATE_CAVEAT, references_newest_first
from service.audit.lineage import describe_quantization
from service.audit.standing import DeploymentAudit
from service.core.models import (
    Evaluation,
    ForgetRequest,
    ForgetRequestPart,
    Model,
    ModelVersion,
    ReferenceRequest,
    RequestStatus,
    as_utc,
    utcnow,
)
from service.requests import lifecycle

METRICS = ("FA", "RA", "TA", "MIA")
GAP_KEYS = (*METRICS, "AG")
# matplotlib's global state (rcParams) is not thread-safe; the API serves requests from a thread pool.
_drawing = threading.Lock()
_SVG_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "qforget", "font.size": 9}
_DASH = Markup("&ndash;")  # what a missing time or figure shows


@dataclass(frozen=True)
class RequestFigures:
    """The forget requests of one model against the deadline, for the request-timeline section."""

    plot: Markup
    received: int
    per_status: list[tuple[str, int]]
    median_days: float | None  # from receipt to completion; None while nothing is completed
    longest_days: float | None
    late: int  # completed after their deadline
    overdue: int  # open and past their deadline


def build_report(session: Session, model: Model, audit: DeploymentAudit, deadline_days: int) -> str:
    """The whole page for `model`, given its deployment audit (service/audit/standing.py)."""
    evaluations = session.execute(
        select(Evaluation)
        .join(ModelVersion, ModelVersion.id == Evaluation.version_id)
        .where(ModelVersion.model_name == model.name)
        .order_by(Evaluation.created_at, Evaluation.id)
    ).scalars().all()
    references = references_newest_first(session, model.name)
    open_requests = session.scalars(
        select(ReferenceRequest)
        .where(ReferenceRequest.model_name == model.name, ReferenceRequest.finished_at.is_(None))
        .order_by(ReferenceRequest.id)
    ).all()
    # The model's parts of requests: when the model forgot them, against each request's due date.
    requests = session.execute(
        select(ForgetRequest.received_at, ForgetRequestPart.completed_at, ForgetRequest.due_at,
               ForgetRequestPart.status)
        .join(ForgetRequestPart, ForgetRequestPart.request_id == ForgetRequest.id)
        .where(ForgetRequestPart.model_name == model.name)
    ).all()
    now = utcnow()
    reference_status = audit.reference.status if audit.reference is not None else "missing"
    mia_evaluation = _mia_evaluation(audit, evaluations)
    return _templates.get_template("report.html").render(
        model=model,
        quantization=describe_quantization(model.spec),
        audit=audit,
        generated_at=now,
        reference_status=reference_status,
        # One plain word a reader sees first, then the sentences behind it.
        verdict=("current" if audit.status == "current"
                 else "interim, against an approximate reference" if audit.status == "interim"
                 else f"{audit.status} evaluation, {reference_status} reference"),
        approximate_caveat=APPROXIMATE_CAVEAT,
        references=references[:20],
        open_requests=open_requests,
        gaps_plot=_gaps_plot(evaluations) if evaluations else None,
        recent_evaluations=list(reversed(evaluations[-50:])),
        mia_evaluation=mia_evaluation,
        mia_plot=_mia_plot(mia_evaluation) if mia_evaluation is not None else None,
        request_figures=_request_figures(requests, deadline_days, now) if requests else None,
        deadline_days=deadline_days,
    )


def _gaps_plot(evaluations: list[Evaluation]) -> Markup:
    times = [as_utc(e.created_at) for e in evaluations]
    with _drawing, matplotlib.rc_context(_SVG_STYLE):
        figure = Figure(figsize=(7.5, 3.2), layout="constrained")
        axes = figure.add_subplot()
        for key in GAP_KEYS:
            axes.plot(times, [e.gaps[key] for e in evaluations], marker="o", label=key,
                      linewidth=2.5 if key == "AG" else 1.2)
        for moment, evaluation in zip(times, evaluations):
            # An interim evaluation (against an approximate reference) is marked on the plot too.
            label = f"v{evaluation.version_id}" + (" approx." if evaluation.approximate else "")
            axes.annotate(label, (moment, evaluation.gaps["AG"]), textcoords="offset points",
                          xytext=(0, 6), ha="center", fontsize=7)
        axes.set_ylabel("gap to the reference (points)")
        axes.set_xlabel("evaluation time (UTC)")
        # A margin around the evaluations' span, at least an hour (one evaluation has no span).
        margin = max((times[-1] - times[0]) * 0.05, timedelta(hours=1))
        axes.set_xlim(times[0] - margin, times[-1] + margin)
        locator = AutoDateLocator(maxticks=7)
        axes.xaxis.set_major_locator(locator)
        axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        axes.set_ylim(bottom=0)
        figure.legend(loc="outside upper center", ncols=5, fontsize=8)
        axes.grid(alpha=0.3)
        return _svg(figure)


def _mia_evaluation(audit: DeploymentAudit, evaluations: list[Evaluation]) -> Evaluation | None:
    """The evaluation the summary shows, if it kept histograms; else the newest that did."""
    shown = audit.evaluation.id if audit.evaluation is not None else None
    with_histograms = [e for e in evaluations if e.score_histograms]
    return next((e for e in with_histograms if e.id == shown), with_histograms[-1] if with_histograms else None)


def _mia_plot(evaluation: Evaluation) -> Markup:
    histograms = evaluation.score_histograms
    edges = histograms["bin_edges"]
    # Bin positions on a log axis: the first bin starts at 0, drawn from a tenth of its upper edge.
    lefts = [edges[1] / 10 if edge == 0 else edge for edge in edges[:-1]]
    with _drawing, matplotlib.rc_context(_SVG_STYLE):
        figure = Figure(figsize=(7.5, 2.8))
        panels = figure.subplots(1, 2, sharey=True)
        for axes, role, label in ((panels[0], "version", f"version {evaluation.version_id}"),
                                  (panels[1], "reference", f"reference {evaluation.reference_id}")):
            for split, colour in (("forget", "tab:red"), ("test", "tab:blue")):
                counts = histograms[role][split]
                total = sum(counts) or 1
                axes.stairs([100.0 * c / total for c in counts], [*lefts, edges[-1]], label=f"{split} samples",
                            color=colour, linewidth=1.5)
            axes.set_xscale("log")
            axes.set_title(label, fontsize=9)
            axes.set_xlabel("loss, -ln p(true label)")
            axes.grid(alpha=0.3)
        panels[0].set_ylabel("share of samples (%)")
        panels[0].legend(fontsize=8)
        figure.tight_layout()
        return _svg(figure)


def _request_figures(requests, deadline_days: int, now: datetime) -> RequestFigures:
    days_to_complete = [(as_utc(done) - as_utc(received)) / timedelta(days=1)
                        for received, done, _, status in requests if status == RequestStatus.completed and done]
    late = sum(1 for _, done, due, status in requests
               if status == RequestStatus.completed and done and as_utc(done) > as_utc(due))
    open_ages = [(now - as_utc(received)) / timedelta(days=1)
                 for received, _, _, status in requests if status in lifecycle.OPEN_STATUSES]
    overdue = sum(1 for _, _, due, status in requests if status in lifecycle.OPEN_STATUSES and as_utc(due) < now)
    per_day = Counter(as_utc(received).date() for received, *_ in requests)
    statuses = Counter(status.value for *_, status in requests)
    with _drawing, matplotlib.rc_context(_SVG_STYLE):
        figure = Figure(figsize=(7.5, 2.8))
        volume, timing = figure.subplots(1, 2)
        days = sorted(per_day)
        volume.bar(days, [per_day[day] for day in days], width=0.8, color="tab:gray")
        volume.set_xlim(days[0] - timedelta(days=1), days[-1] + timedelta(days=1))
        volume.xaxis.set_major_locator(DayLocator(interval=max(1, ((days[-1] - days[0]).days + 2) // 6)))
        volume.xaxis.set_major_formatter(DateFormatter("%Y-%m-%d"))
        volume.yaxis.set_major_locator(MaxNLocator(integer=True))
        volume.set_title("requests received per day", fontsize=9)
        volume.set_ylabel("requests")
        volume.tick_params(axis="x", labelrotation=30, labelsize=7)
        # Whole days up to past the deadline (or the longest wait), so the deadline line is always in view.
        upper = math.ceil(max([deadline_days * 1.1, *days_to_complete, *open_ages]))
        timing.hist([days_to_complete, open_ages], bins=range(upper + 1), stacked=True,
                    color=["tab:green", "tab:orange"], label=["completed: days to complete", "open: days waiting"])
        timing.legend(fontsize=7)
        timing.yaxis.set_major_locator(MaxNLocator(integer=True))
        timing.axvline(deadline_days, color="tab:red", linestyle="--")
        timing.text(deadline_days, 0.95, f" deadline ({deadline_days} d)", color="tab:red", fontsize=7,
                    transform=timing.get_xaxis_transform(), va="top")
        timing.set_title("time to completion", fontsize=9)
        timing.set_xlabel("days since receipt")
        figure.tight_layout()
        plot = _svg(figure)
    return RequestFigures(
        plot=plot,
        received=len(requests),
        per_status=sorted(statuses.items()),
        median_days=statistics.median(days_to_complete) if days_to_complete else None,
        longest_days=max(days_to_complete) if days_to_complete else None,
        late=late,
        overdue=overdue,
    )


def _svg(figure: Figure) -> Markup:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    # Inline: without the XML declaration and doctype. Markup: matplotlib wrote this SVG and escaped its
    # own text; the plots' labels are numbers and fixed words, nothing from a request.
    return Markup(text[text.index("<svg"):])


def _when(moment: datetime | None) -> str:
    return _DASH if moment is None else as_utc(moment).strftime("%Y-%m-%d %H:%M")


def _number(value: float | None) -> str:
    return _DASH if value is None else f"{value:.2f}"


def _sample_list(ids: list[int], limit: int = 50) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"samples {shown}" + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


# Created once per process; get_template caches the compiled templates.
_templates = Environment(
    loader=PackageLoader("service.audit", "templates"),
    # HTML is escaped, and so is any other template unless named here: the style sheet is included verbatim,
    # as escaping would corrupt CSS (a selector such as `ul > li`).
    autoescape=select_autoescape(disabled_extensions=("css",), default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_templates.filters.update(when=_when, number=_number, sample_list=_sample_list)
_templates.globals.update(metrics=METRICS, gap_keys=GAP_KEYS)
