"""Benchmark submit.py's inference (`make bench-submit`); writes its table into bench/README.md, "## submit".

Speed: lib.infer.predict_fragment as submit.py calls it (rot90 x4 TTA and 3 triplets: 12 model inputs a tile) on
one synthetic test fragment with one random-weight model, at each torch thread count and batch size (tiles a
model call), in megapixels of fragment per wall second and per CPU second. Memory: peak RSS (VmHWM) of submit.main
on one test fragment at each size, and before it (imports and one model). Each measurement is a fresh process.

    python bench/bench_submit.py [--speed-size 192] [--rss-sizes 512,2048] [--threads 1,2] [--batches 1,4,16]
"""
import json
import tempfile
import time
from pathlib import Path

from bench_common import machine, main_or_child, maxrss_mb, parser, run_child, write_fragment, write_table

BACKBONE = "tu-mobilenetv3_small_050"
TILE, STRIDE = 64, 32  # the demo preset's tiles, what CPU runs use
SLICES = 40  # enough for the stores' default slices 24:40


def child_speed(store_path, model_path, threads, batches):
    import torch

    from lib.infer import predict_fragment
    from lib.model import load_model_file
    from lib.store import Store

    torch.set_num_threads(threads)
    store, (model, _) = Store(store_path), load_model_file(model_path)  # as submit.py loads it
    megapixels = store.shape[0] * store.shape[1] / 1e6
    predict_fragment(model, store, TILE, STRIDE, batch_size=batches[0])  # warm-up: first calls allocate and tune
    rates = {}
    for batch in batches:
        wall, cpu = time.perf_counter(), time.process_time()
        predict_fragment(model, store, TILE, STRIDE, batch_size=batch)
        rates[batch] = (megapixels / (time.perf_counter() - wall), megapixels / (time.process_time() - cpu))
    return rates


def child_rss(run, stores, tta):
    import torch

    import submit
    from lib.model import load_model_file

    torch.set_num_threads(1)  # memory does not depend on it; two threads contend with other work on 2 cores
    load_model_file(next(Path(run).glob("models/*/*.pt")))
    before, started = maxrss_mb(), time.perf_counter()
    submit.main(["--run", run, "--stores", stores, *([] if tta else ["--no-tta", "--no-triplets"])])
    return {"rss_mb": maxrss_mb(), "before_mb": before, "seconds": time.perf_counter() - started}


def make_fragment(folder, size):
    """folder/stores/test/frag.h5: a size x size synthetic test fragment's store."""
    from lib.fragments import Fragment
    from lib.store import write_store

    write_fragment(folder / "data" / "test" / "frag", size, size, SLICES, labels=False)
    write_store(Fragment.open(folder / "data", "test", "frag"), folder / "stores" / "test" / "frag.h5",
                tile_size=TILE, stride=STRIDE, progress=False)
    return folder / "stores"


def make_run(folder):
    """A run folder submit.py accepts: one random-weight model (seed 0), absolute threshold 0.5."""
    import torch

    from lib.model import build_model, model_config, save_model_file

    torch.manual_seed(0)
    path = folder / "models" / BACKBONE / "fold-1.pt"
    save_model_file(path, build_model(BACKBONE), config=model_config(BACKBONE, 3), fold="1", tile_size=TILE,
                    stride=STRIDE)
    member = {"backbone": BACKBONE, "weight": 1.0, "models": [str(path.relative_to(folder))], "tile_size": TILE,
              "stride": STRIDE}
    (folder / "ensemble.json").write_text(json.dumps({"members": [member], "threshold": {"mode": "absolute",
                                                                                         "value": 0.5}}))
    return folder


def main():
    options = parser(__doc__)
    options.add_argument("--speed-size", type=int, default=192, help="fragment side for the speed table")
    options.add_argument("--rss-sizes", default="512,2048", help="fragment sides for peak RSS (TTA also at the first)")
    options.add_argument("--threads", default="1,2", help="torch thread counts")
    options.add_argument("--batches", default="1,4,16", help="batch sizes, in tiles")
    args = options.parse_args()
    header, started = machine(), time.time()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as work:
        run = make_run(Path(work) / "run")
        stores = make_fragment(Path(work) / "speed", args.speed_size)
        speed = ["| " + " | ".join([t] + [f"{wall:.4f} / {cpu:.4f}" for wall, cpu in run_child(
            __file__, "speed", stores / "test" / "frag.h5", next(run.glob("models/*/*.pt")), int(t), batches).values()])
            + " |" for t in args.threads.split(",")]
        rss = []
        for index, size in enumerate(int(s) for s in args.rss_sizes.split(",")):
            stores = make_fragment(Path(work) / f"rss{size}", size)
            for tta in (False, True) if index == 0 else (False,):
                r = run_child(__file__, "rss", run, stores, tta)
                rss.append(f"| {size} x {size} | {'yes' if tta else 'no'} | {r['rss_mb']:.0f} | {r['before_mb']:.0f} "
                           f"| {r['rss_mb'] - r['before_mb']:.0f} | {r['seconds']:.0f} |")
    write_table(args.readme, "submit", "\n".join([
        f"`python bench/bench_submit.py --speed-size {args.speed_size} --rss-sizes {args.rss_sizes} --threads "
        f"{args.threads} --batches {args.batches}`, {time.strftime('%Y-%m-%d')}, {header}; {time.time() - started:.0f} s "
        f"in all. {BACKBONE}, {TILE} px tiles, stride {STRIDE}.", "",
        "| torch threads | " + " | ".join(f"Mpx/s wall / CPU, batch {b}" for b in batches) + " |",
        "|---" * (len(batches) + 1) + "|", *speed, "",
        "| fragment | TTA + triplets | peak RSS MiB | before MiB | growth MiB | seconds |", "|---|---|---|---|---|---|",
        *rss]))


if __name__ == "__main__":
    main_or_child(main, {"speed": child_speed, "rss": child_rss})
