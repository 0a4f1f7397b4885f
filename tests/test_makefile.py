"""The Makefile chains the steps by their files: `make prepare train submit` on nothing builds everything in
order, a second call does nothing, and each later call redoes only what a change made stale."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("make")


def make(work, *targets):
    """Run make in the repository with every path in `work` and tiny settings; returns (exit code, output lines)."""
    settings = {"SYNTH": work / "synth", "STORES": work / "prepared", "RUN": work / "run", "SIZE": 128,
                "PREPARE_ARGS": "--tile-size 64 --stride 32",
                "TRAIN_ARGS": "--epochs 1 --max-tiles 16 --batch-size 8 --no-dashboard --num-cpus 2",
                "SUBMIT_ARGS": "--no-tta --no-triplets --threads 1"}
    # as a user types it: not a sub-make of `make test` (which would print "make[1]:" and pass its flags down)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    result = subprocess.run(["make", "--no-print-directory", *targets, *[f"{k}={v}" for k, v in settings.items()]],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return result.returncode, (result.stdout + result.stderr).splitlines()


def ran(lines, script):
    return any(line.startswith(f".venv/bin/python {script}") for line in lines)


def mtimes(work):
    return {name: (work / "run" / name).stat().st_mtime_ns for name in ("summary.md", "ensemble.json", "submission.csv")}


def test_chain_builds_what_is_missing_once(work):
    code, lines = make(work, "prepare", "train", "submit")
    assert code == 0, "\n".join(lines[-40:])
    order = [script for script in ("-m lib.synth", "prepare.py", "train.py", "ensemble.py", "submit.py")
             if ran(lines, script)]
    assert order == ["-m lib.synth", "prepare.py", "train.py", "ensemble.py", "submit.py"]
    assert (work / "run" / "submission.csv").read_text().startswith("Id,Predicted\n")

    before = mtimes(work)
    code, lines = make(work, "prepare", "train", "submit")
    assert code == 0 and lines == ["make: Nothing to be done for 'prepare'.",
                                   f"make train: {work / 'run'} is trained; scores in {work / 'run' / 'summary.md'}",
                                   "make: Nothing to be done for 'submit'."]
    assert mtimes(work) == before


def test_later_calls_redo_only_what_is_stale(work):
    (work / "run" / "ensemble.json").unlink()
    code, lines = make(work, "submit")
    assert code == 0 and ran(lines, "ensemble.py") and ran(lines, "submit.py")
    assert not ran(lines, "train.py") and not ran(lines, "prepare.py")

    # a changed test fragment: its store is rebuilt and the submission redone; the trained run stays
    before = mtimes(work)
    mask = work / "synth" / "test" / "a" / "mask.png"
    os.utime(mask)  # now: newer than the stores

    code, lines = make(work, "submit")
    assert code == 0 and ran(lines, "prepare.py") and ran(lines, "submit.py"), "\n".join(lines)
    assert any(line.startswith("test/a: ") and "skipped" not in line for line in lines)
    assert not ran(lines, "train.py") and not ran(lines, "ensemble.py")
    after = mtimes(work)
    assert after["summary.md"] == before["summary.md"] and after["submission.csv"] > before["submission.csv"]


def test_unfinished_run_is_resumed_and_said_so(work):
    summary = work / "run" / "summary.md"
    summary.write_text(summary.read_text() + "\nUnfinished: a trial that failed\n")
    code, lines = make(work, "train")
    assert code == 0, "\n".join(lines[-20:])
    assert f"make train: resuming the unfinished run in {work / 'run'} with the options in {work / 'run' / 'run.json'}" in lines
    assert any("3 of 3 trial(s) finished, 0 to go" in line for line in lines)
    assert "Unfinished" not in summary.read_text()
    code, lines = make(work, "train")
    assert code == 0 and not ran(lines, "train.py")
