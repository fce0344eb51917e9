"""qforget's workers: the Celery app and tasks, and the unlearning engine (workers.engine).

Nothing here is imported eagerly: workers.engine must run with torch alone (benchmarks and GPU
machines import it without Celery or the database).
"""
