"""One writer at a time: an exclusive lock on a path (a run folder, a store being written).

`with exclusive(path, "train"):` takes an advisory flock on `<path>.lock` beside a file, or `<path>/.lock` inside a
folder, and writes the holder (pid, host, what) into it. A second writer fails at once with a `LockedError` whose
one-line message names the holder. The kernel drops the lock when the holder dies (even by SIGKILL), so a crash
never leaves a run or store locked; the lock file is removed on a normal release.
"""
import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path


class LockedError(RuntimeError):
    """Someone else is writing this path: the message is one line and names the holder."""


def lock_path(path):
    path = Path(path)
    return path / ".lock" if path.is_dir() else path.with_name(path.name + ".lock")


def holder(path):
    """The holder recorded in a lock file ({pid, host, what, since}), or None."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def exclusive(path, what):
    """Hold the write lock of `path` (created if missing: its folder must exist) for the body of the `with`."""
    file = lock_path(path)
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = holder(file) or {}
            raise LockedError(f"{path}: already being written by {who.get('what', 'another process')} "
                              f"(pid {who.get('pid', '?')} on {who.get('host', '?')}, lock {file})") from None
        # The previous holder may have removed the file between our open and our flock: then lock the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield file
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file)  # before unlocking: a waiter that then locks the old inode sees it is gone and retries
        os.close(fd)
