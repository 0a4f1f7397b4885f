"""What a model sees: which slices of a store, where they sit in depth, normalised how, in which views.

Every store holds slices of one frame (lib.depth): the recto surface at slice 32 (NOMINAL_SURFACE), papyrus below.
A model reads a tile in one of three ways (`centre_on`): the slices as stored ("nominal"); moved onto the
fragment's own surface ("fragment"); or each tile flattened onto its own surface ("tile", the default), resampled
along depth so that the surface found at each pixel (the store's surface map, lib/surface.py) is slice 32. A tile
whose surface map is unsure (mean confidence below lib.surface.MIN_CONFIDENCE: a torn sheet, debris, no edge) is
not flattened: it is read at the fragment's surface instead, or as stored when that is unsure too.

Two model families read them (`InputSpec.family`):
- "triplets", the original solution's: a 3-channel model fed three consecutive slices; prediction runs it on
  several triplets and combines them (TRIPLET_MODES);
- "stack" and "stem3d", as the top Kaggle teams did: `depth` consecutive slices around the surface (default
  12: 26..37), as the channels of the U-Net's encoder ("stack") or through a small 3-D convolutional stem pooled
  over depth ("stem3d", lib/model.py). Prediction's depth TTA shifts the window by -1, 0 and +1 slices.

Normalisation (InputReader): the fragment's in-mask 1st..99th percentile range maps to 0..1; outside the mask each
slice holds its in-mask median (so that the fragment's border and holes are not a bright edge that looks like ink);
each slice of a tile is moved so that its median sits at 0.5 (so that the slow density changes across a sheet do
not look like ink either). Training and prediction read through the same InputReader.
"""
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lib.depth import NOMINAL_SURFACE
from lib.maps import PackedMap
from lib.surface import MIN_CONFIDENCE, covered_cells, low_confidence_share, pixel_window, tile_confidence

# The model inputs' version: 1, percentile range only (until 2026-11); 2, fill and centring; 3, flattened onto the
# store's surface map, and the families. Model files record it; a model is never fed inputs of another version.
INPUT_VERSION = 3
FAMILIES = ("triplets", "stack", "stem3d")
CENTRE_ON = ("nominal", "fragment", "tile")
CENTRE_SLICES = tuple(range(28, 36))  # the triplets' 8 centre slices; slice 32 is the surface
# The original solution averages three triplets of the 8 centre slices: (1,2,3), (4,5,6), (6,7,8), 1-indexed.
TRIPLETS = ((0, 1, 2), (3, 4, 5), (5, 6, 7))
MIDDLE_TRIPLET = (2, 3, 4)  # slices 30..32: used when triplet averaging is off
# With each tile flattened onto its own surface, the triplets -1..1, 0..2 and 1..3 slices from it: the ink lies on
# the surface, and just above it little papyrus is left to vary with depth.
SURFACE_TRIPLETS = ((3, 4, 5), (4, 5, 6), (5, 6, 7))
# How the triplets' predictions become one: "mean" of the three (the original solution), their "max", the "middle"
# triplet alone, "surface": the mean on the fragment's own surface (as the 7th-place team did), or "tile": the mean
# of SURFACE_TRIPLETS on each tile flattened onto its own surface.
TRIPLET_MODES = ("mean", "max", "middle", "surface", "tile")
DEPTH_TTA = (-1, 0, 1)  # slices: a stack model's window moved up and down at prediction


@dataclass(frozen=True)
class InputSpec:
    """A model's input: its `family`, the slices it reads (`depth`, for stack and stem3d), where they sit
    (`centre_on`), and for triplet models how prediction combines the triplets (`triplets`)."""
    family: str = "stack"
    depth: int = 12
    centre_on: str = "tile"
    triplets: str = "tile"

    def __post_init__(self):
        for value, allowed, name in ((self.family, FAMILIES, "family"), (self.centre_on, CENTRE_ON, "centre_on"),
                                     (self.triplets, TRIPLET_MODES, "triplets")):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if not 2 <= self.depth <= 64:
            raise ValueError(f"depth {self.depth} is not in 2..64")

    @property
    def channels(self):
        return 3 if self.family == "triplets" else self.depth

    @property
    def window(self):
        """The slices a stack model reads (before any depth shift)."""
        first = NOMINAL_SURFACE - self.depth // 2
        return tuple(range(first, first + self.depth))

    def read_mode(self):
        """Where prediction reads the slices: triplet modes imply it (surface: the fragment's, tile: the tile's)."""
        if self.family != "triplets":
            return self.centre_on
        return {"surface": "fragment", "tile": "tile"}.get(self.triplets, "nominal")

    def views(self, tta=True):
        """(slices to read, [views: slice indices into them, one model input each], how views combine)."""
        if self.family == "triplets":
            if self.triplets == "middle":
                return list(CENTRE_SLICES), [MIDDLE_TRIPLET], "mean"
            groups = SURFACE_TRIPLETS if self.triplets == "tile" else TRIPLETS
            return list(CENTRE_SLICES), [list(g) for g in groups], "max" if self.triplets == "max" else "mean"
        shifts = DEPTH_TTA if tta else (0,)
        slices = list(range(self.window[0] + min(shifts), self.window[-1] + max(shifts) + 1))
        return slices, [[i - min(shifts) + s for i in range(self.depth)] for s in shifts], "mean"

    def as_dict(self):
        return {"version": INPUT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: d[k] for k in ("family", "depth", "centre_on", "triplets")})


def surface_shift(store):
    """Slices to move a window by so that it centres on the fragment's own surface (the store's
    fragment_surface), kept inside the store; 0 when the store's surface is unsure."""
    if store.fragment_surface_confidence < MIN_CONFIDENCE:
        return 0
    shift = int(round(store.fragment_surface - NOMINAL_SURFACE))
    return int(np.clip(shift, store.z_start - CENTRE_SLICES[0], store.z_stop - 1 - CENTRE_SLICES[-1]))


def slices_needed(spec, store, tta=True):
    """The slice numbers of `store` a model of `spec` reads: its views (with the depth TTA, the same shifts as
    training's default depth jitter), moved onto the fragment's surface where it reads there. Flattened reads are
    resampled from around these same numbers of the store's frame."""
    slices = spec.views(tta)[0]
    shift = surface_shift(store) if spec.read_mode() == "fragment" else 0
    return [z + shift for z in slices]


def unsure_share(store, tile_size, stride):
    """Share of a store's tiles (at this tile size and stride) whose surface is too unsure to flatten onto."""
    return low_confidence_share(store.read_dataset("surface_confidence"), store.tiles(tile_size, stride), tile_size)


def normalise(volume, intensity_range):
    """uint16 -> float32 with the fragment's robust (1st, 99th percentile) range mapped to 0..1 (a float32 volume
    in place)."""
    low, high = intensity_range
    out = volume.astype(np.float32, copy=False)
    out -= low  # in place: one float32 array per call, not four
    out *= 1 / max(high - low, 1.0)
    return np.clip(out, -0.5, 1.5, out=out)


class InputReader:
    """Model inputs of one store (INPUT_VERSION): tiles of chosen slices, placed in depth by `centre_on`, filled
    outside the mask, normalised and centred (see the module's docstring). Training (lib.data.TileDataset) and
    prediction (lib.infer) both read through it: `read` makes a tile's inputs here, with numpy (on a CPU the
    fastest: it flattens only the pixels kept, one gather per layer); `read_raw` reads what `finish_batch` makes the
    same inputs of on a batch, on the device the model runs on (a GPU: the loader's CPU is then left the read)."""

    def __init__(self, store):
        self.store = store
        self.intensity_range = store.intensity_range()
        low, high = self.intensity_range
        self.scale = np.array([low, 1 / max(high - low, 1.0)], np.float32)  # as normalise applies it, for read_raw
        self.mask = PackedMap(store.read_map("mask"))
        self.medians = np.round(store.slice_percentile(50)).astype(np.uint16)  # by slice - z_start
        self.shift = surface_shift(store)

    def tile_depths(self, y, x, size):
        """(size, size) float32 surface of a tile (from the store's surface map, reading only the tile's cells), or
        None where the tile is too unsure to flatten."""
        store = self.store
        y += store.row_offset  # a view of some rows of the store (lib.bands.RowWindow) reads the whole store's maps
        if tile_confidence(store.read_dataset("surface_confidence", covered_cells(y, x, size))) < MIN_CONFIDENCE:
            return None
        return pixel_window(lambda cells: store.read_dataset("surface", cells), store.dataset("surface").shape, y, x, size)

    def placement(self, y, x, size, centre_on):
        """Where a tile's slices are read: (its surface map, 0) where it is flattened (centre_on "tile", and the map
        sure enough); else (None, the whole slices to move them by: the fragment's surface shift for "fragment" and
        for an unsure "tile", 0 for "nominal")."""
        depths = self.tile_depths(y, x, size) if centre_on == "tile" else None
        return depths, 0 if centre_on == "nominal" or depths is not None else self.shift

    def read_filled(self, y, x, size, slices):
        """The store's `slices` at (y, x) as stored, each filled outside the mask with its in-mask median."""
        volume = self.store.read_tile(y, x, size, size, slices)
        outside = self.mask.window(y, x, size) == 0
        if outside.any():
            np.copyto(volume, self.medians[[z - self.store.z_start for z in slices]][:, None, None], where=outside)
        return volume

    def read_raw(self, y, x, size, slices, centre_on="nominal"):
        """What `finish_batch` makes the (len(slices), size, size) input at (y, x) of (the one `read` makes), as
        numpy arrays:
        "layers" (L, size, size): every slice of the store, as stored, filled outside the mask with its median;
        "depths" (size, size) float32: where the nominal surface (slice NOMINAL_SURFACE) lies at each pixel, in the
        store's frame: the tile's surface map (centre_on "tile"), else the fragment's surface (centre_on
        "fragment", or "tile" where the tile is too unsure to flatten) or the nominal surface, whole slices;
        "offsets" (len(slices),) int64: each slice's layer from there; "scale" (2,) float32: the fragment's
        intensity range as (low, 1 / (high - low)). Slices outside the store's are its nearest slice."""
        store = self.store
        depths, shift = self.placement(y, x, size, centre_on)
        if depths is None:
            depths = np.full((size, size), NOMINAL_SURFACE + shift, np.float32)
        return {"layers": self.read_filled(y, x, size, list(store.slices)), "depths": depths, "scale": self.scale,
                "offsets": np.asarray(slices, np.int64) - (NOMINAL_SURFACE + store.z_start)}

    def read(self, y, x, size, slices, centre_on="nominal", pixels=None):
        """(len(slices), size, size) float32 input at (y, x). Slices outside the store's are its nearest slice.

        `pixels` ((size, size) int, optional): the tile's pixels (flat indices) to return in their place, 0 where
        -1: a geometric augmentation (lib.data.geometry_pixels) resampled with the read instead of after it, so that
        only the pixels kept are flattened and normalised. The centring is the tile's own either way."""
        store = self.store
        depths, shift = self.placement(y, x, size, centre_on)
        wanted = np.clip(np.asarray(slices) + shift, store.z_start, store.z_stop - 1)
        read_slices = list(store.slices) if depths is not None else sorted(set(wanted.tolist()))
        volume = self.read_filled(y, x, size, read_slices)
        if depths is None and wanted.tolist() != read_slices:  # repeated (clamped) or reversed slices
            volume = volume[[read_slices.index(z) for z in wanted.tolist()]]
        # the centring: each slice's median over every 4th pixel each way (plenty, and 16x cheaper than all of them)
        if pixels is None:
            tile = normalise(volume if depths is None else flatten(volume, store.z_start, depths, slices),
                             self.intensity_range)
            sample = tile[:, ::4, ::4]
        else:  # the tile's own pixels for the centring, those kept for the tile
            every_4th = np.arange(0, size, 4)[:, None] * size + np.arange(0, size, 4)
            sample = normalise(_at(volume, store.z_start, depths, slices, every_4th), self.intensity_range)
            tile = normalise(_at(volume, store.z_start, depths, slices, np.maximum(pixels, 0)), self.intensity_range)
        tile += 0.5 - channel_median(sample)
        if pixels is not None:
            tile.reshape(len(tile), -1)[:, np.flatnonzero(pixels < 0)] = 0
        return tile


def _at(volume, z_start, depths, slices, pixels):
    """(len(slices),) + pixels.shape: the read's slices at `pixels` (flat indices into a plane): flattened onto
    `depths`, or as they are in `volume` (its slices already the ones asked for) where depths is None."""
    if depths is None:
        return volume.reshape(len(volume), -1).take(pixels, axis=1)
    return flatten(volume, z_start, depths, slices, pixels)


def flatten(volume, z_start, depths, slices, pixels=None):
    """(len(slices),) + shape float32: slice z of the nominal frame (NOMINAL_SURFACE the surface) sampled in a
    (Z, H, W) volume of the slices z_start.. at each pixel's `depths` ((H, W)) + (z - NOMINAL_SURFACE), linearly
    between slices, clamped to the volume; at `pixels` (flat indices into a plane, of any shape) or at every pixel
    (shape (H, W)).

    The slices' offsets from the surface are whole numbers, so every output slice shares one fraction between
    slices: one gather per layer the slices fall between (each shared by the slices on either side of it), all
    with one index (each layer's from its own first voxel), then one interpolation."""
    plane, last = volume[0].size, len(volume) - 1
    shape = depths.shape if pixels is None else np.shape(pixels)
    if pixels is None:
        pixels, depths = np.arange(plane), depths.reshape(-1)
    else:
        pixels = np.asarray(pixels, np.intp).reshape(-1)
        depths = depths.reshape(-1)[pixels]
    offsets = np.asarray(slices, np.intp) - (NOMINAL_SURFACE + z_start)
    base = np.floor(depths)
    fraction = (depths - base).astype(np.float32)
    base = base.astype(np.intp)
    lowest, highest = int(base.min()), int(base.max())
    start = (base - lowest) * plane + pixels
    flat = volume.reshape(-1)
    layers = np.arange(offsets.min(), offsets.max() + 2)  # the layer below each slice, and the one above
    values = np.empty((len(layers), len(pixels)), volume.dtype)
    for row, k in zip(values, layers.tolist()):
        if lowest + k >= 0 and highest + k <= last:  # every pixel's layer inside the volume
            np.take(flat[(lowest + k) * plane:], start, out=row, mode="clip")  # clip: straight into `row`
        else:
            np.take(flat, np.clip(base + k, 0, last) * plane + pixels, out=row, mode="clip")
    values = values.astype(np.float32)
    below = offsets - layers[0]
    if np.array_equal(below, np.arange(below[0], below[0] + len(below))):  # consecutive: views, no copies
        low, high = values[below[0]: below[-1] + 1], values[below[0] + 1: below[-1] + 2]
    else:
        low, high = values[below], values[below + 1]
    out = np.subtract(high, low)
    out *= fraction
    out += low
    return out.reshape((len(offsets),) + shape)


def channel_median(values):
    """(C, 1, 1) float32: the median of each channel of (C, ...) `values`: the same values as np.median, from a
    partition at one place and the largest value below it (np.median partitions at two places, which costs more)."""
    values = values.reshape(len(values), -1)
    middle = values.shape[1] // 2
    part = np.partition(values, middle, axis=1)
    median = part[:, middle]
    if values.shape[1] % 2 == 0:  # np.median's mean of the two middle values, in float32 as it computes it
        median = (part[:, :middle].max(axis=1) + median) / np.float32(2)
    return median[:, None, None]


def finish_batch(layers, depths, offsets, scale):
    """(B, C, T, T) float32 model inputs from a batch of read_raw's arrays (as tensors, on any device): flattened
    (`flatten_batch`), normalised by `scale` and clipped to -0.5..1.5, each slice moved so that its median over every
    4th pixel each way sits at 0.5 (the centring)."""
    tile = flatten_batch(layers, depths, offsets)
    tile -= scale[:, :1, None, None]
    tile *= scale[:, 1:, None, None]
    tile.clamp_(-0.5, 1.5)
    tile += 0.5 - batch_median(tile[:, :, ::4, ::4].flatten(2))[..., None, None]
    return tile


def flatten_batch(layers, depths, offsets):
    """(B, C, T, T) float32: channel c sampled in `layers` (B, L, T, T) at each pixel's `depths` (B, T, T) +
    offsets[:, c] layers, linearly between layers, clamped to them (the depths' fraction is 0 for slices read as
    stored). Every channel of a pixel shares its depth's fraction: one floor, two gathers."""
    base = torch.floor(depths)
    fraction = (depths - base)[:, None]
    below = base.long()[:, None] + offsets[:, :, None, None]
    last = layers.shape[1] - 1
    if layers.dtype == torch.uint16:  # through int16: torch's uint16 has few operations, on a GPU fewer still
        layers = layers.view(torch.int16).int().bitwise_and_(0xFFFF)
    volume = layers.float()
    low = volume.gather(1, below.clamp(0, last))
    tile = volume.gather(1, below.add_(1).clamp_(0, last))
    tile -= low
    tile *= fraction
    tile += low
    return tile


def batch_median(values):
    """np.median of `values` along the last dimension (with an even count, the mean of the two middle values)."""
    ordered = values.sort(dim=-1).values
    middle = values.shape[-1] // 2
    if values.shape[-1] % 2:
        return ordered[..., middle]
    return (ordered[..., middle - 1] + ordered[..., middle]) / 2
