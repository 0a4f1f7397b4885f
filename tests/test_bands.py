"""Bounded-memory prediction (lib/bands.py, lib/writers.py, submit.py): a fragment predicted in row bands equals the
whole-map prediction bit for bit, and its outputs written band by band (PNG, zarr, BigTIFF, CSV row, percentile
threshold) equal the whole-map ones; a second call skips fragments whose outputs are complete and up to date."""
import csv
import functools
import json
import re
import shutil

import cv2
import numpy as np
import pytest
import tifffile
import zarr

import lib.bands as bands
import submit
from lib.infer import predict_fragment
from lib.metrics import binarise, percentile_cutoff
from lib.writers import PngWriter, percentile_cutoff_in_bands
from lib.rle import RleBuilder, rle_encode
from lib.runs import RunDir, load_members, read_ensemble
from lib.store import Store
from lib.synth import TEST_IDS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def small_bands(monkeypatch):
    """Bands of 32 rows (chunks of 32): a 128 px fragment has several, and tiles cross their edges."""
    monkeypatch.setattr(bands, "OUTPUT_CHUNK", 32)
    monkeypatch.setattr(bands, "BAND_PIXELS", 1)
    monkeypatch.setattr(bands, "MIN_BAND_TILES", 0)
    monkeypatch.setattr("lib.writers.OUTPUT_CHUNK", 32)


def whole_map(groups, store, batch_size, tta):
    """The ensemble's probability as submit.py summed it before bands: one whole (H, W) map, group after group."""
    total = np.zeros(store.shape, np.float32)
    for (tile_size, stride, _), models in groups.items():
        predict_fragment(models, store, tile_size, stride, batch_size, tta=tta, out=total)
    return total


def test_bands_equal_the_whole_map_exactly(tiny, small_bands):
    """Two tilings (an ensemble with members of different tile sizes), 3 tiles a batch (batches straddle bands)."""
    members = load_members(tiny["run"], read_ensemble(tiny["run"]))
    groups = submit.tiling_groups(members)
    (key, models), = groups.items()
    groups = {key: models[:2], (48, 24, "middle"): models[2:]}
    store = Store(tiny["stores"] / "test" / "a.h5")
    counts = {k: bands.tile_row_counts(store, k[0], k[1]) for k in groups}
    plan = bands.plan_bands(*store.shape, 64)
    assert len(plan) >= 4
    predict_group = functools.partial(submit.predict_group, batch_size=3, tta=False, device="cpu")
    got = np.concatenate([bands.predict_band(groups, store, band, counts, predict_group, 3) for band in plan])
    expected = whole_map(groups, store, 3, tta=False)
    assert expected[store.read_map("mask") > 0].min() > 0
    np.testing.assert_array_equal(got, expected)


def test_percentile_cutoff_in_bands_is_the_exact_order_statistic():
    rng = np.random.default_rng(0)
    prob = rng.random((90, 40)).astype(np.float32) ** 3
    prob[10:20] = 0.25  # ties
    inside = rng.random((90, 40)) < 0.7
    rows = [(y, min(90, y + 32)) for y in range(0, 90, 32)]
    for percent in (0.1, 5, 23, 50, 100):
        got = percentile_cutoff_in_bands(lambda y0, y1: (prob[y0:y1], inside[y0:y1]), rows, percent)
        assert got == percentile_cutoff(prob[inside], percent)


def test_rle_and_png_built_band_by_band(tmp_path):
    rng = np.random.default_rng(1)
    mask = (rng.random((70, 33)) < 0.5).astype(np.uint8)
    mask[31:33] = 1  # a run across a band edge
    builder, png = RleBuilder(33), PngWriter(tmp_path / "p.png", 70, 33)
    image = rng.integers(0, 256, (70, 33), dtype=np.uint8)
    for y0 in range(0, 70, 32):
        builder.add(y0, mask[y0: y0 + 32])
        png.write(y0, image[y0: y0 + 32])
    png.close()
    assert builder.text() == rle_encode(mask)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "p.png"), cv2.IMREAD_UNCHANGED), image)


def test_submit_outputs_written_in_bands_equal_the_whole_map(tiny, small_bands, tmp_path):
    """PNG, zarr, BigTIFF and the CSV row (the run's percentile threshold) from bands equal those of the whole map."""
    run, out = tiny["run"], tmp_path / "sub.csv"
    submit.main(["--run", str(run), "--stores", str(tiny["stores"]), "--out", str(out), "--no-tta", "--png",
                 str(tmp_path / "pred"), "--zarr", str(tmp_path / "pred"), "--tif", str(tmp_path / "pred")])
    ensemble = read_ensemble(run)
    groups = submit.tiling_groups(load_members(run, ensemble), None)
    rows = dict(list(csv.reader(open(out)))[1:])
    for fragment_id in TEST_IDS:
        store = Store(tiny["stores"] / "test" / f"{fragment_id}.h5")
        prob = whole_map(groups, store, 4, tta=False)
        expected = cv2.convertScaleAbs(prob, alpha=255.0)
        png = cv2.imread(str(tmp_path / "pred" / f"{fragment_id}_prediction.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(png, expected)
        np.testing.assert_array_equal(zarr.open_array(tmp_path / "pred" / f"{fragment_id}_prediction.zarr")[...],
                                      expected)
        with tifffile.TiffFile(tmp_path / "pred" / f"{fragment_id}_prediction.tif") as tif:
            assert tif.is_bigtiff and tif.pages[0].is_tiled and tif.pages[0].compression == 8  # zlib
            np.testing.assert_array_equal(tif.asarray(), expected)
        threshold = ensemble["threshold"]
        assert threshold["mode"] == "percentile"
        pred = binarise(prob, store.read_map("mask"), threshold["mode"], threshold["value"])
        assert rows[fragment_id] == rle_encode(pred) and pred.any()
    assert not RunDir(run).scratch.exists()


def test_second_call_skips_up_to_date_segments(layouts_for_skip, capsys):
    run, stores = layouts_for_skip
    common = ["--run", str(run), "--stores", str(stores), "--no-tta", "--zarr"]
    submit.main(common)
    first = capsys.readouterr().out
    assert "skipped" not in first
    submit.main(common)
    printed = capsys.readouterr().out
    assert all(f"{i}: outputs complete and up to date, skipped" in printed for i in TEST_IDS)
    stamp = run / "predicted" / f"{TEST_IDS[0]}.json"
    (run / "predictions" / f"{TEST_IDS[0]}_prediction.zarr").rename(run / "gone.zarr")  # incomplete outputs
    submit.main(common + ["--segments", "a*,nothing"])
    printed = capsys.readouterr().out
    assert "1 test fragments" in printed and "skipped" not in printed
    assert json.loads(stamp.read_text())["files"]["zarr"].endswith("_prediction.zarr")


@pytest.fixture
def layouts_for_skip(tiny, tmp_path):
    """The tiny run's models on segment-layout copies of its test stores (no CSV: segments need none)."""
    import h5py

    run, stores = tmp_path / "run", tmp_path / "stores"
    shutil.copytree(tiny["run"] / "models", run / "models")
    shutil.copy(tiny["run"] / "ensemble.json", run / "ensemble.json")
    for fragment_id in TEST_IDS:
        (stores / "test").mkdir(parents=True, exist_ok=True)
        path = stores / "test" / f"{fragment_id}.h5"
        shutil.copy(tiny["stores"] / "test" / f"{fragment_id}.h5", path)
        with h5py.File(path, "r+") as h5:
            h5.attrs["layout"] = "segments"
    return run, stores


def test_gpus_need_a_cuda_device(capsys):
    with pytest.raises(SystemExit):
        submit.parse_args(["--gpus", "2", "--device", "cpu"])
    assert "--gpus 2 needs --device cuda" in capsys.readouterr().err


def test_an_interrupted_run_keeps_its_predicted_bands(tiny, small_bands, tmp_path, capsys):
    """A run that fails writing the first fragment's PNG (a folder where its temporary file should be: the output
    folder itself passed the checks before the work) has predicted that fragment's bands; the next run keeps them,
    predicts the rest, and writes the same files as the whole map."""
    run = tmp_path / "run"
    shutil.copytree(tiny["run"] / "models", run / "models")
    shutil.copy(tiny["run"] / "ensemble.json", run / "ensemble.json")
    blocker = tmp_path / "png" / f".{TEST_IDS[0]}_prediction.png.tmp"
    blocker.mkdir(parents=True)
    common = ["--run", str(run), "--stores", str(tiny["stores"]), "--out", str(tmp_path / "sub.csv"), "--no-tta",
              "--png", str(tmp_path / "png")]
    with pytest.raises((OSError, SystemExit)):
        submit.main(common)
    assert not (tmp_path / "sub.csv").exists()
    capsys.readouterr()
    blocker.rmdir()
    submit.main(common)
    printed = capsys.readouterr().out
    assert f"{TEST_IDS[0]}: 4 of 4 bands predicted by an interrupted run, kept" in printed
    assert f"{TEST_IDS[0]}: band" not in printed and re.search(rf"{TEST_IDS[1]}: band (\d+)/\1 ", printed)
    groups = submit.tiling_groups(load_members(run, read_ensemble(run)), None)
    for fragment_id in TEST_IDS:
        prob = whole_map(groups, Store(tiny["stores"] / "test" / f"{fragment_id}.h5"), 4, tta=False)
        png = cv2.imread(str(tmp_path / "png" / f"{fragment_id}_prediction.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(png, cv2.convertScaleAbs(prob, alpha=255.0))
    assert not RunDir(run).scratch.exists()
