"""The Celery app: reliability settings for long GPU runs, and the beat schedule.

The broker only carries wake-ups (docs/design.md, invariant 1): every task reads its work from the
database, so a lost or duplicated message costs at most a no-op run, and the scheduler re-sends
what is due every `scheduler_interval_seconds`.
"""

from celery import Celery, signals

from service.core.logging_setup import bind_log_context, clear_log_context, configure_logging
from service.core.settings import Settings, get_settings
from service.core.tasks import (
    CONTROL_QUEUE,
    DISPATCH_TASK,
    GPU_QUEUE,
    REFERENCE_TASK,
    UNLEARN_TASK,
    broker_transport_options,
)


def create_celery(settings: Settings) -> Celery:
    app = Celery("qforget", broker=settings.broker_url, include=["workers.tasks"])
    app.conf.update(
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        # Results live in the database (requests, batches, versions), not in a result backend.
        task_ignore_result=True,
        # A task is acknowledged only when it finishes; a worker that dies mid-run leaves its
        # message to be redelivered, and the batch lease in the database decides who runs it.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=CONTROL_QUEUE,
        task_routes={UNLEARN_TASK: {"queue": GPU_QUEUE}, REFERENCE_TASK: {"queue": GPU_QUEUE}},
        beat_schedule={
            "dispatch-due-batches": {
                "task": DISPATCH_TASK,
                "schedule": settings.scheduler_interval_seconds,
                # A dispatch older than one interval is superseded by the next one.
                "options": {"expires": settings.scheduler_interval_seconds},
            }
        },
        worker_hijack_root_logger=False,
    )
    return app


app = create_celery(get_settings())


@signals.setup_logging.connect
def _configure_logging(loglevel=None, **_kwargs) -> None:
    # With a receiver connected Celery leaves logging alone: worker and beat log as the API does
    # (JSON in production, service/core/logging_setup.py).
    configure_logging(loglevel or "INFO", get_settings().log_json)


@signals.task_prerun.connect
def _bind_task_log_context(task_id=None, **_kwargs) -> None:
    # Ids a previous task bound in this process must not leak into this task's lines.
    clear_log_context()
    bind_log_context(task_id=task_id)
