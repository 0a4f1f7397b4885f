"""Benchmark: does the device wait for the loader and for inference? (`make bench-gpu`); writes its table into
bench/README.md, "## gpu" (on a CPU: "## gpu (CPU mode)").

Per backbone, best of --rounds: train tiles/s of model-only steps on tensors on the device (train.TrainStep) against
the real trial loop (train.train_loader over synthetic stores, augmentation, train.train_epoch); inference inputs/s
of model-only calls (12 inputs a tile) against lib.infer.predict_fragment; peak GPU memory. Then the loader alone
with and without augmentation, and packing: K trials at once (1/K GPU each, as Ray packs them), each the real loop
in its own process. SETTINGS: the full preset on a GPU; on a CPU a tiny run, one torch thread, about a minute.

    python bench/bench_gpu.py [--backbones resnet34,efficientnet-b3,mit_b2] [--steps 60] [--rounds 2] [--no-packing]
"""
import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench_common import machine, main_or_child, parser, run_child, write_table  # first: puts the repo on sys.path
import prepare
import train
from lib import synth
from lib.data import TileDataset
from lib.infer import predict_fragment
from lib.losses import build_loss
from lib.model import build_model
from lib.store import Store

FULL = train.PRESETS["full"]
SETTINGS = {
    "cuda": dict(backbones=FULL["backbones"], tile_size=FULL["tile_size"], stride=FULL["stride"], size=1024,
                 batch_size=FULL["batch_size"], infer_batch=32, steps=60, packing="1,2,4",
                 packing_backbones="resnet34,mit_b2", loader_workers="4,all"),
    "cpu": dict(backbones="tu-mobilenetv3_small_050", tile_size=64, stride=32, size=256, batch_size=4, infer_batch=4,
                steps=3, packing="1,2", packing_backbones="tu-mobilenetv3_small_050", loader_workers="0,1"),
}


def best_rate(args, work, calls):
    """Best calls/s of work() over --rounds, each after one warm-up call, the device drained around the timing."""
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    best = 0.0
    for _ in range(args.rounds):
        work()
        sync()
        started = time.perf_counter()
        for _ in range(calls):
            work()
        sync()
        best = max(best, calls / (time.perf_counter() - started))
    return best


def loader(args, workers, augment=True):
    dataset = TileDataset(sorted(Path(args.stores, "train").glob("*.h5")), args.tile_size, args.stride, augment=augment)
    return train.train_loader(dataset, args.batch_size, args.batch_size * args.steps, workers, args.device)


def new_step(backbone, args):
    model = build_model(backbone).to(args.device, memory_format=args.layout)
    return train.TrainStep(model, FULL["lr"], 10**6, train.resolve_precision(args.precision, args.device), args.compile)


def peak_gib(args):
    """Peak GPU memory in GiB since the last call (nan on a CPU)."""
    if args.device != "cuda":
        return float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return peak


def measure(backbone, args, workers):
    """One table row: model-only against real-loop training, model-only against predict_fragment inference."""
    peak_gib(args)
    step, loss_fn, batches = new_step(backbone, args), build_loss().to(args.device), loader(args, workers)
    shape = (args.batch_size, 3, args.tile_size, args.tile_size)
    images = torch.rand(shape, device=args.device).contiguous(memory_format=args.layout)
    labels = (torch.rand(shape[0], 1, *shape[2:], device=args.device) > 0.8).float()
    model_train = args.batch_size * best_rate(args, lambda: step(images, labels, loss_fn), args.steps)
    loop_train = args.batch_size * args.steps * best_rate(args, lambda: train.train_epoch(
        step, batches, loss_fn, args.device), 1)
    train_gib, model = peak_gib(args), step.model.eval()
    inputs = torch.rand(12 * args.infer_batch, *shape[1:], device=args.device).contiguous(memory_format=args.layout)
    store = Store(sorted(Path(args.stores, "test").glob("*.h5"))[0])

    def infer():
        with torch.inference_mode(), torch.autocast(args.device, enabled=args.device == "cuda"):
            torch.sigmoid(model(inputs).float())
    model_infer = len(inputs) * best_rate(args, infer, args.steps)
    fragment = 12 * len(store.tiles(args.tile_size, args.stride)) * best_rate(args, lambda: predict_fragment(
        model, store, args.tile_size, args.stride, args.infer_batch, device=args.device), 1)
    return (f"| {backbone} | {model_train:.4g} | {loop_train:.4g} | **{loop_train / model_train:.2f}** "
            f"| {model_infer:.4g} | {fragment:.4g} | **{fragment / model_infer:.2f}** "
            f"| {train_gib:.1f} / {peak_gib(args):.1f} |")


def child_loop(settings, backbone, workers):
    """One packed trial: tiles/s of the real trial loop, in its own process."""
    args = argparse.Namespace(**settings, layout=torch.channels_last if settings["device"] == "cuda" else torch.contiguous_format)
    if args.device == "cpu":
        torch.set_num_threads(1)
    step, batches = new_step(backbone, args), loader(args, workers)
    rate = best_rate(args, lambda: train.train_epoch(step, batches, build_loss().to(args.device), args.device), 1)
    return args.batch_size * args.steps * rate


def main():
    options = parser(__doc__)
    options.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    for key, value in SETTINGS["cpu"].items():
        options.add_argument(f"--{key.replace('_', '-')}", type=type(value),
                             help=f"default: {SETTINGS['cuda'][key]} on a GPU, {value} on a CPU")
    options.add_argument("--rounds", type=int, default=2, help="rounds of each timing; the best is kept")
    options.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    options.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    options.add_argument("--no-packing", dest="packing_on", action="store_false")
    args = options.parse_args()
    for key, value in SETTINGS[args.device].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.device == "cpu":  # one torch thread: on a shared CPU more spin against each other (bench/README.md)
        torch.set_num_threads(1)
    header, cpus = machine(), len(os.sched_getaffinity(0))
    args.layout = torch.channels_last if args.device == "cuda" else torch.contiguous_format
    workers = cpus - 1 if args.device == "cuda" else 0  # one trial on the whole machine, as Ray would give it
    with tempfile.TemporaryDirectory() as tmp:
        synth.generate(Path(tmp) / "synth", size=args.size, seed=0, num_slices=40, progress=False)  # stores keep 24:40
        args.stores = str(Path(tmp) / "stores")
        prepare.main(["--data", str(Path(tmp) / "synth"), "--out", args.stores, "--ids", "1,2,a",
                      "--tile-size", str(args.tile_size), "--stride", str(args.stride)])
        loaders = []
        for n in (cpus - 1 if n == "all" else int(n) for n in args.loader_workers.split(",")):
            for augment in (True, False):
                batches = loader(args, n, augment)
                rate = args.batch_size * args.steps * best_rate(args, lambda: sum(1 for _ in batches), 1)
                loaders.append(f"| {n} | {'yes' if augment else 'no'} | {rate:.4g} |")
        rows = [measure(backbone, args, workers) for backbone in args.backbones.split(",")]
        settings = {k: v for k, v in vars(args).items() if k not in ("layout", "readme")}  # for the packed trials
        packed = []
        for backbone in args.packing_backbones.split(",") if args.packing_on else []:
            for trials in map(int, args.packing.split(",")):
                each = max(0, cpus // trials - 1) if args.device == "cuda" else 0  # loader workers of each trial
                with ThreadPoolExecutor(trials) as pool:
                    rates = list(pool.map(lambda _: run_child(__file__, "loop", settings, backbone, each), range(trials)))
                packed.append(f"| {backbone} | {trials} | {sum(rates):.4g} |")
    write_table(args.readme, "gpu" if args.device == "cuda" else "gpu (CPU mode)", "\n".join([
        f"`{' '.join(['python bench/bench_gpu.py', *sys.argv[1:]])}`, {time.strftime('%Y-%m-%d')}, "
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'no GPU'}, {header}. {args.tile_size} px tiles, "
        f"train batch {args.batch_size}, {args.steps} steps, precision {train.resolve_precision(args.precision, args.device)}, "
        f"{workers} loader workers; inference {args.infer_batch} tiles x 12 inputs a call. Train tiles/s, inference inputs/s.",
        "", "| backbone | train: model only | real trial loop | ratio | infer: model only | predict_fragment | ratio "
        "| peak GiB train / infer |", "|---|---|---|---|---|---|---|---|", *rows, "",
        "| loader workers (loader alone) | augmentation | tiles/s |", "|---|---|---|", *loaders,
        *(["", "| backbone (packing: K trials at once, CPUs / K - 1 loader workers each on a GPU) | trials at once "
           "| total train tiles/s |", "|---|---|---|", *packed] if packed else [])]))


if __name__ == "__main__":
    main_or_child(main, {"loop": child_loop})
