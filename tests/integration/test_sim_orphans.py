"""A simulated worker (HTTP or native) whose launcher dies (SIGKILL) stops by itself: no orphans."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize(
    "command",
    [
        "'lmgw.simulators', '--port', '0'",
        "'lmgw.worker', '--engine', 'sim'",  # lmgw simulate --transport zmq
    ],
)
def test_worker_exits_when_its_parent_dies(tmp_path, command: str) -> None:
    pid_file = tmp_path / "worker.pid"
    launcher = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', {command},"
        " '--speed', 'inf'], stdout=subprocess.PIPE, text=True)\n"
        "assert p.stdout.readline().startswith('READY')\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the worker never got ready"
            assert parent.poll() is None
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        parent.kill()  # the launcher dies without stopping its worker
        parent.wait(5)
        deadline = time.monotonic() + 10
        while _alive(worker):
            assert time.monotonic() < deadline, "orphaned worker still running after 10 s"
            time.sleep(0.1)
    finally:
        parent.kill()
        if pid_file.exists() and pid_file.read_text():
            try:
                os.kill(int(pid_file.read_text()), 9)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
