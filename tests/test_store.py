"""HDF5 tile store (lib/store.py): exact round trips, zero-padded windows, the tile index, percentiles,
and reading from pickled copies in spawned and forked processes.

Reference values come straight from the source files (tifffile for slices, PIL for PNGs), never from
lib.fragments, so a reader bug cannot hide a writer bug.
"""
import multiprocessing
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import lib.store as store_mod
from lib.fragments import Fragment
from lib.store import Store, StoreError, check_store, fingerprint, grid_starts, store_matches, tile_positions, write_store

FRAGMENTS = {"1": "train", "2": "train", "3": "train", "a": "test", "b": "test"}


@pytest.fixture(scope="module")
def data_root(synth_root):
    """conftest's shared synthetic dataset (size 256, seed 0): read only."""
    return Path(synth_root)


@pytest.fixture(scope="module")
def stores(data_root, tmp_path_factory):
    """{(id, z_range): store path}: every fragment with the default range, two with all 65 slices
    written in 56-row bands (BAND_BYTES=1; chunks of one tile stride), so band boundaries and histogram accumulation
    are exercised."""
    out = tmp_path_factory.mktemp("stores")
    paths = {}
    for fid, split in FRAGMENTS.items():
        fragment = Fragment.open(data_root, split, fid).validate()
        paths[fid, (24, 40)] = out / "default" / split / f"{fid}.h5"
        write_store(fragment, paths[fid, (24, 40)], progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_mod, "BAND_BYTES", 1)
        for fid in ("1", "a"):
            fragment = Fragment.open(data_root, FRAGMENTS[fid], fid).validate()
            paths[fid, (0, 65)] = out / "full" / FRAGMENTS[fid] / f"{fid}.h5"
            write_store(fragment, paths[fid, (0, 65)], z_range=(0, 65), progress=False)
    return paths


def tiff_volume(data_root, fid, z_range):
    folder = data_root / FRAGMENTS[fid] / fid / "surface_volume"
    return np.stack([tifffile.imread(folder / f"{z:02d}.tif") for z in range(*z_range)])


def png(data_root, fid, name):
    return np.asarray(Image.open(data_root / FRAGMENTS[fid] / fid / name))


def padded_window(image, y, x, h, w):
    """Reference window of the last two axes, zero outside the image, computed by padding."""
    pad = max(h, w) + abs(y) + abs(x)
    big = np.pad(image, [(0, 0)] * (image.ndim - 2) + [(pad, pad), (pad, pad)])
    return big[..., y + pad: y + pad + h, x + pad: x + pad + w]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("key", [("1", (24, 40)), ("2", (24, 40)), ("3", (24, 40)), ("a", (24, 40)),
                                 ("b", (24, 40)), ("1", (0, 65)), ("a", (0, 65))])
def test_volume_equals_tiff_pixels(data_root, stores, key):
    fid, z_range = key
    expected = tiff_volume(data_root, fid, z_range)
    with h5py.File(stores[key], "r") as h5:
        assert h5["volume"].dtype == np.uint16
        assert h5["volume"].chunks == (z_range[1] - z_range[0], 56, 56)  # one stride of the 224 / 56 tile grid
        np.testing.assert_array_equal(h5["volume"][()], expected)
        assert (h5.attrs["z_start"], h5.attrs["z_stop"]) == z_range
        assert (h5.attrs["height"], h5.attrs["width"]) == expected.shape[1:]
        assert h5.attrs["source_slices"] == 65
    store = Store(stores[key])
    assert store.slices == range(*z_range)
    assert store.shape == expected.shape[1:]
    np.testing.assert_array_equal(store.read_tile(0, 0, *store.shape), expected)


@pytest.mark.parametrize("fid", sorted(FRAGMENTS))
def test_maps_equal_pngs(data_root, stores, fid):
    store = Store(stores[fid, (24, 40)])
    assert (store.fragment_id, store.split) == (fid, FRAGMENTS[fid])
    mask = store.read_map("mask")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    np.testing.assert_array_equal(mask, (png(data_root, fid, "mask.png") != 0).astype(np.uint8))
    if FRAGMENTS[fid] == "train":
        assert store.has_labels
        np.testing.assert_array_equal(store.read_map("labels"), (png(data_root, fid, "inklabels.png") != 0).astype(np.uint8))
        assert store.read_map("labels").any()
    else:
        assert not store.has_labels
    with h5py.File(store.path, "r") as h5:
        assert "ir" not in h5  # the infrared photo is not stored: nothing reads it
        assert ("labels" in h5) == (FRAGMENTS[fid] == "train")


# ---------------------------------------------------------------- windows

WINDOWS = [  # (y, x, h, w) relative to (H, W) via the lambdas below
    lambda H, W: (0, 0, 224, 224),
    lambda H, W: (17, 29, 64, 100),
    lambda H, W: (-50, -30, 224, 224),  # top-left corner outside
    lambda H, W: (H - 100, W - 10, 224, 224),  # bottom-right outside
    lambda H, W: (-20, 40, H + 60, 32),  # taller than the image
    lambda H, W: (H, 0, 224, 224),  # entirely below
    lambda H, W: (-300, -300, 224, 224),  # entirely above-left
    lambda H, W: (0, W + 5, 10, 10),  # entirely right
    lambda H, W: (H - 1, W - 1, 3, 5),  # one pixel inside
]


@pytest.mark.parametrize("slices", [None, [26, 30, 31], [31, 24, 24], [39], list(range(24, 40))])
def test_read_tile_padded_and_exact(data_root, stores, slices):
    store = Store(stores["2", (24, 40)])
    volume = tiff_volume(data_root, "2", (24, 40))
    z_index = list(range(16)) if slices is None else [z - 24 for z in slices]
    for window in WINDOWS:
        y, x, h, w = window(*store.shape)
        tile = store.read_tile(y, x, h, w, slices)
        assert tile.shape == (len(z_index), h, w) and tile.dtype == np.uint16
        np.testing.assert_array_equal(tile, padded_window(volume[z_index], y, x, h, w), err_msg=str((y, x, h, w)))


def test_read_tile_full_range_store(data_root, stores):
    store = Store(stores["a", (0, 65)])
    volume = tiff_volume(data_root, "a", (0, 65))
    H, W = store.shape
    for y, x in [(0, 0), (H - 150, W - 150), (60, -10), (130, 70)]:  # across 56-row band and chunk seams
        np.testing.assert_array_equal(store.read_tile(y, x, 224, 224, [0, 32, 64]),
                                      padded_window(volume[[0, 32, 64]], y, x, 224, 224))


@pytest.mark.parametrize("slices", [[23], [40], [24, 40], [26, 23], [], [-1]])
def test_read_tile_outside_kept_range_raises(stores, slices):
    store = Store(stores["1", (24, 40)])
    with pytest.raises(ValueError, match="outside the kept range"):
        store.read_tile(0, 0, 32, 32, slices)


def test_read_tile_full_store_accepts_all_slices(stores):
    store = Store(stores["1", (0, 65)])
    assert store.read_tile(10, 10, 8, 8, [0, 64]).shape == (2, 8, 8)
    with pytest.raises(ValueError):
        store.read_tile(10, 10, 8, 8, [65])


@pytest.mark.parametrize("name", ["mask", "labels"])
def test_read_window_padded_and_exact(data_root, stores, name):
    store = Store(stores["3", (24, 40)])
    image = (png(data_root, "3", {"mask": "mask.png", "labels": "inklabels.png"}[name]) != 0).astype(np.uint8)
    for window in WINDOWS:
        y, x, h, w = window(*store.shape)
        got = store.read_window(name, y, x, h, w)
        assert got.shape == (h, w) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, padded_window(image, y, x, h, w), err_msg=str((y, x, h, w)))


# ---------------------------------------------------------------- tile index


def check_tile_index(mask, tiles, tile_size, stride):
    H, W = mask.shape
    assert tiles.ndim == 2 and tiles.shape[1] == 2 and tiles.dtype == np.int32
    assert len({tuple(t) for t in tiles.tolist()}) == len(tiles), "duplicate tiles"
    covered = np.zeros(mask.shape, bool)
    ys, xs = set(grid_starts(H, tile_size, stride).tolist()), set(grid_starts(W, tile_size, stride).tolist())
    for y, x in tiles.tolist():
        assert y in ys and x in xs, "tile off the stride grid"
        assert 0 <= y and 0 <= x, "tile starts outside the image"
        assert y + min(tile_size, H) <= H and x + min(tile_size, W) <= W, "tile runs past the image"
        window = mask[y:y + tile_size, x:x + tile_size]
        assert window.any(), f"tile {(y, x)} lies entirely outside the mask"
        covered[y:y + tile_size, x:x + tile_size] = True
    assert not (mask.astype(bool) & ~covered).any(), "mask pixels no tile covers"
    # Exhaustive: every grid position touching the mask is in the index.
    expected = {(y, x) for y in ys for x in xs if mask[y:y + tile_size, x:x + tile_size].any()}
    assert expected == {tuple(t) for t in tiles.tolist()}


def hand_masks():
    rng = np.random.default_rng(5)
    corner = np.zeros((301, 257), np.uint8)
    corner[-1, -1] = 1  # only the flush far-edge tile reaches it
    first = np.zeros((301, 257), np.uint8)
    first[0, 0] = 1
    blobs = (rng.random((413, 390)) < 0.002).astype(np.uint8)
    full = np.ones((230, 225), np.uint8)
    thin = np.zeros((100, 1000), np.uint8)
    thin[50, 700:705] = 1
    return {"corner": corner, "first": first, "blobs": blobs, "full": full, "thin": thin}


@pytest.mark.parametrize("tile_size,stride", [(224, 56), (224, 224), (64, 32), (100, 37), (512, 128), (1000, 1)])
def test_tile_index_covers_mask(data_root, tile_size, stride):
    masks = hand_masks()
    masks.update({fid: (png(data_root, fid, "mask.png") != 0).astype(np.uint8) for fid in ("1", "a")})
    for name, mask in masks.items():
        tiles = tile_positions(mask, tile_size, stride)
        assert len(tiles) > 0, name
        check_tile_index(mask, tiles, tile_size, stride)


def test_tile_index_edge_cases():
    corner = hand_masks()["corner"]
    assert tile_positions(corner, 224, 56).tolist() == [[301 - 224, 257 - 224]]
    assert tile_positions(corner, 512, 128).tolist() == [[0, 0]]  # tile larger than the image
    assert tile_positions(np.zeros((50, 50), np.uint8), 16, 8).shape == (0, 2)
    assert grid_starts(300, 224, 56).tolist() == [0, 56, 76]
    assert grid_starts(280, 224, 56).tolist() == [0, 56]
    assert grid_starts(224, 224, 56).tolist() == [0]
    assert grid_starts(100, 224, 56).tolist() == [0]


def test_store_tiles_stored_and_recomputed(data_root, stores):
    for key in [("2", (24, 40)), ("a", (0, 65))]:
        store = Store(stores[key])
        mask = store.read_map("mask")
        assert (store.tile_size, store.stride) == (224, 56)
        stored = store.tiles()
        np.testing.assert_array_equal(stored, tile_positions(mask, 224, 56))
        check_tile_index(mask, stored, 224, 56)
        np.testing.assert_array_equal(store.tiles(224, 56), stored)
        for tile_size, stride in [(64, 32), (128, 128), (512, 64)]:
            other = store.tiles(tile_size, stride)
            check_tile_index(mask, other, tile_size, stride)
            np.testing.assert_array_equal(other, tile_positions(mask, tile_size, stride))
        assert len(store.tiles(64, 32)) > len(stored)


# ---------------------------------------------------------------- percentiles


@pytest.mark.parametrize("key", [("1", (24, 40)), ("a", (24, 40)), ("a", (0, 65))])
def test_intensity_range_matches_numpy(data_root, stores, key):
    fid, z_range = key
    volume = tiff_volume(data_root, fid, z_range)
    inside = png(data_root, fid, "mask.png") != 0
    voxels = volume[:, inside]
    store = Store(stores[key])
    for low, high in [(1, 99), (0.5, 99.5), (5, 95), (25, 75)]:
        got = store.intensity_range(low, high)
        want = np.percentile(voxels, [low, high])
        assert abs(got[0] - want[0]) <= 1 and abs(got[1] - want[1]) <= 1, (low, high, got, want)
    assert store.intensity_range() == store.intensity_range(1, 99)
    assert store.intensity_range()[0] < store.intensity_range()[1]
    with h5py.File(store.path, "r") as h5:
        levels = h5.attrs["percentile_levels"]
        per_slice = h5["percentiles"][()]
    assert per_slice.shape == (len(volume), len(levels))
    for z in (0, len(volume) // 2, len(volume) - 1):
        # One slice of a small fragment has sparse tails: check the stored value lies between the
        # order statistics numpy interpolates between (it is the lower one).
        lower = np.percentile(voxels[z], levels, method="lower")
        higher = np.percentile(voxels[z], levels, method="higher")
        assert np.all((lower <= per_slice[z]) & (per_slice[z] <= higher)), (z, lower, per_slice[z], higher)


# ---------------------------------------------------------------- processes


def test_store_pickles_without_handle(data_root, stores):
    store = Store(stores["1", (24, 40)])
    before = store.read_tile(5, 7, 48, 48)  # opens the handle in this process
    copy = pickle.loads(pickle.dumps(store))
    assert copy._h5 is None
    np.testing.assert_array_equal(copy.read_tile(5, 7, 48, 48), before)
    copy.close()
    store.close()


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_store_reads_in_child_processes(stores, method):
    store = Store(stores["a", (24, 40)])
    tiles = store.tiles(64, 32)
    rng = np.random.default_rng(0)
    picks = [tuple(int(v) for v in tiles[i]) + (64, 64, [26, 30, 31]) for i in rng.choice(len(tiles), 8)]
    picks.append((-10, -10, 64, 64, None))
    parent = [store.read_tile(*p) for p in picks]  # the parent holds an open handle when the children start
    with multiprocessing.get_context(method).Pool(2) as pool:
        children = pool.starmap(store.read_tile, picks)  # pickles the bound method, hence the Store
        maps = pool.starmap(store.read_window, [("mask", 0, 0, 50, 50)] * 2)
    for want, got in zip(parent, children):
        np.testing.assert_array_equal(got, want)
    for got in maps:
        np.testing.assert_array_equal(got, store.read_window("mask", 0, 0, 50, 50))
    store.close()


# ---------------------------------------------------------------- writing


def test_store_matches(data_root, stores, tmp_path):
    path = stores["b", (24, 40)]
    fp = fingerprint(Fragment.open(data_root, "test", "b").source_files())
    assert store_matches(path, fp, (24, 40), 224, 56)
    assert not store_matches(path, fp, (24, 41), 224, 56)
    assert not store_matches(path, fp, (24, 40), 256, 56)
    assert not store_matches(path, fp, (24, 40), 224, 64)
    assert not store_matches(path, "0" * 40, (24, 40), 224, 56)
    assert not store_matches(tmp_path / "missing.h5", fp, (24, 40), 224, 56)
    old = tmp_path / "old.h5"  # an older format: rebuilt without complaint
    shutil.copy(path, old)
    with h5py.File(old, "a") as h5:
        h5.attrs["format_version"] = store_mod.FORMAT_VERSION - 1
    assert not store_matches(old, fp, (24, 40), 224, 56)
    (tmp_path / "garbage.h5").write_bytes(b"not hdf5" * 100)  # there but unreadable: an error that names it
    with pytest.raises(StoreError, match=r"garbage\.h5: unreadable, truncated or corrupt \(.*signature"):
        store_matches(tmp_path / "garbage.h5", fp, (24, 40), 224, 56)


def test_write_store_rejects_bad_range_and_cleans_up_on_failure(data_root, tmp_path, monkeypatch):
    fragment = Fragment.open(data_root, "test", "b").validate()
    target = tmp_path / "test" / "b.h5"
    for bad in [(0, 66), (40, 40), (-1, 10), (30, 20)]:
        with pytest.raises(ValueError):
            write_store(fragment, target, z_range=bad, progress=False)
    assert not target.exists()

    write_store(fragment, target, progress=False)
    good = target.read_bytes()
    calls = []

    def failing_read_band(z, y0, y1, out=None):
        calls.append(z)
        if len(calls) > 20:
            raise OSError("disk went away")
        return Fragment.read_band(fragment, z, y0, y1, out)

    monkeypatch.setattr(store_mod, "BAND_BYTES", 1)
    monkeypatch.setattr(fragment, "read_band", failing_read_band)
    with pytest.raises(OSError, match="disk went away"):
        write_store(fragment, target, progress=False)
    assert target.read_bytes() == good, "a failed rewrite damaged the finished store"
    assert not (tmp_path / "test" / "b.h5.tmp").exists()
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == ["b.h5"]


def test_tiny_fragment_smaller_than_chunk_and_tile(tmp_path):
    """A 40 x 37 fragment: chunks and tiles are clamped to the image."""
    folder = tmp_path / "root" / "test" / "t"
    (folder / "surface_volume").mkdir(parents=True)
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 65536, size=(6, 40, 37), dtype=np.uint16)
    for z in range(6):
        tifffile.imwrite(folder / "surface_volume" / f"{z:02d}.tif", volume[z])
    mask = np.zeros((40, 37), np.uint8)
    mask[5:30, 3:20] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    fragment = Fragment.open(tmp_path / "root", "test", "t").validate()
    path = tmp_path / "t.h5"
    summary = write_store(fragment, path, z_range=(1, 5), tile_size=224, stride=56, progress=False)
    assert summary["tiles"] == 1 and summary["shape"] == (40, 37)
    store = Store(path)
    np.testing.assert_array_equal(store.read_tile(0, 0, 40, 37), volume[1:5])
    np.testing.assert_array_equal(store.read_tile(-3, 30, 224, 224, [2]), padded_window(volume[[2]], -3, 30, 224, 224))
    assert store.tiles().tolist() == [[0, 0]]
    inside = volume[1:5][:, mask > 0]
    got = store.intensity_range(5, 95)
    # Uniform 16-bit noise: neighbouring order statistics lie far apart, so check the value lies between them.
    lower, higher = np.percentile(inside, [5, 95], method="lower"), np.percentile(inside, [5, 95], method="higher")
    assert all(lo <= g <= hi for lo, g, hi in zip(lower, got, higher)), (lower, got, higher)


def _fragment_from_volume(root, volume, mask):
    folder = root / "test" / "f"
    (folder / "surface_volume").mkdir(parents=True)
    for z, pixels in enumerate(volume):
        tifffile.imwrite(folder / "surface_volume" / f"{z:02d}.tif", pixels)
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "mask.png")
    return Fragment.open(root, "test", "f").validate()


@pytest.mark.parametrize("band_bytes", [1, store_mod.BAND_BYTES])
def test_partial_edge_chunks_round_trip(tmp_path, monkeypatch, band_bytes):
    """150 x 201: the last chunk row and column are partial (chunks of 32); the chunks written directly (compressed here, not by
    HDF5) read back the same through HDF5's own Blosc filter and through Store.read_tile."""
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 65536, size=(5, 150, 201), dtype=np.uint16)
    mask = np.zeros((150, 201), bool)
    mask[20:140, 30:190] = True
    fragment = _fragment_from_volume(tmp_path / "root", volume, mask)
    monkeypatch.setattr(store_mod, "BAND_BYTES", band_bytes)
    path = tmp_path / "f.h5"
    write_store(fragment, path, z_range=(0, 5), tile_size=64, stride=32, progress=False)
    with h5py.File(path, "r") as h5:
        assert h5["volume"].chunks == (5, 32, 32)  # one tile stride
        np.testing.assert_array_equal(h5["volume"][()], volume)  # HDF5 filter pipeline (hdf5plugin Blosc)
    store = Store(path)
    for y, x, h, w in [(0, 0, 150, 201), (100, 150, 64, 64), (130, 190, 40, 40), (-5, 60, 70, 80), (63, 63, 2, 2)]:
        np.testing.assert_array_equal(store.read_tile(y, x, h, w, [1, 3]), padded_window(volume[[1, 3]], y, x, h, w))
    lower = np.percentile(volume[:, mask], [1, 99], method="lower")
    higher = np.percentile(volume[:, mask], [1, 99], method="higher")
    assert all(lo <= g <= hi for lo, g, hi in zip(lower, store.intensity_range(1, 99), higher))


def test_eight_bit_slices_stay_uint8(tmp_path):
    volume = np.random.default_rng(3).integers(0, 256, size=(4, 70, 90), dtype=np.uint8)
    fragment = _fragment_from_volume(tmp_path / "root", volume, np.ones((70, 90), bool))
    write_store(fragment, tmp_path / "f.h5", z_range=(0, 4), progress=False)
    tile = Store(tmp_path / "f.h5").read_tile(0, 0, 70, 90)
    assert tile.dtype == np.uint8
    np.testing.assert_array_equal(tile, volume)


def test_old_format_stores_are_refused(stores, tmp_path):
    old = tmp_path / "old.h5"
    old.write_bytes(stores["b", (24, 40)].read_bytes())
    with h5py.File(old, "r+") as h5:
        h5.attrs["format_version"] = 1
    with pytest.raises(ValueError, match=f"{old}: store format 1.*prepare.py --force"):
        Store(old)


# ---------------------------------------------------------------- checksums


def flip_bit(path, offset, bit=0):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def chunk_offset(path, dataset, index=0):
    """Byte offset in the file of a dataset's stored chunk number `index` (and its size)."""
    with h5py.File(path, "r") as h5:
        info = h5[dataset].id.get_chunk_info(index)
    return info.byte_offset, info.size


def test_another_codec_and_chunk_side_hold_the_same_voxels(data_root, stores, tmp_path):
    """write_store's codec= and side= (what bench_prepare.py compares): the declared filter and chunks change,
    the voxels and the tiles read back do not."""
    path = tmp_path / "zstd.h5"
    codec = {"compressor": "zstd", "level": 1, "shuffle": 1}
    summary = write_store(Fragment.open(data_root, "train", "1"), path, progress=False, codec=codec, side=64)
    assert summary["copy_seconds"] > 0
    with h5py.File(path, "r") as h5, h5py.File(stores["1", (24, 40)], "r") as default:
        assert h5["volume"].chunks == (16, 64, 64) and default["volume"].chunks == (16, 56, 56)
        blosc = h5["volume"].id.get_create_plist().get_filter(0)
        assert blosc[0] == 32001 and blosc[2][4:7] == (1, 1, 5)  # Blosc: level 1, byte shuffle, zstd (code 5)
        np.testing.assert_array_equal(h5["volume"][()], default["volume"][()])
    tiles = [Store(p).read_tile(30, 40, 64, 64) for p in (path, stores["1", (24, 40)])]
    np.testing.assert_array_equal(*tiles)


def test_every_dataset_checksummed_and_readable_by_plain_hdf5(stores):
    with h5py.File(stores["1", (24, 40)], "r") as h5:
        for name in ("volume", "mask", "labels", "tiles", "percentiles", "percentiles_all"):
            assert h5[name].fletcher32, name
        dcpl = h5["volume"].id.get_create_plist()
        assert [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())] == [32001, 3]  # Blosc, then Fletcher32
        h5["volume"][()]  # HDF5's own pipeline verifies the checksums written beside write_direct_chunk


@pytest.mark.parametrize("dataset", ["percentiles_all", "percentiles", "tiles", "mask", "labels", "volume"])
def test_flipped_bit_in_a_chunk_is_an_error_naming_store_and_dataset(stores, tmp_path, dataset):
    path = tmp_path / "1.h5"
    shutil.copy(stores["1", (24, 40)], path)
    offset, size = chunk_offset(path, dataset)
    flip_bit(path, offset + size // 2, 3)
    named = rf"{path}: dataset {dataset}: unreadable, truncated or corrupt \(.+\)$"
    whole = named.replace("volume:", r"volume \(rows 0:274\):")  # the full check names the band of rows
    with pytest.raises(StoreError, match=whole):
        check_store(path, full=True)
    store = Store(path)  # opening reads only metadata: fine; the read of the bad dataset fails
    read = {"percentiles_all": store.intensity_range, "tiles": store.tiles,
            "volume": lambda: store.read_tile(0, 0, 56, 56)}.get(dataset, lambda: store.read_dataset(dataset))
    with pytest.raises(StoreError, match=named):
        read()
    if dataset == "volume":  # the cheap check leaves the volume to --verify and to the reads
        check_store(path)
    else:
        with pytest.raises(StoreError, match=named):
            check_store(path)


def test_random_bit_flips_never_go_unnoticed(stores, tmp_path):
    """Anywhere in the file: a flipped bit is an error, or changes nothing that is read (padding, free space)."""
    source = stores["b", (24, 40)]
    reference = Store(source)
    want = {name: reference.read_dataset(name) for name in ("volume", "mask", "tiles", "percentiles", "percentiles_all")}
    attrs = dict(h5py.File(source, "r").attrs)
    good = source.read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "b.h5"
    caught = 0
    for offset, bit in zip(rng.integers(0, len(good), 60), rng.integers(0, 8, 60)):
        data = bytearray(good)
        data[offset] ^= 1 << int(bit)
        path.write_bytes(data)
        try:
            check_store(path, full=True)
            store = Store(path)
            got = {name: store.read_dataset(name) for name in want}
            store.close()
            with h5py.File(path, "r") as h5:
                got_attrs = dict(h5.attrs)
        except StoreError:
            caught += 1
            continue
        assert all(np.array_equal(got[n], want[n]) for n in want), f"bit {bit} of byte {offset}: silent change"
        assert got_attrs.keys() == attrs.keys() and all(np.array_equal(got_attrs[k], attrs[k]) for k in attrs)
    assert caught >= 50  # almost every byte of a store is data or checksummed metadata


def test_truncated_or_missing_store_is_a_store_error(stores, tmp_path):
    path = tmp_path / "b.h5"
    data = stores["b", (24, 40)].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=rf"{path}: unreadable, truncated or corrupt \(.*truncated file"):
        Store(path)
    with pytest.raises(StoreError, match=rf"{tmp_path / 'none.h5'}: unreadable"):
        Store(tmp_path / "none.h5")


def test_same_data_at_8_and_16_bits_predicts_the_same(tmp_path, one_thread):
    """8-bit layers stay uint8 (half the bytes) and the 16-bit copy of the same data (x 257, full scale) gives the same
    normalised inputs, so the same prediction within float rounding."""
    from lib.infer import predict_fragment
    from lib.inputs import InputSpec
    from lib.model import build_model

    rng = np.random.default_rng(5)
    depth = np.linspace(220, 20, 40)[:, None, None]  # papyrus below, air above: a surface for the flattening
    volume = np.clip(depth + rng.normal(0, 25, (40, 96, 80)), 0, 255).astype(np.uint8)
    mask = np.zeros((96, 80), bool)
    mask[6:90, 4:76] = True
    paths = {}
    for bits, pixels in ((8, volume), (16, volume.astype(np.uint16) * 257)):
        fragment = _fragment_from_volume(tmp_path / f"root{bits}", pixels, mask)
        paths[bits] = tmp_path / f"{bits}.h5"
        write_store(fragment, paths[bits], tile_size=64, stride=32, progress=False)
    with h5py.File(paths[8]) as h8, h5py.File(paths[16]) as h16:
        assert h8["volume"].dtype == np.uint8 and h16["volume"].dtype == np.uint16
        assert h8["volume"].id.get_storage_size() < h16["volume"].id.get_storage_size()
    torch.manual_seed(0)
    model = build_model("tu-mobilenetv3_small_050").eval()
    # plain slices: the inputs differ by float rounding alone; flattened onto each tile's surface (the default), the
    # surface's interpolation moves by rounding too: still far below an 8-bit output step (1/255)
    for triplets, tolerance in (("middle", 1e-5), ("tile", 1e-3)):
        spec = InputSpec("triplets", centre_on="tile" if triplets == "tile" else "nominal", triplets=triplets)
        maps = [predict_fragment(model, Store(paths[bits]), 64, 32, 4, spec=spec) for bits in (8, 16)]
        assert maps[0][mask].std() > 1e-3  # not a constant map
        np.testing.assert_allclose(maps[0], maps[1], atol=tolerance)
