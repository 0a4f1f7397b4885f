"""train.py end to end with real Ray Tune trials on tiny tiles (each run is a subprocess, as a user runs it)."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

import prepare
from lib.infer import DEFAULT_TRIPLETS
from lib.model import build_from_config
from lib.store import Store

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "tu-mobilenetv3_small_050"


@pytest.fixture(scope="module")
def stores(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores")
    prepare.main(["--data", str(synth_root), "--out", str(out), "--ids", "1,2,3", "--tile-size", "64", "--stride", "32"])
    return out


def train_command(stores, run, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--stores", str(stores), "--run", str(run), "--epochs", "1",
            "--max-tiles", "32", "--batch-size", "8", "--no-dashboard", *extra]


def run_train(stores, run, *extra):
    return subprocess.run(train_command(stores, run, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_two_trials_write_oof_maps_models_previews_and_summary(stores, tmp_path):
    run = tmp_path / "run"
    result = run_train(stores, run, "--folds", "1,2", "--num-cpus", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    for fold in ("1", "2"):
        store = Store(stores / "train" / f"{fold}.h5")
        with h5py.File(run / "oof" / BACKBONE / f"{fold}.h5", "r") as h5:
            prob = h5["prob"][()]
            assert h5.attrs["fragment_id"] == fold and bool(h5.attrs["tta"]) and h5.attrs["triplets"] == DEFAULT_TRIPLETS
        assert prob.shape == store.shape and prob.dtype == "float16"
        assert prob.min() >= 0 and prob.max() <= 1
        assert (prob[store.read_map("mask") == 0] == 0).all()
        exported = torch.load(run / "models" / BACKBONE / f"fold-{fold}.pt", weights_only=True)
        model = build_from_config(exported["config"])
        model.load_state_dict(exported["state_dict"])
        assert exported["tile_size"] == 64 and 0 <= exported["oof_f05"] <= 1
        assert (run / "previews" / BACKBONE / f"fold-{fold}.png").stat().st_size > 0
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert [(r["backbone"], r["fold"]) for r in rows] == [(BACKBONE, "1"), (BACKBONE, "2")]
    assert "mean OOF F0.5" in (run / "summary.md").read_text()
    assert list((run / "tune").glob("*/events.out.tfevents*")), "Tune's TensorBoard logs are kept under the run"

    again = run_train(stores, run, "--folds", "1,2", "--num-cpus", "2")
    assert again.returncode != 0 and "already holds a finished run" in again.stderr


def test_tricks_and_triplet_mode_reach_the_model_files_and_ensemble_json(stores, tmp_path):
    """Every training trick switched on at once trains; the triplet mode travels: OOF map, model file, ensemble.json."""
    import ensemble

    run = tmp_path / "run"
    result = run_train(stores, run, "--folds", "2", "--num-cpus", "1", "--triplets", "max", "--z-reverse", "1",
                       "--cutout", "1", "--cutmix", "1", "--label-smoothing", "0.2", "--ema", "0.9")
    assert result.returncode == 0, result.stderr[-3000:]
    exported = torch.load(run / "models" / BACKBONE / "fold-2.pt", weights_only=True)
    assert exported["triplets"] == "max" and 0 <= exported["oof_f05"] <= 1
    model = build_from_config(exported["config"])
    model.load_state_dict(exported["state_dict"])  # the EMA's weights, in the plain model's layout
    with h5py.File(run / "oof" / BACKBONE / "2.h5", "r") as h5:
        assert h5.attrs["triplets"] == "max"
    ensemble.main(["--run", str(run), "--stores", str(stores)])
    members = json.loads((run / "ensemble.json").read_text())["members"]
    assert [m["triplets"] for m in members] == ["max"]


def test_resume_after_interrupt_does_not_redo_finished_trials(stores, tmp_path):
    run = tmp_path / "run"
    # One trial at a time, so the first finishes while the second is still to come.
    command = train_command(stores, run, "--folds", "1,3", "--num-cpus", "1", "--max-concurrent", "1", "--epochs", "8")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    first_model = run / "models" / BACKBONE / "fold-1.pt"
    deadline = time.time() + 300
    while not first_model.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)
    assert first_model.exists(), "the first trial never finished"
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
    process.wait(timeout=120)
    assert not (run / "summary.md").exists()
    first_mtime = first_model.stat().st_mtime_ns

    refused = run_train(stores, run, "--folds", "1,3", "--num-cpus", "1", "--max-concurrent", "1", "--epochs", "8")
    assert refused.returncode != 0 and "--resume" in refused.stderr

    resumed = run_train(stores, run, "--folds", "1,3", "--num-cpus", "1", "--max-concurrent", "1", "--epochs", "8",
                        "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert first_model.stat().st_mtime_ns == first_mtime, "a finished trial was trained again"
    assert (run / "models" / BACKBONE / "fold-3.pt").exists()
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert sorted(r["fold"] for r in rows) == ["1", "3"] and all(r["epochs"] == "8" for r in rows)
