"""The Makefile chains the steps by their files: `make prepare train submit` on nothing builds everything in
order, a second call does nothing, and each later call redoes only what a change made stale. Each dataset gets
its own stores and run, and a run is never used with train stores it was not trained on.

The tests run make in a fresh clone: a folder of links to this repository's files, with its own data/ and runs/."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = {"data", "runs", ".git", ".pytest_cache", ".hypothesis", "__pycache__"}  # what a clone does not have


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A fresh clone of the repository: links to its files, its own (empty) data/ and runs/."""
    clone = tmp_path_factory.mktemp("make")
    for entry in ROOT.iterdir():
        if entry.name not in LEFT_OUT:
            (clone / entry.name).symlink_to(entry)
    return clone


def make(work, *targets, dry_run=False):
    """Run make in the clone `work` with tiny settings (targets may hold VAR=value); (exit code, output lines)."""
    settings = {"SIZE": 128, "PREPARE_ARGS": "--tile-size 64 --stride 32",
                "TRAIN_ARGS": "--epochs 1 --max-tiles 16 --batch-size 8 --no-dashboard --num-cpus 2",
                "SUBMIT_ARGS": "--no-tta --no-triplets --threads 1"}
    # as a user types it: not a sub-make of `make test` (which would print "make[1]:" and pass its flags down)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    flags = ["-n", "-B"] if dry_run else []  # -B: every recipe, whatever is already built
    result = subprocess.run(["make", "--no-print-directory", *flags, *targets,
                             *[f"{k}={v}" for k, v in settings.items()]],
                            cwd=work, env=env, capture_output=True, text=True, timeout=900)
    return result.returncode, (result.stdout + result.stderr).splitlines()


def ran(lines, script):
    return any(line.startswith(f".venv/bin/python {script}") for line in lines)


def mtimes(work, run="runs/demo"):
    return {name: (work / run / name).stat().st_mtime_ns for name in ("summary.md", "ensemble.json", "submission.csv")}


def test_chain_builds_what_is_missing_once(work):
    code, lines = make(work, "prepare", "train", "submit")
    assert code == 0, "\n".join(lines[-40:])
    order = [script for script in ("-m lib.synth", "prepare.py", "train.py", "ensemble.py", "submit.py")
             if ran(lines, script)]
    assert order == ["-m lib.synth", "prepare.py", "train.py", "ensemble.py", "submit.py"]
    assert (work / "runs" / "demo" / "submission.csv").read_text().startswith("Id,Predicted\n")

    before = mtimes(work)
    code, lines = make(work, "prepare", "train", "submit")
    assert code == 0 and lines == ["make: Nothing to be done for 'prepare'.",
                                   "make train: runs/demo is trained; scores in runs/demo/summary.md",
                                   "make: Nothing to be done for 'submit'."]
    assert mtimes(work) == before


def test_later_calls_redo_only_what_is_stale(work):
    (work / "runs" / "demo" / "ensemble.json").unlink()
    code, lines = make(work, "submit")
    assert code == 0 and ran(lines, "ensemble.py") and ran(lines, "submit.py")
    assert not ran(lines, "train.py") and not ran(lines, "prepare.py")

    # a changed test fragment: its store is rebuilt and the submission redone; the trained run stays
    before = mtimes(work)
    mask = work / "data" / "synth" / "test" / "a" / "mask.png"
    os.utime(mask)  # now: newer than the stores

    code, lines = make(work, "submit")
    assert code == 0 and ran(lines, "prepare.py") and ran(lines, "submit.py"), "\n".join(lines)
    assert any(line.startswith("test/a: ") and "skipped" not in line for line in lines)
    assert not ran(lines, "train.py") and not ran(lines, "ensemble.py")
    after = mtimes(work)
    assert after["summary.md"] == before["summary.md"] and after["submission.csv"] > before["submission.csv"]


def test_unfinished_run_is_resumed_and_said_so(work):
    """The Makefile reads status.json (not the summary's Markdown): a run it does not say is finished is resumed."""
    status = work / "runs" / "demo" / "status.json"
    assert json.loads(status.read_text())["state"] == "finished"
    status.write_text(json.dumps({**json.loads(status.read_text()), "state": "unfinished"}))
    code, lines = make(work, "train")
    assert code == 0, "\n".join(lines[-20:])
    assert "make train: resuming the unfinished run in runs/demo with the config in runs/demo/run.json" in lines
    assert any("3 of 3 trial(s) finished, 0 to go" in line for line in lines)
    assert json.loads(status.read_text())["state"] == "finished"
    code, lines = make(work, "train")
    assert code == 0 and not ran(lines, "train.py")


def planned(work, *assignments):
    """What `make submit` with these variables would run (make -n), as the commands' lines."""
    code, lines = make(work, "submit", *assignments, dry_run=True)
    assert code == 0, "\n".join(lines)
    return lines


def command(lines, script):
    """The first command line that runs `script`."""
    return next(line.strip() for line in lines if line.strip().startswith(f".venv/bin/python {script}"))


def test_run_and_stores_follow_the_preset_and_the_data(work):
    """The demo's run is runs/demo; another preset or dataset names its own (make -n)."""
    assert command(planned(work), "train.py --stores").startswith(
        ".venv/bin/python train.py --stores data/prepared --run runs/demo --preset demo")
    full = planned(work, "PRESET=full")
    assert command(full, "train.py --stores").startswith(
        ".venv/bin/python train.py --stores data/prepared --run runs/full-synth --preset full")
    real = planned(work, "DATA=/kaggle/input/vesuvius-challenge-ink-detection/", "PRESET=full")
    assert command(real, "prepare.py").startswith(".venv/bin/python prepare.py --data /kaggle/input/vesuvius-"
                                                  "challenge-ink-detection/ --out data/prepared-vesuvius-challenge-"
                                                  "ink-detection")
    assert command(real, "train.py --stores").startswith(
        ".venv/bin/python train.py --stores data/prepared-vesuvius-challenge-ink-detection --run "
        "runs/full-vesuvius-challenge-ink-detection --preset full")
    assert command(real, "submit.py").startswith(".venv/bin/python submit.py --run runs/full-vesuvius-challenge-ink-"
                                                 "detection --stores data/prepared-vesuvius-challenge-ink-detection")
    assert not any("runs/demo" in line for line in real)


@pytest.fixture(scope="module")
def other(work):
    """Another dataset (the synthetic one at another seed), outside the clone's data/."""
    from lib.synth import generate

    return Path(generate(work.parent / f"{work.name}-other" / "other", size=128, seed=1, progress=False))


def test_another_dataset_trains_and_predicts_a_run_of_its_own(work, other):
    """After the demo (above), `make submit DATA=X` prepares X's stores, trains X's run and predicts with it."""
    demo = mtimes(work)
    code, lines = make(work, "submit", f"DATA={other}")
    assert code == 0, "\n".join(lines[-30:])
    assert command(lines, "train.py").startswith(".venv/bin/python train.py --stores data/prepared-other "
                                                 "--run runs/demo-other --preset demo")
    assert command(lines, "submit.py").startswith(".venv/bin/python submit.py --run runs/demo-other "
                                                  "--stores data/prepared-other")
    assert (work / "runs" / "demo-other" / "submission.csv").read_text().startswith("Id,Predicted\n")
    assert sorted(p.name for p in (work / "data" / "prepared-other" / "train").iterdir()) == ["1.h5", "2.h5", "3.h5"]
    assert mtimes(work) == demo  # the demo's run untouched


def test_explicit_run_of_other_data_stops_naming_it(work, other):
    before = mtimes(work)["submission.csv"]
    code, lines = make(work, "submit", f"DATA={other}", "RUN=runs/demo")
    assert code != 0 and ran(lines, "submit.py") and not ran(lines, "train.py")
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [f"error: runs/demo was trained on the train stores 1, 2, 3 of {work / 'data' / 'synth'}; "
                      f"data/prepared-other/train holds 1, 2, 3 of {other}: other data. Train a run on these stores "
                      "(another --run or RUN=), or give the stores it was trained on"], "\n".join(lines)
    assert mtimes(work)["submission.csv"] == before


def test_changed_train_labels_make_the_run_stale(work):
    """Labels edited after training: the store is prepared again, and the run fitted on the old labels is refused
    (last: the demo's run stays stale)."""
    labels = work / "data" / "synth" / "train" / "2" / "inklabels.png"
    pixels = np.array(Image.open(labels))
    pixels[:8] = 0
    Image.fromarray(pixels).save(labels)
    before = mtimes(work)
    code, lines = make(work, "submit")
    assert code != 0 and ran(lines, "prepare.py") and not ran(lines, "train.py")
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [f"error: runs/demo was trained on the train stores 1, 2, 3 of {work / 'data' / 'synth'}; "
                      "data/prepared/train/2.h5 changed since (prepared again: its sources or settings differ): the "
                      "run is stale. Retrain it (train.py --run runs/demo --force, or another --run or RUN=), or give "
                      "the stores it was trained on"], "\n".join(lines)
    assert mtimes(work) == before
