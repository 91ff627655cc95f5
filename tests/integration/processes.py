"""Subprocesses the tests start, stopped by PID."""

from __future__ import annotations

import signal
import subprocess


def interrupt(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Ctrl-C as an operator would; SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
