"""Shared test fixtures. Nothing here touches the network: weights default to None and the HF hub is offline."""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """One small synthetic dataset (lib.synth, size 256, seed 0, 65 slices, easy) shared by the session. Read only:
    copy a fragment into tmp_path before changing anything."""
    from lib.synth import generate

    return generate(tmp_path_factory.mktemp("synth") / "synth", size=256, seed=0, progress=False, difficulty="easy")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny models on a 2-core machine shared with other work run many times
    slower when two OpenMP threads spin against each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# member -> the fold models submit.py uses: two families and architectures, one with two folds, so averaging,
# weighting and mixing families all happen (the run has all three folds of each; the fixture trims ensemble.json to
# these, to keep the tests short)
MEMBERS = {"stack:tu-mobilenetv3_small_050": ("1", "2"), "triplets:tu-mobilenetv3_small_075": ("3",)}


@pytest.fixture(scope="session")
def tiny_stores(tmp_path_factory):
    """(dataset root, stores folder): a 128 px synthetic dataset (WORK/synth) and its train and test stores (64 px
    tiles, stride 32; WORK/prepared), the session's one set of small stores. Read only: copy them to change them."""
    from lib.fragments import Fragment
    from lib.store import write_store
    from lib.synth import TEST_IDS, TRAIN_IDS, generate

    work = tmp_path_factory.mktemp("tiny")
    root = generate(work / "synth", size=128, seed=2, progress=False)
    for split, ids in (("train", TRAIN_IDS), ("test", TEST_IDS)):
        for fragment_id in ids:
            write_store(Fragment.open(root, split, fragment_id), work / "prepared" / split / f"{fragment_id}.h5",
                        tile_size=64, stride=32, progress=False)
    return root, work / "prepared"


@pytest.fixture(scope="session")
def tiny(tiny_stores, tmp_path_factory):
    """{root, stores, run}: tiny_stores and a run folder with models and ensemble.json, shared by test_submit.py and
    test_faults.py. Tests write only new files into it (submissions, previews)."""
    import ensemble
    from helpers import record_run
    from lib.synth import TRAIN_IDS

    root, stores = tiny_stores
    run = tmp_path_factory.mktemp("submit") / "run"
    write_models(run)
    write_oof_maps(run, stores)
    record_run(run, stores, list(MEMBERS), TRAIN_IDS)
    ensemble.main(["--run", str(run)])
    fitted = json.loads((run / "ensemble.json").read_text())
    for member in fitted["members"]:
        member["models"] = [f"models/{member['backbone']}/fold-{k}.pt" for k in MEMBERS[member["backbone"]]]
    (run / "ensemble.json").write_text(json.dumps(fitted))
    return {"root": root, "stores": stores, "run": run}


def write_models(run):
    import torch

    from lib.inputs import InputSpec
    from lib.model import build_model, model_config, parse_member, save_model_file
    from lib.synth import TRAIN_IDS

    for index, member in enumerate(MEMBERS):
        family, backbone = parse_member(member, None)
        spec = InputSpec(family)
        for fold in TRAIN_IDS:
            torch.manual_seed(10 * index + int(fold))
            model = build_model(backbone, spec.channels, family=family)
            save_model_file(run / "models" / member / f"fold-{fold}.pt", model, spec,
                            config=model_config(backbone, spec), fold=fold, tile_size=64, stride=32, val_f05=0.0,
                            oof_f05=0.0, threshold=0.5)


def write_oof_maps(run, stores):
    """Two equally informative members whose probability scale drifts per fragment: the fit mixes them and
    picks percentile mode, so every test fragment gets a non-empty mask to encode."""
    import numpy as np

    from lib.maps import save_probability_map
    from lib.store import Store
    from lib.synth import TRAIN_IDS

    rng = np.random.default_rng(0)
    for index, fragment_id in enumerate(TRAIN_IDS):
        store = Store(stores / "train" / f"{fragment_id}.h5")
        labels, mask = store.read_map("labels").astype(np.float32), store.read_map("mask")
        for backbone in MEMBERS:
            prob = (1.0, 0.3, 0.6)[index] * (0.4 * labels + 0.6 * rng.random(labels.shape)) * mask
            save_probability_map(run / "oof" / backbone / f"{fragment_id}.h5", prob, fragment_id=fragment_id)
