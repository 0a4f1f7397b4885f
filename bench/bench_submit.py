"""Benchmark submit.py's inference (`make bench-submit`): predict_fragment's speed per torch thread count and batch
size, submit.main's peak RSS per fragment size, each in a fresh process; writes bench/README.md's table "submit"."""
import tempfile
import time
from pathlib import Path

import torch

from bench_common import command, in_fresh_process, maxrss_mb, parser, stamp, write_fragment, write_tables
import submit
from lib.fragments import Fragment
from lib.infer import predict_fragment
from lib.model import build_model, load_model_file, model_config, save_model_file
from lib.runs import write_json
from lib.store import Store, write_store

# speed: the fragment side, torch threads and batches (tiles a call); peak RSS: fragment sides (with TTA at the first)
SETTINGS = dict(speed_size=192, rss_sizes="512,2048", threads="1,2", batches="1,4,16")
BACKBONE = "tu-mobilenetv3_small_050"
TILE, STRIDE = 64, 32  # the demo preset's tiles, what CPU runs use


def child_speed(stores, model_file, threads, batches):
    torch.set_num_threads(threads)
    store, (model, _) = Store(stores / "test" / "frag.h5"), load_model_file(model_file)  # as submit.py loads it
    megapixels = store.shape[0] * store.shape[1] / 1e6
    predict_fragment(model, store, TILE, STRIDE, batch_size=batches[0])  # warm-up: first calls allocate and tune
    cells = [str(threads)]
    for batch in batches:
        wall, cpu = time.perf_counter(), time.process_time()
        predict_fragment(model, store, TILE, STRIDE, batch_size=batch)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        cells.append(f"{megapixels / wall:.4f} / {megapixels / cpu:.4f}")
    return " | ".join(cells)


def child_rss(run, model_file, stores, tta):
    torch.set_num_threads(1)  # memory does not depend on it; two threads contend with other work on 2 cores
    load_model_file(model_file)
    before, started = maxrss_mb(), time.perf_counter()
    submit.main(["--run", str(run), "--stores", str(stores), *([] if tta else ["--no-tta", "--no-triplets"])])
    peak = maxrss_mb()
    return f"{peak:.0f} | {before:.0f} | {peak - before:.0f} | {time.perf_counter() - started:.0f}"


def make_stores(folder, size):
    """folder/stores/test/frag.h5: a size x size synthetic test fragment's store (40 slices: the default 24:40)."""
    write_fragment(folder / "data" / "test" / "frag", size, size, 40, labels=False)
    write_store(Fragment.open(folder / "data", "test", "frag"), folder / "stores" / "test" / "frag.h5",
                tile_size=TILE, stride=STRIDE, progress=False)
    return folder / "stores"


def main():
    args = parser(__doc__, SETTINGS).parse_args()
    line, started, batches = stamp(command(args, SETTINGS)), time.time(), [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as work:
        run = Path(work) / "run"  # one random-weight model (seed 0), absolute threshold 0.5
        model_file = run / "models" / BACKBONE / "fold-1.pt"
        torch.manual_seed(0)
        save_model_file(model_file, build_model(BACKBONE), config=model_config(BACKBONE, 3), fold="1",
                        tile_size=TILE, stride=STRIDE)
        member = dict(backbone=BACKBONE, weight=1.0, models=[str(model_file.relative_to(run))], tile_size=TILE,
                      stride=STRIDE)
        write_json(run / "ensemble.json", {"members": [member], "threshold": {"mode": "absolute", "value": 0.5}})
        stores = make_stores(Path(work) / "speed", args.speed_size)
        speed = [in_fresh_process(child_speed, stores, model_file, int(t), batches) for t in args.threads.split(",")]
        rss = []
        for index, size in enumerate(int(s) for s in args.rss_sizes.split(",")):
            stores = make_stores(Path(work) / f"rss{size}", size)
            for tta in (False, True) if index == 0 else (False,):
                cells = in_fresh_process(child_rss, run, model_file, stores, tta)
                rss.append(f"{size} x {size} | {'yes' if tta else 'no'} | {cells}")
    write_tables(args.readme, "submit", f"{line}; {time.time() - started:.0f} s in all. {BACKBONE}, {TILE} px tiles, "
                 f"stride {STRIDE}.", ("torch threads | " + " | ".join(f"Mpx/s wall / CPU, batch {b}" for b in batches),
                                       speed),
                 ("fragment | TTA + triplets | peak RSS MiB | before MiB | growth MiB | seconds", rss))


if __name__ == "__main__":
    main()
