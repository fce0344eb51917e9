"""Group commit for `POST /forget-requests`: the requests that arrive while one transaction is
being written are filed together in the next one.

Filing a request costs a fixed number of statements, the audit log's lock and a commit (a WAL
flush); filed together, N requests cost those once (service.forget_requests.file_forget_requests
keeps each request's checks and outcome as if it were filed alone, in arrival order). Nothing is
answered before its transaction commits, so a crash loses no request that was answered 202. One
writer per API process: while it writes, the next batch gathers, so a lone request waits for
nothing and a busy process writes large batches.
"""

import asyncio
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.forget_requests import FiledRequest, Outcome, Submission, file_forget_requests

# At most this many requests per transaction: bounds the latency of the last of them.
MAX_BATCH_SUBMISSIONS = 200
# PostgreSQL binds at most 65,535 parameters per statement; the samples' statements bind every
# sample id of the batch (a single request may name 10,000).
MAX_BATCH_PARAMETERS = 30_000


class IntakeQueue:
    """Files submissions in batches, one transaction at a time, on the event loop that awaits them."""

    def __init__(self, session_factory: sessionmaker[Session], response_body: Callable[[FiledRequest], dict]):
        self._session_factory = session_factory
        self._response_body = response_body
        # Per event loop (uvicorn runs one per process; a test client may run several at once):
        # futures are awaited, and resolved, on their own loop only.
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopQueue] = weakref.WeakKeyDictionary()

    async def file(self, submission: Submission) -> Outcome:
        """The submission's outcome once its transaction has committed; raises what the
        transaction raised (a database error fails every submission of its batch)."""
        loop = asyncio.get_running_loop()
        queue = self._loops.setdefault(loop, _LoopQueue())
        future = loop.create_future()
        queue.pending.append((submission, future))
        if queue.writer is None:
            queue.writer = loop.create_task(self._write_while_pending(queue))
        return await future

    async def _write_while_pending(self, queue: "_LoopQueue") -> None:
        try:
            while queue.pending:
                batch = take_batch(queue.pending)
                try:
                    outcomes = await run_in_threadpool(self._write, [submission for submission, _ in batch])
                except Exception as error:  # noqa: BLE001 - every waiting request gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                else:
                    for (_, future), outcome in zip(batch, outcomes, strict=True):
                        if not future.done():  # a cancelled request's outcome is still filed
                            future.set_result(outcome)
        finally:
            # No await between the last results and here: the task ends in the step that answers
            # the last request (a test client may close its event loop right after).
            queue.writer = None

    def _write(self, submissions: list[Submission]) -> list[Outcome]:
        with self._session_factory() as session:
            outcomes = file_forget_requests(session, submissions, self._response_body)
            session.commit()
        return outcomes


@dataclass
class _LoopQueue:
    pending: list[tuple[Submission, asyncio.Future]] = field(default_factory=list)
    writer: asyncio.Task | None = None


def take_batch(pending: list[tuple[Submission, asyncio.Future]]) -> list[tuple[Submission, asyncio.Future]]:
    """Removes and returns the oldest pending submissions that fit a batch. A second use of an
    idempotency key waits for the next batch, where the first one's record is committed."""
    batch, parameters, keys = [], 0, set()
    for submission, future in pending:
        claim = submission.idempotency
        key = (claim.api_key_id, claim.key) if claim is not None else None
        cost = submission.parameter_count()
        if batch and (
            len(batch) == MAX_BATCH_SUBMISSIONS or parameters + cost > MAX_BATCH_PARAMETERS or key in keys
        ):
            break
        batch.append((submission, future))
        parameters += cost
        if key is not None:
            keys.add(key)
    del pending[: len(batch)]
    return batch
