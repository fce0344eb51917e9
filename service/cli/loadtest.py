"""A bounded load test of request intake: `POST /forget-requests` and `GET /forget-requests/{id}`.

    qforget loadtest [--duration 20] [--requests N] [--connections 64] [--rate R] [--api-workers 2]
                     [--beside-training [--training-nice N]]

By default it builds everything it measures and removes it afterwards: a fresh PostgreSQL database
(`qforget_load_<random>`, created through --postgres-url, migrated, then seeded with one model,
subjects and samples and a submitter key), and `qforget api` serving it on a free loopback port.
With --url it drives an API that is already running instead; --database-url must then name that
API's database, which gets the seed (its own model, subjects and key; nothing is removed: the
audit log keeps what happened).

Each connection alternates: POST a request for one sample nobody asked for yet (expects 202),
then GET a request it created (expects 200), `--get-share` deciding the mix; each as soon as
the last was answered (closed loop), or with --rate on a fixed schedule (open loop: a request's
latency counts from when it was due, so a server that falls behind cannot hide its queue). Every other status,
and every connection error, is an error. The client is a small HTTP/1.1 keep-alive client on
asyncio streams rather than httpx: on a two-core box the generator competes with the server for
the CPU, and a cheaper client leaves the server more of it (0.1 to 0.2 of a core at 600 to 1,200
requests/s here; the report prints its share).

With --beside-training a training run (Retrain then Q-MUL on the digits, as many torch threads as
cores, at a worker's CPU niceness) runs beside the API meanwhile: the CPU a worker's batch takes from it.

The report: requests/s, latency percentiles (p50, p95, p99, max, in ms) per endpoint and overall,
the errors by kind, the CPU of the generator, the API, PostgreSQL (when local) and the whole
machine, and the peak resident memory of the API's processes (sampled from /proc).
"""

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from sqlalchemy import create_engine, insert, make_url, text
from sqlalchemy.pool import NullPool

from service.cli.processes import lower_cpu_priority
from service.core.settings import Settings, get_settings

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
SAMPLES_PER_SUBJECT = 10


# ------------------------------------------------------------------------------------------------
# The data the load needs


@dataclass
class Seeded:
    model: str
    key: str
    subject_of_sample: dict[int, str]  # every sample the load may ask to forget -> its subject


def seed_database(database_url: str, samples: int, api_settings: Settings) -> Seeded:
    """A model with a deployed version, subjects owning `samples` fresh samples, a submitter key;
    audited as the API with `api_settings` audits (its key, its checkpoints)."""
    from service.core.api_keys import create_api_key
    from service.core.audit_log import AuditLogConfig
    from service.core.db import make_engine, transaction
    from service.core.models import Dataset, Model, ModelVersion, Sample, Subject, VersionKind

    tag = secrets.token_hex(3)
    model, dataset = f"loadtest-{tag}", f"loadtest-{tag}"
    engine = make_engine(database_url, "loadtest", audit=AuditLogConfig.from_settings(api_settings))
    try:
        with transaction(engine) as session:
            session.add(Dataset(name=dataset, train_size=samples))
            session.add(Model(name=model, dataset=dataset, spec={"architecture": "loadtest"}))
            session.flush()
            version = ModelVersion(
                model_name=model, kind=VersionKind.original, method="qat", config={}, metrics={},
                sha256="0" * 64, artifact_path="/nonexistent/loadtest.pt", excluded_sample_ids=[],
            )
            session.add(version)
            session.flush()
            session.get(Model, model).deployed_version_id = version.id
            subjects = [f"load-{tag}-{i}" for i in range(-(-samples // SAMPLES_PER_SUBJECT))]
            session.execute(insert(Subject), [{"id": subject} for subject in subjects])
            rows = [{"dataset": dataset, "dataset_index": i, "subject_id": subjects[i // SAMPLES_PER_SUBJECT]}
                    for i in range(samples)]
            ids = session.execute(insert(Sample).returning(Sample.id, Sample.subject_id, sort_by_parameter_order=True),
                                  rows).all()
            _row, key = create_api_key(session, role="submitter", name=f"loadtest {tag}", model=model,
                                       actor="cli:loadtest")
    finally:
        engine.dispose()
    return Seeded(model=model, key=key, subject_of_sample=dict(ids))


def create_database(postgres_url: str) -> str:
    """A new, empty database on the server of `postgres_url`; returns its URL."""
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"qforget_load_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(postgres_url).set(database=name).render_as_string(hide_password=False)


def drop_database(postgres_url: str, database_url: str) -> None:
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{make_url(database_url).database}" WITH (FORCE)'))
    admin.dispose()


# ------------------------------------------------------------------------------------------------
# The API under test, when the load test starts it


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_api(settings: Settings, port: int, workers: int, log_path: Path, log_level: str = "INFO") -> subprocess.Popen:
    """`qforget api` on 127.0.0.1:port with `settings`' database, data folder and audit key, as a
    process group of its own (uvicorn forks its workers)."""
    command = ["service.cli", "--log-level", log_level, "api", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(workers)]
    env = {"QFORGET_DATABASE_URL": settings.database_url, "QFORGET_DATA_DIR": str(settings.data_dir),
           "QFORGET_AUDIT_KEY": settings.audit_secret.decode()}
    return _start_module(command, env, log_path)


# How long the training run beside the API gets to start (import torch, load the digits) before the load.
TRAINING_WARMUP_SECONDS = 8.0


def start_training(log_path: Path, nice: int) -> subprocess.Popen:
    """What a worker running a batch costs the machine, beside the API: a Retrain and Q-MUL run on
    the digits (bundled with scikit-learn, so it runs anywhere) with as many torch threads as
    cores (a worker's default) at a worker's CPU niceness, long enough to outlast any load test;
    stopped with the API."""
    command = ["workers.benchmarks.epoch_floor", "--configs", "digits", "--threads", str(os.cpu_count() or 1),
               "--retrain-epochs", "100000"]
    return _start_module(command, {}, log_path, preexec_fn=lambda: lower_cpu_priority(nice))


def _start_module(command: list[str], env: dict[str, str], log_path: Path, preexec_fn=None) -> subprocess.Popen:
    """`python -m command...` from this checkout, as a process group (and session) of its own,
    logging to log_path; `preexec_fn` runs in the child once it leads its session."""
    env = {**os.environ, **env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                      env.get("PYTHONPATH")]))
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", *command], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=preexec_fn)


def stop_process(process: subprocess.Popen) -> None:
    """Stop a process group started by _start_module: TERM, then KILL after 20 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until_up(host: str, port: int, process: subprocess.Popen | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the API exited with status {process.returncode} before answering")
        try:
            status, _ = asyncio.run(_one_request(host, port, "GET", "/health", {}, None))
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API on {host}:{port} did not answer /health within {timeout:.0f} s")


def process_tree(root_pid: int) -> list[int]:
    """A process and all its descendants (uvicorn's workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_rss_and_cpu(root_pid: int) -> tuple[int, float]:
    """(resident bytes, CPU seconds used so far) of a process tree."""
    rss, cpu, ticks = 0, 0.0, os.sysconf("SC_CLK_TCK")
    for pid in process_tree(root_pid):
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
    return rss, cpu


# ------------------------------------------------------------------------------------------------
# The load


class LoadtestArgumentError(ValueError):
    """An option out of range; the message names it."""


class HttpError(Exception):
    """A response this client cannot read (no Content-Length, a closed connection)."""


def _request_bytes(host: str, method: str, path: str, headers: dict[str, str], body: bytes | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    length = None
    for line in header_lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length is None:
        raise HttpError(f"response {status} without Content-Length")
    return status, await reader.readexactly(length)


async def _one_request(host, port, method, path, headers, body) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_request_bytes(host, method, path, headers, body))
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"POST": [], "GET": []})
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    generator_cpu_seconds: float = 0.0  # this process, over the measured window
    api_cpu_seconds: float | None = None  # the API's processes, over the measured window (None: not ours)
    api_peak_rss: int | None = None
    postgres_cpu_seconds: float | None = None  # the server's processes, when it runs on this machine
    machine_busy_seconds: float | None = None  # every core of the machine, whatever ran on it
    # The CPU figures' window: the measured one, and the wait for its last answers (long when overloaded).
    cpu_window_seconds: float = 0.0
    rate: float | None = None  # the offered load of an open-loop run


@dataclass
class Load:
    host: str
    port: int
    key: str
    samples: list[tuple[int, str]]  # (sample id, subject id), each asked for at most once
    duration: float
    max_requests: int | None
    get_share: float
    warmup: float
    rate: float | None = None  # requests/s on a fixed schedule (open loop); None: each connection sends as soon as answered
    seed: int = 0

    async def run(self, connections: int) -> Results:
        self.results = Results(rate=self.rate)
        self.sent = 0
        self.created: list[str] = []
        self.next_sample = 0
        self.last_sent = 0.0
        self.random = random.Random(self.seed)
        self.start = time.perf_counter()
        self.stop_at = self.start + self.warmup + self.duration
        await asyncio.gather(*(self._connection() for _ in range(connections)))
        # Requests are only sent until the deadline (or the count): the window is up to the last one
        # sent; on a schedule, up to the last answer (a server that falls behind answers fewer per second).
        end = time.perf_counter() if self.rate is not None else min(self.last_sent, self.stop_at)
        self.results.seconds = end - (self.start + self.warmup)
        return self.results

    def _claim(self) -> float | None:
        """When the next request is due (None: no more). Closed loop: now. Open loop (`rate`):
        request n is due at start + n / rate, answered or not the ones before it; its latency counts
        from then, so the time it waited for a free connection counts too (a server that stalls
        cannot hide it by slowing the generator down)."""
        due = time.perf_counter() if self.rate is None else self.start + self.sent / self.rate
        if due >= self.stop_at or (self.max_requests is not None and self.sent >= self.max_requests):
            return None
        self.sent += 1
        self.last_sent = due
        return due

    def _next(self) -> tuple[str, str, bytes | None]:
        if self.created and self.random.random() < self.get_share:
            return "GET", f"/forget-requests/{self.random.choice(self.created)}", None
        if self.next_sample >= len(self.samples):
            raise RuntimeError(f"all {len(self.samples)} seeded samples were used: raise --samples")
        sample_id, subject_id = self.samples[self.next_sample]
        self.next_sample += 1
        body = json.dumps({"subject_id": subject_id, "sample_ids": [sample_id]}).encode()
        return "POST", "/forget-requests", body

    async def _connection(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        reader = writer = None
        while (started := self._claim()) is not None:
            if started > time.perf_counter():
                await asyncio.sleep(started - time.perf_counter())
            method, path, body = self._next()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.write(_request_bytes(self.host, method, path, headers, body))
                await writer.drain()
                status, payload = await _read_response(reader)
                error = None if status == (202 if method == "POST" else 200) else f"{method} {status}"
            except (OSError, asyncio.IncompleteReadError, HttpError, ValueError) as exc:
                status, payload, error = 0, b"", f"{method} {type(exc).__name__}"
                if writer is not None:
                    writer.close()
                reader = writer = None
            finished = time.perf_counter()
            if status == 202:
                self.created.append(json.loads(payload)["id"])
            if started < self.start + self.warmup:
                continue  # warm-up: not counted
            # A request sent before the deadline counts with its whole latency, even when its
            # answer comes after it: dropping the slowest answers would flatter the tail.
            if error is not None:
                self.results.errors[error] += 1
            else:
                self.results.latencies[method].append(finished - started)
        if writer is not None:
            writer.close()


def percentile(sorted_values: list[float], share: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


def report(results: Results) -> str:
    if results.seconds <= 0:
        return "no request was sent after the warm-up: lower --warmup or raise --requests"
    rows = [("POST", results.latencies["POST"]), ("GET", results.latencies["GET"]),
            ("all", results.latencies["POST"] + results.latencies["GET"])]
    lines = [f"{'endpoint':<9}{'ok':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"]
    for name, values in rows:
        ordered = sorted(values)
        cells = [percentile(ordered, q) * 1000 for q in (0.50, 0.95, 0.99)] + [
            (ordered[-1] if ordered else float("nan")) * 1000]
        lines.append(f"{name:<9}{len(ordered):>8}{len(ordered) / results.seconds:>9.0f}"
                     + "".join(f"{cell:>9.1f}" for cell in cells))
    errors = sum(results.errors.values())
    detail = f" ({', '.join(f'{kind}: {n}' for kind, n in results.errors.most_common())})" if errors else ""
    offered = f", {results.rate:g} requests/s offered on schedule" if results.rate else ""
    lines.append(f"errors: {errors}{detail}; measured over {results.seconds:.1f} s{offered}")
    answered = max(len(rows[2][1]) + errors, 1)
    window = results.cpu_window_seconds or results.seconds
    cpu = [f"load generator {results.generator_cpu_seconds / window:.2f} cores"]
    if results.api_cpu_seconds is not None:
        cpu.append(f"API {results.api_cpu_seconds / window:.2f} cores, "
                   f"{1000 * results.api_cpu_seconds / answered:.2f} ms of API CPU per request")
    if results.postgres_cpu_seconds is not None:
        cpu.append(f"PostgreSQL {results.postgres_cpu_seconds / window:.2f} cores")
    if results.machine_busy_seconds is not None:
        cpu.append(f"the machine {results.machine_busy_seconds / window:.2f} of {os.cpu_count()} cores busy")
    lines.append("CPU: " + "; ".join(cpu))
    if results.api_peak_rss is not None:
        lines.append(f"API peak RSS (all its processes): {results.api_peak_rss / 2**20:.0f} MiB")
    return "\n".join(lines)


class _Mark(NamedTuple):
    """The CPU counters at one moment of a run."""

    generator_cpu: float
    api_cpu: float | None
    postgres_cpu: float | None
    machine_busy: float
    wall: float


async def _drive(load: Load, connections: int, api_pid: int | None, postgres_pid: int | None) -> Results:
    loop = asyncio.get_running_loop()
    marks: dict[str, _Mark] = {}
    peak = 0

    def mark(name: str) -> None:
        nonlocal peak
        api_cpu = None
        if api_pid is not None:
            rss, api_cpu = tree_rss_and_cpu(api_pid)
            peak = max(peak, rss)
        postgres_cpu = tree_rss_and_cpu(postgres_pid)[1] if postgres_pid is not None else None
        marks[name] = _Mark(time.process_time(), api_cpu, postgres_cpu, machine_busy_seconds(), time.perf_counter())

    async def watch() -> None:
        nonlocal peak
        await asyncio.sleep(load.warmup)
        mark("start")
        while True:  # the peak memory, every half second
            await asyncio.sleep(0.5)
            if api_pid is not None:
                peak = max(peak, tree_rss_and_cpu(api_pid)[0])

    watcher = loop.create_task(watch())
    results = await load.run(connections)
    mark("end")
    watcher.cancel()
    start, end = marks.get("start", marks["end"]), marks["end"]
    results.generator_cpu_seconds = end.generator_cpu - start.generator_cpu
    results.machine_busy_seconds = end.machine_busy - start.machine_busy
    results.cpu_window_seconds = end.wall - start.wall
    if api_pid is not None:
        results.api_cpu_seconds = end.api_cpu - start.api_cpu
        results.api_peak_rss = peak
    if postgres_pid is not None:
        results.postgres_cpu_seconds = end.postgres_cpu - start.postgres_cpu
    return results


def machine_busy_seconds() -> float:
    """CPU seconds this machine's cores have spent on anything but idling, since boot (/proc/stat)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def local_postgres_pid(database_url: str) -> int | None:
    """The PostgreSQL server's main process when it runs on this machine (its backends are its
    children), else None."""
    engine = create_engine(make_url(database_url), poolclass=NullPool)
    try:
        with engine.connect() as connection:  # read while the backend lives: it exits with the connection
            backend = connection.scalar(text("SELECT pg_backend_pid()"))
            try:
                return int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                return None  # another machine, or a container's own process ids
    finally:
        engine.dispose()


def drive(load: Load, connections: int, api_pid: int | None, postgres_pid: int | None = None) -> Results:
    try:
        import uvloop  # uvicorn[standard] brings it: a cheaper event loop for the generator as well
    except ImportError:
        return asyncio.run(_drive(load, connections, api_pid, postgres_pid))
    return uvloop.run(_drive(load, connections, api_pid, postgres_pid))


# ------------------------------------------------------------------------------------------------
# The command


def check_arguments(args: argparse.Namespace) -> None:
    """Raise LoadtestArgumentError naming the option at fault."""
    if args.duration <= 0 or args.duration > 3600:
        raise LoadtestArgumentError(f"--duration must be in (0, 3600] seconds, got {args.duration}")
    if args.requests is not None and args.requests < 1:
        raise LoadtestArgumentError(f"--requests must be at least 1, got {args.requests}")
    if not 1 <= args.connections <= 1000:
        raise LoadtestArgumentError(f"--connections must be 1 to 1000, got {args.connections}")
    if not 1 <= args.api_workers <= 64:
        raise LoadtestArgumentError(f"--api-workers must be 1 to 64, got {args.api_workers}")
    if not 0 <= args.get_share < 1:
        raise LoadtestArgumentError(f"--get-share must be in [0, 1), got {args.get_share}")
    if args.rate is not None and not 0 < args.rate <= 100_000:
        raise LoadtestArgumentError(f"--rate must be in (0, 100000] requests/s, got {args.rate}")
    if args.warmup < 0:
        raise LoadtestArgumentError(f"--warmup must be >= 0, got {args.warmup}")
    if args.url is not None:
        parts = urlsplit(args.url)
        if parts.scheme != "http" or parts.hostname not in LOCAL_HOSTS or parts.port is None:
            raise LoadtestArgumentError(f"--url must be http://127.0.0.1:<port> or another loopback address, got {args.url!r}")
        if args.api_pid is not None and not Path(f"/proc/{args.api_pid}").exists():
            raise LoadtestArgumentError(f"--api-pid: no process {args.api_pid} on this machine")
        if args.database_url is None:
            raise LoadtestArgumentError("--url needs --database-url: the API's database, where the load's data is seeded")


def samples_needed(args: argparse.Namespace) -> int:
    if args.samples is not None:
        return args.samples
    # Enough POSTs for the rate (3,000 requests/s unless given) over the whole run, or the requested count.
    rate = args.rate if args.rate is not None else 3000
    budget = args.requests if args.requests is not None else int(rate * (args.duration + args.warmup)) + 1
    return max(1000, budget)


def run_loadtest(args: argparse.Namespace) -> int:
    from service.core.migrate import upgrade_database

    check_arguments(args)
    created_database = None
    api = training = None
    try:
        if args.url is None:
            database_url = created_database = create_database(args.postgres_url)
            upgrade_database(database_url)
            # The API it starts: its own data folder, and its own audit key for its own database.
            api_settings = Settings(database_url=database_url, audit_key=secrets.token_hex(32),
                                    data_dir=Path(args.log_dir or Path.cwd() / "var" / "loadtest"))
        else:
            database_url = args.database_url
            api_settings = get_settings()  # the running API's, as this process is configured
        samples = samples_needed(args)
        print(f"seeding {samples} samples ...", file=sys.stderr, flush=True)
        seeded = seed_database(database_url, samples, api_settings)
        if args.url is None:
            host, port = "127.0.0.1", free_port()
            log_path = api_settings.data_dir / f"api-{port}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            api = start_api(api_settings, port, args.api_workers, log_path, args.api_log_level)
            print(f"qforget api ({args.api_workers} workers) on {host}:{port}, log {log_path}", file=sys.stderr)
        else:
            host, port = urlsplit(args.url).hostname, urlsplit(args.url).port
        if args.beside_training:
            log_dir = Path(args.log_dir or Path.cwd() / "var" / "loadtest")
            log_dir.mkdir(parents=True, exist_ok=True)
            nice = args.training_nice if args.training_nice is not None else get_settings().worker_nice
            training = start_training(log_dir / "training.log", nice)
            print(f"beside it: a training run (digits, Retrain then Q-MUL, {os.cpu_count()} torch threads, "
                  f"nice {nice}), log {log_dir / 'training.log'}", file=sys.stderr)
        wait_until_up(host, port, api)
        if training is not None:
            time.sleep(TRAINING_WARMUP_SECONDS)  # past torch's import and the data: training at full speed
        bound = f"{args.duration:g} s" + (f" or {args.requests} requests" if args.requests else "")
        pace = f"{args.rate:g} requests/s on schedule" if args.rate else "each as soon as answered"
        print(f"load: {args.connections} connections, {pace}, GET share {args.get_share:g}, {bound} "
              f"after {args.warmup:g} s of warm-up", file=sys.stderr, flush=True)
        load = Load(host=host, port=port, key=seeded.key, samples=list(seeded.subject_of_sample.items()),
                    duration=args.duration, max_requests=args.requests, get_share=args.get_share,
                    warmup=args.warmup, rate=args.rate)
        training_cpu_before = tree_rss_and_cpu(training.pid)[1] if training is not None else 0.0
        started = time.monotonic()
        results = drive(load, args.connections, api.pid if api is not None else args.api_pid,
                        local_postgres_pid(database_url))
        if api is not None and api.poll() is not None:
            print(f"the API exited with status {api.returncode} during the load", file=sys.stderr)
            return 1
        print(report(results))
        if training is not None:
            if training.poll() is not None:
                print(f"the training run exited with status {training.returncode} during the load", file=sys.stderr)
                return 1
            # Over the whole drive, warm-up included: a close enough share for "was it busy".
            cores = (tree_rss_and_cpu(training.pid)[1] - training_cpu_before) / (time.monotonic() - started)
            print(f"training run beside it: {cores:.2f} cores")
        return 1 if results.errors else 0
    finally:
        for process in (api, training):
            if process is not None:
                stop_process(process)
        if created_database is not None and not args.keep_database:
            drop_database(args.postgres_url, created_database)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of measured load (default 20)")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many requests as well")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load not counted first (default 2)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent keep-alive connections (default 64)")
    parser.add_argument("--rate", type=float, default=None,
                        help="send this many requests/s on a fixed schedule (open loop: latency counts from when "
                             "each was due, waits for a free connection included); default: closed loop")
    parser.add_argument("--get-share", type=float, default=0.5,
                        help="share of GETs of a created request, the rest are POSTs (default 0.5)")
    parser.add_argument("--api-workers", type=int, default=2, help="uvicorn workers of the API it starts (default 2)")
    parser.add_argument("--beside-training", action="store_true",
                        help="run a training process beside the API meanwhile, as a worker's batch would")
    parser.add_argument("--training-nice", type=int, default=None, choices=range(20), metavar="0-19",
                        help="CPU niceness of that training run (default: a worker's, QFORGET_WORKER_NICE)")
    parser.add_argument("--api-log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level of the API it starts (default INFO, as `qforget api`: a line per request)")
    parser.add_argument("--samples", type=int, default=None, help="samples to seed (default: enough for the run)")
    parser.add_argument("--postgres-url", default=os.environ.get("QFORGET_LOADTEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
                        help="a database on the server where the run's own database is created and dropped "
                             "(default QFORGET_LOADTEST_POSTGRES_URL or %(default)s)")
    parser.add_argument("--keep-database", action="store_true", help="do not drop the run's database afterwards")
    parser.add_argument("--url", default=None, help="drive this already running API (loopback only) instead")
    parser.add_argument("--database-url", default=None, help="with --url: that API's database, for the seed")
    parser.add_argument("--api-pid", type=int, default=None,
                        help="with --url: the API's main process id, to report its CPU use and peak memory")
    parser.add_argument("--log-dir", default=None, help="where the started API logs (default var/loadtest)")
