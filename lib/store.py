"""HDF5 tile store of one fragment: the format, writing it in bounded memory, and reading tiles.

A store `OUT/<split>/<id>.h5` holds
    volume       (Z, H, W) uint8 or uint16, the source's bit depth: the kept slices, lossless; chunk (Z, 56, 56),
                 Blosc LZ4 + bitshuffle
    mask         (H, W) uint8 0/1
    labels       (H, W) uint8       train fragments only
    tiles        (N, 2) int32       top-left (y, x) of every tile_size tile on the stride grid touching the mask
    percentiles  (Z, P) float32     in-mask intensity percentiles per slice (levels in attrs["percentile_levels"])
    percentiles_all (P,) float32    the same over all kept slices together
    surface      (H/4, W/4) float16 each pixel's surface (a slice number) on a 4 px grid (lib/surface.py)
    surface_confidence (H/4, W/4) float16  how sure each cell's surface is, 0..1 (NaN off the papyrus)
and attributes: fragment_id, split, source, z_start, z_stop, height, width, tile_size, stride,
fingerprint (of the source files: names, sizes, mtimes) and format_version; source_layers (the source layer of
each kept slice: z_start..z_stop unless the depth was reversed or the window moved to the surface, lib/depth.py),
layout ("kaggle" or "segments": the source's layout), fragment_surface and fragment_surface_confidence (the
fragment's own surface in the store's slice numbers, from its in-mask median along depth, and how sure it is),
low_confidence_share (of the stored tiles, those whose surface is too unsure to flatten onto), and from prepare.py
reversed, orientation ("auto": decided from the data, "given": by --reverse / --no-reverse, "kept": left as it
was, the evidence being too weak), orientation_margin and surface (the detected surface layer, NaN unless
--z-range auto).

Integrity: every dataset's chunks carry HDF5's Fletcher32 checksum (after Blosc, so it covers the stored
bytes), and the file is written with the 1.10 format, whose metadata (superblock, object headers with the
attributes, chunk indexes) is checksummed too. HDF5 checks them on every read; a mismatch, a truncated file or
a missing dataset is a `StoreError` naming the store and the dataset (check_store reads a whole store).

Why this layout (measured in bench/README.md, "## prepare"): every training and inference read takes a window of
several kept slices, so a chunk spans all of Z; in-plane a chunk is one tile stride (56 px for 224 px tiles), so a
tile on the grid decodes exactly its 4 x 4 chunks (see chunk_side); Blosc LZ4 with bitshuffle keeps almost all of
zstd's size ratio and reads and writes faster. write_store takes another codec or chunk side, for benchmarks.

Writing: the volume goes in row bands of whole chunks (slice by slice would recompress every chunk Z times).
The chunks of a band are compressed here, on every core, and stored with write_direct_chunk: HDF5's own
filter pipeline compresses one chunk at a time on one core. The bytes are the same c-blosc frames the
declared Blosc filter writes and reads, followed by the Fletcher32 checksum the declared filter after it
appends (numcodecs computes it exactly as HDF5 does), so it is a plain HDF5 file (h5py + hdf5plugin read it).
"""
import contextlib
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import h5py
import hdf5plugin  # registers the Blosc filter in every process that imports this module
import imagecodecs
import numpy as np
from numcodecs.fletcher32 import Fletcher32
from tqdm import tqdm

from lib.depth import NOMINAL_SURFACE
from lib.surface import fragment_surface, low_confidence_share, surface_map

# 5: surface maps; 4: 8-bit sources stay uint8; 3: checksums; 2: chunks one tile stride wide (older stores are rebuilt)
FORMAT_VERSION = 5
DEFAULT_Z_RANGE = (24, 40)  # 16 centre slices around 32: the 8 centre slices plus random depth shifts
CHUNK_SIDE = 64  # chunk height and width when the tile grid gives none (chunk_side)
PERCENTILE_LEVELS = (0.5, 1, 5, 25, 50, 75, 95, 99, 99.5)
BAND_BYTES = 64 * 2**20  # rows read per band: about this many bytes of volume at a time (two bands in memory)
# Blosc: LZ4, level 5, bitshuffle (2). Why: bench/README.md ("## prepare", codec table).
VOLUME_CODEC = {"compressor": "lz4", "level": 5, "shuffle": 2}
CHUNKS_PER_TASK = 16  # chunks one compression task copies into chunk order and compresses
HDF5_FORMAT = ("v110", "v110")  # the oldest file format whose metadata HDF5 checksums
MAP_BAND_PIXELS = 64 * 2**20  # pixels of a 2-D map checked at a time (check_store)
SMALL_DATASETS = ("tiles", "percentiles", "percentiles_all", "surface", "surface_confidence")  # besides mask, labels, volume
_CHECKSUM = Fletcher32()


class StoreError(ValueError):
    """A store that cannot be used (unreadable, truncated, wrong format, failed checksum): the message is one line
    and names the store (and the dataset, when one is at fault)."""


def _store_error(path, dataset, err):
    """StoreError for an HDF5 read of `dataset` (None: the file itself) that failed with `err`."""
    where = f"{path}" if dataset is None else f"{path}: dataset {dataset}"
    reason = " ".join(str(err).split())  # h5py messages can span lines
    return StoreError(f"{where}: unreadable, truncated or corrupt ({reason})")


def volume_compression(codec=VOLUME_CODEC):
    """The HDF5 filter the volume is declared with (what any other HDF5 reader decodes it with)."""
    return hdf5plugin.Blosc(cname=codec["compressor"], clevel=codec["level"], shuffle=codec["shuffle"])


def encode_chunk(chunk, codec=VOLUME_CODEC):
    """One volume chunk as the filters above store it: a c-blosc 1 frame and its Fletcher32 checksum."""
    return _CHECKSUM.encode(imagecodecs.blosc_encode(chunk, typesize=chunk.itemsize, numthreads=1, **codec))


def fingerprint(paths):
    """A digest of the source files' names, sizes and mtimes (of a URL: the size and the server's ETag or
    Last-Modified, through fsspec): changes whenever a source changes."""
    digest = hashlib.sha1()
    for path in paths:
        if "://" in str(path):
            fs, where = fsspec.core.url_to_fs(str(path))
            info = fs.info(where)
            stamp = info.get("ETag") or info.get("Last-Modified") or info.get("mtime")
            digest.update(f"{str(path).rsplit('/', 1)[-1]} {info.get('size')} {stamp}\n".encode())
            continue
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
    """Fraction of each tile (at (N, 2) top-left positions) that lies inside the mask.

    Uses an integral image kept only on the rows where tiles start or end (a few hundred rows, not all H).
    """
    height, width = mask.shape
    y0, x0 = positions[:, 0], positions[:, 1]
    y1, x1 = np.minimum(y0 + tile_size, height), np.minimum(x0 + tile_size, width)
    if len(positions) == 0:
        return np.zeros(0)
    rows = np.unique(np.concatenate([[0], y0, y1]))  # y1 > 0: at least two rows
    mask = np.asarray(mask, bool)
    band_sums = np.stack([mask[a:b].sum(0, dtype=np.int32) for a, b in zip(rows[:-1], rows[1:])])
    integral = np.zeros((len(rows), width + 1), np.int64)  # integral[i, x]: mask pixels above rows[i], left of x
    integral[1:, 1:] = band_sums.cumsum(0)
    integral[:, 1:] = integral[:, 1:].cumsum(1)
    i0, i1 = np.searchsorted(rows, y0), np.searchsorted(rows, y1)
    inside = integral[i1, x1] - integral[i0, x1] - integral[i1, x0] + integral[i0, x0]
    return inside / tile_size**2


def tile_positions(mask, tile_size, stride):
    """(N, 2) top-left corners of grid tiles that touch the mask; together they cover every mask pixel."""
    ys, xs = grid_starts(mask.shape[0], tile_size, stride), grid_starts(mask.shape[1], tile_size, stride)
    grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    return grid[mask_coverage(mask, grid, tile_size) > 0].astype(np.int32)


def chunk_side(tile_size, stride):
    """Chunk height and width: the tile stride when a tile is a whole number of strides, so that a tile on the
    grid decodes exactly its own chunks (unaligned chunks would decode more bytes a tile); else CHUNK_SIDE."""
    return stride if 32 <= stride <= 128 and tile_size % stride == 0 else CHUNK_SIDE


def band_rows(num_slices, width, chunk_rows, itemsize=2):
    """Rows per band: whole chunks, about BAND_BYTES of volume (`itemsize` bytes a voxel)."""
    rows = BAND_BYTES // max(1, num_slices * width * itemsize)
    return max(chunk_rows, rows // chunk_rows * chunk_rows)


def volume_dtype(fragment):
    """The store's volume dtype for a fragment: uint8 for 8-bit sources (half the disk and the read time; the
    percentiles are on the same scale, so models see the same normalised inputs), else uint16."""
    return np.dtype(np.uint8) if np.dtype(fragment.dtype).itemsize == 1 else np.dtype(np.uint16)


def percentiles_from_histogram(histogram):
    """Percentiles (PERCENTILE_LEVELS) of the values counted in a uint8 or uint16 histogram."""
    cumulative = np.cumsum(histogram)
    if cumulative[-1] == 0:
        return np.zeros(len(PERCENTILE_LEVELS), np.float32)
    targets = np.array(PERCENTILE_LEVELS) / 100 * (cumulative[-1] - 1)
    return np.searchsorted(cumulative, targets, side="right").astype(np.float32)


def write_store(fragment, path, z_range=DEFAULT_Z_RANGE, tile_size=224, stride=56, progress=True, layers=None,
                attrs=None, codec=VOLUME_CODEC, side=None):
    """Write `fragment` (a lib.fragments.Fragment) to the store `path`, atomically; returns a summary dict (with
    the seconds the volume copy took).

    The store's slices z_range[0]..z_range[1] are the source layers `layers` (default: the same numbers; see
    lib/depth.py for reversed and surface-centred windows); `attrs` are extra attributes to record. `codec` (Blosc
    settings as VOLUME_CODEC) and `side` (chunk height and width; default chunk_side) change the volume's layout:
    the bench measures the alternatives with them.

    Peak memory is two bands of rows of the kept slices (one being read, one being compressed) plus the
    fragment's 2-D maps. The file is written as `<path>.tmp` and removed on any failure: a caller that may run
    beside another writer holds lib.lock.exclusive(path) around this (prepare.py does).
    """
    z_start, z_stop = z_range
    layers = list(range(z_start, z_stop)) if layers is None else [int(z) for z in layers]
    if not (0 <= z_start < z_stop and len(layers) == z_stop - z_start
            and all(0 <= z < fragment.num_slices for z in layers)):
        raise ValueError(f"{fragment.path}: slices {z_start}:{z_stop} from layers {layers} do not fit its "
                         f"{fragment.num_slices} slices")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    height, width = fragment.shape
    num_kept = z_stop - z_start
    mask = fragment.read_mask()
    side = side or chunk_side(tile_size, stride)
    ink_fraction = None
    try:
        h5 = h5py.File(tmp, "w", libver=HDF5_FORMAT)
        try:
            volume = h5.create_dataset(
                "volume", shape=(num_kept, height, width), dtype=volume_dtype(fragment), fletcher32=True,
                chunks=(num_kept, min(side, height), min(side, width)), **volume_compression(codec))
            copy_started = time.perf_counter()
            histograms = _copy_volume(fragment, volume, mask, layers, codec, progress)
            copy_seconds = time.perf_counter() - copy_started
            _write_map(h5, "mask", mask)
            if fragment.has_labels:
                labels = fragment.read_labels()
                ink_fraction = float(labels[mask > 0].mean())
                _write_map(h5, "labels", labels)
                del labels
            tiles = tile_positions(mask, tile_size, stride)
            h5.create_dataset("tiles", data=tiles, fletcher32=True)
            h5.create_dataset("percentiles", data=np.stack([percentiles_from_histogram(h) for h in histograms]),
                              fletcher32=True)
            h5.create_dataset("percentiles_all", data=percentiles_from_histogram(histograms.sum(0)), fletcher32=True)
            surfaces = _write_surface(h5, volume, mask, z_start, tiles, tile_size)
            h5.attrs.update(
                fragment_id=fragment.fragment_id, split=fragment.split, source=str(fragment.path.resolve()),
                z_start=z_start, z_stop=z_stop, height=height, width=width, tile_size=tile_size, stride=stride,
                fingerprint=fingerprint(fragment.source_files()), format_version=FORMAT_VERSION,
                source_slices=fragment.num_slices, percentile_levels=np.array(PERCENTILE_LEVELS),
                source_layers=np.array(layers), layout=fragment.layout, **surfaces, **(attrs or {}))
        except BaseException:
            with contextlib.suppress(Exception):  # closing flushes, which fails again on a full disk: keep the first error
                h5.close()
            raise
        _close_flushed(h5, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"tiles": len(tiles), "bytes": path.stat().st_size, "slices": (z_start, z_stop), "shape": (height, width),
            "ink_fraction": ink_fraction, "copy_seconds": copy_seconds, **surfaces}


def _write_surface(h5, volume, mask, z_start, tiles, tile_size):
    """The surface maps (lib/surface.py) of the volume just written, read back band by band; returns the attributes
    that go with them. The search starts from the fragment's own surface (its in-mask median along depth), which
    is the nominal slice when the store's window was centred on it (--z-range auto) or none is found."""
    medians = h5["percentiles"][:, PERCENTILE_LEVELS.index(50)].astype(np.float64)
    surface, confidence = fragment_surface(medians, NOMINAL_SURFACE - z_start)
    expected = NOMINAL_SURFACE if np.isnan(surface) else surface + z_start
    everywhere = h5["percentiles_all"][()]  # papyrus and air over all kept slices: the contrast an edge spans
    contrast = float(everywhere[PERCENTILE_LEVELS.index(95)] - everywhere[PERCENTILE_LEVELS.index(5)])
    depth, cell_confidence = surface_map(lambda y0, y1: (volume[:, y0:y1], mask[y0:y1]), mask.shape, z_start,
                                         expected, contrast)
    for name, grid in (("surface", depth), ("surface_confidence", cell_confidence)):
        h5.create_dataset(name, data=grid.astype(np.float16), fletcher32=True, **hdf5plugin.Blosc(cname="lz4", clevel=5))
    return {"fragment_surface": float(expected), "fragment_surface_confidence": confidence,
            "low_confidence_share": low_confidence_share(cell_confidence, tiles, tile_size)}


def _close_flushed(h5, path):
    """Close a file being written. h5py reports a failed final flush (a full disk) as a RuntimeError: an OSError here,
    like every other failed write."""
    try:
        h5.close()
    except RuntimeError as err:
        raise OSError(f"{path}: {err}") from None


def _copy_volume(fragment, volume, mask, layers, codec, progress):
    """Stream the source `layers` into `volume` band by band; return per-slice in-mask uint16 histograms.

    A reader thread fills the next band while a pool of threads (one per core) compresses the chunks of this
    band and counts its histograms; this thread stores the compressed chunks in order. The TIFF reads and the
    compression release the GIL, so they run beside the counting on every core.
    """
    num_kept, height, width = volume.shape
    chunk_shape = volume.chunks
    rows = band_rows(num_kept, width, chunk_shape[1], volume.dtype.itemsize)
    group_width = CHUNKS_PER_TASK * chunk_shape[2]
    bands = [(y0, min(height, y0 + rows)) for y0 in range(0, height, rows)]
    histograms = np.zeros((num_kept, 65536), np.int64)
    # Two band buffers, reused: one being read while the other is compressed (peak memory two bands).
    buffers = [np.empty((num_kept, min(rows, height), width), volume.dtype) for _ in range(2)]
    bar = tqdm(total=num_kept * height * width * volume.dtype.itemsize, unit="B", unit_scale=True, disable=not progress,
               desc=f"prepare {fragment.split}/{fragment.fragment_id}")
    with bar, ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(len(os.sched_getaffinity(0))) as encoders:
        reading = reader.submit(_read_band, fragment, layers, bands[0], buffers[0])
        for index, (y0, y1) in enumerate(bands):
            block = reading.result()
            if index + 1 < len(bands):
                reading = reader.submit(_read_band, fragment, layers, bands[index + 1], buffers[(index + 1) % 2])
            inside = mask[y0:y1].astype(bool)
            counts = [encoders.submit(_count_in_mask, block[i], inside) for i in range(num_kept)]
            groups = [(cy, cx) for cy in range(0, y1 - y0, chunk_shape[1]) for cx in range(0, width, group_width)]
            encoded = encoders.map(lambda group: _encode_chunks(block, *group, group_width, chunk_shape, codec), groups)
            for (cy, cx), chunks in zip(groups, encoded):
                for i, data in enumerate(chunks):
                    volume.id.write_direct_chunk((0, y0 + cy, cx + i * chunk_shape[2]), data)
            for i, count in enumerate(counts):
                histograms[i] += count.result()
            bar.update(block.nbytes)
    return histograms


def _read_band(fragment, layers, band, buffer):
    y0, y1 = band
    return fragment.read_layers(layers, y0, y1, out=buffer[:, : y1 - y0])


def _encode_chunks(block, cy, cx, width, chunk_shape, codec):
    """Compressed chunks of `block` with corners (cy, cx), (cy, cx + chunk width), ... inside [cx, cx + width):
    one copy into chunk-major order, zero-padded at the image edges (HDF5 stores edge chunks whole), then Blosc."""
    num_kept, chunk_h, chunk_w = chunk_shape
    window = block[:, cy: cy + chunk_h, cx: cx + width]
    h, w = window.shape[1:]
    count, full = -(-w // chunk_w), w // chunk_w
    chunks = np.zeros((count, num_kept, chunk_h, chunk_w), block.dtype)
    grid = chunks.transpose(1, 2, 0, 3)  # a (Z, chunk_h, count, chunk_w) view laid out like the window
    grid[:, :h, :full] = window[:, :, : full * chunk_w].reshape(num_kept, h, full, chunk_w)
    if full < count:
        grid[:, :h, full, : w - full * chunk_w] = window[:, :, full * chunk_w:]
    return [encode_chunk(chunk, codec) for chunk in chunks]


def _count_in_mask(image, inside):
    """Histogram (65536 bins) of a uint8 or uint16 image's values where the boolean `inside` is set."""
    return np.bincount(image[inside], minlength=65536)


def _write_map(h5, name, image):
    chunks = (min(512, image.shape[0]), min(512, image.shape[1]))
    h5.create_dataset(name, data=image.astype(np.uint8), chunks=chunks, fletcher32=True,
                      **hdf5plugin.Blosc(cname="lz4", clevel=5))


def require_slices(store, slices, what):
    """StoreError unless `store` (a Store or a store's path) holds every slice number in `slices`: one line naming
    the store, the slices it keeps and those `what` (e.g. "--triplets mean") reads, and the prepare.py --z-range
    that would keep them. Checked before any prediction or trial starts, never found mid-way."""
    store = store if isinstance(store, Store) else Store(store)
    needed = sorted({int(z) for z in slices})
    missing = [z for z in needed if z not in store.slices]
    if missing:
        low, high = min(needed[0], DEFAULT_Z_RANGE[0]), max(needed[-1] + 1, DEFAULT_Z_RANGE[1])
        raise StoreError(f"{store.path}: holds slices {store.z_start}:{store.z_stop}, but {what} reads slices "
                         f"{needed[0]}:{needed[-1] + 1} (missing {_ranges(missing)}); prepare it again with "
                         f"--z-range {low}:{high} (or auto)")


def _ranges(numbers):
    """Sorted integers as "a:b" half-open runs joined by commas, e.g. [1, 2, 3, 7] -> "1:4, 7:8"."""
    runs, start = [], numbers[0]
    for previous, number in zip(numbers, numbers[1:] + [None]):
        if number != previous + 1:
            runs.append(f"{start}:{previous + 1}")
            start = number
    return ", ".join(runs)


def store_matches(path, sources_fingerprint, z_range, tile_size, stride, layers=None):
    """True when `path` is a store built from these sources with these settings (and these source layers: default
    z_range's own numbers, which a store from before source_layers existed holds) and intact: its file opens (HDF5
    checks the size and the metadata checksums) and every dataset but the volume reads back against its checksums
    (check_store). False when it is missing, of another format version, or stale; a store that is there but
    unreadable or corrupt is a StoreError (prepare.py rebuilds it and says why)."""
    layers = list(range(*z_range)) if layers is None else [int(z) for z in layers]
    if not Path(path).exists():
        return False
    try:
        with h5py.File(path, "r") as h5:
            a = dict(h5.attrs)
    except OSError as err:
        raise _store_error(path, None, err) from None
    if a.get("format_version") != FORMAT_VERSION:
        return False
    if list(a.get("source_layers", range(*z_range))) != layers:
        return False
    if not (a.get("fingerprint") == sources_fingerprint and (a.get("z_start"), a.get("z_stop")) == tuple(z_range)
            and (a.get("tile_size"), a.get("stride")) == (tile_size, stride)):
        return False
    check_store(path)
    return True


def check_store(path, full=False):
    """Read every dataset of a store except the volume (with `full`, the volume too, band by band), so that HDF5
    checks every chunk against its checksum; StoreError on the first failure."""
    store = Store(path)
    try:
        for name in SMALL_DATASETS:
            store.read_dataset(name)
        for name in (n for n in ("mask", "labels") if n in store.h5):  # whole chunk rows at a time: bounded memory
            rows = store.h5[name].chunks[0] * max(1, MAP_BAND_PIXELS // (store.h5[name].chunks[0] * store.shape[1]))
            for y0 in range(0, store.shape[0], rows):
                store.read_dataset(name, np.s_[y0: y0 + rows])
        if full:
            height = store.shape[0]
            volume = store.h5["volume"]
            rows = band_rows(store.z_stop - store.z_start, store.shape[1], volume.chunks[1], volume.dtype.itemsize)
            for y0 in range(0, height, rows):
                try:
                    volume[:, y0: y0 + rows]
                except OSError as err:
                    raise _store_error(path, f"volume (rows {y0}:{min(y0 + rows, height)})", err) from None
    finally:
        store.close()


class Store:
    """Read-only view of one store. The HDF5 file is opened lazily, once per process, so a Store can be
    handed to DataLoader workers (fork, spawn or forkserver) and each worker opens its own handle.
    A store that cannot be read is a StoreError (here, or on the read that meets a corrupt chunk)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as h5:
                a = dict(h5.attrs)
                names = set(h5)
        except OSError as err:
            raise _store_error(self.path, None, err) from None
        if a.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format {a.get('format_version')}, this code reads "
                             f"{FORMAT_VERSION}: rebuild it with prepare.py --force")
        missing = [n for n in ("volume", "mask") + SMALL_DATASETS if n not in names]
        if missing:
            raise StoreError(f"{self.path}: not a complete store (no dataset {missing[0]}); rebuild it with prepare.py --force")
        self.fragment_id = str(a["fragment_id"])
        self.split = str(a["split"])
        self.z_start, self.z_stop = int(a["z_start"]), int(a["z_stop"])
        self.shape = (int(a["height"]), int(a["width"]))
        self.tile_size, self.stride = int(a["tile_size"]), int(a["stride"])
        self.has_labels = "labels" in names
        self.layout = str(a.get("layout", "kaggle"))
        self.source, self.fingerprint = str(a["source"]), str(a["fingerprint"])  # what it was made from (lib.runs)
        self.fragment_surface = float(a["fragment_surface"])  # in this store's slice numbers
        self.fragment_surface_confidence = float(a["fragment_surface_confidence"])
        self.low_confidence_share = float(a["low_confidence_share"])
        self.row_offset = 0  # the rows a view of the store starts at (lib.bands.RowWindow), for the surface maps
        self._h5 = None
        self._pid = None
        self._datasets = {}

    def __getstate__(self):  # never pickle an open handle
        return {**self.__dict__, "_h5": None, "_pid": None, "_datasets": {}}

    @property
    def h5(self):
        if self._pid != os.getpid():
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as err:  # replaced or damaged since __init__
                raise _store_error(self.path, None, err) from None
            self._pid = os.getpid()
            self._datasets = {}
        return self._h5

    def dataset(self, name):
        """The open h5py dataset `name`, looked up once per handle: a lookup costs more than a tile's surface read."""
        h5 = self.h5
        if name not in self._datasets:
            self._datasets[name] = h5[name]
        return self._datasets[name]

    def close(self):
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._pid = None
        self._datasets = {}

    def read_dataset(self, name, selection=()):
        """`dataset[selection]`, checked against the chunks' checksums: a StoreError naming it on failure."""
        try:
            return self.dataset(name)[selection]
        except OSError as err:
            raise _store_error(self.path, name, err) from None

    @property
    def slices(self):
        """The absolute slice numbers held, e.g. range(24, 40)."""
        return range(self.z_start, self.z_stop)

    def read_map(self, name):
        """A whole 2-D map: "mask" or "labels"."""
        return self.read_dataset(name)

    def tiles(self, tile_size=None, stride=None):
        """Tile corners for a tile size and stride (the stored index when they are the store's)."""
        tile_size, stride = tile_size or self.tile_size, stride or self.stride
        if (tile_size, stride) == (self.tile_size, self.stride):
            return self.read_dataset("tiles")
        return tile_positions(self.read_map("mask"), tile_size, stride)

    def intensity_range(self, low=1, high=99):
        """(low, high) in-mask percentiles over all kept slices, for robust normalisation."""
        levels = list(PERCENTILE_LEVELS)
        values = self.read_dataset("percentiles_all")
        return float(values[levels.index(low)]), float(values[levels.index(high)])

    def slice_percentile(self, level=50):
        """(Z,) float32: each kept slice's in-mask intensity at a PERCENTILE_LEVELS level (slice z at z - z_start)."""
        return self.read_dataset("percentiles")[:, list(PERCENTILE_LEVELS).index(level)]

    def read_tile(self, y, x, height, width, slices=None):
        """Volume window (len(slices), height, width) at (y, x) in the volume's dtype (uint8 or uint16), zero outside
        the image.

        `slices` are absolute slice numbers (default: all kept); they must lie inside the kept range.
        """
        slices = list(self.slices) if slices is None else [int(z) for z in slices]
        if not slices or min(slices) < self.z_start or max(slices) >= self.z_stop:
            raise ValueError(f"{self.path}: slices {slices} are outside the kept range {self.z_start}:{self.z_stop}")
        z_index = [z - self.z_start for z in slices]
        z0, z1 = min(z_index), max(z_index) + 1
        volume = self.dataset("volume")
        window = _clip_window(y, x, height, width, self.shape)
        whole = window is not None and window[1] == (slice(0, height), slice(0, width))  # no zeros to fill in
        out = (np.empty if whole else np.zeros)((len(slices), height, width), volume.dtype)
        if window is None:
            return out
        (ys, xs), (oy, ox) = window
        try:
            if z_index == list(range(z0, z1)):  # consecutive slices (the usual case): straight into `out`
                volume.read_direct(out, np.s_[z0:z1, ys, xs], np.s_[:, oy, ox])
            else:  # one contiguous z read (the chunk holds all of Z anyway), then pick the slices asked for
                out[:, oy, ox] = volume[z0:z1, ys, xs][[z - z0 for z in z_index]]
        except OSError as err:
            raise _store_error(self.path, "volume", err) from None
        return out

    def read_window(self, name, y, x, height, width):
        """2-D map window (height, width) uint8 at (y, x), zero outside the image."""
        out = np.zeros((height, width), np.uint8)
        window = _clip_window(y, x, height, width, self.shape)
        if window is not None:
            (ys, xs), (oy, ox) = window
            out[oy, ox] = self.read_dataset(name, (ys, xs))
        return out


def _clip_window(y, x, height, width, shape):
    """Source and destination slices of the part of a window that lies inside an image; None if none."""
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + height, shape[0]), min(x + width, shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
