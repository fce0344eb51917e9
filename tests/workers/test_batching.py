from datetime import datetime, timedelta, timezone

import pytest

from workers.batches.policy import BatchPolicy, PendingStats, is_due

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
POLICY = BatchPolicy(min_samples=100, max_wait_seconds=600, due_margin_days=3)


def stats(samples=10, waited=timedelta(seconds=10), due_in=timedelta(days=29)):
    return PendingStats("m", samples, NOW - waited, NOW + due_in)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (stats(), False),  # few samples, fresh, far from due: wait for more
        (stats(samples=100), True),  # enough samples
        (stats(samples=99), False),
        (stats(waited=timedelta(seconds=600)), True),  # the oldest waited long enough
        (stats(waited=timedelta(seconds=599)), False),
        (stats(due_in=timedelta(days=3)), True),  # the deadline is near
        (stats(due_in=timedelta(days=3, seconds=1)), False),
    ],
)
def test_a_batch_is_due_when_any_bound_is_met(case, expected):
    assert is_due(case, POLICY, NOW) is expected
