"""Test helpers shared by several test files (imported as `helpers`: pytest puts tests/ on sys.path)."""
import contextlib
import functools
import io
import subprocess
from pathlib import Path

import pytest

from lib.folds import make_folds
from lib.config import TrainConfig
from lib.runs import RunDir, TrialResult, file_sha256

ROOT = Path(__file__).resolve().parents[1]


def record_run(run, stores, backbones, train_ids, tile_size=64, stride=32):
    """run.json and trials/<backbone>/fold-<k>.json as train.py leaves them (with the sha256 of each model file
    there; no result where there is no model file), for a run folder whose OOF maps and models a test writes itself
    (one fold per train fragment)."""
    run = RunDir(run)
    config = TrainConfig(stores=str(Path(stores).resolve()), backbones=tuple(backbones), tile_size=tile_size,
                         stride=stride)
    folds = make_folds(train_ids)
    run.write_record(config, train_ids, folds)
    for backbone in backbones:
        for fold in folds:
            model = run.model(backbone, fold.name)
            if model.is_file():
                TrialResult(backbone, fold.name, epoch=1, oof_f05=0.5, oof_threshold=0.5, best_val_f05=0.5,
                            model_sha256=file_sha256(model), minutes=0.0).write(run.result(backbone, fold.name))
    return run.path


def in_process(main, argv):
    """A script's main(argv) in this process (no subprocess's seconds of imports): (exit code, stdout, stderr), a
    sys.exit("error: ...") message as the last stderr line, as the process would print it."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    if isinstance(code, str):
        return 1, stdout.getvalue(), stderr.getvalue() + code + "\n"
    return code or 0, stdout.getvalue(), stderr.getvalue()


@functools.cache
def can_unshare():
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def needs_unshare(test):
    """A test that runs a command on a tmpfs in a private mount namespace (on_tmpfs): e2e, and skipped where
    `unshare -m` is not permitted."""
    return pytest.mark.e2e(pytest.mark.skipif(not can_unshare(), reason="unshare -m (a private mount namespace) is "
                                              "not permitted here: full and read-only tmpfs outputs need it")(test))


def on_tmpfs(tmp_path, argv, size="1m", readonly=False, fill=False, setup=""):
    """Run `argv` with a fresh tmpfs of `size` mounted on tmp_path/mnt in a private mount namespace; `setup` (shell)
    runs first (e.g. copies an old output there), then the tmpfs is filled (`fill`) or made read-only. Returns
    (exit code, stdout, stderr, {name: bytes} of every file left on the tmpfs but the filler)."""
    mnt, report = tmp_path / "mnt", tmp_path / "report"
    mnt.mkdir(parents=True)
    (report / "after").mkdir(parents=True)
    script = "\n".join([
        "set -e", f'mount -t tmpfs -o size={size} tmpfs "{mnt}"', setup,
        f'cat /dev/zero > "{mnt}/filler" 2>/dev/null || true' if fill else "",
        f'mount -o remount,ro "{mnt}"' if readonly else "", "set +e",
        f'"$@" > "{report}/stdout" 2> "{report}/stderr"; echo $? > "{report}/rc"',
        f'rm -f "{mnt}/filler" 2>/dev/null; cp -r "{mnt}/." "{report}/after/"'])
    subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *map(str, argv)], cwd=ROOT, timeout=300, check=True)
    left = {str(p.relative_to(report / "after")): p.read_bytes() for p in (report / "after").rglob("*") if p.is_file()}
    return (int((report / "rc").read_text()), (report / "stdout").read_text(), (report / "stderr").read_text(), left)
