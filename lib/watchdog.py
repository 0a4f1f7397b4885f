"""Nothing a driver started outlives it: a watchdog process that, once the driver is gone, kills every process
started beneath it (its local Ray: gcs_server, raylet, agents, trial workers and their loader workers).

`with outlived_by_nothing(lock_fd):` marks this process's environment with a token (INKSEG_DRIVER=<pid>:<random>)
that every process started from here on inherits, and starts `python -m lib.watchdog TOKEN` holding the read end
of a pipe whose write end only this process has. While it waits, the watchdog notes every process below the driver
twice a second. When the driver ends (normally or by SIGKILL) the kernel closes that pipe; the watchdog then kills
every process whose environment holds the token or that it saw below the driver (the same process: same start
time), and their children, until none is left. Processes reparented to PID 1 are found too: the token and the notes,
not today's process tree, mark them. (Both, since a process may overwrite its environment's memory, as Ray's
workers do with their process titles.)

The watchdog also holds the driver's run lock (`lock_fd`, an inherited descriptor of the same flock), so the lock
is released only once nothing of the run is left running: a `--resume` started at once waits for the sweep
(lib.lock.exclusive waits for a lock whose recorded holder is dead) instead of racing the old trials.
"""
import contextlib
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

TOKEN_VARIABLE = "INKSEG_DRIVER"
NOTE_SECONDS = 0.5  # how often the watchdog notes the processes below the driver
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


def process_table():
    """{pid: (parent pid, start time, running)} of every process (start time in clock ticks since boot)."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), int(fields[19]), fields[0] != "Z")
    return table


def below(table, roots):
    """The PIDs below `roots` in a process_table (not the roots themselves)."""
    children = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def sweep(token, seen=None, seconds=SWEEP_SECONDS):
    """SIGKILL every process marked with `token`, or noted in `seen` ({pid: start time}, still that process), and
    those below them, until none is left (or `seconds` pass); returns how many were killed."""
    killed, deadline, seen = set(), time.monotonic() + seconds, seen or {}
    while time.monotonic() < deadline:
        table = process_table()
        targets = set(marked_processes(token)) | {pid for pid, start in seen.items()
                                                   if pid in table and table[pid][1] == start}
        targets |= below(table, targets)
        alive = [pid for pid in targets if pid in table and table[pid][2] and pid != os.getpid()]
        if not alive:
            break
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.05)
    return len(killed)


@contextlib.contextmanager
def outlived_by_nothing(lock_fd=None):
    """Mark every process started inside the `with` and have them all killed when this process ends, however it
    ends (see the module docstring). On a normal exit, waits for the watchdog's sweep. Linux only (/proc)."""
    token = f"{os.getpid()}:{secrets.token_hex(8)}"
    read_end, write_end = os.pipe()  # not inheritable: only this process holds the write end
    watchdog = subprocess.Popen([sys.executable, "-m", "lib.watchdog", token], stdin=read_end, stdout=subprocess.DEVNULL,
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
    """`python -m lib.watchdog TOKEN`: note the processes the driver (the parent) starts until stdin closes (the
    driver is gone), then sweep them and TOKEN's. Those running below the driver before are left alone (a test
    process calling train.main has its own)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    token, driver, seen = sys.argv[1], os.getppid(), {}
    table = process_table()
    before = {(pid, table[pid][1]) for pid in below(table, [driver])}  # not started inside the `with`: never noted
    while True:
        if select.select([0], [], [], NOTE_SECONDS)[0] and not os.read(0, 4096):
            break
        table = process_table()
        seen.update({pid: table[pid][1] for pid in below(table, [driver])
                     if pid != os.getpid() and (pid, table[pid][1]) not in before})
    sweep(token, seen)


if __name__ == "__main__":
    main()
