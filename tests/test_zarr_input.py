"""Zarr segments in prepare.py (lib/zarr_segment.py): a (Z, H, W) array or an OME-Zarr group, on disk and over a real
HTTP server started here, give the same store as the same layers as TIFF files; bad sources fail in one line."""
import contextlib
import functools
import http.server
import io
import threading

import cv2
import h5py
import numpy as np
import pytest
import tifffile
import zarr

import lib.store as store_mod
from lib.zarr_segment import ZarrSegment
from test_segments import run_prepare

COMPARED = ("volume", "mask", "labels", "tiles", "percentiles", "percentiles_all")
TILES = ("--tile-size", "32", "--stride", "16", "--z-range", "2:10")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real HTTP server (the standard library's, threaded) on a free port serving a folder; yields (folder, URL)."""
    folder = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


def segment_volume(dtype, shape=(12, 70, 52), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, np.iinfo(dtype).max, size=shape, dtype=dtype)


def write_maps(folder, segment_id, shape):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = ((yy - shape[0] / 2) / (0.45 * shape[0])) ** 2 + ((xx - shape[1] / 2) / (0.45 * shape[1])) ** 2 < 1
    labels = (np.random.default_rng(1).random(shape) < 0.2) & mask
    cv2.imwrite(str(folder / f"{segment_id}_mask.png"), mask.astype(np.uint8) * 255)
    cv2.imwrite(str(folder / f"{segment_id}_inklabels.png"), labels.astype(np.uint8) * 255)


def tiff_store(tmp_path, volume, segment_id):
    """The store of the same layers as a TIFF segment folder."""
    folder = tmp_path / "tiffs" / segment_id
    (folder / "layers").mkdir(parents=True)
    for z, layer in enumerate(volume):
        tifffile.imwrite(folder / "layers" / f"{z:02d}.tif", layer)
    write_maps(folder, segment_id, volume.shape[1:])
    assert run_prepare("--data", tmp_path / "tiffs", "--out", tmp_path / "tiff_stores", *TILES) == ""
    return tmp_path / "tiff_stores" / "train" / f"{segment_id}.h5"


def write_ome_zarr(path, volume, chunks, zarr_format=2):
    """An OME-Zarr 0.4 group: level 0 the volume, level 1 a 2x downsample (ignored by the reader)."""
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a} for a in "zyx"],
                                   "datasets": [{"path": "0"}, {"path": "1"}]}]
    group.create_array("0", shape=volume.shape, dtype=volume.dtype, chunks=chunks)[...] = volume
    group.create_array("1", shape=(volume.shape[0], *(s // 2 for s in volume.shape[1:])), dtype=volume.dtype,
                       chunks=chunks)
    return group


def assert_same_stores(a, b):
    with h5py.File(a) as ha, h5py.File(b) as hb:
        for name in COMPARED:
            np.testing.assert_array_equal(ha[name][()], hb[name][()], err_msg=name)
        assert ha["volume"].dtype == hb["volume"].dtype
        for attr in ("z_start", "z_stop", "height", "width", "split", "layout"):
            assert ha.attrs[attr] == hb.attrs[attr], attr


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_local_zarr_array_equals_tiff_layers(tmp_path, monkeypatch, dtype):
    """uint8: a plain zarr v3 array, PNG maps beside it; uint16: an OME-Zarr 0.5 group (zarr v3, metadata under
    "ome"), its labels a zarr array beside it."""
    volume = segment_volume(dtype)
    expected = tiff_store(tmp_path, volume, "s1")
    data = tmp_path / "zarrs"
    data.mkdir()
    write_maps(data, "s1", volume.shape[1:])
    if dtype == np.uint8:
        zarr.create_array(data / "s1.zarr", shape=volume.shape, dtype=volume.dtype, chunks=(4, 16, 32))[...] = volume
    else:
        group = zarr.open_group(data / "s1.zarr", mode="w", zarr_format=3)
        group.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "full"}]}]}
        group.create_array("full", shape=volume.shape, dtype=volume.dtype, chunks=(4, 16, 32))[...] = volume
        labels = cv2.imread(str(data / "s1_inklabels.png"), cv2.IMREAD_UNCHANGED)
        (data / "s1_inklabels.png").unlink()
        zarr.create_array(data / "s1_inklabels.zarr", shape=labels.shape, dtype=np.uint8)[...] = labels > 0
    monkeypatch.setattr(store_mod, "BAND_BYTES", 8 * 52 * 16 * 2)  # several bands of 16 rows
    monkeypatch.chdir(data)  # a relative source: its maps are found beside it all the same
    assert run_prepare("--data", "s1.zarr", "--out", tmp_path / "stores", *TILES) == ""
    assert_same_stores(tmp_path / "stores" / "train" / "s1.h5", expected)
    with h5py.File(tmp_path / "stores" / "train" / "s1.h5") as h5:
        assert h5["volume"].dtype == dtype and h5.attrs["source"] == str(data / "s1.zarr")
    assert "up to date, skipped" in prepare_stdout(tmp_path, data / "s1.zarr")
    segment = ZarrSegment(data / "s1.zarr")
    for layers in ([3, 4, 5], [5, 4, 3], [1, 5, 2]):  # up, down (a reversed depth), neither
        np.testing.assert_array_equal(segment.read_layers(layers, 10, 30), volume[layers, 10:30])


def prepare_stdout(tmp_path, source):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_prepare("--data", source, "--out", tmp_path / "stores", *TILES) == ""
    return out.getvalue()


def test_ome_zarr_over_http_equals_tiff_layers(tmp_path, server):
    """zarr v2 OME-Zarr (the format segments are served in) over a real HTTP server, mask and labels PNGs beside it;
    a second run finds the store up to date from the server's headers."""
    folder, url = server
    volume = segment_volume(np.uint8, seed=2)
    expected = tiff_store(tmp_path, volume, "s2")
    write_ome_zarr(folder / "s2.zarr", volume, chunks=(12, 32, 32))
    write_maps(folder, "s2", volume.shape[1:])
    assert run_prepare("--data", f"{url}/s2.zarr", "--out", tmp_path / "stores", *TILES) == ""
    assert_same_stores(tmp_path / "stores" / "train" / "s2.h5", expected)
    assert "up to date, skipped" in prepare_stdout(tmp_path, f"{url}/s2.zarr")
    (folder / "s2_inklabels.png").unlink()  # unlabelled now: a test segment
    assert run_prepare("--data", f"{url}/s2.zarr", "--out", tmp_path / "stores", *TILES) == ""
    with h5py.File(tmp_path / "stores" / "test" / "s2.h5") as h5:
        np.testing.assert_array_equal(h5["volume"][()], volume[2:10])


def test_bad_zarr_sources_fail_in_one_line(tmp_path, server):
    folder, url = server
    write_maps(folder, "flat", (70, 52))
    zarr.create_array(folder / "flat.zarr", shape=(70, 52), dtype=np.uint8)  # 2-D: not a volume
    write_maps(folder, "float", (70, 52))
    zarr.create_array(folder / "float.zarr", shape=(4, 70, 52), dtype=np.float32)
    write_maps(folder, "nolevel", (70, 52))
    group = zarr.open_group(folder / "nolevel.zarr", mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"datasets": [{"path": "0"}]}]
    zarr.create_array(folder / "nomask.zarr", shape=(4, 70, 52), dtype=np.uint8)
    write_maps(folder, "shape", (60, 52))
    zarr.create_array(folder / "shape.zarr", shape=(4, 70, 52), dtype=np.uint8)
    cases = {"flat": "flat.zarr: expected a (Z, H, W) volume, got shape (70, 52)",
             "float": "float.zarr: layers must be uint8 or uint16, got float32",
             "nolevel": "nolevel.zarr: OME-Zarr full-resolution level '0' missing",
             "nomask": "nomask_mask.png: mask not found",
             "missing": "missing.zarr: no zarr array or group here",
             "shape": "shape_mask.png: shape (60, 52) differs from the volume's (70, 52)"}
    for name, message in cases.items():
        error = run_prepare("--data", f"{url}/{name}.zarr", "--out", tmp_path / "stores")
        assert error.startswith("error: ") and message in error and "\n" not in error, (name, error)
    assert not (tmp_path / "stores").exists() or not list((tmp_path / "stores").glob("*/*.h5"))


def test_bands_across_chunk_rows_fetch_each_chunk_once(tmp_path, monkeypatch):
    """Bands of 12 rows over chunks of 16: every band equals the volume's rows, in every layer order, and each chunk
    is fetched once however the bands fall across the chunk rows (the rows read past a band serve the next)."""
    volume = segment_volume(np.uint16, shape=(12, 70, 52), seed=3)
    zarr.create_array(tmp_path / "s3.zarr", shape=volume.shape, dtype=volume.dtype, chunks=(4, 16, 32))[...] = volume
    write_maps(tmp_path, "s3", volume.shape[1:])
    fetched = []
    get = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        fetched.append(key)
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    for layers in ([3, 4, 5, 6, 7], [7, 6, 5, 4, 3], [1, 5, 2]):
        segment, fetched[:] = ZarrSegment(tmp_path / "s3.zarr"), []
        for y0 in range(0, 70, 12):
            np.testing.assert_array_equal(segment.read_layers(layers, y0, min(70, y0 + 12)), volume[layers, y0: y0 + 12])
        chunks = [key for key in fetched if key.startswith("c/")]
        assert sorted(chunks) == sorted(set(chunks)) and len(chunks) == 2 * 5 * 2, layers  # z chunks x rows x columns
        for y0, y1 in ((3, 9), (20, 60), (50, 70)):  # inside a chunk row, across several, to the end; out of order
            np.testing.assert_array_equal(segment.read_layers(layers, y0, y1), volume[layers, y0:y1])
