"""A run directory has one writer: the process holding its `.lock`.

The lock is an advisory `flock` on `<run dir>/.lock`, which also records who holds it (pid, host,
start time, command) for the message a second writer gets. The kernel releases a flock when its
process dies, however it dies, so a lock file left by a killed run is recognised as stale (its lock
can be taken) and taken over. A finished run removes the file. flock works between processes of one
machine and on most network file systems that support POSIX locks; two machines writing one
directory over a file system without them are not detected.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evals.models.yamlspec import InputError

LOCK_FILE = ".lock"

log = logging.getLogger(__name__)


def _holder(fd: int) -> dict[str, Any]:
    """What the lock file says about the process that wrote it ({} if it says nothing readable)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    started = holder.get("started")
    since = ""
    if isinstance(started, int | float):
        since = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{since} ({holder.get('command', '?')})"


def _open_locked(path: Path) -> int | None:
    """An fd of `path` holding its exclusive flock; InputError naming the holder when another has it;
    None where the system has no flock (Windows): the run goes on unlocked, with a warning."""
    try:
        import fcntl
    except ImportError:
        log.warning(f"{path.parent}: not locked (no flock on this system); do not resume it twice at once")
        return None

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:  # a link planted at the name (ELOOP), a read-only directory, ...
            raise InputError(f"{path}: cannot open the run's lock file ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise InputError(
                f"{path.parent} is being written by {_describe(holder)}; wait for it to finish, or stop it "
                "and resume with `evals run --resume`"
            ) from None
        # The file may have been removed (by the holder finishing) between our open and our lock:
        # then we hold a lock on a name nobody sees. Lock the file that is there now instead.
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block: a second writer (a run, a resume) gets an InputError
    naming this process; a stale lock from a killed process is taken over with a note."""
    path = run_dir / LOCK_FILE
    fd = _open_locked(path)
    if fd is None:
        yield
        return
    try:
        stale = _holder(fd)
        if stale:
            log.info(f"taking over the lock {_describe(stale)} left in {run_dir} (that process is gone)")
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": int(time.time()),
            "command": " ".join(["evals", *sys.argv[1:]])[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        yield
    finally:
        Path(path).unlink(missing_ok=True)  # removed while still locked: no one can take a finished run's lock
        os.close(fd)
