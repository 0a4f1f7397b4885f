"""Benchmark: does the device wait for the loader and for inference? (`make bench-gpu`; on a CPU a tiny run with one
torch thread). Writes bench/README.md's table "gpu" or "gpu (CPU mode)"; that section says what each column is."""
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench_common import in_fresh_process, parser, run_script, stamp, write_tables  # first: puts the repo on sys.path
from lib import synth
from lib.config import PRESETS, resolve
from lib.data import TileDataset
from lib.infer import predict_fragment
from lib.losses import build_loss
from lib.model import build_model
from lib.store import Store
from lib.trial import TrainStep, resolve_precision, train_epoch, train_loader

FULL = PRESETS["full"]
DEFAULTS = resolve({})  # the tiles and models as a trial of the default recipe has them
SPEC = DEFAULTS.input_spec(DEFAULTS.family)
SETTINGS = {  # per device: the full preset on a GPU, a tiny run on a CPU; packing "": none
    "cuda": dict(backbones=",".join(FULL.backbones), tile_size=FULL.tile_size, stride=FULL.stride, size=1024,
                 batch_size=FULL.batch_size, infer_batches="8,32", steps=60, packing="1,2,4",
                 packing_backbones="resnet34,mit_b2", loader_workers="4,all"),
    "cpu": dict(backbones="tu-mobilenetv3_small_050", tile_size=64, stride=32, size=256, batch_size=4,
                infer_batches="1,4,16", steps=3, packing="1,2", packing_backbones="tu-mobilenetv3_small_050",
                loader_workers="0,1"),
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
    dataset = TileDataset(sorted(Path(args.stores, "train").glob("*.h5")), args.tile_size, args.stride, SPEC,
                          augment=augment, max_depth_shift=DEFAULTS.depth_jitter, on_device=args.device == "cuda")
    return train_loader(dataset, args.batch_size, args.batch_size * args.steps, workers, args.device)


def new_step(args, backbone):
    model = build_model(backbone, SPEC.channels, family=SPEC.family).to(args.device, memory_format=args.layout)
    return TrainStep(model, FULL.lr, 10**6, resolve_precision(args.precision, args.device), args.compile)


def loop_rate(args, backbone, workers, step=None):
    """Train tiles/s of the real trial loop (lib.trial's train_loader with augmentation, train_epoch), with `step`
    or a new one; also what each of K packed trials runs, in a fresh process of its own."""
    step, batches, loss_fn = step or new_step(args, backbone), loader(args, workers), build_loss().to(args.device)
    return args.batch_size * args.steps * best_rate(args, lambda: train_epoch(step, batches, loss_fn,
                                                                                    args.device), 1)


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


def train_rates(args, backbone, workers):
    """Training's row of one backbone: model-only steps on tensors already on the device against the real loop."""
    peak_gib(args)
    step, loss_fn = new_step(args, backbone), build_loss().to(args.device)
    shape = (args.batch_size, SPEC.channels, args.tile_size, args.tile_size)
    images = torch.rand(shape, device=args.device).contiguous(memory_format=args.layout)
    labels = (torch.rand(shape[0], 1, *shape[2:], device=args.device) > 0.8).float()
    model_only = args.batch_size * best_rate(args, lambda: step(images, labels, loss_fn), args.steps)
    loop = loop_rate(args, backbone, workers, step)
    return f"{backbone} | {model_only:.4g} | {loop:.4g} | **{loop / model_only:.2f}** | {peak_gib(args):.1f}"


def infer_rates(args, backbone, batch):
    """Inference's row of one backbone and batch (tiles a call, 12 inputs each): model-only calls against
    lib.infer.predict_fragment (rot90 TTA x 3 views: depth shifts or triplets) on a test store, in model inputs/s."""
    model = build_model(backbone, SPEC.channels, family=SPEC.family).to(args.device, memory_format=args.layout).eval()
    inputs = torch.rand(12 * batch, SPEC.channels, args.tile_size, args.tile_size, device=args.device)
    inputs = inputs.contiguous(memory_format=args.layout)
    with torch.inference_mode(), torch.autocast(args.device, enabled=args.device == "cuda"):
        model_only = len(inputs) * best_rate(args, lambda: torch.sigmoid(model(inputs).float()), args.steps)
    store = Store(sorted(Path(args.stores, "test").glob("*.h5"))[0])
    fragment = 12 * len(store.tiles(args.tile_size, args.stride)) * best_rate(args, lambda: predict_fragment(
        model, store, args.tile_size, args.stride, batch, spec=SPEC, device=args.device), 1)
    return (f"{backbone} | {batch} | {model_only:.4g} | {fragment:.4g} | **{fragment / model_only:.2f}** | "
            f"{peak_gib(args):.1f}")


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = parser(__doc__, dict(**SETTINGS[device], rounds=2, precision="auto", compile=False))
    options.add_argument("--device", default=device, choices=SETTINGS)
    options.set_defaults(**SETTINGS[options.parse_known_args()[0].device])  # --device cpu on a GPU: the CPU defaults
    args = options.parse_args()
    cuda, cpus = args.device == "cuda", len(os.sched_getaffinity(0))
    if not cuda:  # one torch thread, here and in the packed trials' processes: on a shared CPU more spin (README)
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    line = stamp(torch.cuda.get_device_name() if cuda else "no GPU")
    args.layout = torch.channels_last if cuda else torch.contiguous_format
    workers = cpus - 1 if cuda else 0  # one trial on the whole machine, as Ray would give it
    trains, infers, loaders, packed = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        synth.generate(Path(tmp) / "synth", size=args.size, seed=0, num_slices=40, progress=False)  # stores keep 24:40
        args.stores = str(Path(tmp) / "stores")
        run_script("prepare.py", ["--data", Path(tmp) / "synth", "--out", args.stores, "--ids", "1,2,a",
                                  "--tile-size", args.tile_size, "--stride", args.stride])
        for n in (cpus - 1 if n == "all" else int(n) for n in args.loader_workers.split(",")):
            for augment in (True, False):
                batches = loader(args, n, augment)
                rate = args.batch_size * args.steps * best_rate(args, lambda: sum(1 for _ in batches), 1)
                keep(loaders, f"{n} | {'yes' if augment else 'no'} | {rate:.4g}")
        for backbone in args.backbones.split(","):
            keep(trains, train_rates(args, backbone, workers))
            for batch in map(int, args.infer_batches.split(",")):
                keep(infers, infer_rates(args, backbone, batch))
        for backbone in args.packing_backbones.split(",") if args.packing else []:
            for trials in map(int, args.packing.split(",")):
                each = max(0, cpus // trials - 1) if cuda else 0  # loader workers of each trial
                with ThreadPoolExecutor(trials) as pool:
                    rates = pool.map(lambda _: in_fresh_process(loop_rate, args, backbone, each), range(trials))
                    keep(packed, f"{backbone} | {trials} | {sum(rates):.4g}")
    write_tables(args.readme, "gpu" if cuda else "gpu (CPU mode)",
                 f"{line}. {args.tile_size} px tiles, train batch {args.batch_size}, {args.steps} steps, precision "
                 f"{resolve_precision(args.precision, args.device)}, {workers} loader workers.",
                 ("backbone | train tiles/s: model only | real trial loop | ratio | peak GiB", trains),
                 ("backbone | inference batch (tiles of 12 inputs) | model inputs/s: model only | predict_fragment | "
                  "ratio | peak GiB", infers),
                 ("loader workers (loader alone) | augmentation | tiles/s", loaders),
                 *([("backbone (packing: K trials at once, CPUs / K - 1 loader workers each on a GPU) | "
                     "trials at once | total train tiles/s", packed)] if packed else []))


if __name__ == "__main__":
    main()
