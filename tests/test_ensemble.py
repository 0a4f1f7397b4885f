"""ensemble.py on fake runs: real HDF5 OOF maps written with lib.maps.save_probability_map over real train
stores of a small synthetic dataset, so the labels and masks are the ones train.py would score against.
Also the percentile / absolute threshold counting in lib/metrics.py that the fit and submit.py share."""
import json
import os
import shutil

import numpy as np
import pytest

import ensemble
from helpers import record_run
from lib.fragments import Fragment
from lib.maps import save_probability_map
from lib.lock import exclusive
from lib.metrics import binarise, percentile_counts, percentile_cutoff, threshold_counts
from lib.inputs import InputSpec
from lib.model import build_model, model_config, save_model_file
from lib.store import Store, write_store
from lib.synth import TRAIN_IDS, generate

BACKBONE = "tu-mobilenetv3_small_050"
SPEC = InputSpec("stack")


@pytest.fixture(scope="module")
def stores(tiny_stores):
    """The session's small stores (conftest.tiny_stores): 64 px tiles, stride 32, ~128 px fragments."""
    return tiny_stores[1]


@pytest.fixture(scope="module")
def model_state():
    return build_model(BACKBONE, SPEC.channels, family=SPEC.family).state_dict()


def make_run(run, stores, members, model_state, seed=0, train_ids=TRAIN_IDS):
    """A run folder as train.py leaves it: run.json, trials/, oof/<name>/<fragment>.h5 from
    members[name](labels, rng, index) and models/<name>/fold-<fragment>.pt (the same random weights everywhere:
    only the format matters here)."""
    rng = np.random.default_rng(seed)
    for index, fragment_id in enumerate(train_ids):
        store = Store(stores / "train" / f"{fragment_id}.h5")
        labels, mask = store.read_map("labels").astype(np.float32), store.read_map("mask")
        for name, make_prob in members.items():
            prob = np.clip(make_prob(labels, rng, index), 0, 1) * mask
            save_probability_map(run / "oof" / name / f"{fragment_id}.h5", prob, fragment_id=fragment_id,
                                 backbone=name, fold=fragment_id)
            model = build_model(BACKBONE, SPEC.channels, family=SPEC.family)
            model.load_state_dict(model_state)
            save_model_file(run / "models" / name / f"fold-{fragment_id}.pt", model, SPEC, config=model_config(BACKBONE, SPEC),
                            fold=fragment_id, tile_size=64, stride=32, val_f05=0.0, oof_f05=0.0, threshold=0.5)
    return record_run(run, stores, list(members), train_ids)


def noisy_labels(labels, rng, index):
    return 0.35 * labels + 0.65 * rng.random(labels.shape)


def pure_noise(labels, rng, index):
    return rng.random(labels.shape)


def run_ensemble(run, stores, *extra):
    ensemble.main(["--run", str(run), "--stores", str(stores), *extra])
    return json.loads((run / "ensemble.json").read_text())


def exit_message(argv):
    with pytest.raises(SystemExit) as exit_:
        ensemble.main(argv)
    return str(exit_.value.code)


def test_fit_favours_the_informative_member(tmp_path, stores, model_state, capsys):
    run = make_run(tmp_path / "run", stores, {"a": noisy_labels, "b": pure_noise}, model_state)
    result = run_ensemble(run, stores)
    members = {m["backbone"]: m for m in result["members"]}
    assert set(members) == {"a", "b"}
    assert members["a"]["weight"] >= 0.7
    assert sum(m["weight"] for m in result["members"]) == pytest.approx(1.0)
    for name, member in members.items():
        assert member["models"] == [f"models/{name}/fold-{i}.pt" for i in TRAIN_IDS]
        assert all((run / path).is_file() for path in member["models"])
        assert (member["tile_size"], member["stride"]) == (64, 32)
    assert result["threshold"]["mode"] in ("absolute", "percentile")
    assert result["fragments"] == list(TRAIN_IDS)

    scores = result["scores"]
    best_member = max(s[mode]["f05"] for s in scores["members"].values() for mode in ("absolute", "percentile"))
    fitted = scores["ensemble"]["fitted"]["f05"]
    assert fitted >= best_member - 1e-9
    assert fitted > scores["members"]["b"]["absolute"]["f05"] + 0.1
    assert 0 < scores["lofo"]["f05"] <= fitted + 1e-9
    assert set(scores["lofo"]["fits"]) == set(TRAIN_IDS)

    png = (run / "plots" / "threshold.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    for row in ("| a |", "| b |", "| equal average |", "| fitted ensemble |", "leave-one-fragment-out"):
        assert row in printed


def test_single_member_gets_weight_one(tmp_path, stores, model_state):
    run = make_run(tmp_path / "run", stores, {"only": noisy_labels}, model_state)
    result = run_ensemble(run, stores)
    assert [m["weight"] for m in result["members"]] == [1.0]
    mode, value = result["threshold"]["mode"], result["threshold"]["value"]
    # the fitted threshold is the member's own best one, so the scores agree
    member = result["scores"]["members"]["only"][mode]
    assert result["scores"]["ensemble"]["fitted"]["f05"] == pytest.approx(member["f05"])
    assert value == member["threshold"]


def test_percentile_mode_wins_when_the_scale_drifts(tmp_path, stores, model_state):
    """Each fragment's probabilities are scaled differently: no one absolute threshold suits all, while the
    top q % of each fragment's pixels still picks its ink."""
    scales = (1.0, 0.25, 0.55)

    def drifting(labels, rng, index):
        return scales[index] * (0.5 * labels + 0.5 * rng.random(labels.shape))

    run = make_run(tmp_path / "run", stores, {"drift": drifting}, model_state)
    result = run_ensemble(run, stores)
    assert result["threshold"]["mode"] == "percentile"
    scores = result["scores"]["ensemble"]
    assert scores["percentile"]["f05"] > scores["absolute"]["f05"] + 0.05
    assert scores["fitted"]["f05"] == pytest.approx(scores["percentile"]["f05"])


@pytest.mark.slow
def test_subsampled_fit_is_deterministic_and_scores_stay_full_resolution(tmp_path, stores, model_state):
    run = make_run(tmp_path / "run", stores, {"a": noisy_labels, "b": pure_noise}, model_state)
    full = run_ensemble(run, stores)
    first = run_ensemble(run, stores, "--fit-pixels", "3000", "--seed", "5")
    second = run_ensemble(run, stores, "--fit-pixels", "3000", "--seed", "5")
    assert first == second
    assert abs(first["fit_pixels"] - 3000) < 250  # each in-mask pixel drawn with probability 3000 / all of them
    assert full["fit_pixels"] > 3 * first["fit_pixels"]
    # member scores never depend on the fit: they are full-resolution either way
    assert first["scores"]["members"] == full["scores"]["members"]


@pytest.mark.slow
def test_bad_inputs_give_one_line_errors(tmp_path, stores, model_state):
    def assert_names(path, argv):
        message = exit_message(argv)
        assert message.startswith("error: ") and str(path) in message and "\n" not in message

    assert_names(tmp_path / "missing", ["--run", str(tmp_path / "missing"), "--stores", str(stores)])
    run = make_run(tmp_path / "run", stores, {"a": noisy_labels, "b": pure_noise}, model_state)
    argv = ["--run", str(run), "--stores", str(stores)]
    assert_names(tmp_path / "nowhere" / "train" / "1.h5", ["--run", str(run), "--stores", str(tmp_path / "nowhere")])
    (run / "oof" / "a" / "2.h5").unlink()
    assert_names(run / "oof" / "a" / "2.h5", argv)
    run = make_run(tmp_path / "run2", stores, {"a": noisy_labels, "b": pure_noise}, model_state)
    for path in (run / "models" / "b").glob("*.pt"):
        path.unlink()
    assert_names(run / "models" / "b", ["--run", str(run)])
    (run / "run.json").unlink()
    assert_names(run / "run.json", ["--run", str(run)])
    (run / "run.json").write_text('{"options": ')
    assert_names(run / "run.json", ["--run", str(run)])


@pytest.mark.slow
def test_run_record_names_stores_folds_and_fragments(tmp_path, stores, model_state, capsys):
    """Only --run: the stores come from run.json; a dot in a fragment id is not a band; a missing fold is an error
    unless --allow-missing, which says what it left out."""
    dotted = tmp_path / "prepared"
    (dotted / "train").mkdir(parents=True)
    for source, target in (("1", "1"), ("2", "2"), ("3", "3.v2")):
        shutil.copy(stores / "train" / f"{source}.h5", dotted / "train" / f"{target}.h5")
    run = make_run(tmp_path / "run", dotted, {"a": noisy_labels}, model_state, train_ids=("1", "2", "3.v2"))
    result = run_ensemble_only_run(run)
    assert result["fragments"] == ["1", "2", "3.v2"] and "over 3 fragments" in capsys.readouterr().out

    (run / "models" / "a" / "fold-2.pt").unlink()
    message = exit_message(["--run", str(run)])
    assert str(run / "models" / "a" / "fold-2.pt") in message and "--allow-missing" in message and "\n" not in message
    result = run_ensemble_only_run(run, "--allow-missing")
    printed = capsys.readouterr().out
    assert "missing, left out: a fold 2" in printed and "over 2 fragments" in printed
    assert result["fragments"] == ["1", "3.v2"]
    assert result["members"][0]["models"] == ["models/a/fold-1.pt", "models/a/fold-3.v2.pt"]

    (run / "oof" / "a" / "1.h5").unlink()  # with fold 2 gone too, one fragment is left
    assert str(run / "oof" / "a" / "1.h5") in exit_message(["--run", str(run)])
    assert run_ensemble_only_run(run, "--allow-missing")["fragments"] == ["3.v2"]


def run_ensemble_only_run(run, *extra):
    ensemble.main(["--run", str(run), *extra])
    return json.loads((run / "ensemble.json").read_text())


def test_second_writer_is_refused(tmp_path, stores, model_state):
    run = make_run(tmp_path / "run", stores, {"a": noisy_labels}, model_state)
    with exclusive(run, "submit.py"):
        message = exit_message(["--run", str(run)])
    assert "already being written by submit.py" in message and f"pid {os.getpid()}" in message
    assert not (run / "ensemble.json").exists()


def test_weight_search_on_the_simplex():
    grid = list(ensemble.simplex_grid(3))
    assert len(grid) == 66
    assert all(w.min() >= 0 and w.sum() == pytest.approx(1) for w in grid)
    # beyond GRID_MAX_MEMBERS the hill climb must find an interior optimum of a smooth score
    target = np.array([0.1, 0.55, 0.25, 0.1, 0.0])
    found = ensemble.search_weights(lambda w: -np.sum((w - target) ** 2), 5)
    assert found.sum() == pytest.approx(1) and found.min() >= 0
    np.testing.assert_allclose(found, target, atol=0.02)


def test_binarise_counts_match_the_sweeps():
    """The fit scores thresholds by counting; submit.py applies them with binarise: both must agree exactly,
    ties included (values rounded to 1/50, so many pixels share a cutoff)."""
    rng = np.random.default_rng(3)
    target = rng.random((90, 70)) < 0.3
    prob = (np.round(np.clip(0.3 * target + 0.7 * rng.random(target.shape), 0, 1) * 50) / 50).astype(np.float32)
    mask = np.zeros(target.shape, np.uint8)
    mask[5:80, 10:65] = 1
    percents = np.array([1, 5, 12.5, 30, 40])
    tp, predicted, n_ink = percentile_counts(prob, target, mask, percents)
    assert n_ink == target.sum()
    for p, t, n in zip(percents, tp, predicted):
        pred = binarise(prob, mask, "percentile", p)
        assert (pred.sum(), (pred & target).sum()) == (n, t)
        assert not (pred & (mask == 0)).any()
    thresholds = np.array([0.02, 0.44, 0.45, 0.46, 0.9])
    tp, predicted, _ = threshold_counts(prob, target, mask, thresholds)
    for value, t, n in zip(thresholds, tp, predicted):
        pred = binarise(prob, mask, "absolute", value)
        assert (pred.sum(), (pred & target).sum()) == (n, t)
    distinct = rng.permutation(1000).astype(np.float32)
    assert (distinct >= percentile_cutoff(distinct, 12)).sum() == 120
    with pytest.raises(ValueError, match="threshold mode"):
        binarise(prob, mask, "median", 0.5)


def test_train_stores_changed_since_the_run_are_refused(tmp_path, stores, model_state):
    """A store prepared again after training (its sources changed: new labels) makes the run stale; so do the train
    stores of other data. One line naming the run and what it was trained on; nothing written."""
    import h5py

    copy = tmp_path / "prepared"
    shutil.copytree(stores, copy)
    run = make_run(tmp_path / "run", copy, {"a": noisy_labels}, model_state)
    with h5py.File(copy / "train" / "2.h5", "a") as h5:
        h5.attrs["fingerprint"] = "sources changed since"
    was = f"error: {run} was trained on the train stores 1, 2, 3 of {(stores.parent / 'synth' / 'train').resolve()}; "
    assert exit_message(["--run", str(run)]) == (
        f"{was}{copy / 'train' / '2.h5'} changed since (prepared again: its sources or settings differ): the "
        f"run is stale. Retrain it (train.py --run {run} --force, or another --run or RUN=), or give the stores it was "
        "trained on")
    other, root = tmp_path / "other", generate(tmp_path / "synth", size=96, seed=3, progress=False)
    for fragment_id in TRAIN_IDS:
        write_store(Fragment.open(root, "train", fragment_id), other / "train" / f"{fragment_id}.h5", tile_size=64,
                    stride=32, progress=False)
    assert exit_message(["--run", str(run), "--stores", str(other)]) == (
        f"{was}{other / 'train'} holds 1, 2, 3 of {root.resolve() / 'train'}: other data. Train a run on these stores (another "
        "--run or RUN=), or give the stores it was trained on")
    assert not (run / "ensemble.json").exists()


def test_flipped_byte_in_a_model_file_is_refused_naming_it(tmp_path, stores, model_state):
    from test_submit import flip_a_byte

    run = make_run(tmp_path / "run", stores, {"a": noisy_labels}, model_state)
    model = run / "models" / "a" / "fold-3.pt"
    flip_a_byte(model)
    message = exit_message(["--run", str(run)])
    assert message.startswith(f"error: {model}: sha256 ") and "\n" not in message
    assert f"recorded in {run / 'trials' / 'a' / 'fold-3.json'} when it was trained" in message
    assert not (run / "ensemble.json").exists()
