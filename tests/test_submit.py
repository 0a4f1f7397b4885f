"""submit.py on a tiny run: random-initialised tiny U-Nets saved in train.py's model format, ensemble.json
written by ensemble.py from synthetic OOF maps, and real stores of a ~128 px synthetic dataset (64 px tiles,
stride 32). The models are useless; the checks are the submission's format, order, masks and plumbing."""
import csv
import json
import shutil
import sys

import cv2
import numpy as np
import pytest
import torch

import submit
from helpers import needs_unshare, on_tmpfs
from lib.inputs import INPUT_VERSION, InputSpec
from lib.lock import exclusive
from lib.model import load_model_file
from lib.runs import file_sha256
from lib.infer import predict_fragment
from lib.maps import load_probability_map
from lib.metrics import BandComponents, remove_small_components
from lib.rle import rle_decode
from lib.store import Store
from lib.synth import TEST_IDS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_submit(tiny, *extra, run=None):
    """submit.main in this process; returns the CSV rows after the header."""
    run = run or tiny["run"]
    out = run / f"submission{len(list(run.glob('submission*.csv')))}.csv"
    submit.main(["--run", str(run), "--stores", str(tiny["stores"]), "--out", str(out), *extra])
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Id", "Predicted"]
    return rows[1:]


def exit_message(argv):
    with pytest.raises(SystemExit) as exit_:
        submit.main(argv)
    return str(exit_.value.code)


def assert_valid_masks(tiny, rows):
    for fragment_id, rle in rows:
        store = Store(tiny["stores"] / "test" / f"{fragment_id}.h5")
        pred, mask = rle_decode(rle, store.shape), store.read_map("mask")
        assert pred.shape == store.shape
        assert np.array_equal(pred * mask, pred)


@pytest.fixture(scope="module")
def default_rows(tiny, tmp_path_factory):
    """The full-settings submission (TTA, triplets), rows ordered by a sample submission listing b before a."""
    sample = tmp_path_factory.mktemp("sample") / "sample_submission.csv"
    sample.write_text("Id,Predicted\nb,1 1\na,1 1\n")
    return run_submit(tiny, "--sample", str(sample), "--save-probs", "--truth", str(tiny["root"] / "_truth"))


def test_ensemble_json_feeds_submit(tiny):
    result = json.loads((tiny["run"] / "ensemble.json").read_text())
    assert result["threshold"]["mode"] == "percentile"
    assert all(m["weight"] > 0 for m in result["members"])


def test_default_submission(tiny, default_rows):
    assert [row[0] for row in default_rows] == ["b", "a"]
    assert all(row[1] for row in default_rows)  # percentile mode: never an empty mask
    assert_valid_masks(tiny, default_rows)
    for fragment_id in TEST_IDS:
        assert (tiny["run"] / "previews" / f"{fragment_id}.png").is_file()
        prob, _ = load_probability_map(tiny["run"] / "probs" / f"{fragment_id}.h5")
        assert prob.shape == Store(tiny["stores"] / "test" / f"{fragment_id}.h5").shape


def test_truth_scores_are_printed(tiny, capsys):
    submit.main(["--run", str(tiny["run"]), "--stores", str(tiny["stores"]), "--out", str(tiny["run"] / "t.csv"),
                 "--no-tta", "--no-triplets", "--truth", str(tiny["root"] / "_truth")])
    printed = capsys.readouterr().out
    assert printed.count("F0.5") == len(TEST_IDS) + 1 and "F0.5 over all test pixels" in printed


def test_flags_weights_and_folds(tiny, default_rows):
    """Without TTA and triplets the map is the weighted sum of each member's fold mean, computed here by hand."""
    rows = run_submit(tiny, "--no-tta", "--no-triplets", "--save-probs", "--threads", "1")
    assert [row[0] for row in rows] == sorted(TEST_IDS)
    assert_valid_masks(tiny, rows)
    assert rows != sorted(default_rows)
    members = json.loads((tiny["run"] / "ensemble.json").read_text())["members"]
    store = Store(tiny["stores"] / "test" / "a.h5")
    expected = 0
    for member in members:
        spec = member_spec(member, "middle")
        folds = [predict_fragment(load_model_file(tiny["run"] / path)[0], store, 64, 32, tta=False, spec=spec)
                 for path in member["models"]]
        expected = expected + member["weight"] * np.mean(folds, axis=0)
    prob, attrs = load_probability_map(tiny["run"] / "probs" / "a.h5")
    assert not attrs["tta"] and attrs["inputs"] == "stack (12 slices, tile), triplets (middle)"
    np.testing.assert_allclose(prob, expected, atol=1e-3)  # the file holds float16


def member_spec(member, triplets=None):
    """A member's InputSpec from ensemble.json, its triplet mode replaced (triplet models only)."""
    spec = InputSpec.from_dict(member["inputs"])
    return InputSpec(spec.family, spec.depth, spec.centre_on, triplets) if triplets and spec.family == "triplets" else spec


def test_triplet_mode_comes_from_ensemble_json(tiny, tmp_path, capsys):
    """submit.py combines a triplet member's triplets as its OOF maps did (ensemble.json), unless --triplets
    overrides; a stack member in the same ensemble reads the same tiles."""
    members = json.loads((tiny["run"] / "ensemble.json").read_text())["members"]
    assert [m["inputs"]["family"] for m in members] == ["stack", "triplets"]
    assert members[1]["inputs"]["triplets"] == "tile"  # as the model file records it
    copy = tmp_path / "max"
    shutil.copytree(tiny["run"] / "models", copy / "models")
    ensemble_json = json.loads((tiny["run"] / "ensemble.json").read_text())
    ensemble_json["members"][1]["inputs"]["triplets"] = "max"
    (copy / "ensemble.json").write_text(json.dumps(ensemble_json))
    run_submit(tiny, "--no-tta", "--save-probs", run=copy)
    assert "inputs stack (12 slices, tile), triplets (max)," in capsys.readouterr().out
    store = Store(tiny["stores"] / "test" / "b.h5")
    expected = sum(m["weight"] * np.mean([predict_fragment(load_model_file(copy / p)[0], store, 64, 32, tta=False,
                                                           spec=member_spec(m)) for p in m["models"]], axis=0)
                   for m in ensemble_json["members"])
    prob, attrs = load_probability_map(copy / "probs" / "b.h5")
    assert attrs["inputs"].endswith("triplets (max)")
    np.testing.assert_allclose(prob, expected, atol=1e-3)
    run_submit(tiny, "--no-tta", "--triplets", "middle", run=copy)
    assert "triplets (middle)," in capsys.readouterr().out

    ensemble_json["members"][1]["inputs"]["triplets"] = "sideways"
    (copy / "ensemble.json").write_text(json.dumps(ensemble_json))
    message = exit_message(["--run", str(copy), "--stores", str(tiny["stores"])])
    assert message.startswith("error: ") and str(copy / "ensemble.json") in message and "'sideways'" in message


def test_copied_run_folder_works(tiny, tmp_path):
    """Only models/ and ensemble.json travel; the stores stay where they are."""
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny["run"] / "models", copy / "models")
    shutil.copy(tiny["run"] / "ensemble.json", copy / "ensemble.json")
    rows = run_submit(tiny, "--no-tta", "--no-triplets", run=copy)
    assert rows == run_submit(tiny, "--no-tta", "--no-triplets")
    assert (copy / "previews" / "a.png").is_file()


def test_min_component_removes_small_blobs(tiny):
    binary = np.zeros((20, 20), np.uint8)
    binary[1:3, 1:3] = 1  # 4 pixels
    binary[10:16, 10:16] = 1  # 36 pixels
    binary[15, 16] = 1  # touches the big blob diagonally: part of it (8-connectivity)
    kept = remove_small_components(binary, 5)
    assert kept.sum() == 37 and kept[1:3, 1:3].sum() == 0
    assert np.array_equal(remove_small_components(binary, 1), binary)
    rows = run_submit(tiny, "--no-tta", "--no-triplets", "--min-component", str(10**9))
    assert [rle for _, rle in rows] == ["", ""]


def whole_mask_reference(binary, min_pixels):
    """remove_small_components as OpenCV does it on the whole mask at once."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False
    return keep[labels].astype(np.uint8)


@pytest.mark.parametrize("band_rows", [1, 2, 3, 7, 64])
def test_components_found_band_by_band_are_those_of_the_whole_mask(band_rows):
    """submit.py's --min-component sees the mask a band at a time (lib.metrics.BandComponents): the same pixels
    kept as on the whole mask, for components that cross many bands, join only below, or touch diagonally."""
    rng = np.random.default_rng(band_rows)
    masks = [(rng.random((40, 50)) < p).astype(np.uint8) for p in (0.2, 0.45, 0.6)]
    snake = np.zeros((40, 50), np.uint8)
    snake[2:38, 5], snake[2:38, 20], snake[37, 5:21] = 1, 1, 1  # a U: its arms join in the last rows only
    snake[10, 30], snake[11, 31], snake[12, 32] = 1, 1, 1  # a diagonal: 8-connected across every boundary
    for binary in masks + [snake]:
        for min_pixels in (1, 3, 20, 80):
            components, bands = BandComponents(), [(y, min(y + band_rows, 40)) for y in range(0, 40, band_rows)]
            for y0, y1 in bands:
                components.add(binary[y0:y1])
            components.count_areas(min_pixels)
            kept = np.concatenate([components.keep(binary[y0:y1], i) for i, (y0, y1) in enumerate(bands)])
            np.testing.assert_array_equal(kept, whole_mask_reference(binary, min_pixels))
    assert kept[:, 5].sum() == 36 and kept[10:13, 30:33].sum() == 0  # the U kept at 80 px, the diagonal dropped


def test_bad_inputs_give_one_line_errors(tiny, tmp_path):
    def assert_names(path, argv):
        message = exit_message(argv)
        assert message.startswith("error: ") and str(path) in message and "\n" not in message

    stores = ["--stores", str(tiny["stores"])]
    assert_names(tmp_path / "ensemble.json", ["--run", str(tmp_path), *stores])
    sample = tmp_path / "sample.csv"
    sample.write_text("Id,Predicted\na,1 1\nc,1 1\n")
    assert_names(sample, ["--run", str(tiny["run"]), *stores, "--sample", str(sample)])
    assert_names(tmp_path / "a_inklabels.png", ["--run", str(tiny["run"]), *stores, "--truth", str(tmp_path)])
    broken = tmp_path / "broken"
    shutil.copytree(tiny["run"] / "models", broken / "models")
    shutil.copy(tiny["run"] / "ensemble.json", broken / "ensemble.json")
    (broken / "models" / "stack:tu-mobilenetv3_small_050" / "fold-2.pt").unlink()
    assert_names(broken / "models" / "stack:tu-mobilenetv3_small_050" / "fold-2.pt", ["--run", str(broken), *stores])
    assert_names(tmp_path / "test", ["--run", str(tiny["run"]), "--stores", str(tmp_path)])


def edited_run(tiny, folder, edit):
    """A copy of the run's models/ and ensemble.json with `edit(ensemble dict)` applied to ensemble.json."""
    shutil.copytree(tiny["run"] / "models", folder / "models")
    data = json.loads((tiny["run"] / "ensemble.json").read_text())
    edit(data)
    (folder / "ensemble.json").write_text(json.dumps(data))
    return folder


def set_all(key, value):
    def edit(data):
        for member in data["members"]:
            member[key] = value
    return edit


BAD_ENSEMBLES = {  # case -> (edit of ensemble.json, what the one-line error must say)
    "no members": (lambda d: d.update(members=[]), "members: empty"),
    "all weights 0": (set_all("weight", 0), "sum to 0"),
    "negative weight": (lambda d: d["members"][0].update(weight=-1), "members[0].weight: -1.0 is negative"),
    "weight of a string": (lambda d: d["members"][0].update(weight="0.5"), "members[0].weight: expected number"),
    "absolute threshold 7.5": (lambda d: d.update(threshold={"mode": "absolute", "value": 7.5}),
                               "threshold.value: 7.5 is out of range for mode absolute"),
    "percentile -20": (lambda d: d.update(threshold={"mode": "percentile", "value": -20}),
                       "threshold.value: -20 is out of range for mode percentile"),
    "unknown mode": (lambda d: d.update(threshold={"mode": "median", "value": 0.5}), "threshold.mode: 'median'"),
    "no tile size": (lambda d: d["members"][1].pop("tile_size"), "members[1].tile_size: missing"),
    "other tile size": (set_all("tile_size", 128), "tile_size 64 differs from its member's tile_size 128"),
    "model outside the run": (lambda d: d["members"][0].update(models=["../outside/good.pt"]),
                              "'../outside/good.pt' points outside the run folder"),
    "not JSON": (None, "not readable JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENSEMBLES))
def test_bad_ensemble_json_stops_before_any_prediction(tiny, tmp_path, case, capsys):
    edit, expected = BAD_ENSEMBLES[case]
    run = edited_run(tiny, tmp_path / "run", edit or (lambda d: None))
    if edit is None:
        (run / "ensemble.json").write_text('{"members": [')
    shutil.copytree(tiny["run"] / "models" / "triplets:tu-mobilenetv3_small_075", tmp_path / "outside")
    (tmp_path / "outside" / "fold-3.pt").rename(tmp_path / "outside" / "good.pt")
    message = exit_message(["--run", str(run), "--stores", str(tiny["stores"])])
    assert message.startswith("error: ") and expected in message and "\n" not in message, message
    named = run / "models" if case == "other tile size" else run / "ensemble.json"
    assert str(named) in message
    assert not (run / "submission.csv").exists() and not (run / "previews").exists()
    assert "predict" not in capsys.readouterr().err  # no progress bar: nothing was predicted


def record_sha256(run, model):
    """ensemble.json recording `model` as it is now: as if training had written it so."""
    data = json.loads((run / "ensemble.json").read_text())
    for member in data["members"]:
        member["sha256"] |= {name: file_sha256(model) for name in member["sha256"] if run / name == model}
    (run / "ensemble.json").write_text(json.dumps(data))


def test_truncated_model_file_is_named_before_any_prediction(tiny, tmp_path):
    run = edited_run(tiny, tmp_path / "run", lambda d: None)
    model = run / "models" / "triplets:tu-mobilenetv3_small_075" / "fold-3.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    record_sha256(run, model)
    message = exit_message(["--run", str(run), "--stores", str(tiny["stores"])])
    assert message.startswith(f"error: {model}: unreadable model file") and "\n" not in message
    assert not (run / "previews").exists()


def test_a_model_trained_on_older_inputs_is_refused(tiny, tmp_path):
    """A model file of other model inputs (here the version 2 of before the families) would be fed inputs it never
    saw: refused."""
    run = edited_run(tiny, tmp_path / "run", lambda d: None)
    model = run / "models" / "triplets:tu-mobilenetv3_small_075" / "fold-3.pt"
    export = torch.load(model, weights_only=True)
    export["inputs"] = 2
    torch.save(export, model)
    record_sha256(run, model)
    message = exit_message(["--run", str(run), "--stores", str(tiny["stores"])])
    assert message == (f"error: {model}: inputs: model inputs of version 2, this inkseg makes version "
                       f"{INPUT_VERSION} (lib/inputs.py): retrain, or predict with the inkseg that trained it")
    assert not (run / "previews").exists()


def test_stores_come_from_the_run_record_and_one_writer_at_a_time(tiny, tmp_path):
    """The fixture's run.json names its stores: --run alone is enough. A second writer of the run is refused."""
    rows = run_submit(tiny, "--no-tta", "--no-triplets")
    out = tmp_path / "only-run.csv"
    submit.main(["--run", str(tiny["run"]), "--out", str(out), "--no-tta", "--no-triplets"])
    assert list(csv.reader(open(out)))[1:] == rows
    with exclusive(tiny["run"], "ensemble.py"):
        message = exit_message(["--run", str(tiny["run"]), "--out", str(tmp_path / "second.csv")])
    assert "already being written by ensemble.py" in message and not (tmp_path / "second.csv").exists()


@needs_unshare
def test_read_only_run_folder_is_only_read(tiny, tmp_path):
    """The Kaggle-notebook recipe: the run folder (models/ and ensemble.json) is a read-only input; the submission
    goes to --out and the lock, scratch, previews and stamps beside it, in RUNNAME-work. The run stays as it was."""
    def on_read_only_run(folder, *extra):
        run, source = folder / "mnt" / "run", tiny["run"]
        setup = f'mkdir "{run}" && cp -r "{source}/models" "{source}/ensemble.json" "{run}/"'
        argv = [sys.executable, "submit.py", "--run", run, "--stores", tiny["stores"], "--no-tta", "--no-triplets",
                "--threads", "1", *extra]
        return run, on_tmpfs(folder, argv, size="64m", readonly=True, setup=setup)

    out = tmp_path / "working" / "submission.csv"
    run, (code, printed, err, left) = on_read_only_run(tmp_path / "given", "--out", out)
    assert code == 0, err
    copied = {str(p.relative_to(tiny["run"])): p.read_bytes()
              for p in [tiny["run"] / "ensemble.json", *(tiny["run"] / "models").rglob("*.pt")]}
    assert left == {f"run/{name}": data for name, data in copied.items()}  # nothing written there
    with open(out, newline="") as f:
        assert list(csv.reader(f))[1:] == run_submit(tiny, "--no-tta", "--no-triplets")
    work = out.parent / "run-work"
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()) == [
        "predicted/a.json", "predicted/b.json", "previews/a.png", "previews/b.png"]  # no lock, no scratch left

    run, (code, printed, err, left) = on_read_only_run(tmp_path / "not_given")
    assert code == 1 and printed == ""
    assert err.splitlines() == [f"error: {run}: cannot write the run folder: Read-only file system; give --out FILE "
                                "(the rest goes beside it) or --work DIR"]


@needs_unshare
def test_ensemble_check_reads_a_read_only_run_and_names_a_damaged_model(tiny, tmp_path):
    """ensemble.py --check on a read-only copy of a run: checks ensemble.json, every model file and the stores, says
    OK, writes nothing (no lock); a flipped byte in a model file fails it naming the file."""
    source = tiny["run"]
    model = sorted((source / "models").rglob("*.pt"))[0].relative_to(source)

    def check(folder, damage):
        run = folder / "mnt" / "run"
        setup = f'mkdir "{run}" && cp -r "{source}/models" "{source}/ensemble.json" "{run}/"'
        if damage:  # one bit of the weights flipped, as flip_a_byte does
            setup += (f' && python3 -c "import sys; p = sys.argv[1]; b = bytearray(open(p, \'rb\').read()); '
                      f'b[len(b) // 2] ^= 1; open(p, \'wb\').write(b)" "{run / model}"')
        argv = [sys.executable, "ensemble.py", "--run", run, "--stores", tiny["stores"], "--check"]
        return run, on_tmpfs(folder, argv, size="64m", readonly=True, setup=setup)

    run, (code, printed, err, left) = check(tmp_path / "intact", damage=False)
    assert code == 0, err
    assert f"{run / 'ensemble.json'}: OK: " in printed and "threshold" in printed
    assert sorted(left) == sorted(f"run/{p.relative_to(source)}" for p in [source / "ensemble.json",
                                                                            *(source / "models").rglob("*.pt")])
    run, (code, printed, err, _) = check(tmp_path / "damaged", damage=True)
    assert code == 1 and err.splitlines()[-1].startswith(f"error: {run / model}: sha256 "), err


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # in the weights: torch.load reads it without complaint
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_model_file_is_refused_naming_it(tiny, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny["run"] / "models", copy / "models")
    shutil.copy(tiny["run"] / "ensemble.json", copy / "ensemble.json")
    model = copy / "models" / "stack:tu-mobilenetv3_small_050" / "fold-2.pt"
    flip_a_byte(model)
    load_model_file(model)  # still a loadable model file
    message = exit_message(["--run", str(copy), "--stores", str(tiny["stores"]), "--out", str(tmp_path / "sub.csv")])
    assert message.startswith(f"error: {model}: sha256 ") and "\n" not in message
    assert message.endswith("recorded in ensemble.json when it was trained: the file changed since (a damaged copy?); "
                            "copy it again or retrain")
    assert not (tmp_path / "sub.csv").exists() and not (copy / "previews").exists()
