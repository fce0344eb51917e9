"""The audit report: one printable HTML page per model, for a person to read (GET /audit/report).

Plots are drawn here, server-side, by matplotlib as inline SVG: the page needs no JavaScript and
no network, and prints as it shows (a print stylesheet keeps sections whole). Everything shown
comes from the database (evaluations, their score histograms, references, forget requests); no
model is loaded. Stable element ids (documented in docs/audit.md) let a browser test find:
`audit-summary` (with `audit-status`), `reference-state`, `gaps-over-time`, `mia-distribution`,
`request-timeline`.
"""

import io
import math
import statistics
import threading
from collections import Counter
from datetime import datetime, timedelta
from html import escape

import matplotlib
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, DateFormatter, DayLocator
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.schemas import AuditPublic
from service.core.models import (
    Evaluation,
    ForgetRequest,
    Model,
    ModelVersion,
    ReferenceRequest,
    RequestStatus,
    VersionKind,
    as_utc,
    utcnow,
)

METRICS = ("FA", "RA", "TA", "MIA")
# matplotlib's global state (rcParams) is not thread-safe; the API serves requests from a thread pool.
_drawing = threading.Lock()
_SVG_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "qforget", "font.size": 9}


def build_report(session: Session, model: Model, audit: AuditPublic, deadline_days: int) -> str:
    """The whole page for `model`, given its deployment audit (service/api/routes/audit.py)."""
    evaluations = session.execute(
        select(Evaluation)
        .join(ModelVersion, ModelVersion.id == Evaluation.version_id)
        .where(ModelVersion.model_name == model.name)
        .order_by(Evaluation.created_at, Evaluation.id)
    ).scalars().all()
    references = session.execute(
        select(ModelVersion)
        .where(ModelVersion.model_name == model.name, ModelVersion.kind == VersionKind.reference)
        .order_by(ModelVersion.id.desc())
    ).scalars().all()
    open_requests = session.scalars(
        select(ReferenceRequest)
        .where(ReferenceRequest.model_name == model.name, ReferenceRequest.finished_at.is_(None))
        .order_by(ReferenceRequest.id)
    ).all()
    requests = session.execute(
        select(ForgetRequest.received_at, ForgetRequest.completed_at, ForgetRequest.due_at, ForgetRequest.status)
        .where(ForgetRequest.model_name == model.name)
    ).all()
    now = utcnow()
    sections = [
        _summary_section(audit),
        _reference_section(audit, references, open_requests),
        _gaps_section(evaluations),
        _mia_section(audit, evaluations),
        _requests_section(requests, deadline_days, now),
    ]
    title = f"Audit report: model {model.name}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{escape(title)}</h1>
<p>Data set <strong>{escape(model.dataset)}</strong>; deployed version
<strong>{_text(audit.deployed_version_id)}</strong>; generated {escape(_when(now))} (UTC).</p>
<p class="note">FA, RA, TA: accuracy (percent) on the forgotten samples, the retained training samples and the
test set; MIA: membership-inference efficacy on the forgotten samples (percent the attacker calls non-members);
each gap is |version &minus; retrain reference|, AG their average. A retrain reference is a model trained from
scratch without the forgotten samples: the target unlearning aims at.</p>
</header>
<main>
{"".join(sections)}
</main>
</body>
</html>
"""


def _summary_section(audit: AuditPublic) -> str:
    evaluation = audit.evaluation
    reference_status = audit.reference.status if audit.reference is not None else "missing"
    # One plain word a reader sees first, then the sentences behind it.
    verdict = "current" if audit.status == "current" else f"{audit.status} evaluation, {reference_status} reference"
    body = [(f'<p id="audit-status" class="status status-{escape(audit.status)}" data-status="{escape(audit.status)}" '
             f'data-reference-status="{escape(reference_status)}"><strong>Status: {escape(verdict)}.</strong> '
             f"{escape(audit.message)}</p>")]
    if evaluation is None:
        body.append("<p>No figures: nothing has been evaluated against a retrain reference.</p>")
    else:
        rows = [
            ("version " + str(evaluation.version_id), evaluation.metrics.model_dump(), None),
            ("retrain reference " + str(evaluation.reference_id), evaluation.reference_metrics.model_dump(), None),
            ("gap |version &minus; reference|", evaluation.gaps.model_dump(), evaluation.gaps.AG),
        ]
        table = ['<table id="audit-figures"><caption>Figures in percent</caption><thead><tr><th scope="col">model'
                 "</th>" + "".join(f'<th scope="col">{key}</th>' for key in METRICS) + '<th scope="col">AG</th>'
                 "</tr></thead><tbody>"]
        for label, values, average in rows:
            cells = "".join(f"<td>{values[key]:.2f}</td>" for key in METRICS)
            table.append(f'<tr><th scope="row">{label}</th>{cells}<td>{_number(average)}</td></tr>')
        table.append("</tbody></table>")
        body.append("".join(table))
        body.append(
            '<table id="audit-details"><tbody>'
            f'<tr><th scope="row">evaluation</th><td>{evaluation.id}, computed {escape(_when(evaluation.computed_at))}'
            "</td></tr>"
            f'<tr><th scope="row">samples</th><td>forget {evaluation.forget_count}, retain {evaluation.retain_count}, '
            f"test {evaluation.test_count}</td></tr>"
            f'<tr><th scope="row">reference</th><td>version {evaluation.reference_id}</td></tr>'
            "</tbody></table>"
        )
    return _section("audit-summary", "Summary", "".join(body))


def _reference_section(audit: AuditPublic, references: list[ModelVersion],
                       open_requests: list[ReferenceRequest]) -> str:
    state = audit.reference
    if state is None:
        body = ["<p>No version is deployed.</p>"]
    else:
        body = [(f'<p class="status status-{escape(state.status)}" data-reference-status="{escape(state.status)}">'
                 f"<strong>Retrain reference: {escape(state.status)}.</strong> {escape(state.message)}</p>")]
        if state.status == "stale":
            body.append(f"<p>Forgotten by the deployed version but still in the reference's training data: "
                        f"{_id_list(state.missing_from_reference)}.</p>")
    if references:
        body.append('<table><caption>Retrain references, newest first</caption><thead><tr><th scope="col">version'
                    '</th><th scope="col">trained</th><th scope="col">samples excluded</th></tr></thead><tbody>')
        body += [f"<tr><td>{r.id}</td><td>{escape(_when(r.created_at))}</td><td>{len(r.excluded_sample_ids)}</td></tr>"
                 for r in references[:20]]
        body.append("</tbody></table>")
    if open_requests:
        body.append("<p>Reference requests waiting for a worker: " + "; ".join(
            f"#{r.id} asked {escape(_when(r.requested_at))} by {escape(r.requested_by)} ({escape(r.reason)})"
            + (f", last error: {escape(r.error)}" if r.error else "") for r in open_requests) + ".</p>")
    return _section("reference-state", "Retrain reference", "".join(body))


def _gaps_section(evaluations: list[Evaluation]) -> str:
    if not evaluations:
        return _section("gaps-over-time", "Gaps to the reference over time", "<p>No evaluations yet.</p>")
    times = [as_utc(e.created_at) for e in evaluations]
    with _drawing, matplotlib.rc_context(_SVG_STYLE):
        figure = Figure(figsize=(7.5, 3.2), layout="constrained")
        axes = figure.add_subplot()
        for key in (*METRICS, "AG"):
            axes.plot(times, [e.gaps[key] for e in evaluations], marker="o", label=key,
                      linewidth=2.5 if key == "AG" else 1.2)
        for moment, evaluation in zip(times, evaluations):
            axes.annotate(f"v{evaluation.version_id}", (moment, evaluation.gaps["AG"]), textcoords="offset points",
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
        svg = _svg(figure)
    rows = "".join(
        f"<tr><td>{escape(_when(e.created_at))}</td><td>{e.version_id}</td><td>{e.reference_id}</td>"
        + "".join(f"<td>{e.gaps[key]:.2f}</td>" for key in (*METRICS, "AG")) + "</tr>"
        for e in reversed(evaluations[-50:])
    )
    table = ('<table><caption>Evaluations, newest first (at most 50)</caption><thead><tr><th scope="col">computed'
             '</th><th scope="col">version</th><th scope="col">reference</th>'
             + "".join(f'<th scope="col">{key} gap</th>' for key in (*METRICS, "AG"))
             + f"</tr></thead><tbody>{rows}</tbody></table>")
    figure_html = _figure(svg, "Each gap per evaluation; labels name the version evaluated.")
    return _section("gaps-over-time", "Gaps to the reference over time", figure_html + table)


def _mia_section(audit: AuditPublic, evaluations: list[Evaluation]) -> str:
    # The evaluation the summary shows, if it kept histograms; else the newest that did.
    shown = audit.evaluation.id if audit.evaluation is not None else None
    with_histograms = [e for e in evaluations if e.score_histograms]
    chosen = next((e for e in with_histograms if e.id == shown), with_histograms[-1] if with_histograms else None)
    title = "Membership scores: forgotten vs test samples"
    if chosen is None:
        return _section("mia-distribution", title, "<p>No evaluation with membership score histograms yet.</p>")
    histograms = chosen.score_histograms
    edges = histograms["bin_edges"]
    # Bin positions on a log axis: the first bin starts at 0, drawn from a tenth of its upper edge.
    lefts = [edges[1] / 10 if edge == 0 else edge for edge in edges[:-1]]
    with _drawing, matplotlib.rc_context(_SVG_STYLE):
        figure = Figure(figsize=(7.5, 2.8))
        panels = figure.subplots(1, 2, sharey=True)
        for axes, role, label in ((panels[0], "version", f"version {chosen.version_id}"),
                                  (panels[1], "reference", f"reference {chosen.reference_id}")):
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
        svg = _svg(figure)
    caption = (f"Evaluation {chosen.id}: distribution of the membership score (the loss; members of the training "
               "set have low loss) on the forgotten samples and on the test set. Unlearning succeeds when the "
               "version's forget curve looks like the reference's.")
    return _section("mia-distribution", title, _figure(svg, caption))


def _requests_section(requests, deadline_days: int, now: datetime) -> str:
    title = "Forget requests against the one-month deadline"
    if not requests:
        return _section("request-timeline", title, "<p>No forget requests for this model.</p>")
    days_to_complete = [(as_utc(done) - as_utc(received)) / timedelta(days=1)
                        for received, done, _, status in requests if status == RequestStatus.completed and done]
    late = sum(1 for _, done, due, status in requests
               if status == RequestStatus.completed and done and as_utc(done) > as_utc(due))
    open_statuses = (RequestStatus.received, RequestStatus.pending, RequestStatus.batched)
    open_ages = [(now - as_utc(received)) / timedelta(days=1)
                 for received, _, _, status in requests if status in open_statuses]
    overdue = sum(1 for _, _, due, status in requests if status in open_statuses and as_utc(due) < now)
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
        svg = _svg(figure)
    median = f"{statistics.median(days_to_complete):.2f}" if days_to_complete else "&ndash;"
    longest = f"{max(days_to_complete):.2f}" if days_to_complete else "&ndash;"
    table = (
        '<table id="request-figures"><caption>Requests</caption><tbody>'
        f'<tr><th scope="row">received</th><td>{len(requests)}</td></tr>'
        + "".join(f'<tr><th scope="row">{escape(status)}</th><td>{count}</td></tr>'
                  for status, count in sorted(statuses.items()))
        + f'<tr><th scope="row">days to complete, median</th><td>{median}</td></tr>'
        f'<tr><th scope="row">days to complete, longest</th><td>{longest}</td></tr>'
        f'<tr><th scope="row">completed after their deadline</th><td>{late}</td></tr>'
        f'<tr><th scope="row">open and past their deadline</th><td>{overdue}</td></tr>'
        "</tbody></table>"
    )
    caption = f"Requests per day, and days from receipt to completion against the {deadline_days}-day deadline."
    return _section("request-timeline", title, _figure(svg, caption) + table)


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # inline: without the XML declaration and doctype


def _figure(svg: str, caption: str) -> str:
    return f'<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>'


def _section(element_id: str, title: str, body: str) -> str:
    return f'<section id="{element_id}" aria-labelledby="{element_id}-title">\n' \
           f'<h2 id="{element_id}-title">{escape(title)}</h2>\n{body}\n</section>\n'


def _when(moment: datetime | None) -> str:
    return "&ndash;" if moment is None else as_utc(moment).strftime("%Y-%m-%d %H:%M")


def _text(value) -> str:
    return "none" if value is None else escape(str(value))


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _id_list(ids: list[int], limit: int = 50) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"samples {shown}" + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; border-bottom: 1px solid #ccc; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: right; }
th[scope=row], caption { text-align: left; } caption { font-weight: 600; padding: .2rem 0; }
.note { color: #555; font-size: .85rem; }
.status { padding: .5rem .75rem; border-left: .4rem solid; }
.status-current, .status-matching { border-color: #2a7; background: #efe; }
.status-stale { border-color: #d80; background: #fff4e0; }
.status-missing { border-color: #c33; background: #fee; }
figure { margin: .5rem 0; } figure svg { max-width: 100%; height: auto; }
figcaption { font-size: .85rem; color: #555; }
@media print {
  body { max-width: none; margin: 0; font-size: 10pt; }
  section, figure, table { break-inside: avoid; }
  .status { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
@page { size: A4; margin: 15mm; }
"""
