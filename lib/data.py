"""Training tiles from tile stores: 3-slice inputs from the 8 centre slices, normalised and augmented.

The model sees 3 channels, as in the original solution: three consecutive slices drawn from the 8
centre slices (28..35, around the nominal surface 32). With centre_on="tile" (train.py's default) each tile is
first flattened onto its own surface (InputReader follow_surface: surface_depths, flatten), so that slice 32 is
the surface at every pixel; else the triplets move up or down by a random depth shift so that the model learns
ink wherever the surface lies. Optional tricks of the top Kaggle solutions (z-reversal, cutout, cutmix) are
TileDataset arguments, all off by default. All randomness comes from torch's generator, which the DataLoader
seeds per worker from the main seed, so a run is deterministic given --seed.

Augmentation is split where it is cheapest: the geometric part (flips, rot90, rotation + scale) per
tile in the loader, the same cv2.warpAffine on image and label; the photometric part (brightness,
contrast, Gaussian noise) on the whole batch after it reaches the device (`photometric`): drawing the
noise per tile was the loader's largest cost (bench/README.md, "## gpu", "feeding the GPU").
"""
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from lib.depth import NOMINAL_SURFACE  # the slice CENTRE_SLICES are centred on
from lib.store import Store, mask_coverage

CENTRE_SLICES = tuple(range(28, 36))  # the 8 centre slices; slice 32 is nominally the surface
# Inference averages three triplets of the 8 centre slices: (1,2,3), (4,5,6), (6,7,8), 1-indexed.
TRIPLETS = ((0, 1, 2), (3, 4, 5), (5, 6, 7))
MIDDLE_TRIPLET = (2, 3, 4)  # slices 30..32: used when triplet averaging is off
# With each tile flattened onto its own surface (InputReader follow_surface), the triplets -1..1, 0..2 and 1..3
# slices from it: the ink lies on the surface, and just above it little papyrus is left to vary with depth.
SURFACE_TRIPLETS = ((3, 4, 5), (4, 5, 6), (5, 6, 7))
CENTRE_ON = ("nominal", "fragment", "tile")  # where training triplets sit (TileDataset)


def surface_shift(store):
    """Slices to move CENTRE_SLICES by so that they centre on this fragment's surface: where the in-mask median
    intensity along z crosses halfway between its first and last kept slice (papyrus one side, air the other);
    0 when it never does. Kept inside the store's slices."""
    profile = store.slice_percentile(50).astype(np.float64)
    half = (profile[0] + profile[-1]) / 2
    side = np.sign(profile - half)
    crossings = np.flatnonzero(side[:-1] * side[1:] < 0)
    if len(crossings) == 0:
        return 0
    z = crossings[np.argmin(np.abs(crossings + store.z_start - NOMINAL_SURFACE))]
    a, b = profile[z] - half, profile[z + 1] - half
    surface = store.z_start + z + a / (a - b)  # linear interpolation between slices z and z + 1
    shift = int(round(surface - NOMINAL_SURFACE))
    return int(np.clip(shift, store.z_start - CENTRE_SLICES[0], store.z_stop - 1 - CENTRE_SLICES[-1]))


def triplet_slices(triplet):
    """Absolute slice numbers of a triplet of indices into CENTRE_SLICES."""
    return [CENTRE_SLICES[i] for i in triplet]


# What the models' inputs are: 1, the fragment's percentile range mapped to 0..1 (until 2026-11); 2, InputReader.
# Model files record it; a model is never fed inputs of another version (lib.runs.check_model_file).
INPUT_VERSION = 2


def normalise(volume, intensity_range):
    """uint16 -> float32 with the fragment's robust (1st, 99th percentile) range mapped to 0..1."""
    low, high = intensity_range
    out = volume.astype(np.float32)
    out -= low  # in place: one float32 array per call, not four
    out *= 1 / max(high - low, 1.0)
    return np.clip(out, -0.5, 1.5, out=out)


class PackedMap:
    """A 0/1 (H, W) map held bit-packed (1 bit a pixel: 18 MB for the largest Kaggle fragment), whose windows cost
    next to nothing, where reading one from the store decodes up to four 512 x 512 chunks."""

    def __init__(self, image):
        self.shape = image.shape
        self.bits = np.packbits(np.asarray(image, np.uint8) > 0, axis=1)

    def window(self, y, x, size):
        """(size, size) uint8 of the map at (y, x) (both >= 0), 0 outside it."""
        height, width = self.shape
        out = np.zeros((size, size), np.uint8)
        y1, x1 = min(y + size, height), min(x + size, width)
        if y1 > y and x1 > x:
            bits = np.unpackbits(self.bits[y:y1, x // 8: (x1 + 7) // 8], axis=1)
            out[: y1 - y, : x1 - x] = bits[:, x % 8: x % 8 + x1 - x]
        return out

    def rows(self, y0, y1):
        """(y1 - y0, W) uint8 of the map's rows y0..y1 (inside it)."""
        return np.unpackbits(self.bits[y0:y1], axis=1, count=self.shape[1])


class InputReader:
    """Model inputs of one store (INPUT_VERSION 2): tiles of chosen slices, normalised (`normalise`); outside the
    mask each slice is set to its own in-mask median; then each slice of the tile is moved so that its median
    sits at 0.5. Without the fill, the step from the zeros outside a fragment to the papyrus inside looks like a
    bright stroke, and the model calls the fragment's border and holes ink. Without the centring, the slow
    density variation across a sheet and the wandering surface change a tile's level as much as ink does, and
    the model calls the denser parts of a sheet ink. Training (TileDataset) and prediction (lib.infer) both read
    through it, so they see the same inputs."""

    def __init__(self, store):
        self.store = store
        self.intensity_range = store.intensity_range()
        self.mask = PackedMap(store.read_map("mask"))
        self.medians = np.round(store.slice_percentile(50)).astype(np.uint16)  # by slice - z_start

    def read(self, y, x, size, slices, follow_surface=False):
        """(len(slices), size, size) float32 input at (y, x). With `follow_surface`, every kept slice is read and
        the tile is flattened onto its own surface (surface_depths, flatten): the surface wanders within a
        fragment, and near it the papyrus-to-air edge changes a slice's intensity with depth far more than ink."""
        store = self.store
        read_slices = list(range(store.z_start, store.z_stop)) if follow_surface else list(slices)
        tile = store.read_tile(y, x, size, size, read_slices)
        outside = self.mask.window(y, x, size) == 0
        if outside.any():
            tile[:, outside] = self.medians[[z - store.z_start for z in read_slices]][:, None]
        if follow_surface:  # on the raw values: only the slices asked for become float32
            tile = flatten(tile, store.z_start, surface_depths(tile, store.z_start), slices)
        tile = normalise(tile, self.intensity_range)
        # every 4th pixel each way is plenty for a median and 16x cheaper than all of them
        tile += 0.5 - np.median(tile[:, ::4, ::4].reshape(len(tile), -1), axis=1)[:, None, None]
        return tile


SURFACE_STEP = 4  # px: each pixel's surface is found on a grid this coarse, then interpolated (it wanders slowly)
SURFACE_BLUR = 2  # grid cells: sigma of the blur that averages the noise (and most of a stroke's own ink) away


def surface_depths(volume, z_start):
    """(H, W) float32: each pixel's surface, a fractional slice number, in a (Z, H, W) volume (any dtype cv2.resize
    takes) of the slices z_start.. (papyrus below, air above): where its intensity, blurred across the sheet, first
    falls below halfway between the lowest and the highest slice (linear between slices)."""
    height, width = volume.shape[1:]
    grid = (max(1, width // SURFACE_STEP), max(1, height // SURFACE_STEP))
    smooth = np.stack([cv2.GaussianBlur(cv2.resize(s, grid, interpolation=cv2.INTER_AREA).astype(np.float32), (0, 0),
                                        SURFACE_BLUR) for s in volume])
    half = (smooth[0] + smooth[-1]) / 2
    k = np.clip(np.argmin(smooth > half, axis=0), 1, len(smooth) - 1)[None]
    above = np.take_along_axis(smooth, k - 1, 0)[0] - half
    below = np.take_along_axis(smooth, k, 0)[0] - half
    depth = z_start + k[0] - 1 + np.clip(above / np.maximum(above - below, 1e-6), 0, 1)
    return cv2.resize(depth.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def flatten(volume, z_start, depths, slices):
    """(len(slices), H, W) float32: slice z of the nominal frame (NOMINAL_SURFACE the surface) sampled in a
    (Z, H, W) volume of the slices z_start.. at each pixel's `depths` + (z - NOMINAL_SURFACE), linearly between
    slices, clamped to the volume."""
    plane = volume[0].size
    offsets = np.asarray(slices, np.float32)[:, None, None] - np.float32(NOMINAL_SURFACE + z_start)
    position = np.clip(depths[None] + offsets, 0, len(volume) - 1)
    lower = np.minimum(position.astype(np.intp), len(volume) - 2)
    index = lower * plane + np.arange(plane).reshape(volume.shape[1:])  # into the flat volume: one gather a slice
    low, high = (volume.reshape(-1).take(i).astype(np.float32) for i in (index, index + plane))
    return low + (high - low) * (position - lower.astype(np.float32))


def random_geometry(tile_size, scale=(0.9, 1.1), degrees=10, affine_p=0.5):
    """One tile's geometric augmentation from torch's generator: (flip_y, flip_x, quarter turns, 2x3 matrix of a
    rotation + scale about the centre, or None). The distributions of torchvision's RandomVerticalFlip,
    RandomHorizontalFlip, RandomApply(RandomAffine(degrees, scale=scale), p=affine_p) and a uniform rot90."""
    flip_y, flip_x, apply_affine, angle, zoom = torch.rand(5).tolist()
    turns = int(torch.randint(0, 4, ()))
    matrix = None
    if apply_affine < affine_p:
        centre = ((tile_size - 1) / 2, (tile_size - 1) / 2)
        matrix = cv2.getRotationMatrix2D(centre, degrees * (2 * angle - 1), scale[0] + (scale[1] - scale[0]) * zoom)
    return flip_y < 0.5, flip_x < 0.5, turns, matrix


def apply_geometry(image, label, geometry):
    """(C, T, T) float32 image and (T, T) label moved alike by `geometry` (random_geometry), both resampled by
    nearest neighbour (torchvision's RandomAffine default, and half the cost of bilinear), 0 outside. Returns
    contiguous arrays.

    The warp comes first, then the flips and turns (exact index permutations): the angle's distribution is
    symmetric, so this order gives the same distribution as flips first."""
    flip_y, flip_x, turns, matrix = geometry
    if matrix is not None:
        size = (image.shape[2], image.shape[1])
        image = np.stack([cv2.warpAffine(channel, matrix, size, flags=cv2.INTER_NEAREST) for channel in image])
        label = cv2.warpAffine(label, matrix, size, flags=cv2.INTER_NEAREST)
    if flip_y:
        image, label = image[:, ::-1], label[::-1]
    if flip_x:
        image, label = image[:, :, ::-1], label[:, ::-1]
    image, label = np.rot90(image, turns, (1, 2)), np.rot90(label, turns)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


class TileDataset(torch.utils.data.Dataset):
    """Tiles of train stores with their labels, for training (augment=True) or validation.

    Items are (image (3, T, T) float32, label (1, T, T) float32). augment=True moves image and label alike
    (random_geometry); the photometric augmentation is left to the batch (`photometric`). Tiles less than
    `min_mask_fraction` inside the mask are skipped. Stores are opened lazily in whichever process reads them.
    Inputs come from InputReader (as prediction's); the labels are held in memory bit-packed (PackedMap).
    """

    def __init__(self, store_paths, tile_size, stride, augment=True, max_depth_shift=2, min_mask_fraction=0.25,
                 skip_rows=None, only_rows=None, z_reverse=0.0, cutout=0.0, cutmix=0.0, centre_on="nominal"):
        """`skip_rows` / `only_rows`: {store_path: (y0, y1)}: drop tiles overlapping those rows (a held-out
        band), or keep only tiles whose centre row lies in them (validating on that band).
        Training tricks of the top Kaggle solutions, each the probability that a tile gets it (augment only):
        `z_reverse` reverses the order of the 3 slices, `cutout` blanks up to 2 rectangles of the image
        (coarse dropout), `cutmix` pastes a rectangle of another random tile, image and label.
        `centre_on`: where the 8 centre slices the triplets are drawn from sit: around the "nominal" surface
        (slice 32), moved onto each "fragment"'s own surface (surface_shift, as the "surface" triplet mode predicts),
        or onto each "tile"'s own surface (InputReader follow_surface, as the "tile" triplet mode predicts)."""
        skip_rows, only_rows = skip_rows or {}, only_rows or {}
        self.stores = [Store(p) for p in store_paths]
        self.tile_size = tile_size
        self.augment = augment
        self.max_depth_shift = max_depth_shift
        self.z_reverse, self.cutout, self.cutmix = z_reverse, cutout, cutmix
        self.readers = [InputReader(s) for s in self.stores]
        if centre_on not in CENTRE_ON:
            raise ValueError(f"centre_on {centre_on!r} is not one of {', '.join(CENTRE_ON)}")
        self.follow_surface = centre_on == "tile"
        self.shifts = [surface_shift(s) if centre_on == "fragment" else 0 for s in self.stores]
        self.labels = [PackedMap(s.read_map("labels")) for s in self.stores]
        items = []
        for index, (path, store) in enumerate(zip(store_paths, self.stores)):
            positions = store.tiles(tile_size, stride)
            keep = mask_coverage(store.read_map("mask"), positions, tile_size) >= min_mask_fraction
            if path in skip_rows:
                y0, y1 = skip_rows[path]
                keep &= (positions[:, 0] + tile_size <= y0) | (positions[:, 0] >= y1)
            if path in only_rows:
                y0, y1 = only_rows[path]
                centre = positions[:, 0] + tile_size // 2
                keep &= (centre >= y0) & (centre < y1)
            items += [(index, int(y), int(x)) for y, x in positions[keep]]
            store.close()  # workers open their own handles
        self.items = items

    def __len__(self):
        return len(self.items)

    def choose_slices(self, store, surface=0):
        """A random triplet start in the 8 centre slices (moved by `surface` slices) plus a random depth shift
        (training), or the middle triplet."""
        if not self.augment:
            return [z + surface for z in triplet_slices(SURFACE_TRIPLETS[1] if self.follow_surface else MIDDLE_TRIPLET)]
        starts = [t[0] for t in SURFACE_TRIPLETS] if self.follow_surface else range(len(CENTRE_SLICES) - 2)
        start = starts[int(torch.randint(0, len(starts), ()))]
        shift = surface + int(torch.randint(-self.max_depth_shift, self.max_depth_shift + 1, ()))
        first = min(max(CENTRE_SLICES[start] + shift, store.z_start), store.z_stop - 3)
        slices = [first, first + 1, first + 2]
        return slices[::-1] if torch.rand(()) < self.z_reverse else slices

    def read_item(self, i):
        index, y, x = self.items[i]
        slices = self.choose_slices(self.stores[index], self.shifts[index])
        image = self.readers[index].read(y, x, self.tile_size, slices, self.follow_surface)
        return image, self.labels[index].window(y, x, self.tile_size)

    def __getitem__(self, i):
        image, label = self.read_item(i)
        if self.augment and torch.rand(()) < self.cutmix:
            image, label = paste_box(image, label, *self.read_item(int(torch.randint(0, len(self.items), ()))))
        if self.augment and torch.rand(()) < self.cutout:
            image = coarse_dropout(image)
        if self.augment:
            image, label = apply_geometry(image, label, random_geometry(self.tile_size))
        return torch.from_numpy(image), torch.from_numpy(label[None].astype(np.float32))


def random_box(size, low, high):
    """(y0, y1, x0, x1) of a random rectangle with sides between low and high fractions of `size`."""
    h, w = (int(size * (low + (high - low) * float(torch.rand(())))) for _ in range(2))
    y0, x0 = int(torch.randint(0, size - h + 1, ())), int(torch.randint(0, size - w + 1, ()))
    return y0, y0 + h, x0, x0 + w


def paste_box(image, label, other_image, other_label):
    """CutMix for segmentation: a random rectangle (1/4 to 3/4 of the side) of another tile, image and label."""
    y0, y1, x0, x1 = random_box(image.shape[-1], 0.25, 0.75)
    image, label = image.copy(), label.copy()
    image[:, y0:y1, x0:x1], label[y0:y1, x0:x1] = other_image[:, y0:y1, x0:x1], other_label[y0:y1, x0:x1]
    return image, label


def coarse_dropout(image, holes=2):
    """Cutout: up to `holes` rectangles (1/10 to 1/4 of the side) set to the tile's mean; the label is kept."""
    image = image.copy()
    for _ in range(int(torch.randint(1, holes + 1, ()))):
        y0, y1, x0, x1 = random_box(image.shape[-1], 0.1, 0.25)
        image[:, y0:y1, x0:x1] = image.mean()
    return image


def loader_worker_init(_):
    """In each DataLoader worker: OpenCV on one thread (torch already is), so that workers do not oversubscribe
    the cores with OpenCV's own thread pools."""
    cv2.setNumThreads(1)


def photometric(images, brightness=0.1, contrast=0.2, noise=0.03):
    """Brightness, contrast and Gaussian noise on a batch of images (B, C, T, T), each tile its own draw, on the
    batch's device (drawn from that device's torch generator)."""
    shape = (len(images), 1, 1, 1)
    gain = 1 + contrast * (2 * torch.rand(shape, device=images.device) - 1)
    offset = brightness * (2 * torch.rand(shape, device=images.device) - 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * gain + mean + offset + noise * torch.randn_like(images)


def equal_area_bands(mask, num_bands):
    """Row ranges [(y0, y1), ...] that cut a fragment into bands holding equal mask area."""
    rows = np.cumsum(mask.astype(bool).sum(axis=1))
    cuts = [0] + [int(np.searchsorted(rows, rows[-1] * k / num_bands)) + 1 for k in range(1, num_bands)] + [len(rows)]
    return list(zip(cuts[:-1], cuts[1:]))


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: `name` (unique in a run; file names use it), the held-out train fragment
    `fragment_id`, and `rows` (y0, y1) of the band it holds out, or None for the whole fragment.

    Everything that needs the fragment of a fold reads `fragment_id`: nothing parses names."""
    name: str
    fragment_id: str
    rows: tuple = None

    def as_dict(self):
        return {"name": self.name, "fragment_id": self.fragment_id, "rows": None if self.rows is None else list(self.rows)}

    @classmethod
    def from_dict(cls, d):
        return cls(str(d["name"]), str(d["fragment_id"]), None if d["rows"] is None else tuple(int(r) for r in d["rows"]))


def make_folds(train_ids, split=None, masks=None):
    """Cross-validation folds, [Fold] in train-id order.

    Fold k holds out train fragment k. `split` = (fragment_id, K) cuts that fragment into K bands of
    equal mask area (needs `masks[fragment_id]`), each its own fold named "<id>.<band>" (1-indexed).
    """
    folds = []
    for fragment_id in train_ids:
        if split and fragment_id == split[0]:
            bands = equal_area_bands(masks[fragment_id], split[1])
            folds += [Fold(f"{fragment_id}.{k}", fragment_id, rows) for k, rows in enumerate(bands, start=1)]
        else:
            folds.append(Fold(fragment_id, fragment_id))
    names = [f.name for f in folds]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"fold name {clash[0]} is both a fragment id and a band of a split fragment")
    return folds
