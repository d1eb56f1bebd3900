"""One run at a time per study folder: an exclusive `flock` on DIR/.lock, held by the driver process.

The kernel drops a flock when its holder dies in any way (kill -9 included), so a stale lock cannot
outlive its run and there is nothing to clean up. The file is never deleted (deleting it would let two
runs lock two different inodes); it holds a line saying who holds it, for the message a second run
prints. Executors' worker processes (Ray) take no lock: the driver's is enough, since they only write
artifacts of the run that holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Iterator

from ..errors import UserError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def study_lock(root: str | Path, command: str | None = None) -> Iterator[Path]:
    """Hold the study folder's lock for the block; a UserError naming the holder if another process has it."""
    path = Path(root) / LOCK_NAME
    try:  # no O_TRUNC: the holder's line must survive; no links followed: the lock is truncated below, and
        # a link planted in a shared folder must not empty its target (O_NONBLOCK: a FIFO does not hang)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e)).lower()
        raise UserError(f"study folder {root}: its lock file {path} {why}; a study's lock is a plain file it "
                        "creates itself (remove it if you know what it is)") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"study folder {root}: its lock file {path} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"study folder {root} is in use by {_holder(fd)}; wait for it or use another "
                            "--out") from None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = f"pid {os.getpid()} host {socket.gethostname()} since {when} command {command or shlex.join(sys.argv)}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, line.encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """'pid P on HOST since T' from the holder's line (it may not have written it yet)."""
    words = os.pread(fd, 4096, 0).decode(errors="replace").split()
    try:
        return f"pid {words[1]} on {words[3]} since {words[5]}"
    except IndexError:
        return "another process (starting up)"
