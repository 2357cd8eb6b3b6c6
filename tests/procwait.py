"""A bounded wait for a file a started process writes (its URL or address), for the tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest


def wait_for_file(path: Path, proc: subprocess.Popen[Any], timeout: float) -> str:
    """The stripped text of ``path`` once ``proc`` has written it; the test fails with the
    process's output if it exits first or ``timeout`` seconds pass (a bound, not a speed check)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return text
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"no {path.name} from the process (exit {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.1)
