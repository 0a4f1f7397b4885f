"""Sliding-window prediction of a whole fragment from its tile store.

Tiles on a stride grid are read once with every slice the models need (lib.inputs.InputReader); each becomes its
models' views (a triplet model's triplets, a stack model's window shifted by the depth TTA: InputSpec.views) x 4
rotations (test-time augmentation), run through the model in one batch, rotated back and averaged over rotations,
then combined over views. Overlapping tiles are blended with smooth weights that fall towards the tile edges, so
there are no seams. Memory is the (H, W) float32 map (or none, with a row sink as `out`: lib/bands.py) and a band
of a few tile rows, never the tiles of a fragment. Out-of-fold predictions (train.py) and submissions (submit.py)
both go through `predict_fragment`, which also runs an ensemble: every model sees each batch of tiles, read once,
whatever its family.

Keeping the model busy: background threads read and normalise the next batches while the model runs; a batch
goes to the device as the slices of its tiles (the TTA inputs are built there); on a GPU the blending of one batch
overlaps the model's work on the next.
"""
import contextlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from lib.inputs import InputReader, InputSpec, finish_batch


def member_views(specs, tta):
    """(slices to read for all members, per member: (its views as indices into those slices, how they combine)).
    Members must read their slices the same way (InputSpec.read_mode): one read serves them all."""
    modes = {spec.read_mode() for spec in specs}
    if len(modes) > 1:
        raise ValueError(f"members read their slices in different ways ({', '.join(sorted(modes))}): "
                         "predict them separately")
    own = [spec.views(tta) for spec in specs]
    slices = sorted({z for member_slices, _, _ in own for z in member_slices})
    return slices, [([[slices.index(member_slices[i]) for i in view] for view in views], combine)
                    for member_slices, views, combine in own]


def blend_weights(tile_size):
    """(T, T) weights: a raised Hann window, highest at the centre and small but positive at the edges."""
    ramp = np.sin(np.pi * (np.arange(tile_size) + 0.5) / tile_size) ** 2
    ramp = 0.02 + 0.98 * ramp
    return np.outer(ramp, ramp).astype(np.float32)


def tta_inputs(tiles, views, rotations):
    """(B, S, T, T) tiles of S slices -> (B * V * R, C, T, T): each view (C slice indices), each rotation."""
    inputs = [torch.rot90(tiles[:, list(v)], k, (2, 3)) for v in views for k in rotations]
    return torch.stack(inputs, dim=1).flatten(0, 1)


def merge_tta(probs, num_tiles, views, rotations, combine="mean"):
    """(B * V * R, 1, T, T) probabilities -> (B, T, T): rotate each back, average over rotations, then the
    mean or the max over views (`combine`)."""
    probs = probs.view(num_tiles, len(views), len(rotations), *probs.shape[-2:])
    unrotated = [torch.rot90(probs[:, :, j], -k, (2, 3)) for j, k in enumerate(rotations)]
    per_view = torch.stack(unrotated, dim=2).mean(dim=2)
    return per_view.amax(dim=1) if combine == "max" else per_view.mean(dim=1)


def read_batches(reader, positions, tile_size, batch_size, slices, readers=2, pin=False, centre_on="nominal",
                 raw=False):
    """Yield (positions, (B, len(slices), T, T) float32 tensor of `reader`'s (an InputReader) tiles) batch by batch,
    in order; with `raw`, a dict of tensors of the tiles' raw reads instead (InputReader.read_raw, batched), which
    lib.inputs.finish_batch makes those tiles of on the model's device.

    `readers` threads read ahead (at most 2 x readers batches in flight, so memory stays a few batches);
    0 reads in the calling thread. h5py releases the GIL while HDF5 reads, so reading overlaps the model's work,
    but it serialises all HDF5 calls behind one lock: reads do not run in parallel with each other (one core's
    worth of reading at most). pin=True returns page-locked tensors (fast, asynchronous copies to a GPU).
    `centre_on`: as InputReader.read's.
    """
    def read(batch):
        if raw:
            tiles = torch.utils.data.default_collate([reader.read_raw(y, x, tile_size, slices, centre_on)
                                                      for y, x in batch])
            return {name: tensor.pin_memory() for name, tensor in tiles.items()} if pin else tiles
        tiles = np.stack([reader.read(y, x, tile_size, slices, centre_on) for y, x in batch])
        return torch.from_numpy(tiles).pin_memory() if pin else torch.from_numpy(tiles)

    batches = [positions[start: start + batch_size] for start in range(0, len(positions), batch_size)]
    if readers == 0:
        yield from ((batch, read(batch)) for batch in batches)
        return
    with ThreadPoolExecutor(readers) as pool:
        pending = deque()
        for batch in batches:
            pending.append((batch, pool.submit(read, batch)))
            if len(pending) > 2 * readers:
                done, tiles = pending.popleft()
                yield done, tiles.result()
        while pending:
            done, tiles = pending.popleft()
            yield done, tiles.result()


def as_members(models, spec):
    """A single model -> [(model, 1.0, spec)]; a list of (model, weight, InputSpec) triples as it is."""
    return [(models, 1.0, spec)] if isinstance(models, torch.nn.Module) else list(models)


@torch.inference_mode()
def predict_fragment(models, store, tile_size, stride, batch_size=16, tta=True, spec=InputSpec(), device="cpu",
                     progress=False, readers=2, out=None, scale=1.0, on_device=None):
    """Probability map (H, W) float32 of one store, 0 outside its mask; with `out` ((H, W) float32), adds
    `scale` x the map into it instead (an ensemble's running sum) and returns it. `out` may also be a row sink:
    any object with add(y0, rows) that takes the finished rows y0.. ((n, W) float32, already x scale) in increasing
    y0 (lib/writers.py), so that no (H, W) map is held at all.

    `models`: one model, whose input is `spec`, or a list of (model, weight, InputSpec) sharing tile_size and
    stride, of any families that read their slices alike (member_views): the map is then sum(weight x the
    model's map), each batch of tiles read once and run through every model with its own views.
    `tta`: rot90 x 4 and, for stack models, the depth shifts (InputSpec.views). batch_size counts tiles.
    `readers`: threads reading tiles ahead (read_batches). Tiles are blended in a band of rows (BlendBand), so
    the memory beyond `out` is a few tile rows, not a second map. `on_device`: the threads only read, and the
    model's inputs are made on the device (lib.inputs.finish_batch); default: on a GPU (on a CPU numpy is faster).
    """
    device = torch.device(device)
    members = as_members(models, spec)
    slices, views = member_views([s for _, _, s in members], tta)
    rotations = (0, 1, 2, 3) if tta else (0,)
    out = np.zeros(store.shape, np.float32) if out is None else out
    reader = InputReader(store)  # also opens the file here, before any thread touches it
    band = BlendBand(reader.mask, tile_size, out, scale)
    device_weights = torch.from_numpy(band.weights).to(device)
    positions = store.tiles(tile_size, stride)
    positions = positions[np.lexsort((positions[:, 1], positions[:, 0]))]  # row by row: the band moves down only
    for model, _, _ in members:
        model.eval()
    on_gpu = device.type == "cuda"
    on_device = on_gpu if on_device is None else on_device
    autocast = torch.autocast(device.type) if on_gpu else contextlib.nullcontext()
    memory_format = torch.channels_last if on_gpu else torch.contiguous_format

    def blend(batch, weighted, arrived):
        """Add a batch's (B, T, T) probabilities x blend weights into the band, once their copy has `arrived`."""
        if arrived is not None:
            arrived.synchronize()
        for (y, x), prob in zip(batch, weighted.numpy()):
            band.add(y, x, prob)

    previous = None
    bar = tqdm(total=len(positions), unit="tile", desc=f"predict {store.fragment_id}", disable=not progress)
    with bar:
        centre_on = members[0][2].read_mode()
        for batch, tiles in read_batches(reader, positions, tile_size, batch_size, slices, readers, on_gpu, centre_on,
                                         on_device):
            if on_device:
                tiles = finish_batch(**{name: tensor.to(device, non_blocking=True) for name, tensor in tiles.items()})
            else:
                tiles = tiles.to(device, non_blocking=True)
            merged = torch.zeros((len(batch), tile_size, tile_size), device=device)
            for (model, weight, _), (own_views, combine) in zip(members, views):
                inputs = tta_inputs(tiles, own_views, rotations).contiguous(memory_format=memory_format)
                with autocast:
                    probs = torch.sigmoid(model(inputs).float())
                merged += weight * merge_tta(probs, len(batch), own_views, rotations, combine)
            weighted = (merged * device_weights).to("cpu", non_blocking=on_gpu)
            arrived = torch.cuda.Event() if on_gpu else None  # on a GPU the copy lands later: blend the
            if arrived is not None:                             # previous batch while this one runs
                arrived.record()
            if previous is not None:
                blend(*previous)
            previous = (batch, weighted, arrived)
            bar.update(len(batch))
        if previous is not None:
            blend(*previous)
    band.flush(store.shape[0])
    return out


class BlendBand:
    """Weighted sums of overlapping tiles over a band of rows [y0, y0 + rows). Tiles come row by row (their top
    rows never decrease); when one reaches below the band, the rows above its top are final: they are divided by
    their weight sum, masked and added into `out` (x scale: an (H, W) array, or a row sink's add(y0, rows)), and
    the band moves down to that tile. Rows without tiles are never added: they stay what `out` holds."""

    def __init__(self, mask, tile_size, out, scale):
        """`mask`: the fragment's PackedMap (InputReader.mask), so that finishing rows reads nothing from the store."""
        self.mask, self.tile_size, self.out, self.scale = mask, tile_size, out, np.float32(scale)
        self.height, self.width = mask.shape
        self.weights = blend_weights(tile_size)
        self.rows = 4 * tile_size  # band height: moving it copies at most a tile's rows
        self.total = np.zeros((self.rows, self.width), np.float32)
        self.weight_sum = np.zeros((self.rows, self.width), np.float32)
        self.y0 = 0

    def add(self, y, x, weighted):
        """Add a tile at (y, x): its probabilities already multiplied by self.weights."""
        if y + self.tile_size > self.y0 + self.rows:
            self.flush(y)
        h, w = min(self.tile_size, self.height - y), min(self.tile_size, self.width - x)
        r = y - self.y0
        self.total[r: r + h, x: x + w] += weighted[:h, :w]
        self.weight_sum[r: r + h, x: x + w] += self.weights[:h, :w]

    def flush(self, y):
        """Finish rows [y0, y) into `out` and move the band to start at row y (rows past the band have no tiles)."""
        done = min(y, self.height) - self.y0
        if done <= 0:
            return
        n = min(done, self.rows)
        total, weight_sum = self.total[:n], self.weight_sum[:n]
        np.divide(total, weight_sum, out=total, where=weight_sum > 0)
        total *= self.mask.rows(self.y0, self.y0 + n)
        if isinstance(self.out, np.ndarray):
            self.out[self.y0: self.y0 + n] += self.scale * total
        else:
            self.out.add(self.y0, self.scale * total)
        for array in (self.total, self.weight_sum):
            array[: self.rows - n] = array[n:].copy()
            array[self.rows - n:] = 0
        self.y0 += done
