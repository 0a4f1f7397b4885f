"""Benchmark: the per-tile CPU cost of training tiles (`make bench-loader`); writes "## loader" of bench/README.md.

One process, one core (1 torch thread, 1 OpenCV thread), 224 px tiles of synthetic stores:
1. Options for the augmentation, tiles/s: TileDataset without augmentation; TileDataset with it (cv2.warpAffine
   per tile, photometric left to the batch); the torchvision v2 pipeline train.py used before (rebuilt here, with
   the photometric part per tile); and the batch-side costs per tile on this CPU: `photometric` on a batch, and a
   batched affine_grid + grid_sample (image and label) as GPU-side geometric augmentation would run it.
   Each is timed in 3 rounds, interleaved, and its best round kept. Timed in CPU seconds of this process
   (time.process_time), not wall time: everything runs on one thread, and on a shared machine CPU time is what
   one core's rate is, while wall time also counts the other jobs' turns.
2. Chunk depth: the same volume written with chunks (D, 56, 56), D = 16 (the store's), 8, 4; reads of 3 slices
   (a training tile) and of 8 (an inference tile) at random grid positions with HDF5's chunk cache off.

    python bench/bench_loader.py [--tiles 300] [--size 1024]
"""
import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
from bench_common import machine  # noqa: E402
from bench_readme import write_section  # noqa: E402
from lib import synth  # noqa: E402
from lib.data import TileDataset, photometric  # noqa: E402
from lib.store import volume_compression  # noqa: E402

TILE, STRIDE = 224, 56


class TorchvisionTiles(TileDataset):
    """The augmentation train.py used before: torchvision v2 flips + RandomAffine, per-tile photometric, rot90."""

    geometric = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                            v2.RandomApply([v2.RandomAffine(degrees=10, scale=(0.9, 1.1))], p=0.5)])

    def __getitem__(self, i):
        plain = TileDataset.__getitem__(self, i)  # augment=False: the middle triplet, no geometry
        image, label = self.geometric(tv_tensors.Image(plain[0]), tv_tensors.Mask(plain[1]))
        image = photometric(image.as_subclass(torch.Tensor)[None])[0]
        k = int(torch.randint(0, 4, ()))
        return torch.rot90(image, k, (1, 2)).contiguous(), torch.rot90(label.as_subclass(torch.Tensor), k, (1, 2)).contiguous()


def batch_affine(images, labels, degrees=10, scale=(0.9, 1.1)):
    """Rotation + scale of a whole batch with one affine_grid / grid_sample (bilinear image, nearest label)."""
    n = len(images)
    angle = torch.deg2rad(degrees * (2 * torch.rand(n) - 1))
    zoom = scale[0] + (scale[1] - scale[0]) * torch.rand(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / zoom, -torch.sin(angle) / zoom
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / zoom, torch.cos(angle) / zoom
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    return F.grid_sample(images, grid, align_corners=False), F.grid_sample(labels, grid, mode="nearest", align_corners=False)


def best_rates(cases, rounds=3):
    """{name: best tiles per CPU second over `rounds` interleaved rounds} for {name: (function, tiles a call, calls)}."""
    best = dict.fromkeys(cases, 0.0)
    for _ in range(rounds):
        for name, (function, per_call, calls) in cases.items():
            function(0)
            started = time.process_time()
            for i in range(1, calls + 1):
                function(i)
            best[name] = max(best[name], per_call * calls / (time.process_time() - started))
    return best


def chunk_depth_rates(volume, tmp, reads):
    rng = np.random.default_rng(0)
    starts = rng.integers(0, (volume.shape[1] - TILE) // STRIDE + 1, (reads, 2)) * STRIDE
    firsts = rng.integers(0, volume.shape[0] - 3, reads)
    rows = []
    for depth in (16, 8, 4):
        path = Path(tmp) / f"depth{depth}.h5"
        with h5py.File(path, "w") as h5:
            h5.create_dataset("volume", data=volume, chunks=(depth, STRIDE, STRIDE), **volume_compression())
        with h5py.File(path, "r", rdcc_nbytes=0) as h5:
            data = h5["volume"]
            def window(i, z0, z1):
                return data[z0:z1, starts[i % reads, 0]: starts[i % reads, 0] + TILE, starts[i % reads, 1]: starts[i % reads, 1] + TILE]
            rates = best_rates({"3": (lambda i: window(i, firsts[i % reads], firsts[i % reads] + 3), 1, reads),
                                "8": (lambda i: window(i, 4, 12), 1, reads)})
        rows.append(f"| ({depth}, {STRIDE}, {STRIDE}) | {path.stat().st_size / 2**20:.1f} | {rates['3']:.0f} | {rates['8']:.0f} |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=300, help="tiles per round of each case")
    parser.add_argument("--size", type=int, default=1024, help="synthetic fragment size (px)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    header = machine()
    with tempfile.TemporaryDirectory() as tmp:
        data, stores = Path(tmp) / "synth", Path(tmp) / "stores"
        synth.generate(data, size=args.size, seed=0, progress=False)
        prepare.main(["--data", str(data), "--out", str(stores), "--ids", "1,2", "--tile-size", str(TILE),
                      "--stride", str(STRIDE)])
        paths = sorted((stores / "train").glob("*.h5"))
        datasets = {"TileDataset, no augmentation": TileDataset(paths, TILE, STRIDE, augment=False),
                    "TileDataset, augmentation (cv2 geometry per tile; photometric on the batch)": TileDataset(paths, TILE, STRIDE),
                    "before: torchvision v2 geometry + photometric per tile": TorchvisionTiles(paths, TILE, STRIDE, augment=False)}
        torch.manual_seed(0)
        order = torch.randperm(10**6).tolist()
        cases = {name: (lambda i, d=d: d[order[i] % len(d)], 1, args.tiles) for name, d in datasets.items()}
        images, labels = torch.rand(32, 3, TILE, TILE), (torch.rand(32, 1, TILE, TILE) > 0.5).float()
        cases["batch side on this CPU: `photometric` (batch 32)"] = (lambda i: photometric(images), 32, 10)
        cases["batch side on this CPU: affine_grid + grid_sample (batch 32)"] = (lambda i: batch_affine(images, labels), 32, 10)
        rates = best_rates(cases)
        volume = h5py.File(paths[0], "r")["volume"][:, :args.size, :args.size]
        depth_rows = chunk_depth_rates(volume, tmp, args.tiles)
    for name, rate in rates.items():
        print(f"{name}: {rate:.0f} tiles/s")
    lines = [f"Measured {date.today()}: `python bench/bench_loader.py --tiles {args.tiles} --size {args.size}` "
             f"(`make bench-loader`), {header}; one core (1 torch thread, 1 OpenCV thread), {TILE} px tiles "
             f"(stride {STRIDE}) of two synthetic {args.size} px fragments; best of 3 interleaved rounds, in CPU time.", "",
             "| per-tile CPU work | tiles per CPU second |", "|---|---|", *[f"| {n} | {r:.0f} |" for n, r in rates.items()], "",
             f"Chunk depth: reads of one {TILE} px tile at random grid positions, HDF5 chunk cache off.", "",
             "| chunk | store MiB | 3-slice reads per CPU second | 8-slice reads per CPU second |", "|---|---|---|---|", *depth_rows]
    write_section("loader", "\n".join(lines))
    print("\n".join(depth_rows))


if __name__ == "__main__":
    main()
