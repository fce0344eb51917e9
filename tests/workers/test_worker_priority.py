"""A worker lowers its CPU priority (QFORGET_WORKER_NICE) so that it does not starve the API beside it."""

import subprocess
import sys
from pathlib import Path

import pytest

from service.core.settings import Settings

REPORT = (
    "import os; from service.cli.processes import lower_cpu_priority; lower_cpu_priority({nice}); "
    "print(os.nice(0)); print(open('/proc/self/autogroup').read())"
)
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no autogroup scheduling here")


def autogroup_nice(autogroup_text: str) -> int | None:
    """The nice in a /proc/PID/autogroup reading ("/autogroup-85 nice 0"). The kernel prints nothing for a
    process still in the root group, one whose session never called setsid (a daemon's child, as under
    some CI runners): None."""
    return int(autogroup_text.split()[-1]) if autogroup_text.strip() else None


def niceness_after_lowering(nice: int, own_session: bool) -> tuple[int, int | None]:
    """(the process's nice, its session's autogroup nice) after lower_cpu_priority(nice)."""
    result = subprocess.run([sys.executable, "-c", REPORT.format(nice=nice)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True, start_new_session=own_session)
    process_nice, autogroup_text = result.stdout.split("\n", 1)
    return int(process_nice), autogroup_nice(autogroup_text)


def test_a_session_leader_lowers_its_process_and_its_session():
    assert niceness_after_lowering(7, own_session=True) == (7, 7)


def test_a_process_in_a_shared_session_lowers_only_itself():
    # Lowering the session would lower the processes it shares it with: the API, a shell.
    own_session_nice = autogroup_nice(Path("/proc/self/autogroup").read_text())
    assert niceness_after_lowering(7, own_session=False) == (7, own_session_nice)


def test_worker_nice_is_checked_naming_the_setting(monkeypatch):
    monkeypatch.setenv("QFORGET_WORKER_NICE", "20")
    with pytest.raises(ValueError, match="worker_nice"):
        Settings()
