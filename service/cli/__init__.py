"""The `qforget` command line: demo, api, worker, scheduler, bootstrap, migrate, reference, keys."""

import argparse
import sys
from pathlib import Path

from service.core.logging_setup import configure_logging, logging_config


def _demo(args) -> int:
    from service.cli.demo import run_demo

    return run_demo(data_dir=args.data_dir, subjects=args.subjects, epochs=args.epochs)


def _bench(args) -> int:
    from workers.benchmarks.bench import main as bench_main

    return bench_main(args.passthrough)


def _loadtest(args) -> int:
    from service.cli.loadtest import LoadtestArgumentError, run_loadtest

    try:
        return run_loadtest(args)
    except LoadtestArgumentError as exc:
        print(f"qforget loadtest: {exc}", file=sys.stderr)
        return 2


# The most a request's line and headers together may take. httptools, uvicorn's faster parser,
# bounds neither and joins a header's pieces in quadratic time: one 48 MiB header held the event
# loop, /health included, for seconds. h11 answers 400 and closes the connection past this.
MAX_REQUEST_HEAD_BYTES = 16 * 1024


def _api(args) -> int:
    import uvicorn

    from service.core.migrate import upgrade_database
    from service.core.settings import get_settings

    settings = get_settings()
    configure_logging(args.log_level, settings.log_json)
    upgrade_database(settings.database_url)
    # uvicorn applies the same logging set-up in each worker process; its access log is off because
    # the API's own middleware logs each request (with its id, without the query string).
    uvicorn.run(
        "service.api.app:create_app", factory=True,
        host=args.host or settings.api_host, port=args.port or settings.api_port,
        workers=args.workers, log_level=args.log_level.lower(),
        log_config=logging_config(args.log_level, settings.log_json), access_log=False,
        http="h11", h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
    )
    return 0


def _worker(args) -> int:
    from service.cli.processes import lower_cpu_priority
    from service.core.settings import get_settings
    from workers.celery_app import app

    settings = get_settings()
    configure_logging(args.log_level, settings.log_json)
    # Before Celery starts its pool: the pool processes and torch's threads inherit it.
    lower_cpu_priority(settings.worker_nice)

    app.worker_main([
        "worker", "--loglevel", args.log_level, "--queues", args.queues,
        "--concurrency", str(args.concurrency), "--hostname", args.hostname,
    ])
    return 0


def _scheduler(args) -> int:
    from service.core.settings import get_settings
    from workers.celery_app import app

    settings = get_settings()
    configure_logging(args.log_level, settings.log_json)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--loglevel", args.log_level,
               "--schedule", str(settings.data_dir / "celerybeat-schedule")])
    return 0


def _bootstrap(args) -> int:
    from service.core.settings import get_settings
    from workers.bootstrap import bootstrap, default_spec

    settings = get_settings()
    model_name = args.model or settings.default_model
    ptq = None
    if args.ptq:
        ptq = {"method": args.ptq, "calibration": args.calibration, "samples": args.calibration_samples}
        if args.synthesizer:
            ptq["synthesizer"] = args.synthesizer
    elif args.float_checkpoint or args.synthesizer:
        raise SystemExit("--float-checkpoint and --synthesizer go with --ptq")
    try:  # a bad option value, or a checkpoint refused: its message, not a traceback
        spec = default_spec(args.epochs, args.architecture, args.semi_parametric, ptq)
        version_id = bootstrap(settings, model_name, spec, samples_per_subject=args.samples_per_subject,
                               float_checkpoint=args.float_checkpoint)
    except ValueError as exc:
        raise SystemExit(f"qforget bootstrap: {exc}") from None
    print(f"model {model_name}: version {version_id} deployed; artifacts in {settings.model_store}")
    return 0


def _migrate(args) -> int:
    from service.core.migrate import upgrade_database
    from service.core.settings import get_settings

    upgrade_database(get_settings().database_url)
    return 0


def _reference(args) -> int:
    # Recorded as a reference request, as POST /models/{model}/references does: the scheduler
    # sends it, and an open request for the same deployment is not asked for twice.
    from service.core.db import get_engine, transaction
    from service.core.migrate import upgrade_database
    from service.core.models import Model
    from service.core.settings import get_settings
    from service.references.schedule import ask_for_reference

    settings = get_settings()
    model_name = args.model or settings.default_model
    upgrade_database(settings.database_url)
    with transaction(get_engine(settings, "cli")) as session:
        model = session.get(Model, model_name, with_for_update=True)
        if model is None or model.deployed_version_id is None:
            print(f"qforget reference: model {model_name!r} has no deployed version", file=sys.stderr)
            return 2
        request, created = ask_for_reference(session, model, "cli", "asked for on the command line")
        if not created:
            print(f"retrain reference for {model_name} already requested (request {request.id})")
            return 0
        print(f"retrain reference for {model_name} requested (request {request.id}); the scheduler sends it")
    return 0


def _keys_session():
    from service.core.db import get_engine, transaction
    from service.core.migrate import upgrade_database
    from service.core.settings import get_settings

    settings = get_settings()
    upgrade_database(settings.database_url)
    return transaction(get_engine(settings, "cli"))


def _cli_actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (some containers)
        return "cli"


def _keys_create(args) -> int:
    from service.core.api_keys import ApiKeyError, create_api_key

    try:
        with _keys_session() as session:
            row, key = create_api_key(session, role=args.role, name=args.name, model=args.model, actor=_cli_actor())
    except ApiKeyError as exc:
        print(f"qforget keys create: {exc}", file=sys.stderr)
        return 2
    limited = f", limited to model {row.model_name}" if row.model_name else ""
    print(f"API key {row.id} ({row.prefix}, role {row.role.value}, name {row.name!r}{limited}) created; "
          "it is shown only now, keep it:", file=sys.stderr)
    print(key)  # alone on stdout, for scripts: KEY=$(qforget keys create ...)
    return 0


def _keys_revoke(args) -> int:
    from service.core.api_keys import ApiKeyError, revoke_api_key

    try:
        with _keys_session() as session:
            row = revoke_api_key(session, args.key_id, actor=_cli_actor())
    except ApiKeyError as exc:
        print(f"qforget keys revoke: {exc}", file=sys.stderr)
        return 2
    print(f"API key {row.id} ({row.prefix}, {row.name!r}) revoked")
    return 0


def _keys_list(args) -> int:
    from service.core.api_keys import list_api_keys

    with _keys_session() as session:
        rows = list_api_keys(session)
    print(f"{'ID':>4}  {'PREFIX':<8}  {'ROLE':<9}  {'MODEL':<16}  {'CREATED':<20}  {'REVOKED':<20}  NAME")
    for row in rows:
        revoked = f"{row.revoked_at:%Y-%m-%d %H:%M:%S}" if row.revoked_at else "-"
        print(f"{row.id:>4}  {row.prefix:<8}  {row.role.value:<9}  {row.model_name or '-':<16}  "
              f"{row.created_at:%Y-%m-%d %H:%M:%S}  {revoked:<20}  {row.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qforget",
        description="Machine unlearning for quantized models: GDPR erasure requests in, "
                    "Q-MUL-unlearned model versions and audits out. Settings come from QFORGET_* "
                    "environment variables (see service/core/settings.py).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the whole flow on the embedded default, no server needed")
    demo.add_argument("--data-dir", default="var/demo", help="fresh folder for the demo's database, "
                      "broker, model store and logs (emptied first; default var/demo)")
    demo.add_argument("--subjects", type=int, default=12, help="subjects who ask to be forgotten (default 12)")
    demo.add_argument("--epochs", type=int, default=None, help="QAT epochs for the original and the reference")
    demo.set_defaults(handler=_demo)

    bench = commands.add_parser("bench", add_help=False,
                                help="compare unlearning methods (workers.benchmarks.bench; "
                                "`bench --help` for its options)")
    bench.set_defaults(handler=_bench)

    loadtest = commands.add_parser("loadtest", help="measure request intake under load (loopback; starts its own "
                                   "API and PostgreSQL database unless given --url)")
    from service.cli.loadtest import add_arguments as add_loadtest_arguments

    add_loadtest_arguments(loadtest)
    loadtest.set_defaults(handler=_loadtest)

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
    # Not argparse choices: the list is workers.bootstrap.BOOTSTRAP_RECIPES, which the CLI loads lazily.
    bootstrap.add_argument("--architecture", default="digits-cnn",
                           help="the model's architecture on the digits: digits-cnn (default) or digits-vit, a "
                                "quantized vision transformer")
    bootstrap.add_argument("--semi-parametric", action="store_true",
                           help="a semi-parametric model (SPM): the architecture is its encoder, and its datastore of "
                                "the training samples loses a forget request's samples within seconds")
    bootstrap.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    bootstrap.add_argument("--ptq", default=None, metavar="METHOD",
                           help="train in full precision, then quantize after training by this post-training "
                                "method: minmax, percentile, tsptq or mptq (default: quantization-aware training)")
    bootstrap.add_argument("--calibration", choices=["real", "synthetic"], default="real",
                           help="with --ptq, what the quantizer grids are fitted on: training samples (real), or "
                                "inputs made from the full-precision model alone, reading no sample (synthetic)")
    bootstrap.add_argument("--synthesizer", default=None,
                           help="with --calibration synthetic: noise, zeroq, qimera (CNNs) or dfq-vit (ViTs)")
    bootstrap.add_argument("--calibration-samples", type=int, default=256, help="with --ptq: how many (default 256)")
    bootstrap.add_argument("--float-checkpoint", type=Path, default=None,
                           help="with --ptq: a trained full-precision state dict of the architecture to quantize, "
                                "instead of training one")
    bootstrap.add_argument("--samples-per-subject", type=int, default=10,
                           help="how many training samples each synthetic subject owns (default 10)")
    bootstrap.set_defaults(handler=_bootstrap)

    migrate = commands.add_parser("migrate", help="upgrade the database schema to the newest migration")
    migrate.set_defaults(handler=_migrate)

    reference = commands.add_parser("reference", help="queue a retrain reference and an audit evaluation")
    reference.add_argument("--model", default=None, help="model name (default QFORGET_DEFAULT_MODEL)")
    reference.set_defaults(handler=_reference)

    keys = commands.add_parser("keys", help="create, revoke and list API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    create = key_commands.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("--role", required=True, choices=["submitter", "auditor", "admin"],
                        help="submitter: file and read requests; auditor: read everything; admin: everything")
    create.add_argument("--name", required=True, help="who or what uses it, e.g. 'web frontend'")
    create.add_argument("--model", default=None, help="limit a submitter key to this model's requests")
    create.set_defaults(handler=_keys_create)
    revoke = key_commands.add_parser("revoke", help="revoke a key: requests with it are refused from now on "
                                        "(within QFORGET_API_KEY_CACHE_SECONDS in a running API)")
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's id or its prefix (see `keys list`)")
    revoke.set_defaults(handler=_keys_revoke)
    listing = key_commands.add_parser("list", help="list keys (never the keys themselves)")
    listing.set_defaults(handler=_keys_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `bench` hands its own options (--help included) to the benchmark's parser.
    args, passthrough = parser.parse_known_args(argv)
    if passthrough and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
    args.passthrough = passthrough
    args.log_level = args.log_level.upper()
    # Readable text until a command has read its settings (api, worker and scheduler then switch
    # to JSON in production: service/core/logging_setup.py).
    try:
        configure_logging(args.log_level)
    except ValueError as exc:
        parser.error(f"--log-level: {exc}")
    return args.handler(args)
