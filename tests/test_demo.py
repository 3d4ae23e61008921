"""The README's first command, `bash scripts/demo.sh`, as a new user sees it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent


def three_free_ports() -> int:
    """A base port with the next two free as well (HTTP, gRPC, metrics)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base > 65000:
            continue
        try:
            sockets = []
            for port in (base, base + 1, base + 2):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no three consecutive free ports")


def test_the_demo_prints_its_steps_something_to_judge_and_what_to_try_next(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "TRITONKIT_DEMO_DIR": str(tmp_path), "TRITONKIT_DEMO_PORT": str(three_free_ports())},
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    steps = re.findall(r"^\[(\d)/9\] ", result.stdout, flags=re.M)
    assert steps == [str(k) for k in range(1, 10)], out
    assert len(re.findall(r"done in \d+ s$", result.stdout, flags=re.M)) == 7
    assert result.stdout.count("tritonkit: ready: ") == 2  # each server's ready line
    assert "caption 1: an orange square" in result.stdout and "random weights" in result.stdout
    assert "Hello there" in result.stdout and "00:00:00,000 -->" in result.stdout  # the subtitles
    assert "Next:\n  . .venv/bin/activate" in result.stdout and "curl" in result.stdout
    assert "Traceback" not in out and "Warning" not in out and "warn" not in out.lower()
