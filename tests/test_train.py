"""train.py end to end with real Ray Tune trials on tiny tiles (each run is a subprocess, as a user runs it)."""
import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

import prepare
from lib.model import build_from_config
from lib.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "stack:tu-mobilenetv3_small_050"  # the default family's member name for the demo backbone


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
            assert h5.attrs["fragment_id"] == fold and bool(h5.attrs["tta"])
            assert (h5.attrs["family"], h5.attrs["depth"], h5.attrs["centre_on"]) == ("stack", 12, "tile")
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
    assert list((run / "tune").glob("attempt-1/*/events.out.tfevents*")), "Tune's TensorBoard logs are kept under the run"
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["stores"] == str(stores.resolve()) and record["config"]["epochs"] == 1
    assert [f["name"] for f in record["folds"]] == ["1", "2", "3"] and record["config"]["folds"] == ["1", "2"]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert record["creator"]["uid"] == os.getuid() and torch.__version__.startswith(record["versions"]["torch"])

    again = run_train(stores, run, "--folds", "1,2", "--num-cpus", "2")
    assert again.returncode != 0 and "already holds a finished run" in again.stderr
    summary = (run / "summary.md").stat().st_mtime_ns
    finished = subprocess.run([sys.executable, str(ROOT / "train.py"), "--run", str(run), "--resume"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0 and "finished run (2 trials), nothing to do" in finished.stdout
    assert (run / "summary.md").stat().st_mtime_ns == summary, "a finished run's summary was rewritten"


class PlantedPickle:
    """Unpickling this runs code: it touches a marker file. Resuming must never unpickle the run's files."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_tricks_and_model_families_reach_the_model_files_and_ensemble_json(stores, tmp_path):
    """Every training trick switched on at once trains; three families in one grid; each member's inputs travel:
    OOF map, model file, ensemble.json (fitted over the families together)."""
    import ensemble

    run = tmp_path / "run"
    members = ["triplets:tu-mobilenetv3_small_050", "stack:tu-mobilenetv3_small_050", "stem3d:tu-mobilenetv3_small_050"]
    result = run_train(stores, run, "--folds", "2", "--num-cpus", "2", "--triplets", "max", "--z-reverse", "1",
                       "--cutout", "1", "--cutmix", "1", "--label-smoothing", "0.2", "--ema", "0.9",
                       "--backbones", ",".join(members), "--depth", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "too unsure to flatten (read at the fragment's surface): 1 0%, 2 0%, 3 0%" in result.stdout
    for member, channels in zip(members, (3, 8, 8)):
        exported = torch.load(run / "models" / member / "fold-2.pt", weights_only=True)
        assert exported["inputs"]["family"] == member.split(":")[0] and 0 <= exported["oof_f05"] <= 1
        assert exported["config"]["in_channels"] == channels and exported["inputs"]["depth"] == 8
        model = build_from_config(exported["config"])
        model.load_state_dict(exported["state_dict"])  # the EMA's weights, in the plain model's layout
    with h5py.File(run / "oof" / members[0] / "2.h5", "r") as h5:
        assert h5.attrs["triplets"] == "max" and h5.attrs["family"] == "triplets"
    ensemble.main(["--run", str(run), "--stores", str(stores)])
    fitted = json.loads((run / "ensemble.json").read_text())["members"]
    assert sorted(m["backbone"] for m in fitted) == sorted(members)
    assert {m["inputs"]["family"]: m["inputs"]["triplets"] for m in fitted}["triplets"] == "max"


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
    second = run_train(stores, run, "--resume")  # a second writer while the first runs: refused at once
    assert second.returncode != 0 and f"already being written by train.py (pid {process.pid}" in second.stderr
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
    process.wait(timeout=120)
    assert not (run / "summary.md").exists()
    first_mtime = first_model.stat().st_mtime_ns

    refused = run_train(stores, run, "--folds", "1,3", "--num-cpus", "1", "--max-concurrent", "1", "--epochs", "8")
    assert refused.returncode != 0 and "--resume" in refused.stderr
    conflict = run_train(stores, run, "--epochs", "9", "--resume")
    assert conflict.returncode != 0 and "--epochs 9 conflicts with 8 recorded in" in conflict.stderr

    # A stranger's experiment state and a broken checkpoint: nothing is unpickled, the broken trial is named.
    marker = tmp_path / "code-ran"
    for pickled in [*run.glob("tune/*/tuner.pkl"), run / "tune" / "attempt-1" / "tuner.pkl"]:
        pickled.write_bytes(pickle.dumps(PlantedPickle(marker)))
    checkpoint = run / "checkpoints" / BACKBONE / "fold-3.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"not a checkpoint")
    resume = [sys.executable, str(ROOT / "train.py"), "--run", str(run), "--resume", "--num-cpus", "1", "--no-dashboard"]
    failed = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and not marker.exists()
    assert f"trial {BACKBONE}/3 failed: lib.trial.CheckpointError: {checkpoint}: unreadable trial checkpoint" in failed.stderr
    summary = (run / "summary.md").read_text()  # one trial finished: the summary is written and names the other
    assert f"Unfinished: {BACKBONE} fold 3" in summary and str(checkpoint) in summary

    checkpoint.unlink()
    resumed = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "1 of 2 trial(s) finished, 1 to go" in resumed.stdout
    assert first_model.stat().st_mtime_ns == first_mtime, "a finished trial was trained again"
    assert (run / "models" / BACKBONE / "fold-3.pt").exists() and not marker.exists()
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert sorted(r["fold"] for r in rows) == ["1", "3"] and all(r["epochs"] == "8" for r in rows)
    assert "Unfinished" not in (run / "summary.md").read_text()


def config_of(argv):
    """The resolved TrainConfig of a command line, as train.py resolves it."""
    import train
    from lib.config import resolve

    given, recipe, _, _ = train.parse_args(argv)
    return resolve(given, recipe)


def test_full_preset_scales_the_learning_rate_with_the_batch():
    from lib.config import PRESETS

    full = PRESETS["full"]
    assert config_of(["--preset", "full"]).lr == full.lr
    config = config_of(["--preset", "full", "--batch-size", str(full.batch_size * 4)])
    assert config.lr == pytest.approx(full.lr * 2)  # sqrt(4)
    assert config_of(["--preset", "full", "--batch-size", "8", "--lr", "0.5"]).lr == 0.5
    assert config.workers is None and config.precision == "auto"


def test_the_default_inputs_and_how_they_set_the_triplets_and_depth_jitter():
    from lib.config import ConfigError

    config = config_of([])
    assert (config.family, config.depth, config.centre_on, config.depth_jitter) == ("stack", 12, "tile", 1)
    assert config.backbones == ("stack:tu-mobilenetv3_small_050",)
    config = config_of(["--family", "triplets", "--backbones", "resnet18,stem3d:resnet18"])
    assert (config.triplets, config.depth_jitter, config.backbones) == ("tile", 0, ("triplets:resnet18", "stem3d:resnet18"))
    config = config_of(["--family", "triplets", "--centre-on", "nominal"])
    assert (config.triplets, config.depth_jitter) == ("surface", 2)
    config = config_of(["--triplets", "max", "--depth-jitter", "2"])
    assert (config.triplets, config.depth_jitter) == ("max", 2)
    with pytest.raises(ConfigError, match="unknown model family 'cube'"):
        config_of(["--backbones", "cube:resnet18"])


def test_a_recipe_file_is_the_config_print_config_shows(tmp_path, capsys):
    """--print-config writes the resolved TrainConfig; as a --config recipe it gives the same config back; options
    beside it win; a recipe with an unknown field, a wrong type or bad YAML is one line naming the file."""
    import train

    train.main(["--preset", "full", "--batch-size", "128", "--family", "triplets", "--print-config"])
    printed = capsys.readouterr().out
    recipe = tmp_path / "recipe.json"
    recipe.write_text(printed)
    config = config_of(["--config", str(recipe)])
    assert config == config_of(["--preset", "full", "--batch-size", "128", "--family", "triplets"])
    assert (config.batch_size, config.lr, config.backbones[0]) == (128, pytest.approx(2e-4 * 2**0.5), "triplets:resnet34")
    assert config_of(["--config", str(recipe), "--epochs", "2"]).epochs == 2
    yaml_recipe = tmp_path / "recipe.yaml"
    yaml_recipe.write_text("preset: full\nepochs: 3\nbackbones: [resnet18]\n")
    assert (config_of(["--config", str(yaml_recipe)]).epochs, config_of(["--config", str(yaml_recipe)]).tile_size) == (3, 224)
    for text, problem in (('{"epoch": 3}', "epoch: not a field of TrainConfig"), ('{"epochs": "3"}', "epochs: expected int"),
                          ("epochs: [3", "not valid YAML"), ('{"family": "cube"}', "'cube' is not one of")):
        bad = tmp_path / ("bad.yaml" if text.startswith("epochs") else "bad.json")
        bad.write_text(text)
        with pytest.raises(SystemExit) as exit_:
            train.main(["--config", str(bad), "--print-config"])
        message = str(exit_.value.code)
        assert message.startswith(f"error: {bad}: ") and problem in message and "\n" not in message, message


def test_help_shows_every_default_by_group():
    import train
    from lib.config import build_parser

    text = build_parser(train.__doc__).format_help()
    for group in ("data:", "model:", "inputs:", "optimisation:", "loss:", "tricks:", "where to run:"):
        assert group in text
    flat = " ".join(text.split())
    assert "tile side in pixels (default: demo: 64; full: 224)" in flat and "(default: stack)" in flat
    assert "centred on the surface (default: 12)" in flat and "derived: 0 for triplets" in flat


def test_workers_follow_the_trials_share_of_the_cpus():
    import train

    def resources(argv, cluster, trials):
        given, recipe, placement, _ = train.parse_args(argv)
        from lib.config import resolve
        return train.trial_resources(resolve(given, recipe), placement, cluster, trials)

    # 6 trials, 2 fit on the GPU at once: each gets half the CPUs, its loader all but one of them
    assert resources(["--preset", "full", "--gpus-per-trial", "0.5"], {"CPU": 16, "GPU": 1}, 6) == {"cpu": 8, "gpu": 0.5}
    assert resources(["--preset", "full", "--gpus-per-trial", "0.25", "--max-concurrent", "2"], {"CPU": 16, "GPU": 1},
                     6) == {"cpu": 8, "gpu": 0.25}
    assert resources(["--preset", "full", "--workers", "3"], {"CPU": 16, "GPU": 1}, 6) == {"cpu": 4, "gpu": 1}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_learns_at_each_precision(precision, one_thread):
    from lib.losses import build_loss
    from lib.trial import TrainStep, resolve_precision

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))
    images = torch.rand(8, 3, 16, 16)
    labels = (images.mean(1, keepdim=True) > 0.5).float()
    step = TrainStep(model, lr=0.05, total_steps=40, precision=precision)
    losses = [step(images, labels, build_loss()).item() for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0]
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("fp16", "cpu") == "fp16"
    restored = TrainStep(model, lr=0.05, total_steps=40, precision=precision)
    restored.load_state_dict(step.state_dict())
    assert restored.scheduler.last_epoch == 40
