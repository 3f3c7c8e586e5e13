"""One trainer per workdir: a lock file that names its holder and proves it alive.

Two trainers writing one workdir (another shell, a job submitted twice) would
interleave checkpoints and logs. The trainer's process 0 creates
`<workdir>/lock.json` (host, process id, start time) atomically and, from a
background thread, touches it every `HEARTBEAT_SECONDS`. A lock is a dead
trainer's, and is taken over, when its process is gone on this host, or when
it has not been touched for `stale_minutes` (a crashed machine, on shared
storage). Other processes of a multi-process job follow process 0's answer.
"""

import contextlib
import datetime
import json
import os
import socket
import threading
import time

import jax

from jclip import parallel

LOCK_FILE = "lock.json"
HEARTBEAT_SECONDS = 30.0


class WorkdirInUseError(ValueError):
    """Another live trainer holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(path: str, stale_minutes: float) -> tuple[dict, str]:
    """(the lock's contents, why it no longer holds: '' while its trainer lives)."""
    try:
        with open(path) as f:
            holder = json.load(f)
        idle_minutes = (time.time() - os.path.getmtime(path)) / 60
    except FileNotFoundError:
        return {}, "released"
    except (OSError, ValueError):
        return {}, "unreadable"
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return holder, f"process {holder.get('pid')} has ended"
    if idle_minutes > stale_minutes:
        return holder, f"not refreshed for {idle_minutes:.0f} minutes (config.lock_stale_minutes={stale_minutes:g})"
    return holder, ""


class WorkdirLock:
    """`with WorkdirLock(workdir, stale_minutes):` holds the workdir for this job, or raises `WorkdirInUseError`
    naming the trainer that holds it."""

    def __init__(self, workdir: str, stale_minutes: float):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.stale_minutes = stale_minutes
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        error = self._acquire() if jax.process_index() == 0 else ""
        if not parallel.process_zero_decides(not error):
            raise WorkdirInUseError(error or f"process 0 found {self.path} held by another trainer")
        if jax.process_index() == 0:
            self._thread = threading.Thread(target=self._heartbeat, name="jclip-workdir-lock", daemon=True)
            self._thread.start()
        return self

    def _acquire(self) -> str:
        """Create the lock file (taking over a dead trainer's); '' when held, else why not."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        content = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "started": datetime.datetime.now().isoformat(timespec="seconds")})
        for _ in range(3):  # a lock released or taken over between our looks: look again
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, gone = _holder(self.path, self.stale_minutes)
                if not gone:
                    return (f"{os.path.dirname(self.path)} is in use by the trainer with process id {holder.get('pid')} "
                            f"on {holder.get('host')} (started {holder.get('started')}): stop it, or use another "
                            f"--workdir. If that trainer is gone, delete {self.path}")
                if holder:
                    print(f"Taking over the workdir lock of process {holder.get('pid')} on {holder.get('host')}: {gone}.")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            with os.fdopen(descriptor, "w") as f:
                f.write(content)
            return ""
        return f"could not take the lock {self.path}: other trainers keep taking it"

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass  # gone or unreachable for now: the next beat tries again

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
