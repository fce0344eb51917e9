"""Operations figures, read when asked: Prometheus text at /metrics, JSON for the dashboard.

The database is the source of truth: API processes keep no counters that a restart would lose,
and every figure is computed from the database (and the broker's queue lengths) when Prometheus
scrapes. `figures.read_figures` reads them all; `exposition` writes them in Prometheus's text
format and the dashboard serves them as JSON, so the two never disagree. No subject or request ids
in labels: only models, statuses, queues and metric names. docs/operations.md describes each metric.
"""
