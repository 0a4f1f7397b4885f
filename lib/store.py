"""HDF5 tile store of one fragment: the format, writing it in bounded memory, and reading tiles.

A store `OUT/<split>/<id>.h5` holds
    volume       (Z, H, W) uint16   the kept slices, lossless; chunk (Z, 64, 64), Blosc LZ4 + bitshuffle
    mask         (H, W) uint8 0/1
    labels, ir   (H, W) uint8       train fragments only (ir when the fragment has one)
    tiles        (N, 2) int32       top-left (y, x) of every tile_size tile on the stride grid touching the mask
    percentiles  (Z, P) float32     in-mask intensity percentiles per slice (levels in attrs["percentile_levels"])
    percentiles_all (P,) float32    the same over all kept slices together
and attributes: fragment_id, split, source, z_start, z_stop, height, width, tile_size, stride,
fingerprint (of the source files: names, sizes, mtimes) and format_version.

Why this layout (numbers in bench/README.md): every training and inference read takes all kept slices of
a window, so a chunk spans all of Z; 64 px chunks waste least decoding on unaligned 224 px tiles; Blosc LZ4 with
bitshuffle keeps most of zstd's ratio (2.1 vs 2.2) at twice its tile read rate and 3x its write rate. The volume is written
in row bands of whole chunks: writing slice by slice would recompress every chunk Z times.
"""
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin  # registers the Blosc filter in every process that imports this module
import numpy as np
from tqdm import tqdm

FORMAT_VERSION = 1
DEFAULT_Z_RANGE = (24, 40)  # 16 centre slices around 32: the 8 centre slices plus random depth shifts
CHUNK_SIDE = 64
PERCENTILE_LEVELS = (0.5, 1, 5, 25, 50, 75, 95, 99, 99.5)
BAND_BYTES = 128 * 2**20  # rows read per band: about this many bytes of volume at a time


def volume_compression():
    return hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE)


def fingerprint(paths):
    """A digest of the source files' names, sizes and mtimes: changes whenever a source changes."""
    digest = hashlib.sha1()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{Path(path).name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def grid_starts(length, tile_size, stride):
    """Tile starts along one axis: the stride grid plus one tile flush with the far edge."""
    if length <= tile_size:
        return np.array([0])
    starts = np.arange(0, length - tile_size + 1, stride)
    if starts[-1] != length - tile_size:
        starts = np.append(starts, length - tile_size)
    return starts


def mask_coverage(mask, positions, tile_size):
    """Fraction of each tile (at (N, 2) top-left positions) that lies inside the mask."""
    integral = np.pad(np.asarray(mask, bool).cumsum(0, dtype=np.int64).cumsum(1), ((1, 0), (1, 0)))
    y0, x0 = positions[:, 0], positions[:, 1]
    y1, x1 = np.minimum(y0 + tile_size, mask.shape[0]), np.minimum(x0 + tile_size, mask.shape[1])
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / tile_size**2


def tile_positions(mask, tile_size, stride):
    """(N, 2) top-left corners of grid tiles that touch the mask; together they cover every mask pixel."""
    ys, xs = grid_starts(mask.shape[0], tile_size, stride), grid_starts(mask.shape[1], tile_size, stride)
    grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    return grid[mask_coverage(mask, grid, tile_size) > 0].astype(np.int32)


def band_rows(num_slices, width):
    """Rows per band: whole chunks, about BAND_BYTES of uint16 volume."""
    rows = BAND_BYTES // max(1, num_slices * width * 2)
    return max(CHUNK_SIDE, rows // CHUNK_SIDE * CHUNK_SIDE)


def percentiles_from_histogram(histogram):
    """Percentiles (PERCENTILE_LEVELS) of the values counted in a uint16 histogram."""
    cumulative = np.cumsum(histogram)
    if cumulative[-1] == 0:
        return np.zeros(len(PERCENTILE_LEVELS), np.float32)
    targets = np.array(PERCENTILE_LEVELS) / 100 * (cumulative[-1] - 1)
    return np.searchsorted(cumulative, targets, side="right").astype(np.float32)


def write_store(fragment, path, z_range=DEFAULT_Z_RANGE, tile_size=224, stride=56, progress=True):
    """Write `fragment` (a lib.fragments.Fragment) to the store `path`, atomically; returns a summary dict.

    Peak memory is one band of rows of the kept slices plus the fragment's 2-D maps.
    """
    z_start, z_stop = z_range
    if not 0 <= z_start < z_stop <= fragment.num_slices:
        raise ValueError(f"{fragment.path}: slice range {z_start}:{z_stop} is outside its {fragment.num_slices} slices")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    height, width = fragment.shape
    num_kept = z_stop - z_start
    mask = fragment.read_mask()
    try:
        with h5py.File(tmp, "w") as h5:
            volume = h5.create_dataset(
                "volume", shape=(num_kept, height, width), dtype="uint16",
                chunks=(num_kept, min(CHUNK_SIDE, height), min(CHUNK_SIDE, width)), **volume_compression())
            histograms = _copy_volume(fragment, volume, mask, z_start, z_stop, progress)
            _write_map(h5, "mask", mask)
            if fragment.has_labels:
                _write_map(h5, "labels", fragment.read_labels())
            if fragment.has_ir:
                _write_map(h5, "ir", fragment.read_ir())
            tiles = tile_positions(mask, tile_size, stride)
            h5.create_dataset("tiles", data=tiles)
            h5.create_dataset("percentiles", data=np.stack([percentiles_from_histogram(h) for h in histograms]))
            h5.create_dataset("percentiles_all", data=percentiles_from_histogram(histograms.sum(0)))
            h5.attrs.update(
                fragment_id=fragment.fragment_id, split=fragment.split, source=str(fragment.path.resolve()),
                z_start=z_start, z_stop=z_stop, height=height, width=width, tile_size=tile_size, stride=stride,
                fingerprint=fingerprint(fragment.source_files()), format_version=FORMAT_VERSION,
                source_slices=fragment.num_slices, percentile_levels=np.array(PERCENTILE_LEVELS))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"tiles": len(tiles), "bytes": path.stat().st_size, "slices": (z_start, z_stop), "shape": (height, width)}


def _copy_volume(fragment, volume, mask, z_start, z_stop, progress):
    """Stream the kept slices into `volume` band by band; return per-slice in-mask uint16 histograms."""
    num_kept, height, width = volume.shape
    rows = band_rows(num_kept, width)
    histograms = np.zeros((num_kept, 65536), np.int64)
    bar = tqdm(total=num_kept * height * width * 2, unit="B", unit_scale=True, disable=not progress,
               desc=f"prepare {fragment.split}/{fragment.fragment_id}")
    # One band buffer, reused (peak memory one band, whatever the fragment size); the histograms are counted
    # in a thread while HDF5 compresses and writes the same band (both release the GIL).
    buffer = np.empty(num_kept * min(rows, height) * width, np.uint16)
    with bar, ThreadPoolExecutor(1) as pool:
        for y0 in range(0, height, rows):
            y1 = min(height, y0 + rows)
            block = buffer[: num_kept * (y1 - y0) * width].reshape(num_kept, y1 - y0, width)  # contiguous
            for i, z in enumerate(range(z_start, z_stop)):
                block[i] = fragment.read_band(z, y0, y1)
            counting = pool.submit(_count_band, histograms, block, mask[y0:y1].astype(bool))
            volume[:, y0:y1, :] = block
            counting.result()
            bar.update(block.nbytes)
    return histograms


def _count_band(histograms, block, inside):
    for z in range(len(block)):
        histograms[z] += np.bincount(block[z][inside], minlength=65536)


def _write_map(h5, name, image):
    chunks = (min(512, image.shape[0]), min(512, image.shape[1]))
    h5.create_dataset(name, data=image.astype(np.uint8), chunks=chunks, compression="gzip", compression_opts=4)


def store_matches(path, sources_fingerprint, z_range, tile_size, stride):
    """True when `path` is a finished store built from these sources with these settings."""
    try:
        with h5py.File(path, "r") as h5:
            a = h5.attrs
            return (a.get("format_version") == FORMAT_VERSION and a.get("fingerprint") == sources_fingerprint
                    and (a.get("z_start"), a.get("z_stop")) == tuple(z_range)
                    and (a.get("tile_size"), a.get("stride")) == (tile_size, stride))
    except OSError:
        return False


class Store:
    """Read-only view of one store. The HDF5 file is opened lazily, once per process, so a Store can be
    handed to DataLoader workers (fork, spawn or forkserver) and each worker opens its own handle."""

    def __init__(self, path):
        self.path = Path(path)
        with h5py.File(self.path, "r") as h5:
            a = h5.attrs
            self.fragment_id = str(a["fragment_id"])
            self.split = str(a["split"])
            self.z_start, self.z_stop = int(a["z_start"]), int(a["z_stop"])
            self.shape = (int(a["height"]), int(a["width"]))
            self.tile_size, self.stride = int(a["tile_size"]), int(a["stride"])
            self.has_labels = "labels" in h5
            self.has_ir = "ir" in h5
        self._h5 = None
        self._pid = None

    def __getstate__(self):  # never pickle an open handle
        return {**self.__dict__, "_h5": None, "_pid": None}

    @property
    def h5(self):
        if self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def close(self):
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._pid = None

    @property
    def slices(self):
        """The absolute slice numbers held, e.g. range(24, 40)."""
        return range(self.z_start, self.z_stop)

    def read_map(self, name):
        """A whole 2-D map: "mask", "labels" or "ir"."""
        return self.h5[name][()]

    def tiles(self, tile_size=None, stride=None):
        """Tile corners for a tile size and stride (the stored index when they are the store's)."""
        tile_size, stride = tile_size or self.tile_size, stride or self.stride
        if (tile_size, stride) == (self.tile_size, self.stride):
            return self.h5["tiles"][()]
        return tile_positions(self.read_map("mask"), tile_size, stride)

    def intensity_range(self, low=1, high=99):
        """(low, high) in-mask percentiles over all kept slices, for robust normalisation."""
        levels = list(PERCENTILE_LEVELS)
        values = self.h5["percentiles_all"][()]
        return float(values[levels.index(low)]), float(values[levels.index(high)])

    def read_tile(self, y, x, height, width, slices=None):
        """Volume window (len(slices), height, width) uint16 at (y, x), zero outside the image.

        `slices` are absolute slice numbers (default: all kept); they must lie inside the kept range.
        """
        slices = list(self.slices) if slices is None else [int(z) for z in slices]
        if not slices or min(slices) < self.z_start or max(slices) >= self.z_stop:
            raise ValueError(f"{self.path}: slices {slices} are outside the kept range {self.z_start}:{self.z_stop}")
        z_index = [z - self.z_start for z in slices]
        out = np.zeros((len(slices), height, width), np.uint16)
        window = _clip_window(y, x, height, width, self.shape)
        if window is not None:
            (ys, xs), (oy, ox) = window
            z0, z1 = min(z_index), max(z_index) + 1
            volume = self.h5["volume"]
            if z_index == list(range(z0, z1)):  # consecutive slices (the usual case): straight into `out`
                volume.read_direct(out, np.s_[z0:z1, ys, xs], np.s_[:, oy, ox])
            else:  # one contiguous z read (the chunk holds all of Z anyway), then pick the slices asked for
                block = volume[z0:z1, ys, xs]
                out[:, oy, ox] = block[[z - z0 for z in z_index]]
        return out

    def read_window(self, name, y, x, height, width):
        """2-D map window (height, width) uint8 at (y, x), zero outside the image."""
        out = np.zeros((height, width), np.uint8)
        window = _clip_window(y, x, height, width, self.shape)
        if window is not None:
            (ys, xs), (oy, ox) = window
            out[oy, ox] = self.h5[name][ys, xs]
        return out


def _clip_window(y, x, height, width, shape):
    """Source and destination slices of the part of a window that lies inside an image; None if none."""
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + height, shape[0]), min(x + width, shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
