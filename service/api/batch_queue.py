"""Batching of the two hot routes: what arrives while one batch is in the database goes in the next.

- `POST /forget-requests`, group commit: filing a request costs a fixed number of statements, the
  audit log's lock and a commit (a WAL flush); filed together (service.requests.intake.
  file_forget_requests, each request checked as if filed alone, in arrival order), N requests cost
  those once. Nothing is answered before its transaction commits, so a crash loses no request that
  was answered 202.
- `GET /forget-requests/{id}`: the ids asked for meanwhile are read in one statement.

One batch at a time per queue and process: while it runs, the next one gathers, so a lone request
waits for nothing and a busy process makes large batches.
"""

import asyncio
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.requests.intake import Outcome, Submission, file_forget_requests
from service.requests.queries import FiledRequest, requests_with_sample_ids

# At most this many requests per transaction: bounds the latency of the last of them.
MAX_BATCH_SUBMISSIONS = 200
# PostgreSQL binds at most 65,535 parameters per statement; the samples' statements bind every
# sample id of the batch (a single request may name 10,000).
MAX_BATCH_PARAMETERS = 30_000
MAX_BATCH_READS = 200

Item = TypeVar("Item")
Result = TypeVar("Result")
Pending = list[tuple[Item, asyncio.Future]]


class BatchQueue(Generic[Item, Result]):
    """Runs `run_batch(items) -> results` (one result per item, in order; in a worker thread) on
    batches that `take_batch(pending)` removes from the front of the queue."""

    def __init__(self, run_batch: Callable[[list[Item]], list[Result]], take_batch: Callable[[Pending], Pending]):
        self._run_batch = run_batch
        self._take_batch = take_batch
        # Per event loop (uvicorn runs one per process; a test client may run several at once):
        # futures are awaited, and resolved, on their own loop only.
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopQueue] = weakref.WeakKeyDictionary()

    async def submit(self, item: Item) -> Result:
        """The item's result once its batch has run; raises what the batch raised (a database
        error fails every item of its batch)."""
        loop = asyncio.get_running_loop()
        queue = self._loops.setdefault(loop, _LoopQueue())
        future = loop.create_future()
        queue.pending.append((item, future))
        if queue.runner is None:
            queue.runner = loop.create_task(self._run_while_pending(queue))
        return await future

    async def _run_while_pending(self, queue: "_LoopQueue") -> None:
        try:
            while queue.pending:
                batch = self._take_batch(queue.pending)
                try:
                    results = await run_in_threadpool(self._run_batch, [item for item, _ in batch])
                except Exception as error:  # noqa: BLE001 - every waiting request gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        if not future.done():  # a cancelled request's item still ran
                            future.set_result(result)
        finally:
            # No await between the last results and here: the task ends in the step that answers
            # the last request (a test client may close its event loop right after).
            queue.runner = None


@dataclass
class _LoopQueue:
    pending: Pending = field(default_factory=list)
    runner: asyncio.Task | None = None


def intake_queue(
    session_factory: sessionmaker[Session], response_body: Callable[[FiledRequest], dict]
) -> BatchQueue[Submission, Outcome]:
    """Files submissions, one transaction per batch."""

    def file_and_commit(submissions: list[Submission]) -> list[Outcome]:
        with session_factory() as session:
            outcomes = file_forget_requests(session, submissions, response_body)
            session.commit()
        return outcomes

    return BatchQueue(file_and_commit, take_intake_batch)


def read_queue(session_factory: sessionmaker[Session]) -> BatchQueue[str, FiledRequest | None]:
    """Reads requests by id (None for an unknown id), one statement per batch."""

    def read(request_ids: list[str]) -> list[FiledRequest | None]:
        with session_factory() as session:
            found = requests_with_sample_ids(session, set(request_ids))
        return [found.get(request_id) for request_id in request_ids]

    return BatchQueue(read, lambda pending: _take_front(pending, MAX_BATCH_READS))


def take_intake_batch(pending: Pending) -> Pending:
    """Removes and returns the oldest pending submissions that fit a batch. A second use of an
    idempotency key waits for the next batch, where the first one's record is committed."""
    size, parameters, keys = 0, 0, set()
    for submission, _ in pending:
        claim = submission.idempotency
        key = (claim.api_key_id, claim.key) if claim is not None else None
        cost = submission.parameter_count()
        if size and (size == MAX_BATCH_SUBMISSIONS or parameters + cost > MAX_BATCH_PARAMETERS or key in keys):
            break
        size += 1
        parameters += cost
        if key is not None:
            keys.add(key)
    return _take_front(pending, size)


def _take_front(pending: Pending, size: int) -> Pending:
    batch = pending[:size]
    del pending[:size]
    return batch
