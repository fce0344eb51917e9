"""The broker's side of the operations figures: how many messages wait in each Celery queue."""

import logging

from service.core.settings import Settings
from service.core.tasks import CONTROL_QUEUE, GPU_QUEUE, broker_transport_options

log = logging.getLogger(__name__)

QUEUES = (GPU_QUEUE, CONTROL_QUEUE)
BROKER_TIMEOUT_SECONDS = 2


def queue_lengths(settings: Settings) -> dict[str, int] | None:
    """Messages waiting in each Celery queue ({queue: count}), None when the broker is unreachable.

    Asks the broker through kombu, as Celery does: on Redis that is the length of the queue's
    lists (one per priority step), on the filesystem broker the count of the queue's message files.
    """
    # Imported here: only a scrape needs kombu, and the API's start stays without it.
    from kombu import Connection
    from kombu.exceptions import ChannelError

    options = {**broker_transport_options(settings), "socket_connect_timeout": BROKER_TIMEOUT_SECONDS,
               "socket_timeout": BROKER_TIMEOUT_SECONDS, "max_retries": 0}
    lengths = {}
    try:
        with Connection(settings.broker_url, transport_options=options,
                        connect_timeout=BROKER_TIMEOUT_SECONDS) as connection:
            channel = connection.default_channel
            for queue in QUEUES:
                try:
                    lengths[queue] = channel.queue_declare(queue, passive=True).message_count
                except ChannelError:  # a queue nothing was ever sent to (Redis keeps no empty lists)
                    lengths[queue] = 0
    except Exception as exc:  # noqa: BLE001 -- any failure means "unknown", not a failed scrape
        log.warning("metrics: broker unreachable: %s", exc)
        return None
    return lengths
