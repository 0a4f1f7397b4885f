"""Prediction of a fragment in row bands, in memory that does not grow with the fragment's height.

A fragment is cut into bands of whole output chunks (plan_bands). A band is predicted on its own (predict_band):
for each tiling of the ensemble (tile size, stride, how slices are read) it takes the tiles that overlap its rows
and runs lib.infer.predict_fragment (through submit.predict_group) on a RowWindow, a view of only the store rows
those tiles cover (its mask, its tiles),
into a band buffer that keeps the band's own rows. So a band reads the tiles that cross its edges again (each band
blends every tile over its rows), and memory is a band's rows, however tall the fragment.

Identical to predicting the whole fragment at once, bit for bit: every pixel sums the same tiles' weighted
probabilities in the same order (tiles row by row), and each tile's probabilities come from the same batch of
tiles as in the whole-fragment run, because a band's tiles are widened to whole batches of the fragment's global
tile order (a model's output for a tile can depend on its batch-mates' count and order). So bands can run in any
order, in any process or on any node (lib/distributed.py), and the result does not depend on how many ran.
"""
import numpy as np

from lib.store import grid_starts, mask_coverage

OUTPUT_CHUNK = 512  # rows and columns of an output chunk; bands are whole chunk rows
BAND_PIXELS = 16 * 2**20  # about this many pixels a band: its float32 buffer is 64 MiB whatever the width
MIN_BAND_TILES = 8  # a band is at least this many of the largest tile tall, so that re-read edge tiles stay few


def plan_bands(height, width, tile_size, rows=None):
    """[(y0, y1)]: bands of whole OUTPUT_CHUNK rows, about BAND_PIXELS each, at least MIN_BAND_TILES tiles tall
    (or `rows` rounded up to whole chunks: more, thinner bands spread over more workers, but re-read more tiles)."""
    rows = rows or max(BAND_PIXELS // max(width, 1), MIN_BAND_TILES * tile_size)
    rows = max(1, -(-rows // OUTPUT_CHUNK)) * OUTPUT_CHUNK
    return [(y0, min(height, y0 + rows)) for y0 in range(0, height, rows)]


def read_mask_rows(store, y0, y1):
    """Rows [y0, y1) of a store's mask."""
    return store.read_dataset("mask", np.s_[y0:y1])


def tile_row_counts(store, tile_size, stride):
    """(grid row starts, tiles on each): the fragment's tile grid (lib.store.tile_positions) counted row by row,
    reading the mask a band at a time."""
    height, width = store.shape
    ys = grid_starts(height, tile_size, stride)
    counts = np.zeros(len(ys), np.int64)
    step = max(1, BAND_PIXELS // max(width, 1) // stride)  # grid rows per mask read
    for first in range(0, len(ys), step):
        rows = ys[first: first + step]
        counts[first: first + step] = [len(p) for p in _tiles_of_rows(store, rows, tile_size, stride)]
    return ys, counts


def _tiles_of_rows(store, rows, tile_size, stride):
    """For each grid row start in `rows` (ascending), its tiles' (N, 2) top-left corners, x ascending."""
    height, width = store.shape
    top, bottom = int(rows[0]), min(height, int(rows[-1]) + tile_size)
    mask = read_mask_rows(store, top, bottom)
    xs = grid_starts(width, tile_size, stride)
    grid = np.stack(np.meshgrid(np.asarray(rows) - top, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    inside = (mask_coverage(mask, grid, tile_size) > 0).reshape(len(rows), len(xs))
    return [np.stack([np.full(int(keep.sum()), y), xs[keep]], axis=1).astype(np.int32) for y, keep in zip(rows, inside)]


def band_tiles(store, band, tile_size, stride, batch_size, row_counts):
    """The tiles a band needs, in the fragment's global order: those overlapping its rows, widened to whole batches
    of `batch_size` of the global order (module docstring). (N, 2) top-left corners; `row_counts`: tile_row_counts."""
    ys, counts = row_counts
    y0, y1 = band
    overlapping = np.flatnonzero((ys + tile_size > y0) & (ys < y1) & (counts > 0))
    if len(overlapping) == 0:
        return np.zeros((0, 2), np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)])  # global index of each grid row's first tile
    first, last = starts[overlapping[0]], starts[overlapping[-1] + 1]
    first, last = first // batch_size * batch_size, min(starts[-1], -(-last // batch_size) * batch_size)
    r0 = np.searchsorted(starts, first, side="right") - 1  # grid rows holding global tiles first .. last - 1
    r1 = np.searchsorted(starts, last - 1, side="right") - 1
    rows = [r for r in range(r0, r1 + 1) if counts[r] > 0]
    tiles = np.concatenate(_tiles_of_rows(store, ys[rows], tile_size, stride))
    return tiles[first - starts[r0]: last - starts[r0]]


class RowWindow:
    """A store seen through rows [y0, y1): its shape, mask, tiles (the given ones) and reads are the window's,
    in window coordinates; everything else (percentiles, slices, ids) is the store's."""

    def __init__(self, store, y0, y1, positions):
        self.store, self.y0, self.y1 = store, y0, y1
        self.row_offset = store.row_offset + y0
        self.shape = (y1 - y0, store.shape[1])
        self.positions = np.asarray(positions, np.int32) - np.array([y0, 0], np.int32)

    def __getattr__(self, name):
        return getattr(self.store, name)

    def tiles(self, tile_size=None, stride=None):
        return self.positions

    def read_map(self, name):
        return self.store.read_dataset(name, np.s_[self.y0: self.y1])

    def read_tile(self, y, x, height, width, slices=None):
        return self.store.read_tile(y + self.y0, x, height, width, slices)

    def read_window(self, name, y, x, height, width):
        return self.store.read_window(name, y + self.y0, x, height, width)


class BandBuffer:
    """The rows [y0, y1) of an ensemble's probability sum, a row sink (lib.infer.predict_fragment's `out`) for a
    window starting at row `offset`: rows outside the band are dropped."""

    def __init__(self, band, width):
        self.y0, self.y1 = band
        self.rows = np.zeros((self.y1 - self.y0, width), np.float32)
        self.offset = 0

    def add(self, y, rows):
        y = y + self.offset
        lo, hi = max(y, self.y0), min(y + len(rows), self.y1)
        if lo < hi:
            self.rows[lo - self.y0: hi - self.y0] += rows[lo - y: hi - y]


def predict_band(groups, store, band, row_counts, predict_group, batch_size):
    """(y1 - y0, W) float32: the ensemble's probability sum on the band's rows. `groups`: {(tile size, stride, ...):
    models} (submit.tiling_groups); `row_counts`: {group key: tile_row_counts}; predict_group(models, window, key,
    out) adds a group's prediction of a store (here a RowWindow) into `out` (submit.predict_group), `batch_size`
    tiles a batch (the band's tiles are widened to whole batches of that many)."""
    buffer = BandBuffer(band, store.shape[1])
    for key, models in groups.items():
        tile_size, stride = key[:2]
        positions = band_tiles(store, band, tile_size, stride, batch_size, row_counts[key])
        if len(positions) == 0:
            continue
        top, bottom = int(positions[0, 0]), min(store.shape[0], int(positions[-1, 0]) + tile_size)
        buffer.offset = top
        predict_group(models, RowWindow(store, top, bottom, positions), key, buffer)
    return buffer.rows
