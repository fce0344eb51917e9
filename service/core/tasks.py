"""Task names, queues and broker options: what the API, the scheduler and the workers
agree on. The API sends tasks by these names without importing the worker's code."""


from service.core.settings import Settings

GPU_QUEUE = "gpu"  # unlearning runs and retrain references: long, one model per worker slot


CONTROL_QUEUE = "control"  # the scheduler's cheap dispatch task, and webhook deliveries


DISPATCH_TASK = "qforget.dispatch"


UNLEARN_TASK = "qforget.run_unlearning"


REFERENCE_TASK = "qforget.train_reference"


# Control queue: a semi-parametric model's forget requests leave its datastore (workers/instant.py);
# sent by the API once a request is filed, and by the scheduler while one waits.
INSTANT_TASK = "qforget.take_instant_effect"


ERASE_TASK = "qforget.erase_copies"  # control queue: a worker with the model store and the data caches


WEBHOOK_TASK = "qforget.deliver_webhooks"  # control queue (the default): short POSTs, no GPU


def redelivery_seconds(settings: Settings) -> int:
    """How long the broker keeps an unacknowledged task before delivering it again (Redis). It must
    outlast the longest run, or a healthy long run would be started a second time; a task sent
    longer ago than this and still not done was lost."""
    return max(3600, 4 * settings.lease_seconds)


def broker_transport_options(settings: Settings) -> dict:
    if settings.broker_url.startswith("filesystem://"):
        # kombu's filesystem transport: producers and consumers share one folder of messages.
        # Its control folder (queue bindings) defaults to the working directory: keep it beside.
        queue_folder, control_folder = settings.broker_folder / "queue", settings.broker_folder / "control"
        for folder in (queue_folder, control_folder):
            folder.mkdir(parents=True, exist_ok=True)
        # It polls the folder (every second by default): a tenth of a second keeps a semi-parametric
        # model's instant stage within its second, for a few directory listings a second.
        return {"data_folder_in": str(queue_folder), "data_folder_out": str(queue_folder),
                "control_folder": str(control_folder), "polling_interval": 0.1}
    # Redis redelivers an unacknowledged message after the visibility timeout.
    return {"visibility_timeout": redelivery_seconds(settings)}
