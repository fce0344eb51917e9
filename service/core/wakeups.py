"""Task wake-ups sent by name from a process that does not import the worker (the API).

The broker only carries wake-ups (docs/design.md, invariant 1): a send that fails is logged and
dropped, and the scheduler sends the same wake-up on its next tick, from what the database says.
"""

import logging
from functools import cached_property

from service.core.settings import Settings
from service.core.tasks import CONTROL_QUEUE, INSTANT_TASK, broker_transport_options

log = logging.getLogger(__name__)

SEND_TIMEOUT_SECONDS = 1
# A wake-up not taken by then (no worker on the control queue) is dropped: the scheduler's own, sent
# every tick while the work waits, take over, and a long outage leaves no pile of them.
WAKEUP_EXPIRES_SECONDS = 300


class Wakeups:
    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def _celery(self):
        # Imported on the first send: an API that never files a request for a semi-parametric model
        # starts without Celery.
        from celery import Celery

        app = Celery("qforget-api", broker=self.settings.broker_url, set_as_current=False)
        app.conf.update(
            broker_transport_options={**broker_transport_options(self.settings),
                                      "socket_connect_timeout": SEND_TIMEOUT_SECONDS,
                                      "socket_timeout": SEND_TIMEOUT_SECONDS},
            broker_connection_timeout=SEND_TIMEOUT_SECONDS,
            task_ignore_result=True,
        )
        return app

    def instant_stage(self, model_names: list[str]) -> None:
        """Wake the instant stage of each semi-parametric model (workers/instant.py)."""
        for model_name in model_names:
            try:
                self._celery.send_task(INSTANT_TASK, args=(model_name,), queue=CONTROL_QUEUE, retry=False,
                                       expires=WAKEUP_EXPIRES_SECONDS)
            except Exception as error:  # noqa: BLE001 -- the scheduler sends it again
                log.warning("instant-stage wake-up not sent (the scheduler sends it again): %s", error)
