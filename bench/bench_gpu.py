"""Benchmark: does the device wait for the loader and for inference? (`make bench-gpu`; on a CPU a tiny run with one
torch thread). Writes bench/README.md's table "gpu" or "gpu (CPU mode)"; that section says what each column is."""
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench_common import in_fresh_process, parser, stamp, write_tables  # first: puts the repo on sys.path
import prepare
import train
from lib import synth
from lib.data import TileDataset
from lib.infer import predict_fragment
from lib.losses import build_loss
from lib.model import build_model
from lib.store import Store

FULL = train.PRESETS["full"]
SETTINGS = {  # per device: the full preset on a GPU, a tiny run on a CPU
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
    defaults = train.parse_args([])  # the tiles as a trial reads them: flattened by default
    dataset = TileDataset(sorted(Path(args.stores, "train").glob("*.h5")), args.tile_size, args.stride, augment=augment,
                          centre_on=defaults.centre_on, max_depth_shift=defaults.depth_jitter)
    return train.train_loader(dataset, args.batch_size, args.batch_size * args.steps, workers, args.device)


def new_step(args, backbone):
    model = build_model(backbone).to(args.device, memory_format=args.layout)
    return train.TrainStep(model, FULL["lr"], 10**6, train.resolve_precision(args.precision, args.device), args.compile)


def loop_rate(args, step, workers):
    """Train tiles/s of the real trial loop: train.train_loader with augmentation, train.train_epoch."""
    batches, loss_fn = loader(args, workers), build_loss().to(args.device)
    rate = best_rate(args, lambda: train.train_epoch(step, batches, loss_fn, args.device), 1)
    return args.batch_size * args.steps * rate


def keep(table, row):
    """Add a row to a table and print it at once: a run stopped at its time limit still shows what it measured."""
    table.append(row)
    print(row, flush=True)


def peak_gib(args):
    """Peak GPU memory in GiB since the last call (nan on a CPU)."""
    if args.device != "cuda":
        return float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return peak


def packed_trial(args, backbone, workers):
    """One of K trials at once: the real loop in this fresh process."""
    if args.device == "cpu":  # as in main
        torch.set_num_threads(1)
    return loop_rate(args, new_step(args, backbone), workers)


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = parser(__doc__, dict(**SETTINGS[device], rounds=2, compile=False))
    options.add_argument("--device", default=device, choices=SETTINGS)
    options.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    options.add_argument("--no-packing", dest="packing_on", action="store_false")
    options.set_defaults(**SETTINGS[options.parse_known_args()[0].device])  # --device cpu on a GPU: the CPU defaults
    args = options.parse_args()
    cuda, cpus = args.device == "cuda", len(os.sched_getaffinity(0))
    if not cuda:  # one torch thread: on a shared CPU more spin against each other (bench/README.md)
        torch.set_num_threads(1)
    line = stamp(" ".join(["python bench/bench_gpu.py", *sys.argv[1:]]),
                 torch.cuda.get_device_name() if cuda else "no GPU")
    args.layout = torch.channels_last if cuda else torch.contiguous_format
    workers = cpus - 1 if cuda else 0  # one trial on the whole machine, as Ray would give it
    rows, loaders, packed = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        synth.generate(Path(tmp) / "synth", size=args.size, seed=0, num_slices=40, progress=False)  # stores keep 24:40
        args.stores = str(Path(tmp) / "stores")
        prepare.main(["--data", str(Path(tmp) / "synth"), "--out", args.stores, "--ids", "1,2,a",
                      "--tile-size", str(args.tile_size), "--stride", str(args.stride)])
        for n in (cpus - 1 if n == "all" else int(n) for n in args.loader_workers.split(",")):
            for augment in (True, False):
                batches = loader(args, n, augment)
                rate = args.batch_size * args.steps * best_rate(args, lambda: sum(1 for _ in batches), 1)
                keep(loaders, f"{n} | {'yes' if augment else 'no'} | {rate:.4g}")
        for backbone in args.backbones.split(","):  # model only against the real loop, in training and inference
            peak_gib(args)
            step, loss_fn = new_step(args, backbone), build_loss().to(args.device)
            shape = (args.batch_size, 3, args.tile_size, args.tile_size)
            images = torch.rand(shape, device=args.device).contiguous(memory_format=args.layout)
            labels = (torch.rand(shape[0], 1, *shape[2:], device=args.device) > 0.8).float()
            model_train = args.batch_size * best_rate(args, lambda: step(images, labels, loss_fn), args.steps)
            loop_train, train_gib, model = loop_rate(args, step, workers), peak_gib(args), step.model.eval()
            inputs = torch.rand(12 * args.infer_batch, *shape[1:], device=args.device)
            inputs = inputs.contiguous(memory_format=args.layout)
            with torch.inference_mode(), torch.autocast(args.device, enabled=cuda):
                model_infer = len(inputs) * best_rate(args, lambda: torch.sigmoid(model(inputs).float()), args.steps)
            store = Store(sorted(Path(args.stores, "test").glob("*.h5"))[0])
            fragment = 12 * len(store.tiles(args.tile_size, args.stride)) * best_rate(args, lambda: predict_fragment(
                model, store, args.tile_size, args.stride, args.infer_batch, device=args.device), 1)
            keep(rows, f"{backbone} | {model_train:.4g} | {loop_train:.4g} | **{loop_train / model_train:.2f}** | "
                        f"{model_infer:.4g} | {fragment:.4g} | **{fragment / model_infer:.2f}** | "
                        f"{train_gib:.1f} / {peak_gib(args):.1f}")
        for backbone in args.packing_backbones.split(",") if args.packing_on else []:
            for trials in map(int, args.packing.split(",")):
                each = max(0, cpus // trials - 1) if cuda else 0  # loader workers of each trial
                with ThreadPoolExecutor(trials) as pool:
                    rates = pool.map(lambda _: in_fresh_process(packed_trial, args, backbone, each), range(trials))
                    keep(packed, f"{backbone} | {trials} | {sum(rates):.4g}")
    precision = train.resolve_precision(args.precision, args.device)
    write_tables(args.readme, "gpu" if cuda else "gpu (CPU mode)",
                 f"{line}. {args.tile_size} px tiles, train batch {args.batch_size}, {args.steps} steps, precision "
                 f"{precision}, {workers} loader workers; inference {args.infer_batch} tiles x 12 inputs a call. "
                 "Train tiles/s, inference inputs/s.",
                 ("backbone | train: model only | real trial loop | ratio | infer: model only | predict_fragment | "
                  "ratio | peak GiB train / infer", rows),
                 ("loader workers (loader alone) | augmentation | tiles/s", loaders),
                 *([("backbone (packing: K trials at once, CPUs / K - 1 loader workers each on a GPU) | "
                     "trials at once | total train tiles/s", packed)] if packed else []))

if __name__ == "__main__":
    main()
