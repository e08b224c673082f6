"""One writer per run directory: an advisory lock held by ``bindkit run`` from start to end.

:func:`run_lock` takes ``fcntl.flock`` on ``RUN/.bindkit.lock`` before anything in the folder is
touched and holds it until the run returns (rank 0 only under torchrun: the other ranks write
nothing there). A second ``bindkit run`` on the same folder, fresh or ``--resume``, is refused at
once with :class:`RunDirectoryBusy`, which names the folder and the holder's pid and host.

The kernel drops a flock when its holder dies (crash, SIGKILL, OOM kill), so a lock file left by a
dead process blocks nothing: the pid written inside is only for the message. The file is never
deleted (deleting a lock file races with the next process that opens it); taking the lock checks
that the locked file is still the one at the path, in case a user deleted it by hand.

flock works across machines on NFS (Linux emulates it with byte-range locks there). On a file
system that has no locks at all the run goes on with a warning: it cannot be refused there.

    with run_lock(Path("runs/digits")):
        ...  # the only writer of runs/digits
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import DataError

LOCK_NAME = ".bindkit.lock"

log = logging.getLogger(__name__)


class RunDirectoryBusy(DataError):
    """Another live ``bindkit run`` holds the run directory's lock."""


@contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock for the ``with`` block; creates the folder. Raises :class:`RunDirectoryBusy`."""
    fd = _acquire(Path(directory))
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock


def _acquire(directory: Path) -> int | None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryBusy(
                    f"{directory}: another bindkit run is writing to this folder ({holder or 'pid unknown'}); "
                    "wait for it to end, or give another --out"
                ) from None
            log.warning("%s: cannot lock (%s); make sure no other run writes to this folder", path, err.strerror)
            return None
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # deleted (or replaced) between open and lock: lock the file now at the path instead
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
    return fd
