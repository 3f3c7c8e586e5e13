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
from typing import Optional

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


def _identity(status: os.stat_result) -> tuple[int, int]:
    """Which lock file this is: its inode alone can be reused at once by a new file in its place."""
    return status.st_ino, status.st_mtime_ns


def _holder(path: str, stale_minutes: float) -> tuple[dict, str, Optional[tuple[int, int]]]:
    """(the lock's contents, why it no longer holds: '' while its trainer lives, the lock file's `_identity`)."""
    try:
        with open(path) as f:
            identity = _identity(os.fstat(f.fileno()))
            holder = json.load(f)
        idle_minutes = (time.time() - os.path.getmtime(path)) / 60
    except FileNotFoundError:
        return {}, "released", None
    except (OSError, ValueError):
        return {}, "unreadable", None  # locks are written whole (`_create`): this one is not a trainer's
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return holder, f"process {holder.get('pid')} has ended", identity
    if idle_minutes > stale_minutes:
        return holder, (f"not refreshed for {idle_minutes:.0f} minutes (config.lock_stale_minutes="
                        f"{stale_minutes:g})"), identity
    return holder, "", identity


def _create(path: str, content: str) -> None:
    """Create `path` holding `content`, whole or not at all (FileExistsError if it exists): written to a file
    of its own, then hard-linked into place, so no trainer ever reads a half-written lock."""
    draft = f"{path}.{socket.gethostname()}.{os.getpid()}.draft"
    with open(draft, "w") as f:
        f.write(content)
    try:
        os.link(draft, path)
    finally:
        os.remove(draft)


def _remove_if_same(path: str, judged: Optional[tuple[int, int]]) -> None:
    """Remove the stale lock of `_identity` `judged`, but not a newer lock another trainer took over in between:
    the file is first renamed aside (atomic), then given back if it is not the one judged."""
    aside = f"{path}.{socket.gethostname()}.{os.getpid()}.stale"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if judged is not None and _identity(os.stat(aside)) != judged:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.remove(aside)


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
                _create(self.path, content)
            except FileExistsError:
                holder, gone, identity = _holder(self.path, self.stale_minutes)
                if not gone:
                    return (f"{os.path.dirname(self.path)} is in use by the trainer with process id {holder.get('pid')} "
                            f"on {holder.get('host')} (started {holder.get('started')}): stop it, or use another "
                            f"--workdir. If that trainer is gone, delete {self.path}")
                if holder:
                    print(f"Taking over the workdir lock of process {holder.get('pid')} on {holder.get('host')}: {gone}.")
                _remove_if_same(self.path, identity)
                continue
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
