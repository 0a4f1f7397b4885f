"""Nothing a driver started outlives it: a watchdog process that, once the driver is gone, kills every process
started beneath it (its local Ray: gcs_server, raylet, agents, trial workers and their loader workers).

`with outlived_by_nothing(lock_fd):` marks this process's environment with a token (INKSEG_DRIVER=<pid>:<random>)
that every process started from here on inherits, and starts `python -m lib.watchdog TOKEN` holding the read end
of a pipe whose write end only this process has. When this process ends (normally or by SIGKILL) the kernel closes
that pipe; the watchdog then kills every process whose environment holds the token, until none is left. Processes
reparented to PID 1 are found too, since the token, not the process tree, marks them.

The watchdog also holds the driver's run lock (`lock_fd`, an inherited descriptor of the same flock), so the lock
is released only once nothing of the run is left running: a `--resume` started at once waits for the sweep
(lib.lock.exclusive waits for a lock whose recorded holder is dead) instead of racing the old trials.
"""
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

TOKEN_VARIABLE = "INKSEG_DRIVER"
SWEEP_SECONDS = 30  # the most a sweep keeps killing (processes still starting while it runs are killed too)


def marked_processes(token):
    """PIDs of the processes (not this one) whose initial environment holds TOKEN_VARIABLE=token."""
    needle = f"{TOKEN_VARIABLE}={token}\0".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ + b"\0":
            found.append(int(entry.name))
    return found


def sweep(token, seconds=SWEEP_SECONDS):
    """SIGKILL every process marked with `token` until none is left (or `seconds` pass); returns how many."""
    killed, deadline = set(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [pid for pid in marked_processes(token) if _is_running(pid)]
        if not alive:
            break
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.05)
    return len(killed)


def _is_running(pid):
    """False for a zombie (dead, waiting for its parent to reap it) or a process that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def outlived_by_nothing(lock_fd=None):
    """Mark every process started inside the `with` and have them all killed when this process ends, however it
    ends (see the module docstring). On a normal exit, waits for the watchdog's sweep. Linux only (/proc)."""
    token = f"{os.getpid()}:{secrets.token_hex(8)}"
    read_end, write_end = os.pipe()  # not inheritable: only this process holds the write end
    watchdog = subprocess.Popen([sys.executable, "-m", "lib.watchdog", token], stdin=read_end,
                                pass_fds=() if lock_fd is None else (lock_fd,), cwd=Path(__file__).parents[1],
                                start_new_session=True)  # Ctrl-C in the terminal must not kill it first
    os.close(read_end)
    os.environ[TOKEN_VARIABLE] = token
    try:
        yield token
    finally:
        os.environ.pop(TOKEN_VARIABLE, None)
        os.close(write_end)
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(SWEEP_SECONDS + 5)


def main():
    """`python -m lib.watchdog TOKEN`: wait for stdin to close (the driver is gone), then sweep TOKEN's processes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    token = sys.argv[1]
    while os.read(0, 4096):
        pass
    sweep(token)


if __name__ == "__main__":
    main()
