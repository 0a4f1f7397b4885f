"""Benchmark: does the real tile loader keep up with training? (`make bench-train`)

Trains the same model for the same number of steps twice in one process: once fed by the real
DataLoader over HDF5 stores (TileDataset with augmentation, as train.py does), once on the same
batches already in memory. Prints tiles/s of each and their ratio (target >= 0.9), and writes the
table into bench/README.md under "## train".

    python bench/bench_train.py [--tile-size 224] [--backbone resnet18] [--workers 1] [--steps 12]
"""
import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
from lib import synth  # noqa: E402
from lib.data import TileDataset  # noqa: E402
from lib.losses import build_loss  # noqa: E402
from lib.model import build_model  # noqa: E402
from bench_readme import write_section  # noqa: E402


def timed_steps(model, optimizer, loss_fn, batches):
    """Train on an iterable of batches; return (tiles, seconds) after one warm-up step."""
    tiles, started = 0, None
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()
        if started is None:
            started = time.perf_counter()  # the first step pays for allocation and the loader's start
            continue
        tiles += len(images)
    return tiles, time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads() - args.workers))  # the loader's workers get their own cores
    with tempfile.TemporaryDirectory() as tmp:
        data, stores = Path(tmp) / "synth", Path(tmp) / "stores"
        synth.generate(data, size=1024, seed=0, progress=False)
        prepare.main(["--data", str(data), "--out", str(stores), "--ids", "1,2",
                      "--tile-size", str(args.tile_size), "--stride", str(args.tile_size // 2)])
        dataset = TileDataset(sorted((stores / "train").glob("*.h5")), args.tile_size, args.tile_size // 2)
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=args.steps * args.batch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                             num_workers=args.workers, persistent_workers=False,
                                             multiprocessing_context="forkserver" if args.workers else None)
        torch.manual_seed(0)
        in_memory = [next(iter(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)))
                     for _ in range(args.steps)]
        results = {}
        for name, batches in (("real loader (HDF5, augmentation)", loader), ("tensors in memory", in_memory)):
            torch.manual_seed(0)
            model = build_model(args.backbone)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            tiles, seconds = timed_steps(model, optimizer, build_loss(), batches)
            results[name] = tiles / seconds
            print(f"{name}: {tiles / seconds:.1f} tiles/s")
    loader_rate, memory_rate = results.values()
    ratio = loader_rate / memory_rate
    lines = [
        f"Measured {date.today()} on this 2-core CPU machine (no GPU): `make bench-train` "
        f"(`python bench/bench_train.py --tile-size {args.tile_size} --backbone {args.backbone} "
        f"--workers {args.workers} --steps {args.steps}`), Unet-{args.backbone}, batch {args.batch_size}, "
        f"{args.tile_size} px tiles from a 1024 px synthetic fragment, {args.workers} loader worker(s).",
        "",
        "| feed | tiles/s |",
        "|---|---|",
        *[f"| {name} | {rate:.1f} |" for name, rate in results.items()],
        f"| **ratio loader / memory** | **{ratio:.2f}** (target >= 0.9) |",
    ]
    write_section("train", "\n".join(lines))
    print(f"ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
