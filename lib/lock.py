"""One writer at a time: an exclusive lock on a path (a run folder, a store being written).

`with exclusive(path, "train"):` takes an advisory flock on `<path>.lock` beside a file, or `<path>/.lock` inside a
folder, and writes the holder (pid, host, what) into it. A second writer fails at once with a `LockedError` whose
one-line message names the holder. The kernel drops the lock when the holder dies (even by SIGKILL), so a crash
never leaves a run or store locked; the lock file is removed on a normal release. A holder may hand its lock to a
process it starts (`held_descriptor`, lib.watchdog): the lock then lasts until that one ends too; a writer that
finds the lock held while its recorded holder is dead waits (up to DEAD_HOLDER_WAIT seconds) for that to happen.
"""
import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

DEAD_HOLDER_WAIT = 60  # seconds: how long a lock whose recorded holder died may stay held by what it left behind
_held = {}  # lock file -> descriptor, of the locks this process holds


class LockedError(RuntimeError):
    """Someone else is writing this path: the message is one line and names the holder."""


def lock_path(path):
    path = Path(path)
    return path / ".lock" if path.is_dir() else path.with_name(path.name + ".lock")


def held_descriptor(path):
    """The descriptor of the lock this process holds on `path` (pass it to a child process so that the lock lasts
    until that child ends too)."""
    return _held[lock_path(path)]


def _holder_dead(who):
    """True when the lock file names a holder on this host whose process is gone."""
    if not who or who.get("host") != socket.gethostname() or not isinstance(who.get("pid"), int):
        return False
    try:
        os.kill(who["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _wait_for_lock(fd, seconds):
    """Block for the lock up to `seconds`; True when it was taken."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.1)
    return False


def holder(path):
    """The holder recorded in a lock file ({pid, host, what, since}), or None."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _locked_error(path, file, who):
    return LockedError(f"{path}: already being written by {who.get('what', 'another process')} "
                       f"(pid {who.get('pid', '?')} on {who.get('host', '?')}, lock {file})")


def refuse_if_locked(path):
    """LockedError when a live process holds the lock of `path`; takes nothing. For a script to call before its
    slow imports, so that a second writer is refused at once; `exclusive` still takes the lock afterwards."""
    file = lock_path(path)
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:  # no lock file (or none readable): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        who = holder(file) or {}
        if not _holder_dead(who):
            raise _locked_error(path, file, who) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(path, what):
    """Hold the write lock of `path` (created if missing: its folder must exist) for the body of the `with`."""
    file = lock_path(path)
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder(file) or {}
            if not (_holder_dead(who) and _wait_for_lock(fd, DEAD_HOLDER_WAIT)):  # dead: what it left is ending
                os.close(fd)
                raise _locked_error(path, file, who) from None
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
        _held[file] = fd
        yield file
    finally:
        _held.pop(file, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file)  # before unlocking: a waiter that then locks the old inode sees it is gone and retries
        os.close(fd)
