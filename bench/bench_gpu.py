"""Benchmark: does the GPU wait for the pipeline? (`make bench-gpu`); writes "## gpu" of bench/README.md.

Per backbone at the full preset's tile size, batch and precision, best of --rounds (interleaved): train tiles/s of
model-only steps on tensors already on the device (train.TrainStep) against the real trial loop (train.train_loader
over synthetic stores, TileDataset's augmentation, loader workers, train.train_epoch); inference model inputs/s of
model-only calls (12 inputs a tile) against lib.infer.predict_fragment with TTA x triplets; ratios; peak GPU memory.
Also the loader alone at a few worker counts, and packing: K trials at once (1/K GPU each, as Ray packs them), each
the real loop in its own process with its share of the CPUs. Without a GPU it runs tiny on the CPU (about a minute,
one torch thread) so that it cannot rot, and writes "## gpu (CPU mode)".

    python bench/bench_gpu.py [--backbones resnet34,efficientnet-b3,mit_b2] [--steps 60] [--rounds 2] [--no-packing]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
import train  # noqa: E402
from bench_common import machine  # noqa: E402
from bench_readme import write_section  # noqa: E402
from lib import synth  # noqa: E402
from lib.data import TileDataset  # noqa: E402
from lib.infer import predict_fragment  # noqa: E402
from lib.losses import build_loss  # noqa: E402
from lib.model import build_model  # noqa: E402
from lib.store import Store  # noqa: E402

FULL = train.PRESETS["full"]
SETTINGS = {  # the full preset on a GPU; tiny on a CPU
    "cuda": dict(backbones=FULL["backbones"], tile_size=FULL["tile_size"], stride=FULL["stride"], size=1024,
                 batch_size=FULL["batch_size"], infer_batch=32, steps=60, packing="1,2,4",
                 packing_backbones="resnet34,mit_b2", loader_workers="4,all"),
    "cpu": dict(backbones="tu-mobilenetv3_small_050", tile_size=64, stride=32, size=256, batch_size=4, infer_batch=4,
                steps=3, packing="1,2", packing_backbones="tu-mobilenetv3_small_050", loader_workers="0,1"),
}


def timed(function, device, calls):
    """Seconds for `calls` calls after one warm-up call, the device drained before and after."""
    function()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(calls):
        function()
    sync()
    return time.perf_counter() - started


def new_step(backbone, args):
    layout = torch.channels_last if args.device == "cuda" else torch.contiguous_format
    model = build_model(backbone).to(args.device, memory_format=layout)
    return train.TrainStep(model, FULL["lr"], 10**6, train.resolve_precision(args.precision, args.device), args.compile)


def loader(args, workers):
    """train.train_loader over the train stores (TileDataset with augmentation), --steps batches an epoch."""
    dataset = TileDataset(sorted(Path(args.stores, "train").glob("*.h5")), args.tile_size, args.stride)
    return train.train_loader(dataset, args.batch_size, args.batch_size * args.steps, workers, args.device)


def epoch_rate(batches, args, step=None):
    """Tiles/s of one epoch: the real trial loop (train_epoch ends with .item(): drained), or the loader alone."""
    started = time.perf_counter()
    if step is None:
        tiles = sum(len(images) for images, _ in batches)
    else:
        _, tiles = train.train_epoch(step, batches, build_loss().to(args.device), args.device)
    return tiles / (time.perf_counter() - started)


def warm_rate(args, workers, step=None):
    """epoch_rate after one untimed epoch (worker start-up, allocation)."""
    batches = loader(args, workers)
    epoch_rate(batches, args, step)
    return epoch_rate(batches, args, step)


def best_of(rounds, cases):
    """{name: best rate over `rounds` rounds} for cases {name: function returning a rate}, interleaved so that a
    busy spell of a shared machine hits every case alike."""
    best = dict.fromkeys(cases, 0.0)
    for _ in range(rounds):
        for name, rate in cases.items():
            best[name] = max(best[name], rate())
    return best


def measure(backbone, args, workers):
    """One row of the table: train and inference rates (best of --rounds), their ratios, peak GPU memory."""
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step, loss_fn = new_step(backbone, args), build_loss().to(args.device)
    images = torch.rand(args.batch_size, 3, args.tile_size, args.tile_size, device=args.device)
    images = images.contiguous(memory_format=torch.channels_last) if cuda else images
    labels = (torch.rand(args.batch_size, 1, args.tile_size, args.tile_size, device=args.device) > 0.8).float()
    batches = loader(args, workers)
    epoch_rate(batches, args, step)  # starts the workers
    row = {"backbone": backbone, **best_of(args.rounds, {
        "model train": lambda: args.batch_size * args.steps / timed(
            lambda: step(images, labels, loss_fn), args.device, args.steps),
        "loop train": lambda: epoch_rate(batches, args, step)})}
    row["train peak GiB"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    model = step.model.eval()
    del step, images, labels, batches
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    inputs = torch.rand(12 * args.infer_batch, 3, args.tile_size, args.tile_size, device=args.device)
    inputs = inputs.contiguous(memory_format=torch.channels_last) if cuda else inputs
    autocast = torch.autocast("cuda") if cuda else torch.autocast("cpu", enabled=False)  # as predict_fragment

    def infer():
        with torch.inference_mode(), autocast:
            torch.sigmoid(model(inputs).float())
    store = Store(sorted(Path(args.stores, "test").glob("*.h5"))[0])
    tiles = len(store.tiles(args.tile_size, args.stride))
    row.update(best_of(args.rounds, {
        "model infer": lambda: 12 * args.infer_batch * args.steps / timed(infer, args.device, args.steps),
        "predict_fragment": lambda: 2 * 12 * tiles / timed(lambda: predict_fragment(
            model, store, args.tile_size, args.stride, args.infer_batch, device=args.device), args.device, 2)}))
    row["infer peak GiB"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return row


def packing(backbone, args, trials, cpus):
    """Total tiles/s of `trials` real trial loops at once, each in its own process with its share of the CPUs."""
    workers = max(0, cpus // trials - 1) if args.device == "cuda" else 0
    command = [sys.executable, __file__, "--child-loop", backbone, str(workers), *args.passthrough]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(trials)]
    rates = [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]
    if any(child.returncode for child in children):
        raise SystemExit(f"error: a packing child for {backbone} failed")
    return sum(rates)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    for key in SETTINGS["cpu"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(SETTINGS["cpu"][key]))
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each timing; the best is kept")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    parser.add_argument("--no-packing", dest="packing_on", action="store_false")
    parser.add_argument("--no-readme", dest="readme", action="store_false")
    parser.add_argument("--stores", help=argparse.SUPPRESS)  # set by the parent for --child-loop
    parser.add_argument("--child-loop", nargs=2, help=argparse.SUPPRESS)  # BACKBONE WORKERS: one packing trial
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    for key, value in SETTINGS[args.device].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.device == "cpu":  # one torch thread: on a shared CPU more spin against each other (bench/README.md)
        torch.set_num_threads(1)
    if args.child_loop:
        print(json.dumps(warm_rate(args, int(args.child_loop[1]), new_step(args.child_loop[0], args))))
        return
    cpus = len(os.sched_getaffinity(0))
    workers = cpus - 1 if args.device == "cuda" else 0  # one trial on the whole machine, as Ray would give it
    card = torch.cuda.get_device_name() if args.device == "cuda" else "no GPU (CPU mode)"
    with tempfile.TemporaryDirectory() as tmp:
        synth.generate(Path(tmp) / "synth", size=args.size, seed=0, num_slices=40, progress=False)  # stores keep 24:40
        args.stores = str(Path(tmp) / "stores")
        prepare.main(["--data", str(Path(tmp) / "synth"), "--out", args.stores, "--ids", "1,2,a",
                      "--tile-size", str(args.tile_size), "--stride", str(args.stride)])
        args.passthrough = given + ["--stores", args.stores]  # for the packing children
        loader_workers = [cpus - 1 if n == "all" else int(n) for n in args.loader_workers.split(",")]
        loaders = [(n, warm_rate(args, n)) for n in loader_workers]
        rows = [measure(backbone, args, workers) for backbone in args.backbones.split(",")]
        packed = [(backbone, trials, packing(backbone, args, trials, cpus)) for backbone in args.packing_backbones.split(",")
                  for trials in map(int, args.packing.split(","))] if args.packing_on else []
    lines = [f"Measured {date.today()}: `python bench/bench_gpu.py {' '.join(given)}` "
             f"(`make bench-gpu`) on {card}; {machine()}. {args.tile_size} px tiles, train batch {args.batch_size}, "
             f"precision {train.resolve_precision(args.precision, args.device)}, {workers} loader workers; inference "
             f"{args.infer_batch} tiles x 12 inputs a call. Rates: train tiles/s, inference model inputs/s.", "",
             "| backbone | train: model only | real trial loop | ratio | infer: model only | predict_fragment | ratio "
             "| peak GiB train / infer |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['model train']:.4g} | {r['loop train']:.4g} | **{r['loop train'] / r['model train']:.2f}** "
                     f"| {r['model infer']:.4g} | {r['predict_fragment']:.4g} | **{r['predict_fragment'] / r['model infer']:.2f}** "
                     f"| {r['train peak GiB']:.1f} / {r['infer peak GiB']:.1f} |")
    lines += ["", "Loader alone (train.train_loader, augmentation on, no model):", "",
              "| loader workers | tiles/s |", "|---|---|", *[f"| {n} | {rate:.4g} |" for n, rate in loaders]]
    if packed:
        lines += ["", "Packing: K trials at once on the one device (--gpus-per-trial 1/K), each the real trial loop in "
                  "its own process with (CPUs / K - 1) loader workers.", "",
                  "| backbone | trials at once | total train tiles/s |", "|---|---|---|"]
        lines += [f"| {backbone} | {trials} | {rate:.4g} |" for backbone, trials, rate in packed]
    print("\n".join(lines))
    if args.readme:
        write_section("gpu" if args.device == "cuda" else "gpu (CPU mode)", "\n".join(lines))


if __name__ == "__main__":
    main()
