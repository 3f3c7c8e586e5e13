"""One trainer per workdir: a live holder refuses a second trainer; a dead or silent one is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jclip.train.workdir_lock import LOCK_FILE, WorkdirInUseError, WorkdirLock


def hold(workdir, pid, host=None, minutes_ago=0.0):
    """A lock file as a trainer with `pid` on `host` (default: this one) wrote it, last refreshed `minutes_ago`."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    with open(path, "w") as f:
        json.dump({"host": host or socket.gethostname(), "pid": pid, "started": "2026-11-30T12:00:00"}, f)
    then = time.time() - 60 * minutes_ago
    os.utime(path, (then, then))
    return path


def test_a_live_trainer_keeps_its_workdir_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = hold(workdir, other.pid)
        with pytest.raises(WorkdirInUseError, match=rf"run is in use by the trainer with process id {other.pid} on "
                                                    rf"{socket.gethostname()} \(started 2026-11-30T12:00:00\): stop it,"
                                                    rf" or use another --workdir. If that trainer is gone, delete {path}"):
            WorkdirLock(workdir, stale_minutes=10).__enter__()
    finally:
        other.kill()
        other.wait()
    with WorkdirLock(workdir, stale_minutes=10):  # its process has ended
        with open(path) as f:
            assert json.load(f)["pid"] == os.getpid()
        with pytest.raises(WorkdirInUseError, match=f"process id {os.getpid()}"):  # a second trainer here
            WorkdirLock(workdir, stale_minutes=10).__enter__()
    assert f"Taking over the workdir lock of process {other.pid} on {socket.gethostname()}: process {other.pid} " \
           "has ended." in capsys.readouterr().out
    assert not os.path.exists(path)  # released


def test_on_shared_storage_a_lock_is_stale_once_its_heartbeat_stops(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    hold(workdir, 1234, host="another-machine", minutes_ago=3)
    with pytest.raises(WorkdirInUseError, match="process id 1234 on another-machine"):
        WorkdirLock(workdir, stale_minutes=10).__enter__()
    path = hold(workdir, 1234, host="another-machine", minutes_ago=11)
    monkeypatch.setattr("jclip.train.workdir_lock.HEARTBEAT_SECONDS", 0.05)
    with WorkdirLock(workdir, stale_minutes=10):
        time.sleep(0.3)
        assert time.time() - os.path.getmtime(path) < 1  # the holder's heartbeat
