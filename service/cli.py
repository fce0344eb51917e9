"""The `qforget` command line: demo, api, worker, scheduler, bootstrap, migrate, reference."""

import argparse
import logging
import sys


def _demo(args) -> int:
    from service.demo import run_demo

    return run_demo(data_dir=args.data_dir, subjects=args.subjects, epochs=args.epochs)


def _api(args) -> int:
    import uvicorn

    from service.migrate import upgrade_database
    from service.settings import get_settings

    settings = get_settings()
    upgrade_database(settings.database_url)
    uvicorn.run(
        "service.api.app:create_app", factory=True,
        host=args.host or settings.api_host, port=args.port or settings.api_port,
        workers=args.workers, log_level=args.log_level.lower(),
    )
    return 0


def _worker(args) -> int:
    from workers.celery_app import app

    app.worker_main([
        "worker", "--loglevel", args.log_level, "--queues", args.queues,
        "--concurrency", str(args.concurrency), "--hostname", args.hostname,
    ])
    return 0


def _scheduler(args) -> int:
    from service.settings import get_settings
    from workers.celery_app import app

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--loglevel", args.log_level,
               "--schedule", str(settings.data_dir / "celerybeat-schedule")])
    return 0


def _bootstrap(args) -> int:
    from service.settings import get_settings
    from workers.bootstrap import bootstrap, default_spec

    settings = get_settings()
    model_name = args.model or settings.default_model
    version_id = bootstrap(settings, model_name, default_spec(args.epochs),
                           samples_per_subject=args.samples_per_subject)
    print(f"model {model_name}: version {version_id} deployed; artifacts in {settings.model_store}")
    return 0


def _migrate(args) -> int:
    from service.migrate import upgrade_database
    from service.settings import get_settings

    upgrade_database(get_settings().database_url)
    return 0


def _reference(args) -> int:
    from service.settings import get_settings
    from workers.tasks import train_reference

    model_name = args.model or get_settings().default_model
    result = train_reference.delay(model_name)
    print(f"retrain reference for {model_name} queued (task {result.id})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qforget",
        description="Machine unlearning for quantized models: GDPR erasure requests in, "
                    "Q-MUL-unlearned model versions and audits out. Settings come from QFORGET_* "
                    "environment variables (see service/settings.py).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the whole flow on the embedded default, no server needed")
    demo.add_argument("--data-dir", default="var/demo", help="fresh folder for the demo's database, "
                      "broker, model store and logs (emptied first; default var/demo)")
    demo.add_argument("--subjects", type=int, default=12, help="subjects who ask to be forgotten (default 12)")
    demo.add_argument("--epochs", type=int, default=None, help="QAT epochs for the original and the reference")
    demo.set_defaults(handler=_demo)

    api = commands.add_parser("api", help="serve the REST API (migrates the database first)")
    api.add_argument("--host", default=None, help="bind address (default QFORGET_API_HOST)")
    api.add_argument("--port", type=int, default=None, help="port (default QFORGET_API_PORT)")
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    api.set_defaults(handler=_api)

    worker = commands.add_parser("worker", help="run a Celery worker that unlearns and trains references")
    worker.add_argument("--queues", default="gpu,control", help="queues to consume (default gpu,control)")
    worker.add_argument("--concurrency", type=int, default=1, help="parallel runs (default 1: one per GPU)")
    worker.add_argument("--hostname", default="qforget@%h", help="Celery node name")
    worker.set_defaults(handler=_worker)

    scheduler = commands.add_parser("scheduler", help="run Celery beat: dispatches due batches periodically")
    scheduler.set_defaults(handler=_scheduler)

    bootstrap = commands.add_parser("bootstrap", help="train, register and deploy the initial model")
    bootstrap.add_argument("--model", default=None, help="model name (default QFORGET_DEFAULT_MODEL)")
    bootstrap.add_argument("--epochs", type=int, default=None, help="QAT epochs (default: the recipe's)")
    bootstrap.add_argument("--samples-per-subject", type=int, default=10,
                           help="how many training samples each synthetic subject owns (default 10)")
    bootstrap.set_defaults(handler=_bootstrap)

    migrate = commands.add_parser("migrate", help="upgrade the database schema to the newest migration")
    migrate.set_defaults(handler=_migrate)

    reference = commands.add_parser("reference", help="queue a retrain reference and an audit evaluation")
    reference.add_argument("--model", default=None, help="model name (default QFORGET_DEFAULT_MODEL)")
    reference.set_defaults(handler=_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.log_level = args.log_level.upper()
    # Alembic and httpx report every revision and request at INFO: noise in the demo's output.
    for chatty in ("alembic", "httpx"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
