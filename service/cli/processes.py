"""Child qforget processes (api, worker, scheduler) started with one environment, logged to files."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def lower_cpu_priority(nice: int) -> None:
    """Run this process, and every thread and child it starts from now on, at CPU niceness `nice`
    (0 to 19; lowering only, which needs no privilege).

    Linux's autogroup scheduling (on by default on desktops and many servers) first shares the CPU
    between sessions, equally, and applies a process's nice only among its own session's; so a
    process that leads its session (a worker started as its own process group, a container's
    process) also sets its session's nice, which is what ranks it against the API's session."""
    os.nice(max(0, nice - os.nice(0)))
    autogroup = Path("/proc/self/autogroup")
    if os.getsid(0) == os.getpid() and autogroup.exists():
        try:
            autogroup.write_text(str(nice))
        except OSError as error:  # a kernel or sandbox that refuses it: the per-process nice stays
            log.warning("could not set the session's CPU niceness to %d: %s", nice, error)


class Processes:
    """Processes started with `python -m service.cli <args>`; `stop` ends them all.

    Each child leads its own process group, so that `kill` takes a Celery worker down together
    with its pool processes, as a crashed machine would.
    """

    def __init__(self, env: dict, log_dir: Path):
        self.env, self.log_dir, self.children = env, log_dir, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log_file = open(self.log_dir / f"{name}.log", "a")
        command = [sys.executable, "-m", "service.cli", *args]
        process = subprocess.Popen(command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.children[name] = process
        return process

    def check_alive(self) -> None:
        for name, process in self.children.items():
            if process.poll() is not None:
                raise RuntimeError(f"the {name} process exited ({process.returncode}); see {self.log_dir / name}.log")

    def wait_until(self, condition, what: str, timeout: float, interval: float = 0.5):
        """Poll `condition` until it returns something truthy; fail early if a child died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            result = condition()
            if result:
                return result
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.log_dir}")

    def kill(self, name: str) -> None:
        """SIGKILL the child and everything in its process group, and forget it."""
        process = self.children.pop(name)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def stop(self) -> None:
        for process in self.children.values():
            process.terminate()
        for name in list(self.children):
            try:
                self.children[name].wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            self.kill(name)
