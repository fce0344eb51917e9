"""Child qforget processes (api, worker, scheduler) started with one environment, logged to files."""

import subprocess
import sys
import time
from pathlib import Path


class Processes:
    """Processes started with `python -m service.cli <args>`; `stop` ends them all."""

    def __init__(self, env: dict, log_dir: Path):
        self.env, self.log_dir, self.children = env, log_dir, []

    def start(self, name: str, *args: str) -> None:
        log_file = open(self.log_dir / f"{name}.log", "w")
        command = [sys.executable, "-m", "service.cli", *args]
        self.children.append((name, subprocess.Popen(command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT)))

    def check_alive(self) -> None:
        for name, process in self.children:
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

    def stop(self) -> None:
        for _, process in self.children:
            process.terminate()
        for _, process in self.children:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
