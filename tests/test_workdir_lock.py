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


def test_a_stale_lock_taken_over_by_another_trainer_in_between_is_left_to_it(tmp_path, monkeypatch):
    """Two trainers find the same dead trainer's lock: the one that looks second must not remove the lock the
    first one has just written in its place."""
    from jclip.train import workdir_lock

    workdir = str(tmp_path / "run")
    path = hold(workdir, 1234, host="another-machine", minutes_ago=11)
    judge = workdir_lock._holder

    def judged_then_overtaken(*args):
        verdict = judge(*args)
        if verdict[1] and verdict[0].get("pid") == 1234:  # the stale lock: the other trainer takes it over now
            os.remove(path)
            hold(workdir, os.getppid())  # a live process
        return verdict

    monkeypatch.setattr(workdir_lock, "_holder", judged_then_overtaken)
    with pytest.raises(WorkdirInUseError, match=f"process id {os.getppid()}"):
        WorkdirLock(workdir, stale_minutes=10).__enter__()
    with open(path) as f:
        assert json.load(f)["pid"] == os.getppid()  # the other trainer's lock, intact
    assert sorted(os.listdir(workdir)) == [LOCK_FILE]  # no draft or set-aside file left behind


def test_a_lock_is_never_seen_half_written(tmp_path, monkeypatch):
    """The lock appears with its whole content: a trainer looking while another writes finds it live, not
    unreadable (which it would take over)."""
    from jclip.train import workdir_lock

    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    seen = []
    linking = os.link

    def look_while_linking(source, target):
        with open(source) as f:
            seen.append(json.load(f))  # the draft is complete before it becomes the lock
        linking(source, target)
        seen.append(workdir_lock._holder(target, 10.0)[1])

    monkeypatch.setattr(workdir_lock.os, "link", look_while_linking)
    with WorkdirLock(workdir, stale_minutes=10):
        assert seen[0]["pid"] == os.getpid() and seen[1] == ""  # complete, and live
