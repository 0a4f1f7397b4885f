"""lib/surface.py and its users: depth orientation decided from the data, the surface map on every sheet geometry of
lib.synth, and the fall-back where the surface is not found (prepare.py, lib.inputs.InputReader)."""
import json

import cv2
import numpy as np
import pytest
import tifffile

import prepare
from lib import synth
from lib.fragments import Fragment
from lib.inputs import InputReader, unsure_share
from lib.store import Store, write_store
from lib.surface import orientation, pixel_window, surface_grid

SIZE = 128


def synthetic_volume(geometry, seed=0, difficulty=0.5):
    """(volume (65, H, W) uint16, mask, the true surface depth (H, W)) of one lib.synth fragment of `geometry`."""
    rng = np.random.default_rng([seed, 0])
    shape = synth.fragment_shape(rng, SIZE)
    level = synth.FragmentLevel.draw(difficulty, np.random.default_rng([seed, 0, 1]), shape)
    fields = synth.FragmentFields(rng, shape, level, synth.SheetGeometry(geometry, np.random.default_rng([seed, 0, 2]),
                                                                         shape))
    volume = np.stack([fields.slice(rng, z) for z in range(synth.NUM_SLICES)])
    return volume, fields.mask, fields.depth


def profile(volume, mask):
    return np.array([s[mask > 0].mean() for s in volume], np.float64)


@pytest.mark.parametrize("geometry", synth.GEOMETRIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_orientation_is_found_on_every_geometry_either_way(geometry, seed):
    volume, mask, _ = synthetic_volume(geometry, seed)
    upright, flipped = orientation(profile(volume, mask)), orientation(profile(volume[::-1], mask))
    assert not upright.reverse and upright.clear, upright.describe()
    assert flipped.reverse and flipped.clear, flipped.describe()
    assert abs(upright.surface - 32) < 4 and abs(flipped.surface - 32) < 4


def test_a_sheet_centred_on_the_middle_decides_nothing():
    """Air, a sheet with its faces 3 slices either side of the middle, air: either face could be the recto."""
    z = np.arange(65, dtype=np.float64)
    sheet = 1 / (1 + np.exp((z - 35) / 0.7)) * 1 / (1 + np.exp(-(z - 29) / 0.7))
    found = orientation(1000 + 10000 * sheet)
    assert not found.clear and "papyrus" in found.describe()
    assert orientation(np.full(65, 500.0)).margin == 0  # no edge at all


@pytest.mark.parametrize("geometry", synth.GEOMETRIES)
def test_the_surface_map_finds_each_pixels_surface(geometry):
    """On the thin sheet with air below and the neighbouring wraps, where a threshold halfway between the lowest and
    the highest slice fails, the edge nearest the expected surface is the recto's."""
    volume, mask, depth = synthetic_volume(geometry)
    kept = volume[24:40]
    medians = np.median(kept[:, mask > 0], axis=1)
    grid, confidence = surface_grid(kept, mask, 24, 32.0, medians.max() - medians.min())
    found = pixel_window(lambda cells: grid[cells], grid.shape, 0, 0, max(mask.shape))[: mask.shape[0], : mask.shape[1]]
    error = np.abs(found - depth)[mask > 0]
    assert np.median(error) < 0.35 and np.percentile(error, 95) < 1.5, geometry
    assert np.nanmean(confidence) > 0.8 and np.isnan(confidence).any()  # NaN: cells off the papyrus


def half_without_surface(folder):
    """A Kaggle-layout fragment: the left half a synthetic sheet, the right half papyrus in every slice (no edge)."""
    volume, mask, _ = synthetic_volume("thin")
    width = volume.shape[2]
    volume[:, :, width // 2:] = np.median(volume[16:30, :, : width // 2][:, mask[:, : width // 2] > 0])
    volume *= mask.astype(np.uint16)
    (folder / "surface_volume").mkdir(parents=True)
    for z, image in enumerate(volume):
        tifffile.imwrite(folder / "surface_volume" / f"{z:02d}.tif", image)
    cv2.imwrite(str(folder / "mask.png"), mask * 255)
    cv2.imwrite(str(folder / "inklabels.png"), mask * 255)
    return volume


def test_tiles_without_a_surface_are_read_at_the_fragments_surface(tmp_path):
    half_without_surface(tmp_path / "train" / "1")
    path = tmp_path / "1.h5"
    write_store(Fragment(tmp_path / "train" / "1"), path, tile_size=32, stride=32, progress=False)
    store = Store(path)
    assert 0.3 < store.low_confidence_share < 0.7 and unsure_share(store, 32, 32) == store.low_confidence_share
    reader = InputReader(store)
    y, right, left = store.shape[0] // 2 - 16, store.shape[1] - 40, 8
    assert reader.tile_depths(y, right, 32) is None and reader.tile_depths(y, left, 32) is not None
    slices = [31, 32, 33]
    np.testing.assert_array_equal(reader.read(y, right, 32, slices, "tile"), reader.read(y, right, 32, slices, "fragment"))
    assert not np.array_equal(reader.read(y, left, 32, slices, "tile"), reader.read(y, left, 32, slices, "fragment"))


def test_prepare_says_where_the_surface_is_not_found(tmp_path, capsys):
    half_without_surface(tmp_path / "data" / "train" / "1")
    prepare.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--tile-size", "32", "--stride",
                  "32"])
    out = capsys.readouterr().out
    assert "surface not found on" in out and "read at the fragment's surface" in out


@pytest.fixture(scope="module")
def reversed_thin(tmp_path_factory):
    """A thin-sheet dataset stored with its depth reversed, and the same upright."""
    root = tmp_path_factory.mktemp("geometries")
    for name, reverse in (("upright", False), ("reversed", True)):
        synth.generate(root / name, size=96, seed=3, progress=False, geometry="thin", reversed_depth=reverse)
    return root


def test_prepare_flips_a_reversed_dataset_back_to_the_upright_store(reversed_thin, capsys):
    root = reversed_thin
    for name in ("upright", "reversed"):
        prepare.main(["--data", str(root / name), "--out", str(root / f"out-{name}"), "--tile-size", "32",
                      "--stride", "32", "--ids", "1,a"])
    out = capsys.readouterr().out
    assert out.count("; stored flipped") == 2 and "train/1: depth papyrus below, air above: upright" in out
    for split, fragment_id in (("train", "1"), ("test", "a")):
        upright, flipped = (Store(root / f"out-{n}" / split / f"{fragment_id}.h5") for n in ("upright", "reversed"))
        np.testing.assert_array_equal(upright.read_tile(0, 0, *upright.shape), flipped.read_tile(0, 0, *flipped.shape))
        assert flipped.h5.attrs["reversed"] and flipped.h5.attrs["orientation"] == "auto"
        assert not upright.h5.attrs["reversed"]


def test_an_explicit_choice_wins_and_is_recorded(reversed_thin, capsys):
    root = reversed_thin
    prepare.main(["--data", str(root / "reversed"), "--out", str(root / "kept"), "--tile-size", "32", "--stride",
                  "32", "--ids", "1,2", "--no-reverse", "1", "--reverse", "2"])
    out = capsys.readouterr().out
    assert "train/1: depth kept as given" in out and "train/2: depth reversed as given" in out
    first, second = Store(root / "kept" / "train" / "1.h5"), Store(root / "kept" / "train" / "2.h5")
    assert not first.h5.attrs["reversed"] and first.h5.attrs["orientation"] == "given"
    assert second.h5.attrs["reversed"]
    with pytest.raises(SystemExit, match="both name 1"):
        prepare.main(["--data", str(root / "reversed"), "--out", str(root / "x"), "--reverse", "1", "--no-reverse", "1"])
    recipe = json.loads((root / "reversed" / "_truth" / "synth.json").read_text())
    assert recipe["geometry"] == "thin" and recipe["reversed_depth"] is True
