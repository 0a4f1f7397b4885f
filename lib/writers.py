"""Band writers: a fragment's prediction as files, written a band of rows at a time: memory does not grow with the fragment.

The ensemble's probability sum goes first to a scratch zarr (ProbabilityScratch: float32, chunks of
lib.bands.OUTPUT_CHUNK), one band at a time, by whichever process predicted the band. finish_fragment then reads
it back band by band and writes every output from it:

    <id>_prediction.png    8-bit greyscale, round(255 p), 0 outside the mask (PngWriter: zlib, streamed)
    <id>_prediction.zarr   the same 8-bit values, chunked (ZarrWriter)
    <id>_prediction.tif    the same 8-bit values, tiled, zlib-compressed BigTIFF (TiffWriter, through tifffile)
    the CSV row            the binary mask's row-major RLE (lib.rle.RleBuilder), each band checked by decoding it
    the preview            probability | binary mask, shrunk band by band
    probs/<id>.h5          float16 probability (as lib.maps.save_probability_map writes it)

The threshold is absolute, or a percentile of the in-mask probabilities: the exact order statistic that
lib.metrics.percentile_cutoff picks from the whole map, found here in two passes over the bands (a histogram of the
floats' upper 16 bits, then of the lower 16 bits inside the upper bin that holds it). Every file is written under
a temporary name and renamed when complete. --min-component (connected components do not split into bands) takes
two passes, the first finding the components' areas across bands (lib.metrics.BandComponents), the second writing
the mask without the small ones: it holds a label and an area a component, not the mask.
"""
import contextlib
import os
import queue
import shutil
import struct
import threading
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import tifffile
import zarr

from lib.bands import OUTPUT_CHUNK, plan_bands, read_mask_rows
from lib.maps import save_preview
from lib.metrics import BandComponents, confusion_counts, top_count
from lib.rle import RleBuilder

TIFF_TILE = 256  # px: the BigTIFF's tiles (OUTPUT_CHUNK is a whole number of them)
PNG_LEVEL = 1  # zlib level of the PNG: the probability maps are mostly smooth or zero; speed matters more
PREVIEW_WIDTH = 2048  # px: the preview's width at most (lib.maps.save_preview)


def to_8bit(prob):
    """round(255 p), saturated to 0..255, as uint8 (what every 8-bit output holds)."""
    return cv2.convertScaleAbs(prob, alpha=255.0)


class ProbabilityScratch:
    """The ensemble's (H, W) float32 probability sum as a zarr on disk, written a band at a time by any process that
    can reach the path: each band is written whole (a retried band overwrites its rows) and then marked done, so
    that a run interrupted after some bands resumes with the others (when it predicts with the same `stamp`)."""

    def __init__(self, path, shape=None, stamp=None):
        """Open the scratch at `path`; with `shape`, create it, unless one of that shape and `stamp` (a string
        naming everything its values depend on) is there already: then its bands marked done are kept."""
        self.path = Path(path)
        self.marks = self.path.with_name(self.path.name + ".done")
        if shape is None:
            self.array = zarr.open_array(self.path, mode="r+")
            return
        try:
            self.array = zarr.open_array(self.path, mode="r+")
            if tuple(self.array.shape) == tuple(shape) and self.array.attrs.get("stamp") == stamp:
                return
        except (OSError, ValueError, KeyError):  # FileNotFoundError included: none there yet
            pass
        shutil.rmtree(self.marks, ignore_errors=True)
        self.array = zarr.create_array(self.path, shape=shape, dtype=np.float32, fill_value=0,
                                       chunks=(OUTPUT_CHUNK, OUTPUT_CHUNK), overwrite=True, attributes={"stamp": stamp},
                                       compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"))

    @property
    def shape(self):
        return tuple(self.array.shape)

    def write(self, y0, rows):
        """Write the band of `rows` at row y0 and mark it done."""
        self.array[y0: y0 + len(rows)] = rows
        self.marks.mkdir(exist_ok=True)
        (self.marks / f"{y0}-{y0 + len(rows)}").touch()

    def done_bands(self):
        """{(y0, y1)} of the bands written whole."""
        names = [p.name for p in self.marks.glob("*-*")] if self.marks.is_dir() else []
        return {tuple(int(v) for v in name.split("-")) for name in names}

    def read(self, y0, y1):
        return self.array[y0:y1]

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self.marks, ignore_errors=True)


def _temp(path):
    return path.with_name(f".{path.name}.tmp")


class PngWriter:
    """An 8-bit greyscale PNG written row band by row band (PIL, OpenCV and imagecodecs encode whole images only):
    the rows, each behind PNG's filter byte 0, through one zlib stream, in IDAT chunks."""

    def __init__(self, path, height, width):
        self.path, self.height, self.width, self.done = Path(path), height, width, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(_temp(self.path), "wb")
        self.file.write(b"\x89PNG\r\n\x1a\n")
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        self.stream = zlib.compressobj(PNG_LEVEL)

    def _chunk(self, tag, data):
        self.file.write(struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data)))

    def write(self, y0, rows):
        assert y0 == self.done and rows.shape[1] == self.width, "PNG rows must come in order"
        filtered = np.zeros((len(rows), self.width + 1), np.uint8)
        filtered[:, 1:] = rows
        data = self.stream.compress(filtered.tobytes())
        if data:
            self._chunk(b"IDAT", data)
        self.done += len(rows)

    def close(self):
        assert self.done == self.height, f"{self.path}: {self.done} of {self.height} rows written"
        self._chunk(b"IDAT", self.stream.flush())
        self._chunk(b"IEND", b"")
        self.file.close()
        os.replace(_temp(self.path), self.path)


class ZarrWriter:
    """A uint8 (H, W) zarr written band by band into a temporary folder, renamed when complete."""

    def __init__(self, path, height, width):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.array = zarr.create_array(_temp(self.path), shape=(height, width), dtype=np.uint8, fill_value=0,
                                       chunks=(OUTPUT_CHUNK, OUTPUT_CHUNK), overwrite=True)

    def write(self, y0, rows):
        self.array[y0: y0 + len(rows)] = rows

    def close(self):
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(_temp(self.path), self.path)


class TiffWriter:
    """A uint8 (H, W) tiled, zlib-compressed BigTIFF. tifffile writes tiles it pulls from an iterator; bands are
    pushed here, so tifffile runs in a thread pulling them from a short queue (two bands in memory at most)."""

    def __init__(self, path, height, width):
        self.path, self.width, self.error = Path(path), width, None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, args=(height,), daemon=True)
        self.thread.start()

    def _tiles(self):
        """The tiles row by row, each row of tiles cut once TIFF_TILE rows (or the last rows) have come."""
        pending = np.zeros((0, self.width), np.uint8)
        while True:
            rows = self.queue.get()
            if rows is not None:
                pending = np.concatenate([pending, rows])
            while len(pending) >= TIFF_TILE or (rows is None and len(pending)):
                for tx in range(0, self.width, TIFF_TILE):
                    tile = np.zeros((TIFF_TILE, TIFF_TILE), np.uint8)
                    part = pending[:TIFF_TILE, tx: tx + TIFF_TILE]
                    tile[: part.shape[0], : part.shape[1]] = part
                    yield tile
                pending = pending[TIFF_TILE:]
            if rows is None:
                return

    def _run(self, height):
        try:
            tifffile.imwrite(_temp(self.path), data=self._tiles(), shape=(height, self.width), dtype=np.uint8,
                             tile=(TIFF_TILE, TIFF_TILE), compression="zlib", bigtiff=True, photometric="minisblack")
        except BaseException as err:  # noqa: BLE001 - handed to the pushing thread
            self.error = err

    def _put(self, item):
        while self.thread.is_alive():
            try:
                self.queue.put(item, timeout=1)
                return
            except queue.Full:
                continue
        raise OSError(f"{self.path}: TIFF writer stopped ({self.error})")

    def write(self, y0, rows):
        self._put(rows)

    def close(self):
        with contextlib.suppress(OSError):  # the last rows' tiles; tifffile may have pulled its last tile already
            self._put(None)
        self.thread.join()
        if self.error is not None:
            raise OSError(f"{self.path}: {self.error}")
        os.replace(_temp(self.path), self.path)


class ProbabilityH5Writer:
    """float16 (H, W) dataset "prob" in HDF5, as lib.maps.save_probability_map writes it, band by band."""

    def __init__(self, path, height, width, **attrs):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.h5 = h5py.File(_temp(self.path), "w")
        self.prob = self.h5.create_dataset("prob", shape=(height, width), dtype=np.float16, compression="gzip",
                                           compression_opts=1, chunks=(min(height, 256), min(width, 256)))
        self.h5.attrs.update(attrs)

    def write(self, y0, prob):
        self.prob[y0: y0 + len(prob)] = prob.astype(np.float16)

    def close(self):
        self.h5.close()
        os.replace(_temp(self.path), self.path)


class PreviewBuilder:
    """lib.maps.save_preview's probability | binary mask panels, each band shrunk as it comes."""

    def __init__(self, height, width):
        self.scale = min(1.0, PREVIEW_WIDTH / (2 * width + 8))
        self.width = max(1, round(width * self.scale))
        self.panels = ([], [])

    def add(self, y0, prob, pred):
        if self.scale == 1:
            self.panels[0].append(prob)
            self.panels[1].append(pred)
            return
        rows = round((y0 + len(prob)) * self.scale) - round(y0 * self.scale)
        if rows > 0:
            for panel, image in zip(self.panels, (prob, pred.astype(np.float32))):
                panel.append(cv2.resize(image, (self.width, rows), interpolation=cv2.INTER_AREA))

    def save(self, path):
        save_preview(path, [np.concatenate(p) for p in self.panels])


def percentile_cutoff_in_bands(read_band, bands, percent):
    """lib.metrics.percentile_cutoff of the in-mask probabilities, exactly, in two passes over `bands`;
    read_band(y0, y1) -> (prob float32 >= 0, inside bool). float32 >= 0 orders as its bits read as uint32."""
    upper = np.zeros(1 << 16, np.int64)
    for y0, y1 in bands:
        prob, inside = read_band(y0, y1)
        upper += np.bincount(prob[inside].view(np.uint32) >> 16, minlength=1 << 16)
    count = int(upper.sum())
    if count == 0:
        return np.float32(np.inf)
    k = count - top_count(count, percent)  # the k-th smallest (from 0) is the cutoff
    cumulative = np.cumsum(upper)
    high = int(np.searchsorted(cumulative, k, side="right"))
    below = int(cumulative[high - 1]) if high else 0
    lower = np.zeros(1 << 16, np.int64)
    for y0, y1 in bands:
        prob, inside = read_band(y0, y1)
        bits = prob[inside].view(np.uint32)
        lower += np.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16)
    low = int(np.searchsorted(np.cumsum(lower), k - below, side="right"))
    return np.array([(high << 16) | low], np.uint32).view(np.float32)[0]


def finish_fragment(scratch, store, threshold, writers, rle=False, preview=None, min_component=0, truth=None):
    """Write a fragment's outputs from its scratch (module docstring), band by band.

    threshold: (mode, value) as ensemble.json's; writers: objects with write(y0, rows) and close(), given the 8-bit
    probability (or, a ProbabilityH5Writer, the float one); rle: build the CSV row; preview: the path of the preview
    PNG; truth: (H, W) labels to count against. Returns {"rle": str or None, "ink": predicted pixels, "mask": mask
    pixels, "counts": (tp, fp, fn) or None}.
    """
    height, width = scratch.shape
    bands = plan_bands(height, width, 0)

    def read_band(y0, y1):
        return scratch.read(y0, y1), read_mask_rows(store, y0, y1) != 0

    mode, value = threshold
    if mode == "absolute":
        cutoff = np.float64(value)  # as lib.metrics.binarise compares
    elif mode == "percentile":
        cutoff = percentile_cutoff_in_bands(read_band, bands, value)
    else:
        raise ValueError(f"unknown threshold mode {mode!r}")
    def binary(prob, inside):
        return ((prob >= cutoff) & inside).astype(np.uint8)

    result = {"ink": 0, "mask": 0, "counts": None if truth is None else np.zeros(3, np.int64)}
    builder = RleBuilder(width) if rle else None
    shrink = PreviewBuilder(height, width) if preview else None
    components = BandComponents() if min_component > 0 else None

    def use_pred(y0, prob, pred):
        result["ink"] += int(np.count_nonzero(pred))
        if builder is not None:
            builder.add(y0, pred)
        if shrink is not None:
            shrink.add(y0, prob, pred)
        if truth is not None:
            result["counts"] += confusion_counts(pred, truth[y0: y0 + len(pred)])

    for y0, y1 in bands:
        prob, inside = read_band(y0, y1)
        result["mask"] += int(np.count_nonzero(inside))
        for writer in writers:
            writer.write(y0, prob if isinstance(writer, ProbabilityH5Writer) else to_8bit(prob))
        pred = binary(prob, inside)
        if components is None:
            use_pred(y0, prob, pred)
        else:
            components.add(pred)
    for writer in writers:
        writer.close()
    if components is not None:
        components.count_areas(min_component)
        for index, (y0, y1) in enumerate(bands):
            prob, inside = read_band(y0, y1)
            use_pred(y0, prob, components.keep(binary(prob, inside), index))
    if shrink is not None:
        shrink.save(preview)
    result["rle"] = builder.text() if builder is not None else None
    return result
