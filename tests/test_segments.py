"""The scroll-segment layout end to end: the reader (TIFF, 8-bit PNG / TIFF, JPEG layers), prepare.py's --train /
--test, --reverse and --z-range auto, bad segment inputs, and submit.py's probability PNGs. The synthetic segments
are lib.synth's segment layout of the same pixels as conftest's Kaggle-layout dataset (size 256, seed 0)."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import prepare
import submit
from lib.depth import NOMINAL_SURFACE, kept_layers
from lib.fragments import FragmentError, Segment, detect_layout, list_segments
from lib.infer import blend_weights, predict_fragment
from lib.inputs import CENTRE_SLICES, InputReader, InputSpec
from lib.model import build_model, model_config, save_model_file
from lib.runs import file_sha256, trained_on
from lib.store import Store
from lib.surface import fragment_surface
from lib.synth import EIGHT_BIT_SEGMENT, REVERSED_SEGMENT, TEST_IDS, TRAIN_IDS, generate

ROOT = Path(__file__).resolve().parents[1]
TILE, STRIDE = 64, 32
COMPARED = ("volume", "mask", "labels", "tiles", "percentiles", "percentiles_all")
MIDDLE = InputSpec("triplets", centre_on="nominal", triplets="middle")  # the middle triplet as stored

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_prepare(*args):
    """prepare.main in this process; its stdout on success, the SystemExit message on failure."""
    try:
        prepare.main([str(a) for a in args])
    except SystemExit as exit_:
        return str(exit_.code)
    return ""


@pytest.fixture(scope="module")
def layouts(synth_root, tmp_path_factory):
    """{kaggle, segments: dataset roots; kaggle_stores, segment_stores: prepared with --z-range auto and --reverse
    auto (which finds segment b reversed), 64 px tiles}."""
    work = tmp_path_factory.mktemp("segments")
    segments = generate(work / "segments", size=256, seed=0, progress=False, layout="segments", difficulty="easy")
    tiles = ("--tile-size", TILE, "--stride", STRIDE)
    assert run_prepare("--data", synth_root, "--out", work / "kaggle_stores", "--z-range", "auto", *tiles) == ""
    assert run_prepare("--data", segments, "--out", work / "segment_stores", *tiles) == ""  # auto: the default
    return {"kaggle": Path(synth_root), "segments": segments, "work": work,
            "kaggle_stores": work / "kaggle_stores", "segment_stores": work / "segment_stores"}


def store_path(stores, fragment_id):
    return Path(stores) / ("train" if fragment_id in TRAIN_IDS else "test") / f"{fragment_id}.h5"


# ------------------------------------------------------------------------------------------- reader and layout


def test_synth_segment_layout_and_detection(layouts):
    root = layouts["segments"]
    assert detect_layout(root) == "segments" and detect_layout(layouts["kaggle"]) == "kaggle"
    assert list_segments(root) == sorted(TRAIN_IDS + TEST_IDS)
    recipe = json.loads((root / "_truth" / "synth.json").read_text())
    assert recipe["reversed"] == [REVERSED_SEGMENT] and recipe["eight_bit_jpeg"] == [EIGHT_BIT_SEGMENT]
    for fragment_id in TRAIN_IDS + TEST_IDS:
        segment = Segment(root / fragment_id).validate()
        assert segment.num_slices == 65
        assert segment.split == ("train" if fragment_id in TRAIN_IDS else "test")
        assert segment.format == ("JPEG" if fragment_id == EIGHT_BIT_SEGMENT else "TIFF")
        assert segment.dtype == (np.uint8 if fragment_id == EIGHT_BIT_SEGMENT else np.uint16)
    # the reversed segment's layer 64 - z is the Kaggle fragment's slice z
    kaggle_slice = tifffile.imread(layouts["kaggle"] / "test" / REVERSED_SEGMENT / "surface_volume" / "10.tif")
    assert np.array_equal(tifffile.imread(root / REVERSED_SEGMENT / "layers" / "54.tif"), kaggle_slice)


def test_both_layouts_prepare_identical_stores(layouts):
    """Same pixels, same stores: train segments as they are, the reversed one flipped back by --reverse."""
    for fragment_id in TRAIN_IDS + (REVERSED_SEGMENT,):
        with h5py.File(store_path(layouts["kaggle_stores"], fragment_id)) as kaggle, \
                h5py.File(store_path(layouts["segment_stores"], fragment_id)) as segment:
            assert set(segment) == set(kaggle) - {"ir"}  # segments have no infrared photo
            assert set(COMPARED) - {"labels" if fragment_id in TEST_IDS else ""} <= set(segment)
            for name in segment:
                assert np.array_equal(kaggle[name][()], segment[name][()], equal_nan=kaggle[name].dtype.kind == "f"), \
                    f"{fragment_id}: {name} differs"
            for key in ("z_start", "z_stop", "surface", "tile_size", "stride"):
                assert kaggle.attrs[key] == segment.attrs[key], f"{fragment_id}: {key}"
            assert (kaggle.attrs["layout"], segment.attrs["layout"]) == ("kaggle", "segments")
            kept = list(kaggle.attrs["source_layers"])
            if fragment_id == REVERSED_SEGMENT:
                assert segment.attrs["reversed"] and list(segment.attrs["source_layers"]) == [64 - z for z in kept]
            else:
                assert list(segment.attrs["source_layers"]) == kept
            # auto centres the 16 kept slices on the surface, stored as 24:40
            assert (kaggle.attrs["z_start"], kaggle.attrs["z_stop"]) == (24, 40)
            assert kept == list(range(round(kaggle.attrs["surface"]) - 8, round(kaggle.attrs["surface"]) + 8))
            assert abs(kaggle.attrs["surface"] - NOMINAL_SURFACE) < 1.5  # lib.synth's surface wanders around 32


def test_reversed_segment_predicts_like_its_twin(layouts, tmp_path):
    torch.manual_seed(0)
    model = build_model("tu-mobilenetv3_small_050").eval()
    twin = Store(store_path(layouts["kaggle_stores"], REVERSED_SEGMENT))
    reversed_ = Store(store_path(layouts["segment_stores"], REVERSED_SEGMENT))
    expected = predict_fragment(model, twin, TILE, STRIDE, 4, tta=False, spec=MIDDLE)
    got = predict_fragment(model, reversed_, TILE, STRIDE, 4, tta=False, spec=MIDDLE)
    assert expected.any() and np.array_equal(got, expected)
    assert reversed_.h5.attrs["reversed"] and reversed_.h5.attrs["orientation"] == "auto"
    # told the depth runs upright (and a fixed window: auto refuses air below papyrus) the prediction is another one
    message = run_prepare("--data", layouts["segments"], "--out", tmp_path, "--ids", REVERSED_SEGMENT,
                          "--reverse", "none", "--tile-size", TILE, "--stride", STRIDE)
    assert message.startswith("error: ") and str(layouts["segments"] / REVERSED_SEGMENT / "layers") in message
    assert f"--reverse {REVERSED_SEGMENT}" in message and "\n" not in message
    assert run_prepare("--data", layouts["segments"], "--out", tmp_path, "--ids", REVERSED_SEGMENT,
                       "--no-reverse", REVERSED_SEGMENT, "--z-range", "24:40", "--tile-size", TILE,
                       "--stride", STRIDE) == ""
    unflipped = predict_fragment(model, Store(store_path(tmp_path, REVERSED_SEGMENT)), TILE, STRIDE, 4,
                                 tta=False, spec=MIDDLE)
    assert np.abs(unflipped - expected).max() > 0.01


def test_jpeg_layers_store_the_decoded_pixels(layouts):
    """A JPEG segment's store holds exactly the decoded 8-bit pixels (JPEG itself is lossy)."""
    store = Store(store_path(layouts["segment_stores"], EIGHT_BIT_SEGMENT))
    with h5py.File(store.path) as h5:
        volume, layers = h5["volume"][()], list(h5.attrs["source_layers"])
    folder = layouts["segments"] / EIGHT_BIT_SEGMENT / "layers"
    decoded = np.stack([np.asarray(Image.open(folder / f"{z:02d}.jpg")) for z in layers])  # the reader's decoder
    assert decoded.dtype == np.uint8 and volume.dtype == np.uint8
    assert np.array_equal(volume, decoded)
    low, high = store.intensity_range()
    assert 0 <= low < 20 < high <= 255  # the percentiles carry the 8-bit scale to normalisation


def make_segment(root, segment_id, shape=(40, 52), num_layers=20, dtype=np.uint16, ext="tif", labels=True, seed=0):
    """A tiny segment of random layers (as TIFF, PNG or JPEG), an elliptic mask and labels; returns the layers."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / segment_id
    (folder / "layers").mkdir(parents=True)
    top = np.iinfo(dtype).max
    volume = rng.integers(1, top, size=(num_layers, *shape), dtype=dtype)
    for z, layer in enumerate(volume):
        if ext == "tif":
            tifffile.imwrite(folder / "layers" / f"{z:02d}.tif", layer)
        else:
            assert cv2.imwrite(str(folder / "layers" / f"{z:02d}.{ext}"), layer)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = (((yy - shape[0] / 2) / (0.45 * shape[0])) ** 2 + ((xx - shape[1] / 2) / (0.45 * shape[1])) ** 2 < 1)
    cv2.imwrite(str(folder / f"{segment_id}_mask.png"), mask.astype(np.uint8) * 255)
    if labels:
        cv2.imwrite(str(folder / f"{segment_id}_inklabels.png"), (rng.random(shape) < 0.2).astype(np.uint8) * 255)
    return volume


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_8bit_layers_round_trip_exactly(tmp_path, ext):
    volume = make_segment(tmp_path / "data", "s8", dtype=np.uint8, ext=ext, num_layers=12)
    make_segment(tmp_path / "data", "u16", dtype=np.uint16, ext="png", num_layers=12, labels=False, seed=1)
    assert run_prepare("--data", tmp_path / "data", "--out", tmp_path / "out", "--z-range", "2:10") == ""
    with h5py.File(tmp_path / "out" / "train" / "s8.h5") as h5:
        assert h5["volume"].dtype == np.uint8 and np.array_equal(h5["volume"][()], volume[2:10])
        assert list(h5.attrs["source_layers"]) == list(range(2, 10)) and h5.attrs["layout"] == "segments"
    with h5py.File(tmp_path / "out" / "test" / "u16.h5") as h5:  # unlabelled: a test store; 16-bit PNG layers
        layers = [cv2.imread(str(tmp_path / "data" / "u16" / "layers" / f"{z:02d}.png"), cv2.IMREAD_UNCHANGED)
                  for z in range(2, 10)]
        assert layers[0].dtype == np.uint16 and np.array_equal(h5["volume"][()], np.stack(layers))


def test_train_test_roles_and_reverse_of_a_fixed_window(tmp_path):
    volume = make_segment(tmp_path / "data", "s1")
    make_segment(tmp_path / "data", "s2", seed=1)
    out = tmp_path / "out"
    assert run_prepare("--data", out.parent / "data", "--out", out, "--train", "s2", "--test", "s1",
                       "--reverse", "s1", "--z-range", "3:7") == ""
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.h5")) == ["test/s1.h5", "train/s2.h5"]
    with h5py.File(out / "test" / "s1.h5") as h5:
        assert h5.attrs["split"] == "test" and "labels" in h5  # a test store; its labels are kept (for scoring)
        assert list(h5.attrs["source_layers"]) == [16, 15, 14, 13]  # 20 layers flipped: slices 3:7 = layers 16..13
        assert np.array_equal(h5["volume"][()], volume[[16, 15, 14, 13]])
    assert "up to date" in subprocess_prepare(tmp_path, "--train", "s2", "--test", "s1", "--reverse", "s1",
                                              "--z-range", "3:7").stdout
    rerun = subprocess_prepare(tmp_path, "--train", "s2", "--test", "s1", "--z-range", "3:7")  # no --reverse: rebuilt
    assert "test/s1: 40 x 52, slices 3:7, " in rerun.stdout and "train/s2: up to date" in rerun.stdout


def subprocess_prepare(tmp_path, *args):
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--data", str(tmp_path / "data"), "--out",
                           str(tmp_path / "out"), *[str(a) for a in args]], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


# ------------------------------------------------------------------------------------------- bad inputs


def break_missing_layer(folder):
    (folder / "layers" / "05.tif").unlink()
    return folder / "layers" / "05.tif"


def break_mask_size(folder):
    cv2.imwrite(str(folder / "s1_mask.png"), np.full((41, 52), 255, np.uint8))
    return folder / "s1_mask.png"


def break_bit_depth(folder):
    tifffile.imwrite(folder / "layers" / "07.tif", np.ones((40, 52), np.uint8))
    return folder / "layers" / "07.tif"


def break_format(folder):
    (folder / "layers" / "07.tif").unlink()
    cv2.imwrite(str(folder / "layers" / "07.png"), np.ones((40, 52), np.uint16))
    return folder / "layers" / "07.png"


def break_duplicate_layer(folder):
    cv2.imwrite(str(folder / "layers" / "03.png"), np.ones((40, 52), np.uint16))
    return folder / "layers" / "03.tif"


def break_colour_layer(folder):
    for path in (folder / "layers").iterdir():
        path.unlink()
    for z in range(20):
        cv2.imwrite(str(folder / "layers" / f"{z:02d}.jpg"), np.full((40, 52, 3), 100, np.uint8))
    return folder / "layers" / "00.jpg"


def break_truncated_jpeg(folder):
    for path in (folder / "layers").iterdir():
        path.unlink()
    for z in range(20):
        cv2.imwrite(str(folder / "layers" / f"{z:02d}.jpg"), np.full((40, 52), 100 + z, np.uint8))
    path = folder / "layers" / "04.jpg"
    path.write_bytes(path.read_bytes()[:300])
    return path


def break_labels_of_train(folder):
    (folder / "s1_inklabels.png").unlink()
    return folder / "s1_inklabels.png"


def break_layers_folder(folder):
    for path in (folder / "layers").iterdir():
        path.unlink()
    (folder / "layers").rmdir()
    return folder / "layers"


@pytest.mark.parametrize("damage", [break_missing_layer, break_mask_size, break_bit_depth, break_format,
                                    break_duplicate_layer, break_colour_layer, break_truncated_jpeg,
                                    break_labels_of_train, break_layers_folder])
def test_bad_segment_inputs_name_the_file(tmp_path, damage):
    make_segment(tmp_path / "data", "s1")
    make_segment(tmp_path / "data", "s2", seed=1)
    named = damage(tmp_path / "data" / "s1")
    message = run_prepare("--data", tmp_path / "data", "--out", tmp_path / "out", "--train", "s1,s2",
                          "--z-range", "2:10")
    assert message.startswith(f"error: {named}: ") and "\n" not in message, message
    assert not list(tmp_path.glob("out/**/*.h5*"))  # nothing written, not even a temporary store


def test_bad_input_exits_nonzero_with_one_line(tmp_path):
    make_segment(tmp_path / "data", "s1")
    named = break_missing_layer(tmp_path / "data" / "s1")
    result = subprocess_prepare(tmp_path)
    assert result.returncode == 1 and result.stderr == f"error: {named}: layer missing (layers must run from 0 " \
                                                       f"to 19 without gaps)\n"
    assert not (tmp_path / "out").exists()


def test_bad_role_and_layout_arguments(tmp_path):
    make_segment(tmp_path / "data", "s1")
    make_segment(tmp_path / "data", "s2", seed=1, labels=False)
    data, out = tmp_path / "data", tmp_path / "out"
    assert run_prepare("--data", data, "--out", out, "--train", "s1", "--test", "s1") == \
        f"error: {data}: segment s1 listed both as train and as test"
    assert run_prepare("--data", data, "--out", out, "--test", "nope") == f"error: {data / 'nope'}: no such segment " \
                                                                          f"(no layers folder)"
    assert run_prepare("--data", data, "--out", out, "--reverse", "s3", "--z-range", "2:10") == \
        f"error: {data}: --reverse names s3, not among the fragments prepared"
    assert run_prepare("--data", data, "--out", out, "--train", "s2") == f"error: {data / 's2' / 's2_inklabels.png'}: " \
                                                                         f"file not found"
    assert run_prepare("--data", data, "--out", out, "--layout", "kaggle").startswith(f"error: {data}: no train/")
    assert run_prepare("--data", tmp_path, "--out", out) == \
        f"error: {tmp_path}: neither the Kaggle layout (train/, test/) nor the segment layout (<id>/layers/)"
    assert not out.exists()


# ------------------------------------------------------------------------------------------- depth window


def test_fragment_surface_and_kept_layers():
    z = np.arange(65)
    papyrus_below = 1000 + 20000 / (1 + np.exp((z - 30.3) / 0.7))
    surface, confidence = fragment_surface(papyrus_below, 32)
    assert surface == pytest.approx(30.3, abs=0.15) and confidence == 1
    assert kept_layers(65, (24, 40), surface=30.3) == list(range(22, 38))
    assert kept_layers(65, (24, 40), reverse=True, surface=30.3) == list(range(42, 26, -1))
    assert np.isnan(fragment_surface(papyrus_below[::-1], 32)[0])  # air below papyrus: no falling edge
    with pytest.raises(FragmentError, match=r"seg: slices 47:63 \(surface at slice 54.6\) are outside its 60 layers"):
        kept_layers(60, (24, 40), surface=54.6, where="seg")


# ------------------------------------------------------------------------------------------- prediction


def test_banded_blend_equals_the_whole_map_blend(tmp_path):
    """predict_fragment blends in bands of rows; with a mask gap taller than a band it still equals the plain sum
    over the whole map (the reference computed here from the tiles' own predictions)."""
    make_segment(tmp_path / "data", "gap", shape=(400, 70), num_layers=40, labels=False)
    mask = np.zeros((400, 70), np.uint8)
    mask[10:100, 5:60] = mask[300:390, 20:70] = 255  # 200 rows without tiles: more than a band (4 x 32 rows)
    cv2.imwrite(str(tmp_path / "data" / "gap" / "gap_mask.png"), mask)
    assert run_prepare("--data", tmp_path / "data", "--out", tmp_path / "out", "--z-range", "24:40") == ""
    store = Store(tmp_path / "out" / "test" / "gap.h5")

    class Constant(torch.nn.Module):  # a model whose tile output depends on the tile's content
        def forward(self, x):
            return x[:, :1] * 4 - 2

    tile, stride = 32, 16
    got = predict_fragment(Constant(), store, tile, stride, 8, tta=False, spec=MIDDLE)
    reader = InputReader(store)  # the model's inputs, as predict_fragment reads them
    total, weight_sum = np.zeros(store.shape, np.float32), np.zeros(store.shape, np.float32)
    weights = blend_weights(tile)
    for y, x in store.tiles(tile, stride):
        image = reader.read(y, x, tile, CENTRE_SLICES)[2]
        prob = 1 / (1 + np.exp(-(image * 4 - 2)))
        h, w = min(tile, store.shape[0] - y), min(tile, store.shape[1] - x)
        total[y: y + h, x: x + w] += prob[:h, :w] * weights[:h, :w]
        weight_sum[y: y + h, x: x + w] += weights[:h, :w]
    expected = np.divide(total, weight_sum, out=total, where=weight_sum > 0) * store.read_map("mask")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    out = np.ones(store.shape, np.float32)
    predict_fragment(Constant(), store, tile, stride, 8, tta=False, spec=MIDDLE, out=out, scale=0.25)
    np.testing.assert_allclose(out, 1 + 0.25 * got, atol=1e-6)


def write_run(run, stores):
    """A run folder submit.py accepts: one random-weight tiny model, absolute threshold 0.5, trained on `stores`."""
    torch.manual_seed(0)
    backbone = "tu-mobilenetv3_small_050"
    path = run / "models" / backbone / "fold-1.pt"
    save_model_file(path, build_model(backbone), MIDDLE, config=model_config(backbone, MIDDLE), fold="1",
                    tile_size=TILE, stride=STRIDE)
    name = str(path.relative_to(run))
    members = [{"backbone": backbone, "weight": 1.0, "models": [name], "sha256": {name: file_sha256(path)},
                "tile_size": TILE, "stride": STRIDE, "inputs": MIDDLE.as_dict()}]
    (run / "ensemble.json").write_text(json.dumps({"members": members, "threshold": {"mode": "absolute", "value": 0.5},
                                                   "trained_on": trained_on(stores, TRAIN_IDS)}))
    return run


def test_submit_writes_probability_pngs_and_csv_by_rule(layouts, tmp_path):
    stores = layouts["segment_stores"]
    run = write_run(tmp_path / "run", stores)
    common = ["--run", str(run), "--stores", str(stores), "--no-tta", "--no-triplets"]
    submit.main(common)  # segment stores, no --sample, no --out: PNGs only
    assert not (run / "submission.csv").exists()
    assert sorted(p.name for p in (run / "predictions").iterdir()) == [f"{i}_prediction.png" for i in TEST_IDS]
    for fragment_id in TEST_IDS:
        store = Store(store_path(stores, fragment_id))
        png = cv2.imread(str(run / "predictions" / f"{fragment_id}_prediction.png"), cv2.IMREAD_UNCHANGED)
        model = build_model("tu-mobilenetv3_small_050")
        model.load_state_dict(torch.load(next(run.glob("models/*/*.pt")))["state_dict"])
        prob = predict_fragment(model.eval(), store, TILE, STRIDE, 4, tta=False, spec=MIDDLE)
        assert png.dtype == np.uint8 and png.shape == store.shape
        assert np.abs(png.astype(int) - np.rint(prob * 255)).max() <= 1  # 8-bit probability
        assert not png[store.read_map("mask") == 0].any() and png.any()
    submit.main(common + ["--png", str(tmp_path / "pngs"), "--out", str(tmp_path / "sub.csv")])  # both on request
    assert (tmp_path / "sub.csv").read_text().startswith("Id,Predicted\na,")
    assert len(list((tmp_path / "pngs").glob("*_prediction.png"))) == 2
    kaggle_run = write_run(tmp_path / "kaggle_run", layouts["kaggle_stores"])
    submit.main(["--run", str(kaggle_run), "--stores", str(layouts["kaggle_stores"]), "--no-tta", "--no-triplets"])
    assert (kaggle_run / "submission.csv").is_file()  # Kaggle stores: the CSV, and no PNGs unless asked for
    assert not (kaggle_run / "predictions").exists()
