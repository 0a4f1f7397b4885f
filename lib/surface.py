"""Where the inked surface lies: which way a fragment's depth runs, the fragment's surface, and each pixel's.

Models read slices in one frame: the recto (inked) surface at slice 32 (lib.depth.NOMINAL_SURFACE), papyrus below
it, air above. Real scans do not all look like that: Kaggle fragments are a thick body of several layers below the
surface, a scroll segment is a thin sheet with air (or the neighbouring wraps of the scroll, or debris) on both
sides, and a segment's depth runs either way. One edge finder serves every question asked here, so that they
cannot disagree: along depth, the intensity falls steeply where papyrus meets air, and the inked surface is the
edge of that kind nearest where the surface is expected.

- `orientation` (a fragment's mean profile): the strong edge nearest the middle of the stack is the surface; if
  intensity rises there going up (air below, papyrus above), the depth runs the other way. Evidence is the margin,
  in slices, by which that edge is nearer the middle than the nearest strong edge of the other direction: a sheet
  centred on the middle has both at the same distance, and then nothing is decided.
- `fragment_surface` (a fragment's mean profile): the falling edge nearest the middle.
- `surface_map` (a store's volume, on a 4 px grid): each pixel's falling edge nearest the fragment's surface, with a
  confidence: the edge's fall as a share of what a clean papyrus-to-air edge falls (NaN off the papyrus). Where it
  is low (no edge: the sheet is torn, debris, a neighbour), the map holds the fragment's surface.
Edges are found between slices: the fall between slices k and k + 1, refined to a fraction of a slice by a
parabola through the falls around its peak.
"""
from dataclasses import dataclass

import cv2
import numpy as np

STRONG_EDGE = 0.3  # an edge counts for orientation when it falls (or rises) at least this share of the steepest
MIN_FALL = 0.06  # an edge falls at least this share of the papyrus-air contrast per slice (noise falls less)
CLEAN_FALL = 0.2  # what a clean edge falls per slice, as a share of the contrast: confidence 1 at or above it
CLEAR_MARGIN = 1.5  # slices: orientation is decided when the deciding edge is this much nearer the middle
SURFACE_STEP = 4  # px: each pixel's surface is found on a grid this coarse, then interpolated (it wanders slowly)
SURFACE_BLUR = 2  # grid cells: sigma of the blur that averages the noise (and most of a stroke's own ink) away
MIN_CONFIDENCE = 0.5  # a tile whose mean surface confidence is below this is not flattened


def edge_positions(profiles, sign=1, min_fall=0.0):
    """Edges along axis 0 of `profiles` ((Z,) or (Z, N)): (positions (K, ...) fractional slice numbers, falls (K, ...))
    of every local peak of sign x (p[k] - p[k + 1]) (sign 1: falling edges, -1: rising), NaN where a k is no peak
    or falls less than `min_fall`; K = Z - 1."""
    falls = sign * (profiles[:-1] - profiles[1:]).astype(np.float32)
    padded = np.concatenate([np.full_like(falls[:1], -np.inf), falls, np.full_like(falls[:1], -np.inf)])
    left, right = padded[:-2], padded[2:]
    peak = (falls >= left) & (falls > right) & (falls >= min_fall) & (falls > 0)
    left, right = np.where(np.isfinite(left), left, falls), np.where(np.isfinite(right), right, falls)
    curvature = left - 2 * falls + right
    offset = np.where(curvature < 0, 0.5 * (left - right) / np.where(curvature < 0, curvature, -1), 0)
    k = np.arange(len(falls), dtype=np.float32).reshape((-1,) + (1,) * (falls.ndim - 1))
    positions = np.where(peak, k + 0.5 + np.clip(offset, -0.5, 0.5), np.nan)
    return positions, np.where(peak, falls, np.nan)


def nearest_edge(profiles, expected, sign=1, min_fall=0.0, relative=STRONG_EDGE):
    """(position, fall) of the edge (edge_positions) nearest `expected` along axis 0, among those falling at least
    `relative` x the steepest of their profile (a minor wiggle beside the real edge is no edge); NaN, 0 where there
    is none."""
    positions, falls = edge_positions(profiles, sign, min_fall)
    strong = falls >= relative * np.nanmax(np.where(np.isnan(falls), 0, falls), axis=0, keepdims=True)
    positions = np.where(strong, positions, np.nan)
    distance = np.where(np.isnan(positions), np.inf, np.abs(positions - expected))
    best = np.argmin(distance, axis=0)[None]
    position = np.take_along_axis(positions, best, 0)[0]
    return position, np.nan_to_num(np.take_along_axis(falls, best, 0)[0])


@dataclass(frozen=True)
class Orientation:
    """What a fragment's profile says about its depth: `reverse` (air below the surface: flip it), `surface` (the
    deciding edge, in the profile's slice numbers), `margin` (slices by which that edge is nearer the middle than
    any strong edge of the other direction; inf when there is none, 0 when there is no edge at all)."""
    reverse: bool
    surface: float
    margin: float

    @property
    def clear(self):
        return self.margin >= CLEAR_MARGIN

    def describe(self):
        if self.margin == 0:
            return "no papyrus-to-air edge in its mean intensity along depth"
        way = "air below, papyrus above: reversed" if self.reverse else "papyrus below, air above: upright"
        other = "no edge the other way" if np.isinf(self.margin) else \
            f"{self.margin:.1f} slices nearer the middle than any edge the other way"
        return f"{way} (its surface edge at layer {self.surface:.1f} is {other})"


def orientation(profile, middle=None):
    """Orientation of a mean intensity profile along depth (source order); `middle` defaults to the middle layer."""
    profile = np.asarray(profile, np.float64)
    middle = (len(profile) - 1) / 2 if middle is None else middle
    steepest = np.abs(np.diff(profile)).max(initial=0.0)
    contrast = profile.max(initial=0.0) - profile.min(initial=0.0)
    threshold = max(STRONG_EDGE * steepest, MIN_FALL * contrast)
    if steepest <= 0:
        return Orientation(False, float(middle), 0.0)
    found = {sign: nearest_edge(profile, middle, sign, threshold)[0] for sign in (1, -1)}
    distance = {sign: abs(float(p) - middle) if np.isfinite(p) else np.inf for sign, p in found.items()}
    sign = 1 if distance[1] <= distance[-1] else -1
    if np.isinf(distance[sign]):
        return Orientation(False, float(middle), 0.0)
    return Orientation(sign == -1, float(found[sign]), distance[-sign] - distance[sign])


def fragment_surface(profile, middle):
    """(surface, confidence) of a mean intensity profile in stored order (papyrus below): the falling edge nearest
    `middle`; (NaN, 0) when there is none."""
    profile = np.asarray(profile, np.float64)
    contrast = profile.max(initial=0.0) - profile.min(initial=0.0)
    threshold = max(STRONG_EDGE * np.diff(-profile).max(initial=0.0), MIN_FALL * contrast, 1e-9)
    position, fall = nearest_edge(profile, middle, 1, threshold)
    return float(position), float(min(1.0, fall / max(CLEAN_FALL * contrast, 1e-9)))


def grid_shape(shape):
    """(rows, columns) of the SURFACE_STEP grid over an image of `shape`."""
    return -(-shape[0] // SURFACE_STEP), -(-shape[1] // SURFACE_STEP)


def surface_grid(volume, mask, z_start, expected, contrast):
    """(depth, confidence), each (H / SURFACE_STEP, W / SURFACE_STEP) float32, of a (Z, H, W) volume of the slices
    z_start.. (papyrus below) and its (H, W) mask: each grid cell's falling edge nearest `expected` (a slice number)
    in the slices blurred across the sheet, over the papyrus only (outside the mask the intensity says nothing
    about this sheet's depth); cells with no edge hold `expected` at confidence 0, and cells with no papyrus near
    them confidence NaN (they say nothing either way). `contrast`: the fragment's papyrus-minus-air intensity."""
    grid = grid_shape(volume.shape[1:])
    pad = ((0, grid[0] * SURFACE_STEP - volume.shape[1]), (0, grid[1] * SURFACE_STEP - volume.shape[2]))

    def blur(image):  # padded to whole cells (zero weight there), so that a cell is always SURFACE_STEP px square
        cells = cv2.resize(np.pad(image, pad), grid[::-1], interpolation=cv2.INTER_AREA)
        return cv2.GaussianBlur(cells, (0, 0), SURFACE_BLUR)

    inside = np.asarray(mask, np.float32)
    weight = blur(inside)
    cells = np.stack([blur(s.astype(np.float32) * inside) for s in volume]) / np.maximum(weight, 1e-6)
    position, fall = nearest_edge(cells, expected - z_start, 1, MIN_FALL * contrast)
    papyrus = weight > 0.05
    found = ~np.isnan(position) & papyrus
    confidence = np.where(found, np.minimum(1.0, fall / max(CLEAN_FALL * contrast, 1e-9)), 0)
    depth = np.where(found, position + z_start, expected).astype(np.float32)
    return depth, np.where(papyrus, confidence, np.nan).astype(np.float32)


def surface_map(read_rows, shape, z_start, expected, contrast, band_rows=512):
    """surface_grid over a whole fragment in bands of rows (bounded memory): `read_rows(y0, y1)` returns the
    (Z, y1 - y0, W) volume and the (y1 - y0, W) mask of those rows. Bands overlap by enough rows that the blur sees
    the same neighbours as on the whole image."""
    height = shape[0]
    band = max(SURFACE_STEP, band_rows // SURFACE_STEP * SURFACE_STEP)
    margin = SURFACE_STEP * 4 * SURFACE_BLUR
    rows, columns = grid_shape(shape)
    depth, confidence = np.empty((rows, columns), np.float32), np.empty((rows, columns), np.float32)
    for y0 in range(0, height, band):
        a, b = max(0, y0 - margin), min(height, y0 + band + margin)
        d, c = surface_grid(*read_rows(a, b), z_start, expected, contrast)
        g0, g1 = y0 // SURFACE_STEP, min(rows, (y0 + band) // SURFACE_STEP)
        part = slice(g0 - a // SURFACE_STEP, g1 - a // SURFACE_STEP)
        depth[g0:g1], confidence[g0:g1] = d[part], c[part]
    return depth, confidence


def pixel_window(read, grid, y, x, size):
    """(size, size) float32 of a SURFACE_STEP grid map of `grid` (rows, columns) cells at the pixels of the window
    at (y, x), bilinear between cell centres (edge cells held beyond the map). `read(selection)` returns the cells
    of a (rows, columns) slice selection (from a store: a tile reads only its own)."""
    rows, columns = grid
    g0, h0 = max(0, y // SURFACE_STEP - 1), max(0, x // SURFACE_STEP - 1)
    part = np.asarray(read(np.s_[g0: min(rows, (y + size) // SURFACE_STEP + 2),
                                 h0: min(columns, (x + size) // SURFACE_STEP + 2)]), np.float32)
    pixels = cv2.resize(part, (part.shape[1] * SURFACE_STEP, part.shape[0] * SURFACE_STEP),
                        interpolation=cv2.INTER_LINEAR)
    oy, ox = y - g0 * SURFACE_STEP, x - h0 * SURFACE_STEP
    window = pixels[max(oy, 0): oy + size, max(ox, 0): ox + size]
    pad = ((max(-oy, 0), size - window.shape[0] - max(-oy, 0)), (max(-ox, 0), size - window.shape[1] - max(-ox, 0)))
    return np.pad(window, pad, mode="edge") if any(p for side in pad for p in side) else window


def covered_cells(y, x, size):
    """The (rows, columns) slice selection of the grid cells a window at (y, x) of `size` px covers."""
    return np.s_[max(0, y) // SURFACE_STEP: -(-(y + size) // SURFACE_STEP),
                 max(0, x) // SURFACE_STEP: -(-(x + size) // SURFACE_STEP)]


def tile_confidence(cells):
    """Mean surface confidence of a tile's grid cells on the papyrus (NaN cells are off it); 1 when none are."""
    cells = np.asarray(cells, np.float32)
    return float(np.nanmean(cells)) if np.isfinite(cells).any() else 1.0


def low_confidence_share(confidence, positions, tile_size):
    """Share of the tiles at `positions` whose mean surface confidence (tile_confidence) is below MIN_CONFIDENCE:
    the tiles that will not be flattened."""
    if len(positions) == 0:
        return 0.0
    return float(np.mean([tile_confidence(confidence[covered_cells(y, x, tile_size)]) < MIN_CONFIDENCE
                          for y, x in positions]))
