"""lib.lock: a second writer fails at once naming the holder; a dead holder leaves no lock behind."""
import os
import signal
import subprocess
import sys

import pytest

from lib.lock import LockedError, exclusive, lock_path

HOLD = ("import sys, time; from lib.lock import exclusive\nwith exclusive(sys.argv[1], 'holder-test'):\n"
        " print('held', flush=True); time.sleep(60)")


def hold_in_child(path, root):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=root, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_second_writer_fails_naming_the_holder_and_lock_dies_with_it(tmp_path, request):
    target = tmp_path / "store.h5"
    child = hold_in_child(target, request.config.rootpath)
    try:
        with pytest.raises(LockedError) as err:
            with exclusive(target, "me"):
                pass
        message = str(err.value)
        assert f"pid {child.pid}" in message and "holder-test" in message and "\n" not in message
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with exclusive(target, "me") as file:  # the kernel released the dead holder's lock
        assert file == lock_path(target) and file.exists()
    assert not lock_path(target).exists(), "a normal release removes the lock file"


def test_folder_lock_lives_inside_the_folder(tmp_path):
    with exclusive(tmp_path, "run"):
        assert (tmp_path / ".lock").exists()
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            with exclusive(tmp_path, "again"):
                pass
    assert not (tmp_path / ".lock").exists()
