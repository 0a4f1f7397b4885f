"""Output paths checked before the work that fills them, and files written whole or not at all.

`check_writable(path, need_bytes)` runs before a script's long step: the folder `path` is (or will be created)
in must accept a new file and hold at least `need_bytes` free, else an `OutputError` naming it (read-only,
no permission, not a folder, disk full). `write_atomically(path, write)` writes through a temporary file
and a rename; when the write fails (a disk that filled up meanwhile) the temporary file is removed and the
error is an `OutputError` naming the file. Both messages are one line.
"""
import contextlib
import errno
import os
import tempfile
from pathlib import Path


class OutputError(OSError):
    """An output cannot be written: the message is one line and names the path."""


def _existing_folder(path):
    """The folder a write of `path` goes into: `path` itself when it is a folder, its parent when it is a file, else
    the nearest parent that exists (the missing ones would be created)."""
    path = Path(path)
    folder = path
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder.parent if folder == path and folder.is_file() else folder


def describe(err):
    """The reason of an OSError in a few words (its strerror), without Python's "[Errno N]" prefix."""
    return os.strerror(err.errno) if err.errno else " ".join(str(err).split())


def check_writable(path, need_bytes=0, what="output"):
    """Raise an OutputError unless a file can be written at `path` (a file or folder to create; its missing parent
    folders are not created here) and its filesystem has `need_bytes` free. Creates and removes one empty probe
    file, so a read-only mount, missing permission or a folder in the way are found as the real write would."""
    path = Path(path)
    folder = _existing_folder(path)
    if not folder.is_dir():
        raise OutputError(f"{path}: cannot write the {what}: {folder} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".inkseg-probe-"):
            pass
        free = os.statvfs(folder)
    except OSError as err:
        raise OutputError(f"{path}: cannot write the {what}: {describe(err)}") from None
    available = free.f_bavail * free.f_frsize
    if available < need_bytes:
        raise OutputError(f"{path}: cannot write the {what}: {os.strerror(errno.ENOSPC)} "
                          f"({available / 2**20:.1f} MiB free in {folder}, about {need_bytes / 2**20:.1f} MiB needed)")


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """The one way this project writes a file: yields a temporary name beside `path` (`<name>.tmp<suffix>`: a suffix
    such as ".png" for writers that go by the extension) for the block to write; renames it over `path` when the
    block ends, removes it when the block fails, so that `path` is never half-written. An OSError becomes an
    OutputError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = _os_error(err)
        if cause is not None and not isinstance(err, OutputError):
            raise OutputError(f"{path}: cannot write: {describe(cause)}") from None
        raise


def write_atomically(path, write, mode="w", **open_args):
    """Write `path` through atomic_path: `write(file)` fills the open temp file, which is flushed to disk before the
    rename."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_args) as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())  # a full disk can fail only here: before the rename, never after


def _os_error(err):
    """The OSError that `err` is or was raised while handling (torch.save reports a failed write as a RuntimeError
    raised while the OSError unwinds); None when there is none."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def torch_save_atomically(path, data):
    """torch.save through write_atomically: a full disk leaves the file there before (a trial's last checkpoint)
    whole, and no temp file."""
    import torch  # here: the scripts that never save a tensor (prepare.py) need not import torch

    write_atomically(path, lambda file: torch.save(data, file), "wb")
