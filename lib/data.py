"""Training tiles from tile stores, with their labels, augmented.

The inputs are a model's InputSpec (lib/inputs.py) read through InputReader, as prediction reads them: a triplet
model gets three consecutive slices drawn from the 8 centre slices, a stack model its window of `depth` slices;
both move up or down by a random depth shift of up to `max_depth_shift` slices, so that the model learns ink a
little off where the surface was found. Optional tricks of the top Kaggle solutions (z-reversal, cutout, cutmix)
are TileDataset arguments, all off by default. All randomness comes from torch's generator, which the DataLoader
seeds per worker from the main seed, so a run is deterministic given --seed.

The work is split where it is cheapest. Training on a CPU, the loader makes each tile (InputReader.read, numpy:
the geometric augmentation, one map of which pixel goes where (geometry_pixels), resampled with the read so that
only the pixels kept are flattened and normalised). Training on a GPU (`on_device`), a loader item is only what
the store holds for the tile (InputReader.read_raw: the layers as stored, the surface under each pixel) and its
random draws, and `model_batch` makes the model's inputs of the whole batch on the GPU (lib.inputs.finish_batch,
then the geometry): flattening was the loader's largest cost, which would starve a GPU, while torch's gathers on a
CPU are slower than numpy's (bench/README.md, "## loader"). Either way the tricks' boxes and the photometric part
(brightness, contrast, Gaussian noise, `photometric`) are applied to the batch on its device.
"""
import ctypes

import cv2
import numpy as np
import torch

from lib.inputs import CENTRE_SLICES, MIDDLE_TRIPLET, SURFACE_TRIPLETS, InputReader, InputSpec, finish_batch
from lib.maps import PackedMap
from lib.store import Store, mask_coverage

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_BELOW, KEEP_FREE = 32 * 2**20, 64 * 2**20  # bytes: keep_freed_memory's settings


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


def geometry_pixels(size, geometry):
    """(size, size) int32: the pixel of a (size, size) tile (its flat index) that each pixel of the tile moved by
    `geometry` (random_geometry) shows, -1 where none (0 there). Nearest neighbour (torchvision's RandomAffine
    default, and half the cost of bilinear): the warp moves the pixels' numbers exactly as it would move any
    channel, so one warp (cv2.warpAffine) of the numbers serves every channel and the label; flips and turns are
    index permutations.

    The warp comes first, then the flips and turns: the angle's distribution is symmetric, so this order gives the
    same distribution as flips first."""
    flip_y, flip_x, turns, matrix = geometry
    numbers = np.arange(1, size * size + 1, dtype=np.float32).reshape(size, size)  # exact in float32; 0: outside
    if matrix is not None:
        numbers = cv2.warpAffine(numbers, matrix, (size, size), flags=cv2.INTER_NEAREST)
    if flip_y:
        numbers = numbers[::-1]
    if flip_x:
        numbers = numbers[:, ::-1]
    return np.rot90(numbers, turns).astype(np.int32) - 1


def take_pixels(image, pixels):
    """(..., size, size) `image` (..., H, W) at `pixels` (geometry_pixels: flat indices), 0 where -1; contiguous."""
    out = image.reshape(image.shape[:-2] + (-1,)).take(np.maximum(pixels, 0), axis=-1)
    np.copyto(out, 0, where=pixels < 0)
    return out


def take_batch_pixels(images, pixels):
    """take_pixels of a batch, in torch: (B, C, T, T) `images` at (B, T, T) `pixels`."""
    index = pixels.long().clamp_(min=0).flatten(1)[:, None].expand(-1, images.shape[1], -1)
    return images.flatten(2).gather(2, index).view(images.shape).masked_fill_((pixels < 0)[:, None], 0)


class TileDataset(torch.utils.data.Dataset):
    """Tiles of train stores with their labels, for training (augment=True) or validation.

    Items are dicts of arrays, which `model_batch` makes (B, C, T, T) float32 images and (B, 1, T, T) float32 labels
    of, C the `spec`'s channels: with `on_device` (training on a GPU) the tile's InputReader.read_raw, its "label"
    and its geometry ("pixels", geometry_pixels), made the model's inputs on the device; else its "image" made here
    (InputReader.read, the geometry resampled with the read) and its "label", moved alike. Where the tricks are
    on, "cutmix" and "cutout" boxes come with them.
    Tiles less than `min_mask_fraction` inside the mask are skipped. Stores are opened lazily in whichever process
    reads them. The labels are held in memory bit-packed (PackedMap).
    """

    def __init__(self, store_paths, tile_size, stride, spec=InputSpec(), augment=True, max_depth_shift=1,
                 min_mask_fraction=0.25, skip_rows=None, only_rows=None, z_reverse=0.0, cutout=0.0, cutmix=0.0,
                 on_device=False):
        """`skip_rows` / `only_rows`: {store_path: (y0, y1)}: drop tiles overlapping those rows (a held-out
        band), or keep only tiles whose centre row lies in them (validating on that band).
        Training tricks of the top Kaggle solutions, each the probability that a tile gets it (augment only):
        `z_reverse` reverses the order of the slices, `cutout` blanks up to 2 rectangles of the image
        (coarse dropout), `cutmix` pastes a rectangle of the next tile of the batch, image and label (both after
        the geometry, on the batch)."""
        skip_rows, only_rows = skip_rows or {}, only_rows or {}
        self.stores = [Store(p) for p in store_paths]
        self.tile_size, self.spec = tile_size, spec
        self.augment, self.on_device = augment, on_device
        self.max_depth_shift = max_depth_shift
        self.z_reverse, self.cutout, self.cutmix = z_reverse, cutout, cutmix
        self.readers = [InputReader(s) for s in self.stores]
        self.labels = [PackedMap(s.read_map("labels")) for s in self.stores]
        # tiles batch together: every store's layers as many as the deepest's, as wide as the widest's
        self.layer_count = max(len(s.slices) for s in self.stores)
        self.layer_dtype = max((s.dataset("volume").dtype for s in self.stores), key=lambda d: d.itemsize)
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

    def choose_slices(self):
        """The slices of one input: a triplet model's random triplet of the centre slices (with flattened tiles,
        one of SURFACE_TRIPLETS), a stack model's window; both moved by a random depth shift (training), or the
        middle triplet and the window as they are (validation)."""
        spec, flattened = self.spec, self.spec.centre_on == "tile"
        if spec.family == "triplets":
            if not self.augment:
                return [CENTRE_SLICES[i] for i in (SURFACE_TRIPLETS[1] if flattened else MIDDLE_TRIPLET)]
            starts = [t[0] for t in SURFACE_TRIPLETS] if flattened else range(len(CENTRE_SLICES) - 2)
            first = CENTRE_SLICES[starts[int(torch.randint(0, len(starts), ()))]]
            slices = [first, first + 1, first + 2]
        else:
            slices = list(spec.window)
        if not self.augment:
            return slices
        shift = int(torch.randint(-self.max_depth_shift, self.max_depth_shift + 1, ()))
        slices = [z + shift for z in slices]
        return slices[::-1] if torch.rand(()) < self.z_reverse else slices

    def __getitem__(self, i):
        index, y, x = self.items[i]
        size, slices, pixels, item = self.tile_size, self.choose_slices(), None, {}
        if self.augment:  # the random draws in a fixed order: slices (above), cutmix, cutout, geometry
            cutmix = random_box(size, 0.25, 0.75) if torch.rand(()) < self.cutmix else (-1,) * 4
            cutout = np.full((2, 4), -1, np.int64)
            if torch.rand(()) < self.cutout:
                for hole in range(int(torch.randint(1, len(cutout) + 1, ()))):
                    cutout[hole] = random_box(size, 0.1, 0.25)
            item.update({"cutmix": np.array(cutmix, np.int64)} if self.cutmix else {})
            item.update({"cutout": cutout} if self.cutout else {})
            pixels = geometry_pixels(size, random_geometry(size))
        label, reader = self.labels[index].window(y, x, size), self.readers[index]
        if self.on_device:
            item.update(reader.read_raw(y, x, size, slices, self.spec.centre_on), label=label)
            item["layers"] = self.fit_layers(item["layers"])
            item.update({"pixels": pixels} if pixels is not None else {})
        else:
            item.update(image=reader.read(y, x, size, slices, self.spec.centre_on, pixels),
                        label=label if pixels is None else take_pixels(label, pixels))
        return item

    def fit_layers(self, layers):
        """A store's `layers` as many and as wide as the dataset's (layer_count, layer_dtype), so that its tiles
        batch with the others': the last layer repeated (what finish's clamping reads there anyway), widened."""
        if len(layers) < self.layer_count:
            layers = np.concatenate([layers, np.repeat(layers[-1:], self.layer_count - len(layers), axis=0)])
        return layers.astype(self.layer_dtype, copy=False)


def model_batch(batch, device):
    """(images (B, C, T, T) float32, labels (B, 1, T, T) float32) on `device` from a batch of TileDataset items:
    raw reads made the model's inputs there (lib.inputs.finish_batch) and moved by their geometry; then cutmix and
    cutout, as the items drew them; the images channels_last on a GPU (what its convolutions run fastest on). The
    photometric augmentation is the caller's (training only)."""
    batch = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
    labels = batch["label"][:, None].float()
    if "layers" in batch:
        images = finish_batch(batch["layers"], batch["depths"], batch["offsets"], batch["scale"])
        if "pixels" in batch:
            images, labels = take_batch_pixels(images, batch["pixels"]), take_batch_pixels(labels, batch["pixels"])
    else:
        images = batch["image"]
    if "cutmix" in batch:
        paste_boxes(images, labels, batch["cutmix"])
    if "cutout" in batch:
        blank_boxes(images, batch["cutout"])
    if images.is_cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def random_box(size, low, high):
    """(y0, y1, x0, x1) of a random rectangle with sides between low and high fractions of `size`."""
    h, w = (int(size * (low + (high - low) * float(torch.rand(())))) for _ in range(2))
    y0, x0 = int(torch.randint(0, size - h + 1, ())), int(torch.randint(0, size - w + 1, ()))
    return y0, y0 + h, x0, x0 + w


def paste_boxes(images, labels, boxes):
    """CutMix for segmentation, in place: where a tile has a box ((B, 4) y0, y1, x0, x1; -1s for none), that
    rectangle of the next tile in the batch (the last tile's: the first's), image and label, as they were."""
    others, other_labels = images.roll(-1, 0), labels.roll(-1, 0)
    for k, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        if y0 >= 0:
            images[k, :, y0:y1, x0:x1] = others[k, :, y0:y1, x0:x1]
            labels[k, :, y0:y1, x0:x1] = other_labels[k, :, y0:y1, x0:x1]


def blank_boxes(images, boxes):
    """Cutout, in place: each tile's rectangles ((B, holes, 4); -1s for none) set to the tile's mean."""
    means = images.mean(dim=(1, 2, 3)).tolist()
    for k, tile_boxes in enumerate(boxes.tolist()):
        for y0, y1, x0, x1 in tile_boxes:
            if y0 >= 0:
                images[k, :, y0:y1, x0:x1] = means[k]


def loader_worker_init(_):
    """In each DataLoader worker: OpenCV on one thread (torch already is), so that workers do not oversubscribe
    the cores with OpenCV's own thread pools; freed memory kept for reuse (keep_freed_memory)."""
    cv2.setNumThreads(1)
    keep_freed_memory()


def keep_freed_memory():
    """Make glibc's malloc serve arrays below MMAP_BELOW bytes from its heap and keep up to KEEP_FREE bytes of it
    free, in this process. By default it maps arrays above 128 kB afresh and hands them back to the kernel when
    freed, so every tile's temporaries (0.2 to 2.5 MB each) come back as new pages, zeroed one page fault at a time;
    on a virtual machine those faults can cost more than the tile's arithmetic (bench/README.md, "## loader").
    Nothing happens where the C library has no mallopt (not glibc)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_BELOW)
        mallopt(M_TRIM_THRESHOLD, KEEP_FREE)


def photometric(images, brightness=0.1, contrast=0.2, noise=0.03):
    """Brightness, contrast and Gaussian noise on a batch of images (B, C, T, T), each tile its own draw, on the
    batch's device (drawn from that device's torch generator)."""
    shape = (len(images), 1, 1, 1)
    gain = 1 + contrast * (2 * torch.rand(shape, device=images.device) - 1)
    offset = brightness * (2 * torch.rand(shape, device=images.device) - 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * gain + mean + offset + noise * torch.randn_like(images)
